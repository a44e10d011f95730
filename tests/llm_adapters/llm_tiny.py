"""Tiny random models for the llm_adapters tests (and for other packages' tests that need a chat model).

* a sentencepiece LLaMA tokenizer trained on a few hundred Shapes-like lines,
* a tiny SEED tokenizer (K = 16 codes, N = 4 codes per image) with a tiny embedded unCLIP decoder
  (16-px images), built with the seedtok tests' builders,
* a tiny random LLaMA (hidden 64, 2 layers) with the image tokens, saved as a chat-model directory.

Import from another test directory with ``sys.path.insert(0, "tests/llm_adapters")``.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

_SEEDTOK_TESTS = Path(__file__).resolve().parents[1] / "seedtok"
if str(_SEEDTOK_TESTS) not in sys.path:
    sys.path.insert(0, str(_SEEDTOK_TESTS))

from test_unclip_decoder import E, build_embedded, write_tokenizer  # noqa: E402 — the seedtok tests' builders

K, N = 16, 4  # codebook size, codes per image
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")


def corpus() -> list[str]:
    """Shapes-like captions plus the chat words (≈ 330 lines)."""
    lines = [f"a {size} {c} {s} in the {p}" for size, c, s, p in
             itertools.product(("small", "large"), COLOURS, SHAPES, POSITIONS)]
    lines += ["USER: Describe the image.", "ASSISTANT: a small red circle", "draw a blue square", "hello there"]
    return lines


def build_sp_tokenizer(path: Path, vocab_size: int = 400):
    from llm_adapters.sp_tokenizer import train_llama_tokenizer

    return train_llama_tokenizer(corpus(), path, vocab_size=vocab_size)


def build_clip_dir(path: Path) -> Path:
    """A full tiny CLIP directory (both towers, tokenizer, image processor) — the unCLIP decoder's image encoder."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.CLIPModel(tf.CLIPConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=60, max_position_embeddings=8),
        projection_dim=E))
    model.save_pretrained(path)
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    write_tokenizer(path)
    return path


def build_seed_tokenizer_dir(root: Path, *, decoder: bool = True) -> Path:
    """A tiny random SEED tokenizer (K=16, N=4) saved at ``root/seed_tok`` (with ``image_decoder/`` if ``decoder``)."""
    from seedtok.quantizers import QuantizerConfig
    from seedtok.tokenizer import (
        DecoderConfig,
        QFormerConfig,
        SeedTokenizer,
        SeedTokenizerConfig,
        VisionTowerConfig,
    )
    from seedtok.unclip import UnCLIPImageDecoder, UnCLIPSamplingConfig

    clip_dir = build_clip_dir(root / "clip")
    config = SeedTokenizerConfig(
        vision=VisionTowerConfig(path=str(clip_dir)),
        qformer=QFormerConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64),
        num_queries=N, quantizer=QuantizerConfig(codebook_size=K, dim=4),
        decoder=DecoderConfig(num_layers=1, num_heads=4, down_dims=[8, 4]), embed_dim=E,
    )
    torch.manual_seed(0)
    tok = SeedTokenizer.from_config(config).eval()
    if decoder:
        tok.image_decoder = UnCLIPImageDecoder(build_embedded(clip_dir),
                                               UnCLIPSamplingConfig(num_inference_steps=2, guidance_scale=2.0))
    return tok.save_pretrained(root / "seed_tok")


def tiny_preset():
    from llm_adapters.builders import LlamaPreset

    return LlamaPreset(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                       max_position_embeddings=256)


def build_chat_dir(root: Path, seed_tokenizer_dir: Path, *, name: str = "chat", seed: int = 0) -> Path:
    """A tiny random LLaMA chat-model directory at ``root/name`` over the given SEED tokenizer."""
    from llm_adapters.builders import build_chat_model
    from llm_adapters.chat_model import save_chat_model
    from seedtok.tokenizer import SeedTokenizer

    tokenizer = build_sp_tokenizer(root / f"{name}_sp")
    seed_tok = SeedTokenizer.from_pretrained(seed_tokenizer_dir, load_image_decoder=False)
    model, processor = build_chat_model(tokenizer, seed_tok, preset=tiny_preset(), seed=seed,
                                        seed_tokenizer_dir=seed_tokenizer_dir)
    return save_chat_model(root / name, model, processor)
