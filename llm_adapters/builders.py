"""Builders: a LLaMA (random tiny preset or a loaded checkpoint) with the image tokens and chat template.

The presets hold the numbers; the model is transformers' ``LlamaForCausalLM``, so a chat-model
directory is a plain Hugging Face LLaMA directory plus ``image_vocab.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llm_adapters.chat_template import set_chat_template
from llm_adapters.image_vocab import add_image_tokens, init_image_embeddings
from llm_adapters.processor import SeedProcessor
from seedtok.errors import ConfigError
from seedtok.schema import ConfigBase, option


@dataclass
class LlamaPreset(ConfigBase):
    """Sizes of a LLaMA built from scratch (defaults: the embedded default, ~3.8 M parameters at vocab 2k)."""

    hidden_size: int = option(256, help="model width")
    num_layers: int = option(4, help="decoder layers")
    num_heads: int = option(4, help="attention heads")
    num_kv_heads: int = option(4, help="key/value heads (< num_heads = grouped-query attention)")
    intermediate_size: int = option(688, help="SwiGLU FFN width (LLaMA: ≈ 8/3 · hidden, rounded)")
    max_position_embeddings: int = option(512, help="longest sequence")
    rope_theta: float = option(10000.0, help="RoPE base")
    tie_word_embeddings: bool = option(False, help="share input and output embeddings (LLaMA does not)")


def build_llama(vocab_size: int, preset: LlamaPreset | None = None, *, tokenizer: Any = None,
                seed: int = 0) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` (fp32) with ``vocab_size`` rows.

    ``tokenizer`` (optional) supplies the bos/eos/pad ids for the config and generation config.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    p = preset or LlamaPreset()
    if p.num_heads < 1 or p.hidden_size % p.num_heads or p.num_heads % max(p.num_kv_heads, 1):
        raise ConfigError(f"num_heads ({p.num_heads}) must divide hidden_size ({p.hidden_size}) and be a multiple of "
                          f"num_kv_heads ({p.num_kv_heads})")
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
        max_position_embeddings=p.max_position_embeddings, tie_word_embeddings=p.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": p.rope_theta}, **ids,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if ids:
        for k, v in ids.items():
            setattr(model.generation_config, k, v)
    return model.eval()


def codebook_vectors(seed_tokenizer: Any) -> torch.Tensor:
    """The SEED tokenizer's K code vectors ``(K, D)`` (for ``init_image_embeddings(method="codebook")``)."""
    K = seed_tokenizer.codebook_size
    with torch.no_grad():
        return seed_tokenizer.quantizer.indices_to_codes(torch.arange(K, device=seed_tokenizer.device)[None])[0].cpu()


def build_processor(tokenizer: Any, seed_tokenizer: Any = None, *, codebook_size: int | None = None,
                    num_tokens: int | None = None, seed_tokenizer_dir: Any = None) -> SeedProcessor:
    """Add the image tokens, a pad token (``<unk>``) and the chat template to ``tokenizer`` (in place).

    K and N come from ``seed_tokenizer`` (a :class:`~seedtok.tokenizer.SeedTokenizer`), or from
    ``codebook_size`` and ``num_tokens`` when there is none.
    """
    if seed_tokenizer is not None:
        codebook_size, num_tokens = seed_tokenizer.codebook_size, seed_tokenizer.num_tokens
    if codebook_size is None or num_tokens is None:
        raise ConfigError("give a SEED tokenizer or both codebook_size and num_tokens")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    vocab = add_image_tokens(tokenizer, codebook_size, num_tokens)
    set_chat_template(tokenizer)
    return SeedProcessor(tokenizer, vocab, seed_tokenizer, seed_tokenizer_dir=seed_tokenizer_dir)


def build_chat_model(tokenizer: Any, seed_tokenizer: Any = None, *, codebook_size: int | None = None,
                     num_tokens: int | None = None, model: Any = None, preset: LlamaPreset | None = None,
                     init: str = "mean", seed: int = 0,
                     seed_tokenizer_dir: Any = None) -> tuple[Any, SeedProcessor]:
    """:func:`build_processor`, then give the LLM the matching embedding rows.

    Args:
        tokenizer: a LLaMA tokenizer without image tokens (modified in place).
        seed_tokenizer: a :class:`~seedtok.tokenizer.SeedTokenizer` (gives K and N, encodes/decodes images);
            or ``None`` with ``codebook_size`` and ``num_tokens``.
        model: an existing ``LlamaForCausalLM`` (resized, new rows initialised by ``init``); ``None`` builds a
            random one from ``preset`` with exactly ``vocab.vocab_size`` rows.
        init: ``"mean"`` or ``"codebook"`` (needs ``seed_tokenizer``) — see ``init_image_embeddings``. A fresh
            model (``model=None``) with ``"mean"`` keeps all its rows random.
        seed_tokenizer_dir: where ``seed_tokenizer`` was loaded from (saving copies it verbatim).

    Returns ``(model, processor)``.
    """
    processor = build_processor(tokenizer, seed_tokenizer, codebook_size=codebook_size, num_tokens=num_tokens,
                                seed_tokenizer_dir=seed_tokenizer_dir)
    vocab = processor.vocab
    if init == "codebook" and seed_tokenizer is None:
        raise ConfigError("init='codebook' needs the SEED tokenizer (its codebook vectors)")
    codebook = codebook_vectors(seed_tokenizer) if init == "codebook" else None
    if model is None and init == "mean":
        model = build_llama(vocab.vocab_size, preset, tokenizer=tokenizer, seed=seed)  # every row random
    else:
        if model is None:  # a fresh model whose image rows start from the codebook's geometry
            model = build_llama(vocab.offset, preset, tokenizer=tokenizer, seed=seed)
        init_image_embeddings(model, vocab, method=init, codebook=codebook, seed=seed)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.generation_config, k, getattr(tokenizer, k))
            setattr(model.config, k, getattr(tokenizer, k))
    return model, processor
