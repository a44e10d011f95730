"""Causal Q-Former: learned queries read the vision features through cross-attention, each query
attending only to itself and the queries before it.

SEED (arXiv:2307.08041) turns BLIP-2's Q-Former (arXiv:2301.12597) into a causal one so that the
32 query embeddings — and the codes quantised from them — form a left-to-right sequence an LLM can
predict. The transformer itself is transformers' ``Blip2QFormerModel`` (BERT-style layers,
cross-attention every ``cross_attention_frequency`` layers); this module adds the learned queries,
the LayerNorm SEED/BLIP-2 apply to the vision features (``ln_vision``), and the causal mask.

Why a 4-D *float* additive mask: transformers v5 rejects 3-D masks and passes a 4-D mask through
unchanged; a boolean 4-D mask is honoured by the sdpa kernel but *added* as 0/1 by the eager
kernel, which silently leaks future queries. A float mask of 0 / ``finfo.min`` is causal under
both (tests/seedtok/test_qformer.py checks it for each implementation).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from seedtok.errors import CheckpointError, ConfigError
from seedtok.io import check_state_dict, load_hf_tensors

# Keys of the BLIP-2 text branch (its FFN for text tokens); a Q-Former built without text input
# never uses them, so they are skipped when present in a checkpoint.
_TEXT_FFN = re.compile(r"\.layer\.\d+\.(intermediate|output)\.")


def causal_query_mask(batch_size: int, num_queries: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask ``(B, 1, N, N)``: 0 where query i may attend to query j (j ≤ i), ``finfo.min`` elsewhere."""
    idx = torch.arange(num_queries, device=device)
    future = idx[None, :] > idx[:, None]  # (N, N): True above the diagonal
    mask = torch.zeros(num_queries, num_queries, dtype=dtype, device=device)
    mask = mask.masked_fill(future, torch.finfo(dtype).min)
    return mask[None, None].expand(batch_size, 1, num_queries, num_queries)


class CausalQFormer(nn.Module):
    """Learned queries + ``Blip2QFormerModel`` with a causal mask among the queries.

    Args:
        vision_width: width ``C`` of the vision features (cross-attention key/value input).
        hidden_size, num_layers, num_heads, intermediate_size: the BERT-style transformer
            (SEED: 768, 12, 12, 3072).
        num_queries: number of learned queries ``N`` (SEED: 32).
        cross_attention_frequency: a cross-attention block every this many layers (SEED: 2).
        causal: causal mask among the queries (SEED); ``False`` gives BLIP-2's bidirectional one.
        dropout: hidden and attention dropout (BERT: 0.1).
        layer_norm_eps: LayerNorm epsilon inside the Q-Former (BERT: 1e-12).
        text_vocab_size: if > 0, add BLIP-2's text branch (word/position embeddings and the text
            FFN) so :meth:`encode_text` can embed captions with the same transformer — what an
            image–text contrastive stage 1 needs. 0 (default) builds the image path only.
        max_text_len: position embeddings of the text branch.
        attn_implementation: ``"sdpa"`` or ``"eager"``.
    """

    def __init__(self, *, vision_width: int, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 intermediate_size: int = 3072, num_queries: int = 32, cross_attention_frequency: int = 2,
                 causal: bool = True, dropout: float = 0.1, layer_norm_eps: float = 1e-12,
                 text_vocab_size: int = 0, max_text_len: int = 512, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel
        from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

        if hidden_size % num_heads:
            raise ConfigError(f"qformer hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if attn_implementation not in ("sdpa", "eager"):
            raise ConfigError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
        config = Blip2QFormerConfig(
            hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            intermediate_size=intermediate_size, cross_attention_frequency=cross_attention_frequency,
            encoder_hidden_size=vision_width, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            layer_norm_eps=layer_norm_eps, use_qformer_text_input=text_vocab_size > 0,
            vocab_size=max(text_vocab_size, 1), max_position_embeddings=max_text_len,
        )
        config._attn_implementation = attn_implementation
        self.num_queries = num_queries
        self.causal = causal
        self.vision_norm = nn.LayerNorm(vision_width)  # BLIP-2 / SEED "ln_vision"
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, hidden_size) * 0.02)
        self.qformer = Blip2QFormerModel(config)
        self.text_embeddings = Blip2TextEmbeddings(config) if text_vocab_size > 0 else None

    @property
    def hidden_size(self) -> int:
        return self.qformer.config.hidden_size

    @property
    def vision_width(self) -> int:
        return self.vision_norm.normalized_shape[0]

    def forward(self, vision_features: torch.Tensor, vision_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Query embeddings for a batch of images.

        Args:
            vision_features: ``(B, T, C)`` features of the frozen vision tower.
            vision_mask: optional ``(B, T)`` 1/0 mask of valid vision tokens.

        Returns:
            ``(B, N, H)`` — output i depends on queries 0..i only when ``causal``.
        """
        B = vision_features.shape[0]
        image_embeds = self.vision_norm(vision_features.to(self.vision_norm.weight.dtype))
        queries = self.query_tokens.expand(B, -1, -1)  # (B, N, H)
        mask = None
        if self.causal:
            mask = causal_query_mask(B, self.num_queries, queries.dtype, queries.device)
        out = self.qformer(
            query_embeds=queries,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=vision_mask,
        )
        return out.last_hidden_state  # (B, N, H)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``(B, L)`` → text features ``(B, L, H)`` (bidirectional; token 0 is the [CLS] slot)."""
        if self.text_embeddings is None:
            raise ConfigError("this Q-Former has no text branch (build it with text_vocab_size > 0)")
        embeds = self.text_embeddings(input_ids=input_ids)
        return self.qformer(query_embeds=embeds, query_length=0, attention_mask=attention_mask).last_hidden_state

    # ---- BLIP-2 initialisation ------------------------------------------------------------------

    @classmethod
    def from_blip2(cls, model_dir: str | os.PathLike, *, causal: bool = True, dropout: float = 0.1,
                   text: bool = False, attn_implementation: str = "sdpa") -> CausalQFormer:
        """Initialise from a saved transformers BLIP-2 model (``Blip2Model``, ``Blip2ForConditionalGeneration``, …).

        Reads only ``qformer.*``, ``query_tokens`` and ``vision_model.post_layernorm.*`` (BLIP-2's
        ``ln_vision``) from the safetensors — the language model is never loaded. With ``text=True``
        the text branch (``embeddings.*`` and the text FFN) must be in the checkpoint too
        (``Blip2ForImageTextRetrieval`` has it). Missing, unexpected or mis-shaped tensors raise
        CheckpointError.
        """
        from transformers import AutoConfig

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise CheckpointError(f"not a Hugging Face model directory (no config.json): {model_dir}")
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        if config.model_type != "blip-2":
            raise CheckpointError(f"{model_dir}: expected a BLIP-2 model, found model type '{config.model_type}'")
        qc = config.qformer_config
        module = cls(
            vision_width=qc.encoder_hidden_size, hidden_size=qc.hidden_size, num_layers=qc.num_hidden_layers,
            num_heads=qc.num_attention_heads, intermediate_size=qc.intermediate_size,
            num_queries=config.num_query_tokens, cross_attention_frequency=qc.cross_attention_frequency,
            causal=causal, dropout=dropout, layer_norm_eps=qc.layer_norm_eps,
            text_vocab_size=qc.vocab_size if text else 0, max_text_len=qc.max_position_embeddings,
            attn_implementation=attn_implementation,
        )

        def wanted(key: str) -> bool:
            if key == "query_tokens" or key.startswith("vision_model.post_layernorm."):
                return True
            if key.startswith("qformer."):
                return text or not _TEXT_FFN.search(key)
            return text and key.startswith("embeddings.")

        tensors = load_hf_tensors(model_dir, wanted)
        state = {}
        for key, value in tensors.items():
            if key.startswith("vision_model.post_layernorm."):
                key = "vision_norm." + key.removeprefix("vision_model.post_layernorm.")
            elif key.startswith("embeddings."):
                key = "text_embeddings." + key.removeprefix("embeddings.")
            state[key] = value
        expected = module.state_dict()
        check_state_dict(expected, state, f"BLIP-2 Q-Former in {model_dir}")
        module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
        return module
