"""A process for the fault tests to kill: writes checkpoints with the real CheckpointManager.

    python ckpt_worker.py write ROOT [--pause-in-state]   save step 1, 2, … forever; print "saved N"
    python ckpt_worker.py train ROOT --steps N             a tiny resumable training run; print "step N"
    python ckpt_worker.py fill ROOT                        save step 1, then steps 2, 3 over a file-size limit

``--pause-in-state`` makes the first save after start-up stop in the middle of writing state.pt
(half the bytes on disk) and print ``paused``: the parent SIGKILLs it there, deterministically
mid-write. ``train`` runs the same loop shape as the recipes (checkpoint_or_stop, RNG restored,
per-step seeded batches) and writes ``ROOT/final.safetensors`` at the end. Errors the toolkit raises
(SeedError) are printed as ``error: …`` with exit status 2, like the ``seed`` CLI.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from seedtok.errors import SeedError
from train_scripts import runtime
from train_scripts.runtime import CheckpointManager, DistInfo, checkpoint_or_stop, load_state_strict


def _write(root: Path, pause_in_state: bool) -> None:
    mgr = CheckpointManager(root, keep=2)
    latest = mgr.latest()
    step = int(latest.name.split("_")[1]) if latest is not None else 0
    if pause_in_state:
        real_save = torch.save

        def slow_save(obj, path, *a, **kw):
            real_save(obj, path, *a, **kw)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])  # half of state.pt is on disk …
            print("paused", flush=True)
            time.sleep(600)  # … when the parent's SIGKILL arrives

        runtime.torch.save = slow_save  # the runtime's module reference: only its writes pause
    while True:
        step += 1
        # 4 MB of weights whose every value is the step: a torn write is visible as a wrong value.
        mgr.save(step, {"w": torch.full((1024, 1024), float(step))}, config={"step": step})
        print(f"saved {step}", flush=True)


def _train(root: Path, steps: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    ckpt = CheckpointManager(root / "checkpoints")
    start = 0
    if ckpt.latest() is not None:
        start, state, _ = ckpt.load(optimizer=opt, scheduler=sched)
        load_state_strict(model, state, "worker checkpoint")
    gen = torch.Generator()
    target = torch.arange(8, dtype=torch.float32)[:, None]
    for step in range(start, steps):
        gen.manual_seed(step)
        x = torch.randn(32, 8, generator=gen)
        loss = (model(x) - x @ target + 0.01 * torch.randn(32, 1)).pow(2).mean()  # global RNG: restored on resume
        runtime.check_finite(loss, step + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        print(f"step {step + 1}", flush=True)
        time.sleep(0.02)  # give the parent time to kill between steps as well as mid-save
        checkpoint_or_stop(ckpt, DistInfo(), step=step + 1, start=start, total=steps, ckpt_every=2, stop_after=0,
                           module=model, optimizer=opt, scheduler=sched, config={})
    save_file(model.state_dict(), str(root / "final.safetensors"))
    print("done", flush=True)


def _fill(root: Path) -> None:
    mgr = CheckpointManager(root, keep=5)
    mgr.save(1, {"w": torch.full((16,), 1.0)})
    # A real failed write: past RLIMIT_FSIZE, write(2) fails with EFBIG (SIGXFSZ ignored) — what a
    # full disk or an exhausted quota does to the writer, without needing a small file system.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    big = torch.full((1 << 20,), 2.0)  # 4 MB > 256 KB
    for step, weights, extra in ((2, big, None), (3, big[:16], {"big": big})):  # fails in safetensors, then torch.save
        try:
            mgr.save(step, {"w": weights}, extra=extra)
            print(f"saved {step}", flush=True)
        except SeedError as e:
            print(f"refused {step}: {e}", flush=True)
    mgr.save(4, {"w": torch.full((16,), 4.0)})  # a write that fits still works afterwards
    print("saved 4", flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["write", "train", "fill"])
    p.add_argument("root")
    p.add_argument("--pause-in-state", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    root = Path(args.root)
    try:
        if args.mode == "write":
            _write(root, args.pause_in_state)
        elif args.mode == "train":
            _train(root, args.steps)
        else:
            _fill(root)
    except SeedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
