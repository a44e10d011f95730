"""``seed tokenizer …``: train (stage 0 CLIP, stages 1–2), evaluate and convert SEED tokenizers."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from train_scripts.train_clip import ClipTrainConfig
    from train_scripts.train_tokenizer import TokenizerTrainConfig

    group = sub.add_parser("tokenizer", help="train, evaluate and convert SEED image tokenizers")
    tsub = group.add_subparsers(dest="tokenizer_command", metavar="TOKENIZER_COMMAND")
    tsub.required = True

    p = tsub.add_parser("train-clip", help="stage 0: train the embedded default's tiny CLIP on the Shapes world",
                        description="Stage 0: a tiny CLIP (frozen ViT, text tower and unCLIP space of the embedded default).")
    ClipTrainConfig.add_arguments(p)
    p.set_defaults(func=_train_clip)

    p = tsub.add_parser("train", help="stage 1 (Q-Former contrastive) or stage 2 (quantise + reconstruct)",
                        description="Train one stage of the SEED tokenizer; see train_scripts/train_tokenizer.py.")
    TokenizerTrainConfig.add_arguments(p)
    p.set_defaults(func=_train)

    p = tsub.add_parser("eval", help="code usage, perplexity, embedding cosine and retrieval on a Shapes split")
    p.add_argument("--model", required=True, help="tokenizer directory (e.g. runs/demo/tokenizer/model)")
    p.add_argument("--clip", default=None, help="CLIP directory for caption embeddings (default: the one recorded at training)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test", "compositional"])
    p.add_argument("--n", type=int, default=1000, help="scenes to score (default: 1000)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the metrics as JSON")
    p.set_defaults(func=_eval)

    from train_scripts.train_decoder import add_reconstruct_arguments, add_train_arguments

    p = tsub.add_parser("train-decoder", help="train the embedded default's unCLIP image decoder (VAE + UNet)",
                        description="Train a tiny Stable unCLIP (AutoencoderKL + UNet conditioned on the CLIP image "
                                    "embedding) on the Shapes world; see train_scripts/train_decoder.py.")
    add_train_arguments(p)
    p.set_defaults(func=_train_decoder)

    p = tsub.add_parser("reconstruct", help="image → codes → embedding → image, one PNG per input",
                        description="Reconstruct images through a SEED tokenizer and its image decoder; each output "
                                    "PNG keeps its input's file stem.")
    add_reconstruct_arguments(p)
    p.set_defaults(func=_reconstruct)

    p = tsub.add_parser("convert-seed", help="convert an official SEED tokenizer checkpoint into this format")
    p.add_argument("--checkpoint", required=True, help="seed_quantizer.pt / .safetensors from the SEED release")
    p.add_argument("--vision", required=True, help="local vision tower directory (HF format, 1408-d for SEED's EVA ViT-g)")
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.set_defaults(func=_convert)


def _print_metrics(metrics: dict[str, float]) -> None:
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


def _train_clip(args: argparse.Namespace) -> int:
    from train_scripts.train_clip import ClipTrainConfig, train_clip

    metrics = train_clip(ClipTrainConfig.from_cli(args))
    if metrics:
        _print_metrics(metrics)
    return 0


def _train(args: argparse.Namespace) -> int:
    from train_scripts.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    metrics = train_tokenizer(TokenizerTrainConfig.from_cli(args))
    if metrics:
        _print_metrics(metrics)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from eval.tokenizer_metrics import evaluate_tokenizer, recorded_clip_dir
    from train_scripts.train_tokenizer import check_clip_dir

    clip = args.clip or recorded_clip_dir(args.model)
    if clip:  # checked before any work: a wrong --clip would otherwise fail deep inside transformers
        check_clip_dir(clip)
    metrics = evaluate_tokenizer(args.model, clip_dir=args.clip, split=args.split, n=args.n,
                                 shapes=_recorded_shapes(args.model))
    _print_metrics(metrics)
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1) + "\n")
    return 0


def _recorded_shapes(model_dir: str):
    """The Shapes world a tokenizer was trained on (its image size in particular), from the recipe
    config saved beside it; None (the default world) when there is none."""
    from pathlib import Path

    from train_scripts.train_tokenizer import TokenizerTrainConfig

    for name in ("seed_stage2.yaml", "seed_stage1.yaml"):
        path = Path(model_dir) / name
        if path.is_file():
            return TokenizerTrainConfig.from_yaml(path).shapes
    return None


def _convert(args: argparse.Namespace) -> int:
    from seedtok.convert_seed import convert_seed_checkpoint

    out = convert_seed_checkpoint(args.checkpoint, args.vision, args.out)
    print(f"converted tokenizer written to {out}")
    return 0


def _train_decoder(args: argparse.Namespace) -> int:
    from train_scripts.train_decoder import train_main

    return train_main(args)


def _reconstruct(args: argparse.Namespace) -> int:
    from train_scripts.train_decoder import reconstruct_main

    return reconstruct_main(args)
