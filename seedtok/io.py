"""Checkpoint I/O: atomic writes and strict loads.

Every weight file the toolkit writes is safetensors, written to a temporary name and renamed into
place, so an interrupted save never leaves a half-written checkpoint behind. Every load compares
the key set *and* shapes against the model first and raises a one-line
:class:`~seedtok.errors.CheckpointError` naming the first offending keys — never a silent
``strict=False``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from seedtok.errors import CheckpointError

_SHOW = 3  # how many offending keys an error message lists


def _fmt(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


# ---- atomic writes ------------------------------------------------------------------------------


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with _write_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(data, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _write_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(obj, f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """A failed write (disk full, file too large, read-only, quota) is a one-line CheckpointError;
    the atomic rename means whatever ``path`` held before is untouched."""
    try:
        yield
    except (OSError, SafetensorError) as e:  # safetensors reports I/O failures as SafetensorError
        reason = (e.strerror if isinstance(e, OSError) else None) or str(e).strip().split("\n")[0]
        raise CheckpointError(f"cannot write {path}: {reason} (any previous version is kept)") from None


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` only if the block succeeds.

    The temporary directory is a sibling of ``path`` (same filesystem), so the final step is a
    rename; an existing ``path`` is moved aside first and deleted after the swap.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _write_errors(path):  # whatever the block writes (a disk fills up) fails as one line
            yield tmp
            old = None
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except OSError:
                if old is not None:  # put the previous version back before reporting
                    os.replace(old / path.name, path)
                    shutil.rmtree(old, ignore_errors=True)
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---- reading ------------------------------------------------------------------------------------


def load_safetensors(path: str | os.PathLike, select: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Read the tensors of one safetensors file (only the keys ``select`` accepts, if given)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if select is None or select(k)}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat state dict from ``.safetensors``, or from ``.pt/.pth/.bin`` via ``weights_only`` torch.load.

    A pickle holding ``{"model": sd}`` or ``{"state_dict": sd}`` (LAVIS / Lightning style) is
    unwrapped. Non-tensor values are an error.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message goes on to suggest weights_only=False — exactly what must not be done
        # with a downloaded file; say what the file is instead.
        what = ("it pickles Python objects other than tensors" if "GLOBAL" in str(e)
                else "not a torch checkpoint, or a corrupt one")
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {what}; "
                              "convert trusted weights to safetensors") from None
    except Exception as e:  # torch.load raises many exception types; report them as one
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be loaded with torch.load(weights_only=True): {first}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: non-tensor entries in the state dict: {_fmt(sorted(map(str, bad)))}")
    return dict(obj)


def load_hf_tensors(model_dir: str | os.PathLike, select: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Read the tensors ``select`` accepts from a Hugging Face model directory.

    Handles a single ``model.safetensors`` and a sharded one (``model.safetensors.index.json``),
    opening only the shards that hold selected keys — a BLIP-2 directory's language model is
    never read.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory not found: {model_dir}")
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise CheckpointError(f"{index}: not a valid safetensors index") from None
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            if select(key):
                shards.setdefault(shard, []).append(key)
        out: dict[str, torch.Tensor] = {}
        for shard, keys in shards.items():
            wanted = set(keys)
            out.update(load_safetensors(model_dir / shard, select=wanted.__contains__))
        return out
    if single.is_file():
        return load_safetensors(single, select=select)
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


# ---- strict checks ------------------------------------------------------------------------------


def check_state_dict(expected: Mapping[str, Any], got: Mapping[str, Any], what: str) -> None:
    """Raise CheckpointError unless ``got`` has exactly the keys of ``expected`` with the same shapes.

    Values are anything with a ``.shape`` (tensors, meta tensors) or shape tuples.
    """

    def shape(v: Any) -> tuple[int, ...]:
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    missing = sorted(set(expected) - set(got))
    if missing:
        raise CheckpointError(f"{what}: missing {len(missing)} weight(s): {_fmt(missing)}")
    unexpected = sorted(set(got) - set(expected))
    if unexpected:
        raise CheckpointError(f"{what}: {len(unexpected)} unexpected weight(s): {_fmt(unexpected)}")
    wrong = [
        f"{k} {list(shape(got[k]))} vs expected {list(shape(expected[k]))}"
        for k in sorted(expected)
        if shape(got[k]) != shape(expected[k])
    ]
    if wrong:
        raise CheckpointError(f"{what}: {len(wrong)} weight(s) with the wrong shape: {_fmt(wrong)}")


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Check ``state_dict`` against ``module`` (keys and shapes), then load it with ``strict=True``."""
    check_state_dict(module.state_dict(), state_dict, what)
    module.load_state_dict(state_dict, strict=True)
