"""``seed demo`` and the training sub-commands that sit on top of every stage."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from train_scripts.demo import DemoConfig

    demo = sub.add_parser(
        "demo",
        help="run every stage on the embedded default (Shapes world) and write a report",
        description="Run every stage on the embedded default. Finished stages are reused on re-runs.",
    )
    DemoConfig.add_arguments(demo)
    demo.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from train_scripts.demo import DemoConfig, run_demo

    cfg = DemoConfig.from_cli(args)
    metrics = run_demo(cfg)
    print(json.dumps(metrics["stages"], indent=1))
    print(f"metrics: {Path(cfg.out) / 'metrics.json'}")
    return 0
