"""``seed demo``: every stage runs (side by side where it can), writes its marker and metrics, the
chat model and the report; finished stages are reused on re-runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from train_scripts import demo
from train_scripts.cli import main
from train_scripts.demo import DemoConfig, run_demo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "llm_adapters"))
import llm_tiny  # noqa: E402 — the llm_adapters tests' tiny builders

# Real architectures, schedules cut to a few steps: the stages' plumbing, not their quality. Passed
# as the config's schedule overrides (not a patched PRESETS): spawned stage workers must see them.
TINY = {
    "clip": {"steps": 3, "cf_steps": 2, "n_train": 128, "n_val": 32, "batch_size": 32},
    "stage1": {"steps": 3, "n_train": 128, "n_val": 32, "batch_size": 32},
    "stage2": {"steps": 3, "n_train": 128, "n_val": 32, "batch_size": 32},
    "vae": {"vae_steps": 2, "vae_batch_size": 4, "vae_block_out_channels": [16, 16], "vae_latent_channels": 4,
            "n_train": 64},
    "decoder": {"unet_block_out_channels": [16, 32], "unet_attention_levels": [False, True], "steps": 2,
                "batch_size": 4, "n_train": 64, "num_inference_steps": 2, "sample_every": 0},
    "refine": {"steps": 2},
    "llm": {"steps": 3, "n_train": 64, "n_val": 0, "preset": llm_tiny.tiny_preset().to_dict(),
            "text_vocab_size": 300, "seq_len": 128, "micro_batch": 2, "pack_window": 32, "tensorboard": False},
}


def _cfg(tmp_path: Path, **kw) -> DemoConfig:
    base = dict(out=str(tmp_path / "demo"), n_test=12, n_compositional=6, n_test_tokenizer=32, n_round_trip=4,
                schedule=TINY, progress=False)
    base.update(kw)
    return DemoConfig.from_dict(base)


def test_demo_runs_every_stage_side_by_side_then_reuses_them(tmp_path):
    cfg = _cfg(tmp_path, workers=2)
    logs: list[str] = []
    metrics = run_demo(cfg, log=logs.append)
    out = tmp_path / "demo"
    # clip and vae need nothing: both started before either finished (side by side).
    order = [line for line in logs if line.endswith(": running") or "finished" in line]
    assert order.index("[3/8] vae: running") < order.index(next(x for x in order if x.startswith("[2/8] clip: fin")))
    assert set(metrics["stages"]) == {s.name for s in demo.STAGES}

    data = metrics["stages"]["data"]["metrics"]
    assert data["test"] == {"n": 12, "scorer_strict_on_ground_truth": 1.0}
    tok = metrics["stages"]["tokenizer"]["metrics"]["test"]
    assert 0 < tok["code_usage"] <= 1 and 0 <= tok["t2i_R@1"] <= 1
    assert 0 <= metrics["stages"]["decoder"]["metrics"]["true_embed_strict"] <= 1
    # The refine stage fine-tuned the decoder from the decoder stage's UNet; the chat model paints with it.
    refined = metrics["stages"]["refine"]["metrics"]
    assert 0 <= refined["round_trip_strict"] <= 1 and 0 <= refined["true_embed_strict"] <= 1
    unet = Path("unet") / "diffusion_pytorch_model.safetensors"
    chat_unet = (out / "model" / "seed_tokenizer" / "image_decoder" / unet).read_bytes()
    assert chat_unet == (out / "refine" / "decoder" / unet).read_bytes()
    assert chat_unet != (out / "decoder" / "decoder" / unet).read_bytes()
    summary = metrics["summary"]
    for key in ("caption_strict", "t2i_strict", "t2i_compositional_strict", "round_trip_strict"):
        assert 0.0 <= summary[key] <= 1.0, key
    # The chat model: LLM + SEED tokenizer + image decoder, loadable by seed chat / generate / caption.
    assert (out / "model" / "seed_tokenizer" / "image_decoder" / "model_index.json").is_file()
    assert main(["caption", "--model", str(out / "model"), str(out / "data" / "test" / "00000000.png")]) == 0
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Loss curves" in html and "floor 0.90" in html
    assert json.loads((out / "metrics.json").read_text())["summary"] == summary

    logs.clear()
    run_demo(cfg.replace(workers=1), log=logs.append)
    assert sum("reusing" in line for line in logs) == len(demo.STAGES)

    # A changed setting a stage depends on invalidates its marker — and every stage that reads it.
    logs.clear()
    (out / "llm" / "planted").write_text("x")
    (out / "decoder" / "planted").write_text("x")
    changed = {**TINY, "stage2": {**TINY["stage2"], "steps": 4}}
    run_demo(cfg.replace(workers=1, schedule=changed), log=logs.append)
    reused = {line.split()[1].rstrip(":") for line in logs if "reusing" in line}
    assert reused == {"data", "clip", "vae", "decoder"}  # refine reads the tokenizer: it re-ran
    # A re-run stage starts afresh (no checkpoints trained on the old codes); a reused one is untouched.
    assert not (out / "llm" / "planted").exists() and (out / "decoder" / "planted").exists()

    # Without refine steps (the quick preset) the stage is skipped and the decoder is used as trained.
    logs.clear()
    plain = {k: v for k, v in changed.items() if k != "refine"}
    metrics = run_demo(cfg.replace(workers=1, schedule=plain), log=logs.append)
    assert metrics["stages"]["refine"]["metrics"] == {"skipped": True}
    assert (out / "model" / "seed_tokenizer" / "image_decoder" / unet).read_bytes() == \
        (out / "decoder" / "decoder" / unet).read_bytes()


def test_demo_cli_rejects_bad_config(tmp_path, capsys):
    bad = tmp_path / "demo.yaml"
    bad.write_text("n_tset: 3\n")
    assert main(["demo", "--config", str(bad), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown DemoConfig key 'n_tset'") and "\n" not in err



def test_every_preset_schedule_is_a_valid_recipe_config(tmp_path):
    """A mistyped key would otherwise surface only when its stage starts — in the full preset, an
    hour in: every preset's schedules build their recipe configs, and bad overrides fail up front."""
    from seedtok.errors import ConfigError

    for preset in demo.PRESETS:
        demo.check_schedules(DemoConfig.from_dict(dict(out="x", preset=preset)))
    # Bad overrides: refused before any stage directory is made.
    out = tmp_path / "demo"
    for schedule, message in (({"stage2": {"codebook": 8192}}, "stage2.*codebook"),
                              ({"stage3": {"steps": 1}}, "unknown demo schedule stage 'stage3'"),
                              ({"llm": {"steps": "many"}}, "llm.*steps")):
        with pytest.raises(ConfigError, match=message):
            run_demo(_cfg(tmp_path, schedule={**TINY, **schedule}), log=lambda _: None)
        assert not out.exists()
    assert main(["demo", "--out", str(out), "--schedule", "{stage3: {steps: 1}}"]) == 2
    assert not out.exists()
