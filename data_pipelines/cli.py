"""``seed data …`` sub-commands."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("data", help="make and inspect data sets (Shapes world, real formats)")
    data_sub = group.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_sub.required = True
    _register_shapes(data_sub)
    _register_inspect(data_sub)


def _register_shapes(sub: argparse._SubParsersAction) -> None:
    """``seed data shapes``: write a split of the Shapes world."""
    # Flags are written out here (not ShapesConfig.add_arguments) so that `seed --help` does not
    # import numpy/PIL; the handler builds the ShapesConfig and checks every value.
    p = sub.add_parser(
        "shapes",
        help="write a split of the Shapes world (the embedded default data set)",
        description=(
            "Generate records START … START+N-1 of a Shapes split (SHAPES.md) and write them as an "
            "image folder with metadata.jsonl, a saved Hugging Face dataset, or webdataset tar shards. "
            "The same seed and size always give byte-identical images."
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (absent, empty, or an earlier output of the same split)")
    p.add_argument("--n", type=int, required=True, help="number of records")
    p.add_argument("--split", default="test", choices=["train", "validation", "test", "compositional"],
                   help="split to write (default: test)")
    p.add_argument("--format", default="imagefolder", choices=["imagefolder", "hf", "wds"],
                   help="imagefolder (PNGs + metadata.jsonl), hf (save_to_disk) or wds (tar shards) (default: imagefolder)")
    p.add_argument("--start", type=int, default=0, help="index of the first record (default: 0)")
    p.add_argument("--config", default=None, metavar="YAML", help="start from this ShapesConfig YAML; flags override it")
    p.add_argument("--size", type=int, default=None, help="image side: 32, 64, 128 or 256 (default: 64)")
    p.add_argument("--seed", type=int, default=None, help="world seed (default: 0)")
    p.add_argument("--pair-fraction", type=float, default=None, help="share of two-object scenes (default: 0.5)")
    p.add_argument("--n-paraphrases", type=int, default=None, help="paraphrases per record (default: 3)")
    p.add_argument("--held-out", default=None, metavar="'COLOUR SHAPE,…'",
                   help="(colour, shape) pairs kept out of train/validation/test, e.g. 'red circle,blue square'")
    p.add_argument("--shard-size", type=int, default=1000, help="records per tar shard for --format wds (default: 1000)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    def handler(args: argparse.Namespace) -> int:
        from data_pipelines.shapes import ShapesConfig
        from data_pipelines.writers import write_shapes
        from seedtok.errors import ConfigError

        values = ShapesConfig.from_yaml(args.config).to_dict() if args.config else {}
        flags = {"image_size": args.size, "seed": args.seed, "pair_fraction": args.pair_fraction,
                 "n_paraphrases": args.n_paraphrases}
        values.update({k: v for k, v in flags.items() if v is not None})
        if args.held_out is not None:
            combos = [item.split() for item in args.held_out.split(",") if item.strip()]
            bad = [" ".join(c) for c in combos if len(c) != 2]
            if bad:
                raise ConfigError(f"--held-out: {bad[0]!r} is not 'COLOUR SHAPE' (e.g. 'red circle,blue square')")
            values["held_out_combinations"] = combos
        config = ShapesConfig.from_dict(values)
        out = write_shapes(args.out, args.split, args.n, args.format, config, args.start,
                           overwrite=args.overwrite, shard_size=args.shard_size)
        print(f"wrote {args.n} {args.split} records ({args.format}, {config.image_size} px) to {out}")
        return 0

    p.set_defaults(func=handler)


def _register_inspect(sub: argparse._SubParsersAction) -> None:
    """``seed data inspect PATH``: counts, examples and errors of a data set in any supported format."""
    from data_pipelines.loaders import FORMATS, LoadOptions  # light: PIL only, numpy stays lazy

    p = sub.add_parser(
        "inspect",
        help="report format, counts, bad rows and examples of a data set",
        description=(
            "Read a data set once and report its detected format, records by kind, images, rows "
            f"skipped by reason, file errors and a few examples. Formats: {', '.join(FORMATS)}. "
            "Exit status 0 if records could be read, 2 if the path is unusable."
        ),
    )
    p.add_argument("path", help="a directory, file, glob ('shards/*.tar') or brace range ('s-{000..009}.tar')")
    LoadOptions.add_arguments(p, config_flag=False)
    p.add_argument("--n-examples", type=int, default=3, help="records to show (default: 3)")
    p.add_argument("--limit", type=int, default=0, help="stop after this many records (default: 0, all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    def handler(args: argparse.Namespace) -> int:
        import json
        import sys

        from data_pipelines.loaders import inspect_dataset
        from seedtok.errors import DataError

        options = LoadOptions.from_cli(args)
        report = inspect_dataset(args.path, options, n_examples=max(0, args.n_examples), limit=max(0, args.limit))
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            _print_inspect_report(report)
        if report["n_records"] == 0:
            reasons = ", ".join(f"{r} {n}" for r, n in report["skipped"].items()) or "no rows"
            raise DataError(f"no usable records in {args.path} ({reasons})")
        sys.stdout.flush()
        return 0

    def _print_inspect_report(r: dict) -> None:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(r["records"].items()))
        print(f"path:     {r['path']}")
        print(f"format:   {r['format']}")
        print(f"records:  {r['n_records']}" + (f" ({kinds})" if kinds else "") + ("  [stopped at --limit]" if r["limited"] else ""))
        print(f"images:   {r['images']} referenced")
        if r["checked_images"]:
            check = r["image_check"]
            bad = ", ".join(f"{k} {n}" for k, n in check["skipped"].items())
            print(f"decoded:  {check['ok']} ok, {sum(check['skipped'].values())} records skipped for bad images"
                  + (f" ({bad})" if bad else ""))
            for reason, names in check["examples"].items():
                print(f"  {reason}: {', '.join(names)}")
        n_skipped = sum(r["skipped"].values())
        reasons = ", ".join(f"{k} {n}" for k, n in sorted(r["skipped"].items(), key=lambda kv: -kv[1]))
        print(f"skipped:  {n_skipped} rows" + (f" ({reasons})" if reasons else ""))
        for msgs in r["skipped_examples"].values():
            for m in msgs:
                print(f"  {m}")
        print(f"errors:   {len(r['errors'])}")
        for e in r["errors"]:
            print(f"  {e}")
        for i, ex in enumerate(r["examples"], 1):
            print(f"example {i}: [{ex['kind']}] id={ex['id']}  segments={ex['n_segments']}")
            if ex["images"]:
                print(f"  images: {', '.join(ex['images'])}")
            print(f"  text:   {ex['text']}")
            if ex["meta_keys"]:
                print(f"  meta:   {', '.join(ex['meta_keys'])}")

    p.set_defaults(func=handler)
