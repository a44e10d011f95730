"""seedtok — a SEED-style causal 1D semantic image tokenizer (image → N discrete codes → unCLIP embedding).

Public names are imported lazily (PEP 562), so ``import seedtok.errors`` — which every CLI
module does — does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

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

