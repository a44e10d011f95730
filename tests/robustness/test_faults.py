"""Faults: SIGKILL mid checkpoint write, a killed training run resuming, a full disk, a NaN loss.

The kills hit a real process (``ckpt_worker.py``) that writes with the real CheckpointManager; the
disk-full cases fail the writer both by an injected ``ENOSPC`` and by a real ``EFBIG`` from
``RLIMIT_FSIZE``; the NaN and disk-full cases also run through ``seed tokenizer train``.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, tiny_stage2
from safetensors.torch import load_file

from seedtok.errors import CheckpointError
from train_scripts.runtime import CheckpointManager

WORKER = Path(__file__).with_name("ckpt_worker.py")
REPO = Path(__file__).resolve().parents[2]


class Worker:
    """``ckpt_worker.py`` in a subprocess, read line by line; killed with SIGKILL on request."""

    def __init__(self, *args: str | os.PathLike):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []

    def wait_for(self, prefix: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"worker ended before {prefix!r}: {self.proc.stderr.read()[-2000:]}")
            self.lines.append(line.strip())
            if line.startswith(prefix):
                return line.strip()
        raise AssertionError(f"no {prefix!r} within {timeout} s")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


def _saved(lines: list[str]) -> int:
    return max((int(s.split()[1]) for s in lines if s.startswith("saved")), default=0)


def _assert_latest_is_whole(root: Path, at_least: int) -> int:
    step, state, _ = CheckpointManager(root).load(restore_rng=False)
    assert step >= at_least
    assert torch.equal(state["w"], torch.full((1024, 1024), float(step)))  # not torn, not mixed
    return step


def test_sigkill_in_the_middle_of_writing_state_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    w = Worker("write", root)
    w.wait_for("saved 2")
    w.kill()
    previous = _assert_latest_is_whole(root, at_least=2)

    w = Worker("write", root, "--pause-in-state")  # stops with half of state.pt written
    w.wait_for("paused")
    w.kill()
    assert list(root.glob(".tmp-step_*")), "the kill should have left a half-written temporary directory"
    assert _assert_latest_is_whole(root, at_least=previous) == previous  # the half-written one is invisible

    w = Worker("write", root)  # the next run saves over it and sweeps the dead writer's leftovers
    w.wait_for(f"saved {previous + 1}")
    w.kill()
    _assert_latest_is_whole(root, at_least=previous + 1)
    assert [p.name for p in root.glob(".tmp-step_*") if not p.name.endswith(f"-{w.proc.pid}")] == []


def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    rng = random.Random(0)
    last = 0
    for _ in range(2):
        w = Worker("write", root)
        w.wait_for(f"saved {last + 1}")
        time.sleep(rng.uniform(0.0, 0.15))  # a save takes ~20–60 ms here: kills land mid-write too
        w.kill()
        last = _assert_latest_is_whole(root, at_least=_saved(w.lines))


def test_killed_training_run_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    import ckpt_worker

    ckpt_worker._train(tmp_path / "a", 16)  # the uninterrupted reference, in this process
    capsys.readouterr()
    w = Worker("train", tmp_path / "b", "--steps", "16")
    w.wait_for("step 7")  # checkpoints every 2 steps: the steps after the last one are redone identically
    w.kill()
    latest = CheckpointManager(tmp_path / "b" / "checkpoints").latest()
    assert latest is not None and latest.name >= "step_00000006"
    rc, out, err = Worker("train", tmp_path / "b", "--steps", "16").finish()
    assert rc == 0, err[-2000:]
    assert out.splitlines()[0] == f"step {int(latest.name[5:]) + 1}"  # resumed, not restarted
    a, b = load_file(str(tmp_path / "a" / "final.safetensors")), load_file(str(tmp_path / "b" / "final.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- disk full -------------------------------------------------------------------------------


def _enospc_after(n_bytes: int):
    """A stand-in for safetensors' save_file that writes ``n_bytes`` and then finds the disk full."""

    def save_file(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * n_bytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return save_file


def test_disk_full_while_writing_a_checkpoint(tmp_path, monkeypatch):
    from train_scripts import runtime

    mgr = CheckpointManager(tmp_path, keep=2)
    mgr.save(1, {"w": torch.ones(4)})
    monkeypatch.setattr(runtime, "save_file", _enospc_after(1000))
    with pytest.raises(CheckpointError) as info:
        mgr.save(2, {"w": torch.full((4,), 2.0)})
    msg = str(info.value)
    assert "No space left on device" in msg and "step_00000001" in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]  # the partial write is gone
    step, state, _ = mgr.load(restore_rng=False)
    assert step == 1 and torch.equal(state["w"], torch.ones(4))


def test_file_size_limit_is_a_real_failed_write(tmp_path):
    """RLIMIT_FSIZE makes write(2) fail with EFBIG part-way through a file, like a full disk: once in
    model.safetensors (safetensors' error) and once in state.pt (torch.save's)."""
    rc, out, err = Worker("fill", tmp_path).finish()
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    lines = out.splitlines()
    assert lines[0].startswith("refused 2: cannot write checkpoint") and "File too large" in lines[0]
    assert lines[1].startswith("refused 3: cannot write checkpoint")
    assert all("the previous checkpoint (step_00000001) is kept" in line for line in lines[:2])
    assert lines[2] == "saved 4"
    mgr = CheckpointManager(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000001", "step_00000004"]
    assert not list(tmp_path.glob(".tmp-*"))
    step, state, _ = mgr.load(mgr.root / "step_00000001", restore_rng=False)
    assert step == 1 and torch.equal(state["w"], torch.ones(16))


def test_disk_full_while_saving_a_tokenizer_keeps_the_old_directory(models, tmp_path, monkeypatch):
    import shutil

    from seedtok import io as seed_io
    from seedtok.tokenizer import SeedTokenizer

    target = tmp_path / "tok"
    shutil.copytree(models.tokenizer, target)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    tok = SeedTokenizer.from_pretrained(target)
    monkeypatch.setattr(seed_io, "save_file", _enospc_after(100))
    with pytest.raises(CheckpointError, match="No space left on device"):
        tok.save_pretrained(target)
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary directory left behind
    SeedTokenizer.from_pretrained(target)


def test_disk_full_in_the_recipe_then_resume(models, seed_cli, tmp_path, monkeypatch):
    from train_scripts import runtime

    real, calls = runtime.save_file, []

    def flaky(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the checkpoint after step 4
            return _enospc_after(10)(tensors, path, metadata)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(runtime, "save_file", flaky)
    rc, _, err = seed_cli(*tiny_stage2(models, tmp_path / "run"))
    assert_one_line_error(rc, err, "No space left on device", "step_00000004", "step_00000002) is kept")
    monkeypatch.setattr(runtime, "save_file", real)
    rc, _, err = seed_cli(*tiny_stage2(models, tmp_path / "run"))  # space freed: resumes from step 2
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


# ---- NaN loss ---------------------------------------------------------------------------------


def test_nan_loss_is_reported_with_its_step(models, seed_cli, tmp_path, monkeypatch):
    from train_scripts import train_tokenizer

    real, calls = train_tokenizer.stage2_loss, []

    def poisoned(**kw):
        out = real(**kw)
        calls.append(1)
        if len(calls) == 5:  # the 5th optimizer step
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_tokenizer, "stage2_loss", poisoned)
    rc, _, err = seed_cli(*tiny_stage2(models, tmp_path / "run"))
    assert_one_line_error(rc, err, "non-finite loss (nan) at step 5", "last checkpoint is kept")
    step, state, _ = CheckpointManager(tmp_path / "run" / "checkpoints").load(restore_rng=False)
    assert step == 4 and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (tmp_path / "run" / "model").exists()  # nothing was saved from the poisoned weights
