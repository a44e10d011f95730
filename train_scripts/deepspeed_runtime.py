"""DeepSpeed for the LLM recipe: shipped ZeRO configs, their ``"auto"`` values, process groups, checkpoints.

* :func:`load_ds_config` — a shipped config by name (``zero2``, ``zero3``, ``zero3_offload``;
  ``train_scripts/configs/*.json``, package data) or a JSON file. The shipped files use ``"auto"``
  exactly where the Hugging Face Trainer fills values in (batch sizes, optimizer params, clipping,
  ``bf16.enabled``, bucket sizes), so the same file works with ``TrainingArguments(deepspeed=…)``.
* :func:`fill_auto` — what the Trainer does for those keys, for recipes that call
  ``deepspeed.initialize`` themselves.
* :func:`init_deepspeed_distributed` — joins the group a launcher (``deepspeed``, ``torchrun``) set
  up, or creates a one-process group, so a plain ``python`` run needs no environment variables.
  gloo on CPU (DeepSpeed's CPU accelerator would otherwise ask for oneCCL), NCCL on GPU. On CPU
  it skips DeepSpeed's shared-memory all-reduce kernel (an inference-only C++ op JIT-built at every
  group start) and clears torch-extension build locks that a killed build left behind.
* :class:`DeepSpeedCheckpointer` — atomic, resumable checkpoints of a DeepSpeed engine.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from seedtok.errors import CheckpointError, ConfigError
from train_scripts.runtime import DistInfo, _rng_state, _set_rng_state, barrier, latest_step_dir

SHIPPED_CONFIGS = ("zero2", "zero3", "zero3_offload")


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def shipped_config_path(name: str) -> Path:
    """Path of a shipped DeepSpeed config (``zero2`` / ``zero3`` / ``zero3_offload``)."""
    if name not in SHIPPED_CONFIGS:
        raise ConfigError(f"unknown DeepSpeed config '{name}' (shipped: {', '.join(SHIPPED_CONFIGS)}; or a .json path)")
    return Path(str(resources.files("train_scripts") / "configs" / f"{name}.json"))


def load_ds_config(spec: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config from a shipped name, a JSON path, or a dict (copied)."""
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    spec = str(spec)
    path = shipped_config_path(spec) if spec in SHIPPED_CONFIGS else Path(spec)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config not found: {spec} (shipped: {', '.join(SHIPPED_CONFIGS)})")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    return cfg


def _walk(cfg: Any, prefix: str = ""):
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], cfg


def auto_keys(cfg: dict[str, Any]) -> list[str]:
    """Dotted keys whose value is still ``"auto"``."""
    return [k for k, v in _walk(cfg) if v == "auto"]


def _set_if_auto(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.get(p)
        if not isinstance(node, dict):
            return
    if node.get(leaf) == "auto":
        node[leaf] = value


def fill_auto(cfg: dict[str, Any], *, micro_batch: int, grad_accum: int, world_size: int, lr: float,
              betas: tuple[float, float], eps: float, weight_decay: float, grad_clip: float, bf16: bool,
              hidden_size: int) -> dict[str, Any]:
    """Replace ``"auto"`` the way ``transformers``' Trainer does; returns a new config.

    An ``"auto"`` left anywhere else, or an explicit value contradicting the recipe (a batch size
    or precision the run does not use), is a ConfigError naming the key.
    """
    cfg = copy.deepcopy(cfg)
    values = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "optimizer.params.lr": lr,
        "optimizer.params.betas": list(betas),
        "optimizer.params.eps": eps,
        "optimizer.params.weight_decay": weight_decay,
        "bf16.enabled": bf16,
        "fp16.enabled": False,
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in values.items():
        _set_if_auto(cfg, key, value)
    left = auto_keys(cfg)
    if left:
        raise ConfigError(f"DeepSpeed config key '{left[0]}' is \"auto\" but this recipe does not fill it")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if key in cfg and cfg[key] != values[key]:
            raise ConfigError(f"DeepSpeed config {key}={cfg[key]} contradicts the recipe's {values[key]} "
                              "(set it to \"auto\")")
    if bool(cfg.get("bf16", {}).get("enabled", False)) != bf16:
        raise ConfigError(f"DeepSpeed config bf16.enabled={cfg['bf16']['enabled']} contradicts precision "
                          f"{'bf16' if bf16 else 'fp32'} (set it to \"auto\")")
    if cfg.get("fp16", {}).get("enabled") is True and not torch.cuda.is_available():
        raise ConfigError("DeepSpeed config enables fp16, which is not supported on CPU (use bf16)")
    return cfg


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A JIT build of a C++ op (DeepSpeed's CPU Adam, for instance) takes a minute or two here; a lock
# file older than this was left by a build that was killed.
STALE_BUILD_LOCK_SECONDS = 15 * 60


def clear_stale_extension_locks(max_age: float = STALE_BUILD_LOCK_SECONDS) -> list[Path]:
    """Remove torch-extension build locks older than ``max_age`` seconds; return what was removed.

    ``torch.utils.cpp_extension`` guards each JIT build with a ``lock`` file in the extension's build
    directory and waits, without a timeout, for it to disappear. A build killed mid-way (Ctrl-C,
    an OOM kill, a machine restart) leaves the file behind, and every later run that needs the op
    (DeepSpeed's CPU Adam for ``zero3_offload``) then hangs silently. torch has no stale-lock
    handling, so we clear locks that no live build can still hold.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed: list[Path] = []
    now = time.time()
    # <root>/<op>/lock with TORCH_EXTENSIONS_DIR, <root>/<py…_cpu|cu…>/<op>/lock by default.
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            if now - lock.stat().st_mtime > max_age:
                lock.unlink()
                removed.append(lock)
                print(f"warning: removed a stale torch-extension build lock (left by a killed build): {lock}",
                      file=sys.stderr)
        except FileNotFoundError:  # released by its build meanwhile
            continue
    return removed


def _skip_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory all-reduce kernel on a CPU group.

    DeepSpeed's torch backend compiles that C++ op every time a group starts on the CPU accelerator,
    but only its inference all-reduce uses it; training all-reduces go through gloo. Skipping it
    saves a compile (and the need for a compiler) and a build lock that could hang the run.
    ``deepspeed.ops.__compatible_ops__`` is the table ``build_shm_op`` consults; it is computed once
    and cached, and DeepSpeed skips ops marked incompatible there.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_deepspeed_distributed(device: str = "auto") -> DistInfo:
    """Join (``RANK``/``WORLD_SIZE`` from a launcher) or create (one process) a process group for DeepSpeed."""
    import deepspeed

    use_cuda = (device == "cuda") or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available")
    backend = "nccl" if use_cuda else "gloo"
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    clear_stale_extension_locks()
    if not use_cuda:
        _skip_cpu_shm_comm_op()
    if not dist.is_initialized():
        if launched:
            os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        else:
            # A plain `python` run: a one-process group on a free local port. DeepSpeed's engine
            # still reads LOCAL_RANK from the environment.
            for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
                os.environ.setdefault(k, v)
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
class DeepSpeedCheckpointer:
    """Atomic, resumable checkpoints of a DeepSpeed engine under ``root/step_XXXXXXXX``.

    Layout (the same for any number of processes and any ZeRO stage; only the number of
    optimizer-partition files inside ``deepspeed/`` depends on the world size)::

        step_00000200/trainable.safetensors   gathered trainable weights (LoRA + new rows, or all)
        step_00000200/deepspeed/ds/…          engine.save_checkpoint: module, optimizer partitions,
                                              client LR scheduler
        step_00000200/rng_rank{r}.pt          each process's RNG states (weights_only-safe)
        step_00000200/meta.json               step, world size, data position, config

    Every process writes into ``.tmp-step_…``; after a barrier, rank 0 renames it into place and
    replaces the ``latest`` pointer, so a crash mid-write leaves the previous checkpoint intact.
    Resuming needs the same number of processes (DeepSpeed partitions the optimizer state by rank).
    """

    TAG = "ds"

    def __init__(self, root: str | os.PathLike, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def latest(self) -> Path | None:
        return latest_step_dir(self.root)

    def save(self, engine: Any, info: DistInfo, step: int, *, trainable_state: dict[str, torch.Tensor] | None,
             data_state: dict[str, Any], config: dict[str, Any]) -> Path:
        """Collective: every process must call it. ``trainable_state`` is only read on rank 0."""
        name = f"step_{step:08d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier(info)
        engine.save_checkpoint(str(tmp / "deepspeed"), tag=self.TAG, save_latest=False)
        torch.save(_rng_state(), tmp / f"rng_rank{info.rank}.pt")
        barrier(info)
        if info.is_main:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in (trainable_state or {}).items()},
                      str(tmp / "trainable.safetensors"))
            meta = {"step": step, "world_size": info.world_size, "data": data_state, "config": config}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.root / ".latest.tmp"
            pointer_tmp.write_text(name)
            os.replace(pointer_tmp, self.root / "latest")
            done = sorted(p for p in self.root.glob("step_*") if (p / "meta.json").is_file())
            for old in done[: max(0, len(done) - self.keep)]:
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        barrier(info)
        return final

    def load(self, engine: Any, info: DistInfo, path: Path | None = None) -> tuple[int, dict[str, Any]]:
        """Restore engine (weights, optimizer, scheduler) and this process's RNG; returns ``(step, data_state)``."""
        path = path or self.latest()
        if path is None:
            raise CheckpointError(f"no checkpoint found under {self.root}")
        meta_path = path / "meta.json"
        if not meta_path.is_file() or not (path / "deepspeed" / self.TAG).is_dir():
            raise CheckpointError(f"checkpoint {path} is incomplete")
        meta = json.loads(meta_path.read_text())
        if meta["world_size"] != info.world_size:
            raise CheckpointError(f"checkpoint {path} was written by {meta['world_size']} processes; resume it "
                                  f"with {meta['world_size']}, not {info.world_size}")
        load_path, _ = engine.load_checkpoint(str(path / "deepspeed"), tag=self.TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path / 'deepspeed'}")
        rng_file = path / f"rng_rank{info.rank}.pt"
        try:
            _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
        except Exception as e:
            raise CheckpointError(f"{rng_file} cannot be read safely: {type(e).__name__}") from None
        return int(meta["step"]), meta["data"]

    @staticmethod
    def trainable_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """The gathered trainable weights of a checkpoint directory."""
        return load_file(str(Path(path) / "trainable.safetensors"))


__all__ = [
    "DeepSpeedCheckpointer", "SHIPPED_CONFIGS", "auto_keys", "clear_stale_extension_locks", "fill_auto",
    "init_deepspeed_distributed", "load_ds_config", "shipped_config_path", "zero_stage",
]
