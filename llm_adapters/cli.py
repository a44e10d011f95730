"""``seed chat | generate | caption | llm merge``: the chat model from the command line.

    seed chat --model DIR [--image PATH]…                 multi-turn chat on stdin/stdout
    seed generate --model DIR --prompt "…" --out x.png [--n 4 --seed S]
    seed generate --model DIR --prompts FILE --out OUTDIR  OUTDIR/00000.png + 00000.txt, …
    seed caption --model DIR IMG…                         one "path<TAB>caption" line per image
    seed llm merge --model DIR --out OUT                  fold DIR/adapter into a plain HF directory
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from seedtok.errors import ConfigError, DataError

_LLM_SUB = "_seed_llm_subparsers"


def llm_group(subparsers: Any) -> Any:
    """The sub-command set of ``seed llm`` (created on first use, so several packages can add to it)."""
    parser = subparsers.choices.get("llm")
    if parser is None:
        parser = subparsers.add_parser("llm", help="LLM training and adapters",
                                       description="LLM training and adapters (LoRA merge, …).")
        setattr(parser, _LLM_SUB, parser.add_subparsers(dest="llm_command", metavar="COMMAND"))
    return getattr(parser, _LLM_SUB)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, metavar="DIR", help="chat-model directory")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def _add_sampling_args(p: argparse.ArgumentParser, *, sample_default: bool) -> None:
    if sample_default:
        p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    else:
        p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = all (default: 0)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance on image tokens; 1 = off (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("chat", help="chat with a model: text and images in, text and images out",
                              description="Multi-turn chat on stdin. Lines: a message; '/image PATH' attaches an "
                                          "image to the next message; '/reset' clears the history; '/quit' ends.")
    _add_model_args(p)
    p.add_argument("--image", type=Path, action="append", default=[], metavar="PATH",
                   help="image to send with the first message (repeatable)")
    p.add_argument("--out-dir", type=Path, default=Path("seed_chat_images"),
                   help="where generated images are saved as PNG (default: ./seed_chat_images)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--mode", choices=["auto", "text", "image"], default="auto",
                   help="generation_mode of every reply (default: auto)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest reply in tokens (default: 128)")
    _add_sampling_args(p, sample_default=False)
    p.set_defaults(func=_chat)

    p = subparsers.add_parser("generate", help="text → image with a chat model",
                              description="Generate images from one prompt (--prompt, --out x.png) or from a file "
                                          "of prompts, one a line (--prompts FILE, --out OUTDIR → OUTDIR/00000.png "
                                          "and OUTDIR/00000.txt, …).")
    _add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", type=Path, metavar="FILE", help="a text file, one prompt a line")
    p.add_argument("--out", type=Path, required=True,
                   help="PNG path for --prompt (with --n > 1: STEM_0.png, STEM_1.png, …); a directory for --prompts")
    p.add_argument("--n", type=int, default=1, help="images per prompt (default: 1)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences generated together (default: 16)")
    _add_sampling_args(p, sample_default=True)
    p.set_defaults(func=_generate)

    p = subparsers.add_parser("caption", help="image → caption with a chat model",
                              description="Print one line per image: its path, a tab, the caption (greedy, or beam search "
                                          "with --num-beams).")
    _add_model_args(p)
    p.add_argument("images", type=Path, nargs="+", metavar="IMG", help="image files")
    p.add_argument("--instruction", default=None, help="user text after the image (default: the training one)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest caption in tokens (default: 64)")
    p.add_argument("--batch-size", type=int, default=16, help="images captioned together (default: 16)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (default: 1 = greedy)")
    p.set_defaults(func=_caption)

    p = llm_group(subparsers).add_parser(
        "merge", help="fold a LoRA adapter into the weights",
        description="Load DIR with DIR/adapter, merge the adapter, and write a plain Hugging Face chat-model "
                    "directory (no adapter/) to OUT.")
    p.add_argument("--model", type=Path, required=True, metavar="DIR", help="chat-model directory with adapter/")
    p.add_argument("--out", type=Path, required=True, metavar="OUT", help="new directory for the merged model")
    p.set_defaults(func=_merge)


# ---- handlers -------------------------------------------------------------------------------------


def _load(args: argparse.Namespace, **kwargs: Any) -> Any:
    from llm_adapters.chat import SeedChat

    return SeedChat.from_pretrained(args.model, device=args.device, **kwargs)


def _sampling(args: argparse.Namespace, *, sample: bool) -> dict[str, Any]:
    return dict(do_sample=sample, temperature=args.temperature, top_k=args.top_k, guidance_scale=args.guidance_scale)


def _generate(args: argparse.Namespace) -> int:
    from llm_adapters.chat import save_png

    if args.n < 1:
        raise ConfigError(f"--n must be ≥ 1, got {args.n}")
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise DataError(f"prompts file not found: {args.prompts}")
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
        if not prompts:
            raise DataError(f"{args.prompts}: no prompts (one a line)")
        if args.out.exists() and not args.out.is_dir():
            raise ConfigError(f"--out {args.out} must be a directory with --prompts")
    else:
        if not args.prompt.strip():
            raise DataError("--prompt is empty: nothing to generate an image from")
        prompts = [args.prompt]
    chat = _load(args)
    if not chat.can_draw:
        raise ConfigError(f"{args.model}: its seed_tokenizer/ has no image_decoder/, so images cannot be painted")
    sampling = _sampling(args, sample=not args.greedy)
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        images = chat.generate_images(chunk, n=args.n, seed=args.seed + start, batch_size=args.batch_size, **sampling)
        for i, (prompt, pictures) in enumerate(zip(chunk, images), start):
            if args.prompts is not None:
                (args.out).mkdir(parents=True, exist_ok=True)
                (args.out / f"{i:05d}.txt").write_text(prompt + "\n")
                names = [f"{i:05d}.png"] if args.n == 1 else [f"{i:05d}_{j}.png" for j in range(args.n)]
                paths = [args.out / name for name in names]
            else:
                paths = [args.out] if args.n == 1 else [
                    args.out.with_name(f"{args.out.stem}_{j}{args.out.suffix or '.png'}") for j in range(args.n)]
            for path, picture in zip(paths, pictures):
                print(save_png(picture, path), flush=True)
    return 0


def _caption(args: argparse.Namespace) -> int:
    from llm_adapters.chat_template import CAPTION_INSTRUCTION

    for path in args.images:
        if not path.is_file():
            raise DataError(f"image not found: {path}")
    if args.num_beams < 1:
        raise ConfigError(f"--num-beams must be ≥ 1, got {args.num_beams}")
    chat = _load(args, load_image_decoder=False)
    instruction = args.instruction if args.instruction is not None else CAPTION_INSTRUCTION
    for start in range(0, len(args.images), args.batch_size):
        chunk = args.images[start:start + args.batch_size]
        captions = chat.caption(chunk, instruction=instruction, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, num_beams=args.num_beams)
        for path, caption in zip(chunk, captions):
            print(f"{path}\t{' '.join(caption.split())}", flush=True)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from llm_adapters.chat import save_png

    for path in args.image:
        if not path.is_file():
            raise DataError(f"image not found: {path}")
    chat = _load(args)
    chat.system = args.system
    interactive = sys.stdin.isatty()
    pending = list(args.image)
    turn = 0
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() in ("/quit", "/exit"):
            break
        if line.strip() == "/reset":
            chat.reset()
            print("(history cleared)", flush=True)
            continue
        if line.startswith("/image "):
            path = Path(line[len("/image "):].strip())
            if not path.is_file():
                print(f"error: image not found: {path}", file=sys.stderr, flush=True)
            else:
                pending.append(path)
            continue
        if not line.strip() and not pending:
            continue
        print("assistant> ", end="", flush=True)
        for chunk in chat.stream(line, images=pending or None, generation_mode=args.mode,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed + turn,
                                 **_sampling(args, sample=args.sample)):
            print(chunk, end="", flush=True)
        print(flush=True)
        reply = chat.last_reply
        if reply.codes and not reply.images:
            print(f"({len(reply.codes)} image(s) generated; this model has no image decoder to paint them)", flush=True)
        for j, picture in enumerate(reply.images):
            print(f"image: {save_png(picture, args.out_dir / f'turn{turn:03d}_{j}.png')}", flush=True)
        pending = []
        turn += 1
    return 0


def _merge(args: argparse.Namespace) -> int:
    from llm_adapters.chat_model import merge_chat_model

    print(merge_chat_model(args.model, args.out))
    return 0
