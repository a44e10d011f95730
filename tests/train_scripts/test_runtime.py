"""Training runtime: atomic resumable checkpoints, strict loads, precision, logs."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from seedtok.errors import CheckpointError
from train_scripts.runtime import (
    CheckpointManager,
    MetricsLogger,
    NonFiniteLossError,
    check_finite,
    load_state_strict,
    plot_loss_curves,
    read_jsonl,
    resolve_precision,
)


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched


def _train(model, opt, sched, steps):
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 4)
        loss = model(x).pow(2).mean() + np.random.rand() * 0 + random.random() * 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    model, opt, sched = _model_and_opt()
    torch.manual_seed(1)
    full = _train(model, opt, sched, 10)

    model, opt, sched = _model_and_opt()
    torch.manual_seed(1)
    first = _train(model, opt, sched, 4)
    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(4, model.state_dict(), optimizer=opt, scheduler=sched, extra={"data_pos": 64})
    _train(model, opt, sched, 3)  # work after the checkpoint that a crash would lose

    model, opt, sched = _model_and_opt()
    step, state, extra = mgr.load(optimizer=opt, scheduler=sched)
    load_state_strict(model, state, "test checkpoint")
    assert step == 4 and extra == {"data_pos": 64}
    rest = _train(model, opt, sched, 6)
    assert first + rest == pytest.approx(full, abs=0, rel=0)


def test_keeps_last_n_and_latest_pointer(tmp_path):
    model, opt, sched = _model_and_opt()
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        mgr.save(step, model.state_dict(), optimizer=opt)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert mgr.latest().name == "step_00000003"
    # A half-written checkpoint (no meta.json, temp name) is never taken as the latest.
    (tmp_path / ".tmp-step_00000004-1").mkdir()
    (tmp_path / "latest").unlink()
    assert mgr.latest().name == "step_00000003"


def test_incomplete_or_unsafe_checkpoints_are_clear_errors(tmp_path):
    model, opt, _ = _model_and_opt()
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        mgr.load()
    path = mgr.save(1, model.state_dict(), optimizer=opt)
    os.remove(path / "state.pt")
    with pytest.raises(CheckpointError, match="missing state.pt"):
        mgr.load(path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = mgr.save(2, model.state_dict(), optimizer=opt)
    torch.save({"step": 2, "payload": Evil()}, path / "state.pt")
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        mgr.load(path)


def test_load_state_strict_names_the_problem():
    model, _, _ = _model_and_opt()
    state = model.state_dict()
    with pytest.raises(CheckpointError, match="missing"):
        load_state_strict(model, {k: v for k, v in state.items() if k != "0.bias"}, "ckpt")
    with pytest.raises(CheckpointError, match="unexpected"):
        load_state_strict(model, {**state, "extra.weight": torch.zeros(1)}, "ckpt")
    with pytest.raises(CheckpointError, match="shape mismatch 0.weight"):
        load_state_strict(model, {**state, "0.weight": torch.zeros(8, 5)}, "ckpt")


def test_precision_and_non_finite_loss():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    with pytest.raises(CheckpointError, match="fp16"):
        resolve_precision("fp16", cpu)
    check_finite(torch.tensor(1.0), 3)
    with pytest.raises(NonFiniteLossError, match="step 7"):
        check_finite(torch.tensor(float("nan")), 7)


def test_metrics_log_and_curve(tmp_path):
    log = MetricsLogger(tmp_path / "log.jsonl")
    for s in range(1, 6):
        log.log(s, loss=1.0 / s)
    rows = list(read_jsonl(tmp_path / "log.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["loss"] == pytest.approx(0.2)
    png = plot_loss_curves(tmp_path / "log.jsonl", tmp_path / "loss.png", ["loss"])
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_log_rewind(tmp_path):
    log = MetricsLogger(tmp_path / "log.jsonl")
    for s in range(1, 6):
        log.log(s, loss=float(s))
    log.rewind(3)
    log.log(4, loss=40.0)
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "log.jsonl")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    log.rewind(0)
    assert list(read_jsonl(tmp_path / "log.jsonl")) == []
