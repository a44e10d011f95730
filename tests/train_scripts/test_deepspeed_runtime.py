"""DeepSpeed configs ("auto" filled like the HF Trainer, contradictions refused) and the TensorBoard
event writer (CRC-32C, record framing)."""

from __future__ import annotations

import json

import pytest

from seedtok.errors import ConfigError
from train_scripts.deepspeed_runtime import (
    SHIPPED_CONFIGS,
    auto_keys,
    fill_auto,
    load_ds_config,
    shipped_config_path,
)
from train_scripts.tensorboard_log import scalar_writer

FILL = dict(micro_batch=4, grad_accum=2, world_size=2, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
            grad_clip=1.0, bf16=True, hidden_size=64)


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_shipped_configs_fill_completely(name):
    raw = load_ds_config(name)
    assert "train_micro_batch_size_per_gpu" in auto_keys(raw) and "bf16.enabled" in auto_keys(raw)
    cfg = fill_auto(raw, **FILL)
    assert auto_keys(cfg) == []
    assert cfg["train_batch_size"] == 16 and cfg["optimizer"]["params"]["lr"] == 1e-3
    assert cfg["bf16"]["enabled"] is True and cfg["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert cfg["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)
    assert shipped_config_path(name).is_file()  # package data next to the recipe


def test_bad_configs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown DeepSpeed config|not found"):
        load_ds_config("zero9")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(bad)
    cfg = load_ds_config("zero2")
    cfg["mystery"] = "auto"
    with pytest.raises(ConfigError, match="'mystery' is \"auto\""):
        fill_auto(cfg, **FILL)
    cfg = load_ds_config("zero2")
    cfg["train_micro_batch_size_per_gpu"] = 3
    with pytest.raises(ConfigError, match="contradicts"):
        fill_auto(cfg, **FILL)
    cfg = load_ds_config("zero2")
    cfg["bf16"]["enabled"] = False
    with pytest.raises(ConfigError, match="bf16.enabled"):
        fill_auto(cfg, **FILL)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}}))
    assert fill_auto(load_ds_config(path), **{**FILL, "bf16": False})["zero_optimization"]["stage"] == 1


def test_tensorboard_scalars_round_trip(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = scalar_writer(tmp_path)
    for step, v in enumerate([2.5, 2.0, 1.25], 1):
        w.add_scalar("train/loss", v, step)
    w.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 2.0), (3, 1.25)]


HF_TRAINER_SCRIPT = """
import os, sys, torch
torch.set_num_threads(1)
for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
             ("MASTER_PORT", sys.argv[2])):
    os.environ[k] = v
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from train_scripts.deepspeed_runtime import shipped_config_path
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, max_position_embeddings=32))
ids = torch.randint(0, 64, (8, 16))
args = TrainingArguments(output_dir=sys.argv[3], per_device_train_batch_size=4, max_steps=2, use_cpu=True,
                         bf16=True, deepspeed=str(shipped_config_path(sys.argv[1])), report_to=[],
                         save_strategy="no", disable_tqdm=True)
out = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids]).train()
print("LOSS", out.training_loss)
"""


@pytest.mark.slow
def test_shipped_config_works_with_the_hf_trainer(tmp_path):
    """The same JSON file serves `TrainingArguments(deepspeed=…)`: the Trainer fills its "auto" values."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from train_scripts.deepspeed_runtime import _free_port

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", HF_TRAINER_SCRIPT, "zero2", str(_free_port()), str(tmp_path)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOSS" in proc.stdout


INIT_SCRIPT = """
import os, sys
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
    os.environ.pop(k, None)
import deepspeed.comm.comm as ds_comm
from train_scripts.deepspeed_runtime import init_deepspeed_distributed
info = init_deepspeed_distributed("cpu")
print("GROUP", info.rank, info.world_size, ds_comm.cdb.shm_comm_op is None)
"""


def test_cpu_group_skips_the_shm_op_and_clears_a_killed_builds_lock(tmp_path):
    """A build lock left by a killed JIT build hung every later DeepSpeed start (torch waits on it with
    no timeout). Starting a CPU group clears a stale lock, leaves a live build's lock alone, and does
    not JIT-build DeepSpeed's inference-only shared-memory op at all."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from train_scripts.deepspeed_runtime import STALE_BUILD_LOCK_SECONDS

    ext = tmp_path / "torch_extensions"
    stale, live = ext / "deepspeed_shm_comm" / "lock", ext / "cpu_adam" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - STALE_BUILD_LOCK_SECONDS - 60
    os.utime(stale, (old, old))

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "TORCH_EXTENSIONS_DIR": str(ext)}
    proc = subprocess.run([sys.executable, "-c", INIT_SCRIPT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GROUP 0 1 True" in proc.stdout
    assert not stale.exists() and live.exists()
    assert "stale torch-extension build lock" in proc.stderr
    assert list((ext / "deepspeed_shm_comm").iterdir()) == []  # nothing was built
