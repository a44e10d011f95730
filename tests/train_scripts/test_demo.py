"""``seed demo``: stages run, write their markers and metrics, and are reused on re-runs."""

from __future__ import annotations

import json

import pytest

from train_scripts import demo
from train_scripts.cli import main
from train_scripts.demo import DemoConfig, run_demo

# Real architectures, schedules cut to a few steps: the stages' plumbing, not their quality.
TINY = {
    "clip": {"steps": 3, "cf_steps": 2, "n_train": 128, "n_val": 32, "batch_size": 32},
    "stage1": {"steps": 3, "n_train": 128, "n_val": 32, "batch_size": 32},
    "stage2": {"steps": 3, "n_train": 128, "n_val": 32, "batch_size": 32},
    "decoder": {"vae_steps": 2, "vae_batch_size": 4, "vae_block_out_channels": [16, 16], "vae_latent_channels": 4,
                "unet_block_out_channels": [16, 32], "unet_attention_levels": [False, True], "steps": 2,
                "batch_size": 4, "n_train": 64, "num_inference_steps": 2, "sample_every": 0},
}


@pytest.fixture(autouse=True)
def tiny_presets(monkeypatch):
    monkeypatch.setitem(demo.PRESETS, "quick", TINY)


def test_demo_stages_run_and_are_reused(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), n_test=40, n_compositional=20, n_test_tokenizer=32, progress=False)
    logs: list[str] = []
    metrics = run_demo(cfg, log=logs.append)
    data = metrics["stages"]["data"]["metrics"]
    assert data["test"] == {"n": 40, "scorer_strict_on_ground_truth": 1.0}
    assert len(list((tmp_path / "demo/data/test").glob("*.png"))) == 40
    assert json.loads((tmp_path / "demo/metrics.json").read_text())["stages"]["data"]["metrics"] == data

    tok = metrics["stages"]["tokenizer"]["metrics"]["test"]
    assert 0 < tok["code_usage"] <= 1 and 0 <= tok["t2i_R@1"] <= 1
    assert (tmp_path / "demo/tokenizer/stage2/model/model.safetensors").is_file()

    dec = metrics["stages"]["decoder"]["metrics"]
    assert 0 <= dec["true_embed_strict"] <= 1 and 0 <= dec["round_trip_strict"] <= 1
    assert (tmp_path / "demo/tokenizer/stage2/model/image_decoder/model_index.json").is_file()

    logs.clear()
    run_demo(cfg, log=logs.append)
    assert sum("reusing" in line for line in logs) == len(demo.STAGES)

    # A changed setting a stage depends on invalidates its marker — and every stage after it.
    logs.clear()
    run_demo(cfg.replace(n_test=30, n_test_tokenizer=16), log=logs.append)
    assert not any("data: done before" in line for line in logs)
    assert any("clip: done before" in line for line in logs)
    assert not any("tokenizer: done before" in line for line in logs)
    assert len(list((tmp_path / "demo/data/test").glob("*.png"))) == 30


def test_demo_cli_rejects_bad_config(tmp_path, capsys):
    bad = tmp_path / "demo.yaml"
    bad.write_text("n_tset: 3\n")
    assert main(["demo", "--config", str(bad), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown DemoConfig key 'n_tset'") and "\n" not in err
