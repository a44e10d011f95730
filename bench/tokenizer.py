"""Encode throughput of the SEED tokenizer (images → codes), in images per second.

    .venv/bin/python -m bench.tokenizer [--model DIR] [--n 512] [--threads 2] [--json out.json]

Without ``--model`` it builds the embedded default's architecture with random weights (speed does
not depend on the weights). Measured side by side in one run: encoding from PIL images (image
processor included) vs from ready ``pixel_values``, fp32 vs bf16 autocast, at two batch sizes;
the table's ratio column is each row's rate over the first row's. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def _build_default(tmp: Path):
    from seedtok.tokenizer import SeedTokenizer
    from train_scripts.train_clip import ClipTrainConfig, build_clip, build_image_processor
    from train_scripts.train_tokenizer import _build_fresh, embedded_default_tokenizer_config

    cfg = ClipTrainConfig()
    clip = build_clip(cfg, vocab_size=128)
    clip.save_pretrained(tmp / "clip")
    build_image_processor(cfg.shapes.image_size).save_pretrained(tmp / "clip")
    tok: SeedTokenizer = _build_fresh(embedded_default_tokenizer_config(str(tmp / "clip")))
    return tok.eval()


def _rate(fn, n: int, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a saved tokenizer directory (default: random embedded default)")
    parser.add_argument("--n", type=int, default=512, help="images per timed run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from data_pipelines.shapes import ShapesWorld
    from seedtok.tokenizer import SeedTokenizer
    from train_scripts.runtime import autocast, quiet_libraries

    quiet_libraries()

    with tempfile.TemporaryDirectory() as tmp:
        tok = SeedTokenizer.from_pretrained(args.model) if args.model else _build_default(Path(tmp))
        images = [r.image for r in ShapesWorld().generate("test", args.n)]
        pixels = tok.preprocess(images)
        cpu = torch.device("cpu")
        rows = []
        for source in ("pil", "pixels"):
            for precision in ("fp32", "bf16"):
                for batch in (32, 256):
                    def run(source=source, precision=precision, batch=batch):
                        with autocast(precision, cpu):
                            for s in range(0, args.n, batch):
                                tok.encode(images[s:s + batch] if source == "pil" else pixels[s:s + batch])

                    rows.append({"input": source, "precision": precision, "batch": batch, "images_per_s": _rate(run, args.n)})
    base = rows[0]["images_per_s"]
    print(f"SEED tokenizer encode ({tok.num_tokens} codes/image, K={tok.codebook_size}, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()})")
    print(f"{'input':<8}{'precision':<11}{'batch':>6}{'images/s':>12}{'ratio':>8}")
    for r in rows:
        r["ratio"] = r["images_per_s"] / base
        print(f"{r['input']:<8}{r['precision']:<11}{r['batch']:>6}{r['images_per_s']:>12.1f}{r['ratio']:>8.2f}")
    result = {"bench": "tokenizer_encode", "threads": args.threads, "n": args.n, "rows": rows}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
