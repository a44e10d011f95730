"""Throughput of the Shapes world on one core: generation, scoring and writing, in images per second.

    .venv/bin/python -m bench.shapes [--n 5000] [--sizes 64 128] [--json out.json]

Prints a table and one JSON line (also written to ``--json``). The target is ≥ 2,000 generated
images/s at 64 px on one core; everything here runs in one thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from data_pipelines.shapes import ShapesConfig, ShapesWorld
from data_pipelines.writers import write_shapes
from eval.shapes_scorer import score_image


def _rate(fn: Callable[[], int], repeats: int = 3) -> float:
    """Best of ``repeats`` runs of ``fn`` (which returns how many images it handled), in images/s."""
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t))
    return best


def _count_scenes(world: ShapesWorld, n: int) -> int:
    for i in range(n):
        world.scene("train", i)
    return n


def _count_records(world: ShapesWorld, n: int) -> int:
    return sum(1 for _ in world.generate("train", n))


def _count_scores(records: list) -> int:
    for r in records:
        score_image(r.image, r.attributes)
    return len(records)


def _count_written(world: ShapesWorld, n: int, fmt: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        write_shapes(Path(tmp) / "out", "test", n, fmt, world.config, progress=False)
    return n


def bench(n: int, sizes: list[int], formats: list[str]) -> dict:
    """Images/s per size: scene sampling, full records (+ render + captions), scoring, each writer."""
    results: dict = {"python": platform.python_version(), "n": n, "rows": []}
    for size in sizes:
        world = ShapesWorld(ShapesConfig(image_size=size))
        records = list(world.generate("test", min(n, 1000)))
        row = {
            "image_size": size,
            "scene": _rate(partial(_count_scenes, world, n)),
            "generate": _rate(partial(_count_records, world, n)),
            "score": _rate(partial(_count_scores, records), 1),
        }
        for fmt in formats:
            row[f"write_{fmt}"] = _rate(partial(_count_written, world, n, fmt), 1)
        results["rows"].append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="images per measurement (default: 5000)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64], help="image sizes (default: 64)")
    parser.add_argument("--formats", nargs="*", default=["imagefolder", "hf", "wds"], help="writers to time")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    results = bench(args.n, args.sizes, args.formats)
    keys = [k for k in results["rows"][0] if k != "image_size"]
    print("images/s, one core")
    print(f"{'size':>6}" + "".join(f"{k:>18}" for k in keys))
    for row in results["rows"]:
        print(f"{row['image_size']:>6}" + "".join(f"{row[k]:>18.0f}" for k in keys))
    text = json.dumps(results)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
