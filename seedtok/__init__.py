"""seedtok — a SEED-style causal 1D semantic image tokenizer (image → N discrete codes → unCLIP embedding).

Public names are imported lazily (PEP 562), so ``import seedtok.errors`` — which every CLI
module does — does not pay for torch.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any


class _DropHubKernelHint(logging.Filter):
    """bitsandbytes, which transformers, peft and diffusers import when it is installed, logs on every
    import on a CPU with AVX512-BF16 that it could not fetch an optional 4-bit kernel from the
    Hugging Face Hub (through the ``kernels`` package) and asks to install that package. This toolkit
    never downloads code or weights at run time and bitsandbytes falls back to its own kernel, so
    that one message is dropped; the logger's other messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropHubKernelHint())

_EXPORTS = {
    "ImageCodes": "seedtok.types",
    "FrozenVisionTower": "seedtok.vision",
    "CausalQFormer": "seedtok.qformer",
    "causal_query_mask": "seedtok.qformer",
    "Quantizer": "seedtok.quantizers",
    "QuantizerConfig": "seedtok.quantizers",
    "QuantizerOutput": "seedtok.quantizers",
    "CodeUsageTracker": "seedtok.quantizers",
    "build_quantizer": "seedtok.quantizers",
    "EmbeddingDecoder": "seedtok.embedding_decoder",
    "Stage2LossWeights": "seedtok.embedding_decoder",
    "stage2_loss": "seedtok.embedding_decoder",
    "SeedTokenizer": "seedtok.tokenizer",
    "SeedTokenizerConfig": "seedtok.tokenizer",
    "TokenizerOutput": "seedtok.tokenizer",
    "convert_seed_checkpoint": "seedtok.convert_seed",
    "convert_seed_state_dict": "seedtok.convert_seed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'seedtok' has no attribute {name!r}")

