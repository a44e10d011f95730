"""``seed demo``: stages run, write their markers and metrics, and are reused on re-runs."""

from __future__ import annotations

import json

from train_scripts.cli import main
from train_scripts.demo import DemoConfig, run_demo


def test_demo_data_stage_runs_and_is_reused(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), n_test=40, n_compositional=20, progress=False)
    logs: list[str] = []
    metrics = run_demo(cfg, log=logs.append)
    data = metrics["stages"]["data"]["metrics"]
    assert data["test"] == {"n": 40, "scorer_strict_on_ground_truth": 1.0}
    assert len(list((tmp_path / "demo/data/test").glob("*.png"))) == 40
    assert json.loads((tmp_path / "demo/metrics.json").read_text())["stages"]["data"]["metrics"] == data

    logs.clear()
    run_demo(cfg, log=logs.append)
    assert any("reusing" in line for line in logs)

    # A changed setting the stage depends on invalidates its marker.
    logs.clear()
    run_demo(cfg.replace(n_test=30), log=logs.append)
    assert not any("reusing" in line for line in logs)
    assert len(list((tmp_path / "demo/data/test").glob("*.png"))) == 30


def test_demo_cli_rejects_bad_config(tmp_path, capsys):
    bad = tmp_path / "demo.yaml"
    bad.write_text("n_tset: 3\n")
    assert main(["demo", "--config", str(bad), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown DemoConfig key 'n_tset'") and "\n" not in err
