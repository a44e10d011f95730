"""SEED image tokens in a LLaMA: vocabulary, LoRA/QLoRA, processor and chat template, constrained generation, chat.

Modules (read in this order): ``image_vocab`` (codes ↔ ids), ``sp_tokenizer`` (the embedded default's
sentencepiece LLaMA tokenizer), ``chat_template``, ``processor`` (SeedProcessor), ``builders``,
``lora``, ``chat_model`` (the directory format), ``generation`` (logits processors), ``chat``
(SeedChat), ``cli``.

The names below are exported lazily so that ``import llm_adapters`` (e.g. by ``seed --help``) does
not import transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ImageVocab": "image_vocab", "add_image_tokens": "image_vocab", "init_image_embeddings": "image_vocab",
    "BOI": "image_vocab", "EOI": "image_vocab", "IMAGE_TOKEN": "image_vocab",
    "train_llama_tokenizer": "sp_tokenizer",
    "CHAT_TEMPLATE": "chat_template", "CAPTION_INSTRUCTION": "chat_template", "chat_labels": "chat_template",
    "SeedProcessor": "processor",
    "LlamaPreset": "builders", "build_llama": "builders", "build_chat_model": "builders", "build_processor": "builders",
    "LoraSettings": "lora", "apply_lora": "lora", "load_base_for_qlora": "lora",
    "save_chat_model": "chat_model", "load_chat_model": "chat_model", "save_adapter": "chat_model",
    "merge_chat_model": "chat_model",
    "ImageSpanLogitsProcessor": "generation", "ImageCFGLogitsProcessor": "generation", "generate": "generation",
    "SeedChat": "chat", "ChatReply": "chat",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llm_adapters' has no attribute {name!r}")
    return getattr(importlib.import_module(f"llm_adapters.{module}"), name)
