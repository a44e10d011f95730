"""``seed demo``: every stage runs (side by side where it can), writes its marker and metrics, the
chat model and the report; finished stages are reused on re-runs."""

from __future__ import annotations

import json
import os
import sys
import time
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
    from train_scripts.train_tokenizer import TokenizerTrainConfig

    for preset in demo.PRESETS:
        demo.check_schedules(DemoConfig.from_dict(dict(out="x", preset=preset)))
    # The full preset's stage 2 overrides only the codebook size; the rest of the quantiser stays.
    full2 = TokenizerTrainConfig.from_dict(dict(demo.PRESETS["full"]["stage2"]))
    default = TokenizerTrainConfig().tokenizer.quantizer
    assert full2.tokenizer.quantizer.codebook_size == 8192
    assert (full2.tokenizer.quantizer.dim, full2.tokenizer.quantizer.type) == (default.dim, default.type)
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


# --- the runner's processes: nothing outlives the command -------------------------------------
sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_stage_helpers as helpers  # noqa: E402 — module-level stage bodies the spawned processes import


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_for(path: Path, seconds: float = 120) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text():
            return int(path.read_text())
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


def test_a_failing_stage_stops_the_stage_beside_it_at_once(tmp_path):
    cfg = DemoConfig.from_dict(dict(out=str(tmp_path), progress=False))
    lines: list[str] = []
    number = {"sleep": 1, "fail": 2, "die": 3, "quick": 4}
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="boom in a stage") as err:
        demo._run_parallel(cfg, [demo.Stage("sleep", helpers.sleeper, ()), demo.Stage("fail", helpers.failer, ())],
                           {}, lambda *a: None, lines.append, number, 4)
    assert time.monotonic() - t0 < 60  # not the sleeper's 600 s
    assert "in the fail stage's process" in str(err.value.__cause__) and "failer" in str(err.value.__cause__)
    assert _gone(int((tmp_path / "sleep" / "pid").read_text()))
    assert "[2/4] fail: failed" in lines and "[1/4] sleep: stopped (re-run to resume it)" in lines

    # A stage whose process is killed outright is an error naming it, not a hang.
    (tmp_path / "sleep" / "pid").unlink()
    with pytest.raises(RuntimeError, match=r"stage die: its process died \(exit code -9\)"):
        demo._run_parallel(cfg, [demo.Stage("sleep", helpers.sleeper, ()), demo.Stage("die", helpers.dier, ())],
                           {}, lambda *a: None, lines.append, number, 4)
    assert _gone(int((tmp_path / "sleep" / "pid").read_text()))

    # Metrics come back from the stage's process.
    results: dict = {}
    demo._run_parallel(cfg, [demo.Stage("quick", helpers.quick, ())], results,
                       lambda stage, metrics, s: results.__setitem__(stage.name, metrics), lines.append, number, 4)
    assert results == {"quick": {"value": 7}}


@pytest.mark.parametrize("how", ["sigterm-to-the-command", "ctrl-c-to-the-terminal-group"])
def test_stopping_the_command_stops_its_stages(tmp_path, how):
    import signal
    import subprocess

    # This checkout's code (not whatever an installed copy holds), the helpers imported by name.
    paths = [str(Path(__file__).resolve().parents[2]), str(Path(helpers.__file__).parent)]
    code = f"import sys; sys.path[:0] = {paths!r}; import demo_stage_helpers; demo_stage_helpers.main({str(tmp_path)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        try:
            pids = [_wait_for(tmp_path / name / "pid") for name in ("sleep", "sleep2")]
        except AssertionError:
            proc.kill()
            raise AssertionError(proc.communicate()[1][-2000:]) from None
        if how == "sigterm-to-the-command":
            proc.send_signal(signal.SIGTERM)  # the command alone, as `kill PID` does
        else:
            os.killpg(proc.pid, signal.SIGINT)  # every process of the group, as Ctrl-C does
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == (128 + signal.SIGTERM if how.startswith("sigterm") else 130), err
    assert all(_gone(pid) for pid in pids)
    assert "sleep: stopped (re-run to resume it)" in out and "sleep2: stopped" in out
    assert "Traceback" not in err  # no stage process dies with a traceback of its own
