"""What every training recipe needs and none should write again: processes, precision, checkpoints, logs.

* :func:`init_distributed` — one process, or several under ``torchrun`` / the ``deepspeed``
  launcher (env ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, or ``--local_rank``): NCCL on GPUs, gloo on
  CPU.
* :func:`autocast` — bf16 autocast where the device supports it (the fast path on AVX-512 bf16
  CPUs and on GPUs), a no-op for fp32. Never fp16 on CPU.
* :class:`CheckpointManager` — atomic, resumable checkpoints: model weights in safetensors,
  optimizer / scheduler / RNG / data position in a ``torch.save`` file read back with
  ``weights_only=True``; a checkpoint directory is written under a temporary name and renamed
  into place, so a crash mid-write leaves the previous one intact.
* :class:`MetricsLogger` — JSONL log (one row a step) that a loss-curve PNG is drawn from.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from seedtok.errors import CheckpointError


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", backend: str | None = None) -> DistInfo:
    """Join the process group if a launcher started us; otherwise run as a single process.

    ``device``: ``auto`` (CUDA if present, else CPU), ``cpu`` or ``cuda``. The backend defaults to
    NCCL for CUDA and gloo for CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device == "cuda") or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' requested but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def quiet_libraries() -> None:
    """Turn off transformers' per-load / per-save progress bars and advisory warnings (our own bars
    report progress; a failed load raises instead of warning)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / info.world_size)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------
def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # oneDNN has fast bf16 matmuls only with AVX-512 bf16 / AMX; elsewhere bf16 is emulated.
        try:
            return bool(torch.backends.mkldnn.is_available()) and "avx512_bf16" in _cpu_flags()
        except Exception:
            return False
    return False


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 where supported, else fp32. fp16 is refused on CPU (≈2 GFLOP/s here)."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise CheckpointError("fp16 is not supported on CPU (use bf16 or fp32)")
    return precision


def autocast(precision: str, device: torch.device):
    """Autocast context for ``bf16``/``fp16``; nothing for ``fp32``."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate()[1],  # tuple of ints (the Mersenne state) — weights_only-safe
        "python_pos": random.getstate()[2],
        "torch": torch.get_rng_state(),
    }
    np_state = np.random.get_state()
    state["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_pos"] = int(np_state[2])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_step_dir(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` points to, else the newest complete ``root/step_*`` (one with a
    ``meta.json``: e.g. when the pointer write was interrupted); None if there is none."""
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        cand = root / name
        if name.startswith("step_") and "/" not in name and (cand / "meta.json").is_file():
            return cand
    done = sorted(p for p in root.glob("step_*") if (p / "meta.json").is_file())
    return done[-1] if done else None


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.0):
    """LambdaLR factor: linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``.

    Plain ``math`` floats: a numpy scalar in the scheduler state would not load with weights_only=True.
    """
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _free_space(path: Path) -> str:
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown"
    return f"{free / 2**20:,.0f} MiB"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointManager:
    """Atomic, resumable checkpoints under ``root/step_XXXXXXXX`` with a ``latest`` pointer.

    Layout of one checkpoint::

        step_00001000/model.safetensors   trainable weights (safetensors)
        step_00001000/state.pt            optimizer, scheduler, RNG, step, data position, extras
        step_00001000/meta.json           step and the resolved config

    The directory is written as ``.tmp-step_…`` and renamed into place only when complete, then
    ``latest`` is replaced atomically. Old checkpoints beyond ``keep`` are removed afterwards.
    """

    def __init__(self, root: str | os.PathLike, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def latest(self) -> Path | None:
        return latest_step_dir(self.root)

    def save(
        self,
        step: int,
        model_state: dict[str, torch.Tensor],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        extra: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ) -> Path:
        name = f"step_{step:08d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temps()
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
            save_file(tensors, str(tmp / "model.safetensors"))
            state = {
                "step": step,
                "rng": _rng_state(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "extra": extra or {},
            }
            torch.save(state, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": step, "config": config or {}}, indent=1))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            old = None
            if final.exists():  # re-saving a step: move the old copy aside so a crash never leaves neither
                old = self.root / f".old-{name}-{os.getpid()}"
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            pointer_tmp = self.root / f".latest.tmp{os.getpid()}"
            pointer_tmp.write_text(name)
            os.replace(pointer_tmp, self.root / "latest")
        except (OSError, SafetensorError, RuntimeError) as e:
            # Disk full, quota, file too large, read-only: one line, and the previous checkpoint
            # (complete, under its own name) is untouched. safetensors reports I/O failures as
            # SafetensorError and torch.save as RuntimeError ("unexpected pos …"), hence all three.
            shutil.rmtree(tmp, ignore_errors=True)
            reason = (e.strerror if isinstance(e, OSError) else None) or _first_line(e)
            raise CheckpointError(f"cannot write checkpoint {final}: {reason} ({_free_space(self.root)} free); "
                                  f"the previous checkpoint ({self._latest_name()}) is kept") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune(keep_name=name)
        return final

    def _latest_name(self) -> str:
        latest = self.latest()
        return latest.name if latest is not None else "none"

    def _remove_stale_temps(self) -> None:
        """Delete half-written ``.tmp-step_…-PID`` directories of processes that died mid-write."""
        for p in self.root.glob(".tmp-step_*-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)

    def _prune(self, keep_name: str) -> None:
        done = sorted(p for p in self.root.glob("step_*") if (p / "meta.json").is_file())
        for old in done[: max(0, len(done) - self.keep)]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)

    def load(
        self,
        path: Path | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        restore_rng: bool = True,
    ) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
        """Load a checkpoint (default: the latest). Returns ``(step, model_state, extra)``.

        A damaged checkpoint is a one-line CheckpointError naming the file (and the previous
        complete checkpoint, if any, to fall back to by removing the damaged one).
        """
        path = path or self.latest()
        if path is None:
            raise CheckpointError(f"no checkpoint found under {self.root}")
        try:
            return self._load(path, optimizer, scheduler, restore_rng)
        except CheckpointError as e:
            older = [p for p in sorted(self.root.glob("step_*")) if p.name < path.name and (p / "meta.json").is_file()]
            hint = f" (remove it to resume from {older[-1].name})" if older else ""
            raise CheckpointError(f"{e}{hint}") from None

    def _load(self, path: Path, optimizer: Any, scheduler: Any,
              restore_rng: bool) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
        for f in ("model.safetensors", "state.pt", "meta.json"):
            if not (path / f).is_file():
                raise CheckpointError(f"checkpoint {path} is incomplete: missing {f}")
        try:
            model_state = load_file(str(path / "model.safetensors"))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint {path}/model.safetensors is not readable ({_first_line(e)})") from None
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt file, or one holding non-tensor objects
            raise CheckpointError(f"checkpoint {path}/state.pt cannot be read safely: {type(e).__name__}") from None
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "rng" not in state:
            raise CheckpointError(f"checkpoint {path}/state.pt is not a training state (no step / rng)")
        try:
            if optimizer is not None and state.get("optimizer") is not None:
                optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
            if restore_rng:
                _set_rng_state(state["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path}/state.pt does not match this run's optimizer / scheduler "
                                  f"({type(e).__name__}: {_first_line(e)})") from None
        return int(state["step"]), model_state, state.get("extra", {})


def checkpoint_or_stop(ckpt: CheckpointManager, info: DistInfo, *, step: int, start: int, total: int,
                       ckpt_every: int, stop_after: int, module: torch.nn.Module, optimizer: Any,
                       scheduler: Any, config: dict[str, Any], write=print) -> bool:
    """After optimizer step ``step`` (1-based count done): save a periodic checkpoint, and return
    True when ``stop_after`` steps of this run are done (the checkpoint is saved first)."""
    if step >= total:
        return False
    stop = bool(stop_after) and step - start >= stop_after
    if info.is_main and (step % ckpt_every == 0 or stop):
        ckpt.save(step, module.state_dict(), optimizer=optimizer, scheduler=scheduler, config=config)
        if stop:
            write(f"stopped after step {step} (stop_after={stop_after}); re-run to resume")
    if stop and info.distributed:
        barrier(info)
    return stop


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that turns missing / unexpected / mis-shaped keys into one-line errors."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape mismatch {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------
class MetricsLogger:
    """Appends one JSON row per logged step to ``path`` (main process only)."""

    def __init__(self, path: str | os.PathLike | None, enabled: bool = True):
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._t0 = time.perf_counter()

    def rewind(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed or restarted run re-logs them)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if isinstance(v, float) and not math.isfinite(v):
                values[k] = str(v)
        row = {"step": step, "time": round(time.perf_counter() - self._t0, 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                yield json.loads(line)


def plot_loss_curves(log_path: str | os.PathLike, out_png: str | os.PathLike, keys: list[str], title: str = "") -> Path | None:
    """Draw the logged curves with matplotlib if it is installed; return the PNG path or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = list(read_jsonl(log_path))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


class NonFiniteLossError(CheckpointError):
    """Training produced a NaN/inf loss."""


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Raise NonFiniteLossError if ``loss`` holds a NaN/inf, before it reaches backward() and the weights.

    ``step`` is the 1-based number of the optimizer step being taken, the way logs and checkpoints
    count (``step_00000004`` holds the weights after 4 steps; a NaN in the 5th step says "step 5").
    """
    flat = loss.detach().reshape(-1)
    bad = flat[~torch.isfinite(flat)]
    if bad.numel():
        raise NonFiniteLossError(f"non-finite loss ({bad[0].item()}) at step {step}; last checkpoint is kept")


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    box = {"seconds": 0.0}
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - t0
