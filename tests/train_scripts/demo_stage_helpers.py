"""Stage bodies for the demo runner's process tests. Spawned stage processes import this module by
name (the parent's ``sys.path`` travels with them), so they must live at module level."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def sleeper(cfg: Any, out: Path) -> dict[str, Any]:
    """Announce its pid, then run 'forever' (a long training stage)."""
    (out / "pid").write_text(str(os.getpid()))
    time.sleep(600)
    return {"slept": True}


def _wait_for_partner(cfg: Any) -> None:
    partner = Path(cfg.out) / "sleep" / "pid"
    deadline = time.monotonic() + 120
    while not partner.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def failer(cfg: Any, out: Path) -> dict[str, Any]:
    """Fail once the sleeper runs beside it."""
    _wait_for_partner(cfg)
    raise ValueError("boom in a stage")


def dier(cfg: Any, out: Path) -> dict[str, Any]:
    """Be killed (the OOM killer, say) once the sleeper runs beside it."""
    _wait_for_partner(cfg)
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def quick(cfg: Any, out: Path) -> dict[str, Any]:
    return {"value": 7}


def main(out: str) -> None:
    """A demo run of two long stages side by side, as the ``seed`` command runs it."""
    from train_scripts import demo

    cfg = demo.DemoConfig.from_dict(dict(out=out, progress=False))
    stages = [demo.Stage("sleep", sleeper, ()), demo.Stage("sleep2", sleeper, ())]
    try:
        demo._run_parallel(cfg, stages, {}, lambda *a: None, lambda m: print(m, flush=True),
                           {"sleep": 1, "sleep2": 2}, 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)

