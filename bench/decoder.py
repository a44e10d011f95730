"""Throughput of the unCLIP image decoder: images per second at its default resolution and step count.

    .venv/bin/python -m bench.decoder --decoder runs/decoder/decoder [--n 32] [--batch-size 16] [--threads 1]
    .venv/bin/python -m bench.decoder --clip runs/clip/model      # untrained embedded default (same speed)

``--decoder`` takes a decoder directory (``train_decoder``'s ``OUT/decoder``, or any local Stable
unCLIP directory) or a SEED tokenizer directory with an ``image_decoder/``. Without it, the
embedded default's architecture is built with random weights around the CLIP at ``--clip``
(sampling cost does not depend on the weights). Prints a table and one JSON line (also written to
``--json``); sampling settings are the decoder's own unless overridden.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def load_or_build(decoder: Path | None, clip: Path | None):
    from seedtok.unclip import (
        UnCLIPImageDecoder,
        UnCLIPSamplingConfig,
        assemble_pipeline,
        build_noising,
        build_schedulers,
        build_unet,
        build_vae,
        load_clip_parts,
    )

    if decoder is not None:
        if (decoder / "image_decoder").is_dir():
            decoder = decoder / "image_decoder"
        return UnCLIPImageDecoder.from_pretrained(decoder)
    if clip is None:
        raise SystemExit("error: pass --decoder DIR or --clip DIR")
    from train_scripts.train_decoder import DecoderTrainConfig

    cfg = DecoderTrainConfig()
    parts = load_clip_parts(clip)
    embed_dim = parts["image_encoder"].config.projection_dim
    vae = build_vae(block_out_channels=cfg.vae_block_out_channels, latent_channels=cfg.vae_latent_channels)
    side = parts["image_encoder"].config.image_size // 2 ** (len(cfg.vae_block_out_channels) - 1)
    unet = build_unet(embed_dim=embed_dim, in_channels=cfg.vae_latent_channels, sample_size=side,
                      block_out_channels=cfg.unet_block_out_channels, attention_levels=cfg.unet_attention_levels,
                      cross_attention_dim=parts["text_encoder"].config.hidden_size)
    normalizer, noising = build_noising(embed_mean=torch.zeros(embed_dim), embed_std=torch.ones(embed_dim))
    pipe = assemble_pipeline(clip, vae=vae, unet=unet, scheduler=build_schedulers(sampler=cfg.sampler)[1],
                             image_normalizer=normalizer, image_noising_scheduler=noising)
    return UnCLIPImageDecoder(pipe, UnCLIPSamplingConfig(num_inference_steps=cfg.num_inference_steps,
                                                         guidance_scale=cfg.guidance_scale))


def bench(decoder, n: int, batch_size: int, steps: int | None, guidance: float | None, repeats: int = 2) -> dict:
    """Best of ``repeats`` timed runs decoding ``n`` random embeddings (after one warm-up batch)."""
    emb = torch.randn(n, decoder.embed_dim, generator=torch.Generator().manual_seed(0))
    kw = dict(batch_size=batch_size, num_inference_steps=steps, guidance_scale=guidance)
    decoder.decode(emb[:batch_size], **kw)  # warm-up (allocations, kernel selection)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        decoder.decode(emb, **kw)
        best = max(best, n / (time.perf_counter() - t))
    s = decoder.sampling
    return {
        "python": platform.python_version(), "threads": torch.get_num_threads(), "n": n, "batch_size": batch_size,
        "image_size": decoder.image_size, "steps": steps or s.num_inference_steps,
        "guidance_scale": guidance if guidance is not None else s.guidance_scale,
        "unet_params_M": round(sum(p.numel() for p in decoder.pipeline.unet.parameters()) / 1e6, 3),
        "images_per_s": round(best, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--decoder", type=Path, default=None, help="decoder or tokenizer directory")
    p.add_argument("--clip", type=Path, default=None, help="CLIP directory (untrained embedded default)")
    p.add_argument("--n", type=int, default=32, help="images per timed run (default: 32)")
    p.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (default: 16)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the decoder's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the decoder's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = bench(load_or_build(args.decoder, args.clip), args.n, args.batch_size, args.steps, args.guidance)
    print(f"{'image size':<14}{'steps':>6}{'guidance':>10}{'threads':>9}{'images/s':>10}")
    print(f"{result['image_size']:<14}{result['steps']:>6}{result['guidance_scale']:>10.1f}{result['threads']:>9}"
          f"{result['images_per_s']:>10.2f}")
    line = json.dumps(result)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
