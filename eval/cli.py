"""``seed eval …`` sub-commands."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("eval", help="score captions, generated images and tokenizers")
    eval_sub = group.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    eval_sub.required = True
    _register_shapes(eval_sub)


def _register_shapes(sub: argparse._SubParsersAction) -> None:
    """``seed eval shapes DIR``: score an image folder against its Shapes attributes."""
    p = sub.add_parser(
        "shapes",
        help="score images against their Shapes attributes (colour, shape, size, position, relation)",
        description=(
            "Read DIR/metadata.jsonl (rows with file_name and attributes, or a caption in text), detect "
            "the objects in each image and report accuracy per attribute and the strict score, overall "
            "and for single/pair scenes (SHAPES.md, Scoring)."
        ),
    )
    p.add_argument("dir", metavar="DIR", help="image folder with metadata.jsonl (e.g. from `seed data shapes`)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the summary and per-image scores here (default: DIR/shapes_scores.json)")
    p.add_argument("--tolerance", type=float, default=80.0,
                   help="largest RGB distance from a pixel to its palette colour (default: 80)")
    p.add_argument("--min-area", type=float, default=0.01,
                   help="smallest object, as a fraction of the image area (default: 0.01)")

    def handler(args: argparse.Namespace) -> int:
        import json
        from pathlib import Path

        from eval.shapes_scorer import format_table, score_folder

        result = score_folder(args.dir, tolerance=args.tolerance, min_area=args.min_area)
        print(format_table(result))
        out = Path(args.json) if args.json else Path(args.dir) / "shapes_scores.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"scores written to {out}")
        return 0

    p.set_defaults(func=handler)
