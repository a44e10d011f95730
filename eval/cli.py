"""``seed eval …`` sub-commands."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("eval", help="score captions, generated images and tokenizers")
    eval_sub = group.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    eval_sub.required = True
    _register_shapes(eval_sub)
    _register_caption(eval_sub)
    _register_t2i(eval_sub)
    _register_tokenizer(eval_sub)


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


# ---- shared flags -------------------------------------------------------------------------------

def _add_scene_arguments(p: argparse.ArgumentParser, n_default: int, split_help: str) -> None:
    """Which scenes to evaluate on: a rendered Shapes split (world flags) or an image folder (--data)."""
    p.add_argument("--split", default="test", choices=["train", "validation", "test", "compositional"],
                   help=split_help)
    p.add_argument("--n", type=int, default=n_default, help=f"number of scenes (default: {n_default})")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="evaluate on this image folder (PNG + metadata.jsonl from `seed data shapes`) instead of "
                        "rendering --split")
    p.add_argument("--shapes-config", default=None, metavar="YAML",
                   help="ShapesConfig the model was trained on (e.g. a data folder's shapes_config.yaml; "
                        "default: the --model directory's, which `seed llm train` writes when it trains on "
                        "Shapes); the flags below override it")
    p.add_argument("--size", type=int, default=None, help="Shapes image side (default: 64)")
    p.add_argument("--world-seed", type=int, default=None, help="Shapes world seed (default: 0)")
    p.add_argument("--held-out", default=None, metavar="'COLOUR SHAPE,…'",
                   help="held-out (colour, shape) pairs, needed by --split compositional, e.g. 'red triangle,blue circle'")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def _shapes_config(args: argparse.Namespace):
    from data_pipelines.shapes import ShapesConfig
    from llm_adapters.chat_model import TRAINING_WORLD_FILE
    from seedtok.errors import ConfigError

    source = args.shapes_config
    if source is None and getattr(args, "model", None) and (Path(args.model) / TRAINING_WORLD_FILE).is_file():
        source = Path(args.model) / TRAINING_WORLD_FILE  # the world the model was trained on (held-out pairs and all)
    values = ShapesConfig.from_yaml(source).to_dict() if source else {}
    if args.size is not None:
        values["image_size"] = args.size
    if args.world_seed is not None:
        values["seed"] = args.world_seed
    if args.held_out is not None:
        combos = [item.split() for item in args.held_out.split(",") if item.strip()]
        bad = [" ".join(c) for c in combos if len(c) != 2]
        if bad:
            raise ConfigError(f"--held-out: {bad[0]!r} is not 'COLOUR SHAPE' (e.g. 'red triangle,blue circle')")
        values["held_out_combinations"] = combos
    return ShapesConfig.from_dict(values)


def _register_caption(sub: argparse._SubParsersAction) -> None:
    """``seed eval caption``: caption held-out scenes with a chat model; n-gram metrics + exact attributes."""
    p = sub.add_parser(
        "caption",
        help="caption held-out scenes with a chat model: BLEU/METEOR/ROUGE-L/CIDEr and exact attribute accuracy",
        description=(
            "Caption N scenes with the chat model in --model (SeedChat.caption: greedy, or beam search with "
            "--num-beams) and write "
            "OUT/predictions.jsonl and OUT/caption_metrics.json: corpus BLEU-1..4, METEOR 1.5 (when Java is "
            "available), ROUGE-L and CIDEr-D against the canonical caption and its paraphrases, and the "
            "Shapes scorer's per-attribute and strict accuracy (overall, single, pair)."
        ),
    )
    p.add_argument("--model", required=True, metavar="DIR", help="chat-model directory")
    p.add_argument("--out", required=True, metavar="OUT", help="output directory")
    _add_scene_arguments(p, 300, "Shapes split to caption (default: test)")
    p.add_argument("--batch-size", type=int, default=32, help="images per captioning batch (default: 32)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest caption in tokens (default: 64)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (default: 1 = greedy)")
    p.add_argument("--no-meteor", dest="meteor", action="store_false", help="skip METEOR (it starts a JVM)")

    def handler(args: argparse.Namespace) -> int:
        from eval.caption_eval import METRICS_FILE, format_caption_metrics, run_caption_eval

        metrics = run_caption_eval(args.model, args.out, split=args.split, n=args.n, data_dir=args.data,
                                   shapes=_shapes_config(args), batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                   with_meteor=args.meteor, device=args.device, progress=args.progress)
        print(format_caption_metrics(metrics))
        print(f"predictions and metrics written to {args.out} ({METRICS_FILE})")
        return 0

    p.set_defaults(func=handler)


def _register_t2i(sub: argparse._SubParsersAction) -> None:
    """``seed eval t2i``: generate images for Shapes prompts (GenEval layout) and score them exactly."""
    # ~1 ms at start-up: PIL and tqdm, its only heavy imports, are loaded by then.
    from eval.t2i_eval import DEFAULT_GUIDANCE, DEFAULT_TEMPERATURE
    p = sub.add_parser(
        "t2i",
        help="generate images for held-out prompts (GenEval layout) and score them: attributes, strict, CLIP score",
        description=(
            "Generate --samples images for each of N prompts (the canonical captions of a Shapes split; "
            "--split compositional for held-out colour/shape pairs) into OUT/<index>/samples/0000.png with "
            "OUT/<index>/metadata.jsonl, then score every image with the Shapes scorer (per attribute, strict, "
            "single vs pair) and the CLIP score (100·max(cos, 0)) with --clip or the CLIP the model's SEED "
            "tokenizer was trained against. Without --model, only score the images already in OUT."
        ),
    )
    p.add_argument("--model", default=None, metavar="DIR", help="chat-model directory (omit to re-score OUT)")
    p.add_argument("--out", required=True, metavar="OUT", help="output directory (GenEval layout)")
    _add_scene_arguments(p, 300, "Shapes split whose captions are the prompts (default: test)")
    p.add_argument("--clip", default=None, metavar="DIR", help="local CLIP directory for the CLIP score")
    p.add_argument("--samples", type=int, default=1, help="images per prompt (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale, 1 = off (default: {DEFAULT_GUIDANCE})")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"sampling temperature (default: {DEFAULT_TEMPERATURE})")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (default: 0)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding of the image codes instead of sampling")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default: 16)")

    def handler(args: argparse.Namespace) -> int:
        import json
        from pathlib import Path

        from eval.t2i_eval import METRICS_FILE, format_t2i_metrics, run_t2i_eval, score_geneval_folder

        if args.model is None:
            clip = None
            if args.clip is not None:
                from eval.clip_score import ClipScore

                clip = ClipScore.from_pretrained(args.clip, device=args.device)
            metrics = score_geneval_folder(args.out, clip=clip, clip_unavailable="no --clip given",
                                           progress=args.progress)
            metrics.pop("per_image")
            (Path(args.out) / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
        else:
            metrics = run_t2i_eval(args.model, args.out, split=args.split, n=args.n, samples=args.samples,
                                   seed=args.seed, guidance_scale=args.guidance, do_sample=not args.greedy,
                                   temperature=args.temperature, top_k=args.top_k, clip_dir=args.clip,
                                   data_dir=args.data, shapes=_shapes_config(args), batch_size=args.batch_size,
                                   device=args.device, progress=args.progress)
        print(format_t2i_metrics(metrics))
        print(f"images and scores written to {args.out} ({METRICS_FILE})")
        return 0

    p.set_defaults(func=handler)


def _register_tokenizer(sub: argparse._SubParsersAction) -> None:
    """``seed eval tokenizer``: code usage, perplexity, retrieval and the exact round trip."""
    p = sub.add_parser(
        "tokenizer",
        help="score a SEED tokenizer: code usage, perplexity, retrieval, round-trip attributes",
        description=(
            "Score the SEED tokenizer in --model (a tokenizer directory or a chat-model directory with "
            "seed_tokenizer/): code usage and perplexity, embedding cosine and text<->image retrieval from the "
            "codes (needs the CLIP text tower: --clip or the one recorded at training), and, when it has an "
            "image decoder, the round trip image -> codes -> image scored by the Shapes scorer."
        ),
    )
    p.add_argument("--model", required=True, metavar="DIR", help="tokenizer or chat-model directory")
    p.add_argument("--out", default=None, metavar="OUT",
                   help="write OUT/tokenizer_metrics.json and the reconstructions OUT/round_trip/")
    p.add_argument("--clip", default=None, metavar="DIR", help="CLIP directory (default: the one recorded at training)")
    _add_scene_arguments(p, 1000, "Shapes split to score on (default: test)")
    p.add_argument("--round-trip-n", type=int, default=300, help="scenes reconstructed for the round trip (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the image decoder (default: 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")

    def handler(args: argparse.Namespace) -> int:
        from eval.tokenizer_eval import format_tokenizer_metrics, run_tokenizer_eval

        metrics = run_tokenizer_eval(args.model, args.out, clip_dir=args.clip, split=args.split, n=args.n,
                                     n_round_trip=args.round_trip_n, seed=args.seed, data_dir=args.data,
                                     shapes=_shapes_config(args), batch_size=args.batch_size, device=args.device,
                                     progress=args.progress)
        print(format_tokenizer_metrics(metrics))
        if args.out:
            print(f"metrics and reconstructions written to {args.out}")
        return 0

    p.set_defaults(func=handler)
