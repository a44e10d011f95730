"""The DeepSpeed LLM recipe on tiny models: it learns, writes a loadable chat-model directory and
its logs, resumes to exactly the uninterrupted losses, does LoRA under ZeRO-3, and runs as two
CPU processes (gloo) through the ``deepspeed`` launcher with the same checkpoint format."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_pipelines.shapes import ShapesConfig
from train_scripts.deepspeed_runtime import DeepSpeedCheckpointer
from train_scripts.runtime import read_jsonl
from train_scripts.train_llm import LLMTrainConfig, train_llm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "llm_adapters"))
import llm_tiny  # noqa: E402 — the llm_adapters tests' tiny builders

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def seed_tok(tmp_path_factory) -> Path:
    return llm_tiny.build_seed_tokenizer_dir(tmp_path_factory.mktemp("seedtok"), decoder=False)


def _cfg(out: Path, seed_tok: Path, **kw) -> LLMTrainConfig:
    base = dict(out=str(out), seed_tokenizer=str(seed_tok), cache_dir=str(out.parent / "cache"),
                shapes=ShapesConfig(image_size=32), n_train=96, n_val=16, preset=llm_tiny.tiny_preset(),
                text_vocab_size=400, seq_len=128, micro_batch=2, pack_window=32, steps=8, lr=3e-3, warmup=2,
                log_every=1, ckpt_every=4, precision="fp32", progress=False, tensorboard=True)
    base.update(kw)
    return LLMTrainConfig.from_dict(base)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(out / "log.jsonl") if "loss" in r]


def test_full_run_learns_and_saves_a_chat_model(tmp_path, seed_tok):
    from llm_adapters.chat_model import load_chat_model

    out = tmp_path / "run"
    metrics = train_llm(_cfg(out, seed_tok, steps=24, ckpt_every=100, precision="bf16"))
    losses = _losses(out)
    assert len(losses) == 24 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert {"val_caption_loss", "val_generation_loss", "tokens_per_s"} <= set(metrics)
    assert (out / "loss.png").is_file() and (out / "metrics.json").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    # The chat-model directory holds the fp32 master weights of the last step (not DeepSpeed's bf16 copy).
    model, processor = load_chat_model(out / "model", load_vision=False)
    final = DeepSpeedCheckpointer(out / "checkpoints").latest()
    state = load_file(str(final / "trainable.safetensors"))
    own = model.state_dict()
    assert all(own[k].dtype == torch.float32 and torch.equal(own[k], v) for k, v in state.items())
    assert processor.vocab.codebook_size == llm_tiny.K and (out / "model" / "seed_tokenizer").is_dir()
    # … and records the Shapes world it was trained on, for `seed eval` (under the name `seed llm merge` copies)
    from llm_adapters.chat_model import TRAINING_WORLD_FILE

    assert ShapesConfig.from_yaml(out / "model" / TRAINING_WORLD_FILE) == ShapesConfig(image_size=32)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, seed_tok, finetune):
    # LoRA with dropout: the resumed run must also restore each process's RNG.
    kw = dict(n_val=0, finetune=finetune, lora={"r": 4, "alpha": 8, "dropout": 0.2}, precision="bf16")
    a, b = tmp_path / "a", tmp_path / "b"
    train_llm(_cfg(a, seed_tok, **kw))
    assert train_llm(_cfg(b, seed_tok, stop_after=3, **kw)) == {}
    assert len(_losses(b)) == 3 and not (b / "model").exists()
    train_llm(_cfg(b, seed_tok, **kw))
    assert len(_losses(a)) == 8 and _losses(a) == _losses(b)
    name = "adapter/adapter_model.safetensors" if finetune == "lora" else "model.safetensors"
    wa, wb = load_file(str(a / "model" / name)), load_file(str(b / "model" / name))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_under_zero3_trains_only_the_adapter(tmp_path, seed_tok):
    from llm_adapters.chat_model import load_chat_model

    out = tmp_path / "lora"
    train_llm(_cfg(out, seed_tok, finetune="lora", deepspeed="zero3", steps=4, n_val=0, precision="bf16",
                   lora={"r": 4, "alpha": 8, "dropout": 0.0}))
    assert (out / "model" / "adapter" / "adapter_model.safetensors").is_file()
    assert ShapesConfig.from_yaml(out / "model" / "shapes_config.yaml").image_size == 32
    base = load_file(str(out / "model" / "model.safetensors"))
    model, _ = load_chat_model(out / "model", load_vision=False)
    lora_b = [v for k, v in model.state_dict().items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: trained
    merged, _ = load_chat_model(out / "model", load_vision=False, merge=True)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base[q])


def _layout(run: Path) -> dict:
    ckpt = DeepSpeedCheckpointer(run / "checkpoints").latest()
    # Per-process files (RNG, DeepSpeed's optimizer partitions) differ in number, not in kind.
    files = sorted({re.sub(r"rank_?\d+", "rank_N", str(p.relative_to(ckpt))) for p in ckpt.rglob("*") if p.is_file()})
    weights = load_file(str(run / "model" / "model.safetensors"))
    return {"ckpt": files, "model": sorted(p.name for p in (run / "model").iterdir()),
            "weights": {k: tuple(v.shape) for k, v in weights.items()}}


def test_two_processes_with_the_deepspeed_launcher(tmp_path, seed_tok):
    one, two = tmp_path / "one", tmp_path / "two"
    train_llm(_cfg(one, seed_tok, steps=4, n_val=0))
    cfg = _cfg(two, seed_tok, steps=4, n_val=0, micro_batch=1)
    cfg.to_yaml(tmp_path / "two.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    deepspeed = Path(sys.executable).with_name("deepspeed")
    from train_scripts.deepspeed_runtime import _free_port

    proc = subprocess.run([str(deepspeed), "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
                           "train_scripts.train_llm", "--config", str(tmp_path / "two.yaml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _layout(one) == _layout(two)
    meta = json.loads((DeepSpeedCheckpointer(two / "checkpoints").latest() / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert sorted(p.name for p in DeepSpeedCheckpointer(two / "checkpoints").latest().glob("rng_rank*.pt")) == [
        "rng_rank0.pt", "rng_rank1.pt"]
    # Same global batch (2 rows): the 2-process losses track the 1-process ones.
    l1, l2 = _losses(one), _losses(two)
    assert len(l2) == 4 and abs(l1[0] - l2[0]) < 0.05 * l1[0]


def test_seed_llm_train_cli(tmp_path, seed_tok, capsys):
    from train_scripts.cli import main

    cfg = _cfg(tmp_path / "cli", seed_tok, steps=2, n_val=8)
    cfg.to_yaml(tmp_path / "llm.yaml")
    assert main(["llm", "train", "--config", str(tmp_path / "llm.yaml"), "--lr", "0.002"]) == 0
    assert "val_caption_loss" in capsys.readouterr().out
    saved = LLMTrainConfig.from_yaml(tmp_path / "cli" / "train_config.yaml")
    assert saved.lr == 0.002 and saved.steps == 2
    assert main(["llm", "train", "--config", str(tmp_path / "llm.yaml"), "--deepspeed", "zero9"]) == 2


@pytest.mark.slow
def test_zero3_offload(tmp_path, seed_tok):
    """ZeRO-3 with optimizer and parameters offloaded to CPU (DeepSpeedCPUAdam, JIT-built on first use)."""
    out = tmp_path / "offload"
    train_llm(_cfg(out, seed_tok, deepspeed="zero3_offload", steps=3, n_val=0, precision="bf16"))
    assert len(_losses(out)) == 3 and (out / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("targets", ["all", "canonical", "ordered"])
def test_caption_targets_choose_what_the_model_says(tmp_path, seed_tok, targets):
    from seedtok.tokenizer import SeedTokenizer
    from train_scripts.runtime import DistInfo
    from train_scripts.train_llm import load_train_data

    cfg = _cfg(tmp_path / "run", seed_tok, caption_targets=targets)
    tok = SeedTokenizer.from_pretrained(seed_tok, load_vision=True)
    data = load_train_data(cfg, tok, DistInfo())
    assert len(data.codes) == len(data.texts) == 96
    if targets == "all":
        assert data.answers is None
    else:
        canonical = [ts[0] for ts in data.texts]
        assert data.answers == canonical if targets == "canonical" else data.answers != canonical
        if targets == "ordered":
            assert all((" right of " not in a) and (" below " not in a) for a in data.answers)
            from eval.shapes_scorer import parse_caption, scene_key

            # The same scene as the canonical caption, every time.
            assert all(scene_key(parse_caption(a)) == scene_key(parse_caption(c))
                       for a, c in zip(data.answers, canonical))
    with pytest.raises(Exception, match="caption_targets"):
        _cfg(tmp_path / "bad", seed_tok, caption_targets="every")


def test_bf16_on_a_cpu_without_native_bf16_runs_emulated_with_a_warning(tmp_path, seed_tok, monkeypatch):
    """AVX2-only CPUs compute bf16 correctly, only slowly: an explicit bf16 trains (warned); auto picks fp32."""
    import train_scripts.train_llm as recipe

    monkeypatch.setattr(recipe, "bf16_supported", lambda device: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        train_llm(_cfg(tmp_path / "bf16", seed_tok, steps=2, n_val=0, precision="bf16"))
    assert len(_losses(tmp_path / "bf16")) == 2
    assert json.loads((tmp_path / "bf16" / "ds_config.json").read_text())["bf16"]["enabled"] is True
