"""Embedding decoder: quantised codes → (a) the N causal Q-Former outputs and (b) an unCLIP image embedding.

This is SEED's stage-2 head (arXiv:2307.08041, SEED-LLaMA's released tokenizer): the code vectors
are lifted back to the Q-Former width (``decode_task_layer``: Linear–Tanh–Linear), then two
branches, each a learned position embedding plus a few pre-norm transformer blocks:

* the *query* branch reconstructs the N Q-Former outputs (trained with a cosine loss);
* the *embedding* branch shrinks every token with a bias-free MLP (H → 256 → 128 → 32, ReLU),
  flattens the N tokens and projects them to the unCLIP image embedding (1024-d for
  Stable unCLIP / CLIP ViT-H; trained with MSE).

The blocks are ``nn.TransformerEncoderLayer`` (``norm_first``, GELU, fused QKV with bias) — the
same computation as the ViT blocks of SEED's code, so its weights map one to one.

:func:`stage2_loss` combines SEED's three terms: ``5·VQ + 2·(1 − cos) + 0.5·MSE`` (weights configurable).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seedtok.schema import ConfigBase, option


def _blocks(hidden_size: int, num_layers: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
    return nn.ModuleList(
        nn.TransformerEncoderLayer(
            d_model=hidden_size, nhead=num_heads, dim_feedforward=int(hidden_size * mlp_ratio), dropout=0.0,
            activation="gelu", layer_norm_eps=1e-6, batch_first=True, norm_first=True,
        )
        for _ in range(num_layers)
    )


class EmbeddingDecoder(nn.Module):
    """Codes ``(B, N, code_dim)`` → reconstructed queries ``(B, N, H)`` and image embedding ``(B, embed_dim)``.

    Args:
        code_dim: size of the quantised code vectors.
        hidden_size: Q-Former width ``H`` (SEED: 768).
        num_queries: ``N`` (SEED: 32).
        num_layers, num_heads, mlp_ratio: each branch's transformer blocks (SEED: 4, 12, 4.0).
        embed_dim: size of the unCLIP image embedding (SEED: 1024).
        down_dims: widths of the per-token MLP before flattening (SEED: 256, 128, 32).
    """

    def __init__(self, *, code_dim: int, hidden_size: int = 768, num_queries: int = 32, num_layers: int = 4,
                 num_heads: int = 12, mlp_ratio: float = 4.0, embed_dim: int = 1024,
                 down_dims: Sequence[int] = (256, 128, 32)):
        super().__init__()
        self.num_queries = num_queries
        self.code_up = nn.Sequential(nn.Linear(code_dim, code_dim), nn.Tanh(), nn.Linear(code_dim, hidden_size))
        self.query_pos = nn.Parameter(torch.zeros(1, num_queries, hidden_size))
        self.query_blocks = _blocks(hidden_size, num_layers, num_heads, mlp_ratio)
        self.embed_pos = nn.Parameter(torch.zeros(1, num_queries, hidden_size))
        self.embed_blocks = _blocks(hidden_size, num_layers, num_heads, mlp_ratio)
        down: list[nn.Module] = []
        widths = [hidden_size, *down_dims]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            down.append(nn.Linear(a, b, bias=False))
            if i < len(down_dims) - 1:
                down.append(nn.ReLU())
        self.embed_down = nn.Sequential(*down)
        self.embed_proj = nn.Linear(num_queries * widths[-1], embed_dim)

    @property
    def embed_dim(self) -> int:
        return self.embed_proj.out_features

    def _check(self, codes: torch.Tensor) -> None:
        if codes.ndim != 3 or codes.shape[1] != self.num_queries:
            raise ValueError(f"expected code vectors (B, {self.num_queries}, D), got {tuple(codes.shape)}")

    def decode_queries(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors ``(B, N, D)`` → reconstructed Q-Former outputs ``(B, N, H)``."""
        self._check(codes)
        x = self.code_up(codes) + self.query_pos
        for block in self.query_blocks:
            x = block(x)
        return x

    def decode_embedding(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors ``(B, N, D)`` → unCLIP image embedding ``(B, embed_dim)``."""
        self._check(codes)
        x = self.code_up(codes) + self.embed_pos
        for block in self.embed_blocks:
            x = block(x)
        x = self.embed_down(x)  # (B, N, down_dims[-1])
        return self.embed_proj(x.flatten(1))

    def forward(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs: ``(queries (B, N, H), image_embeds (B, embed_dim))``."""
        return self.decode_queries(codes), self.decode_embedding(codes)


@dataclass
class Stage2LossWeights(ConfigBase):
    """Weights of SEED's stage-2 loss terms."""

    vq: float = option(5.0, help="weight of the quantizer's loss (commitment/codebook terms)")
    cosine: float = option(2.0, help="weight of 1 − cos between reconstructed and true Q-Former outputs")
    mse: float = option(0.5, help="weight of the MSE to the unCLIP image embedding")


def cosine_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``1 − cos(pred, target)``; both ``(B, N, H)``."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def stage2_loss(*, vq_loss: torch.Tensor, pred_queries: torch.Tensor, target_queries: torch.Tensor,
                pred_embeds: torch.Tensor | None = None, target_embeds: torch.Tensor | None = None,
                weights: Stage2LossWeights | None = None) -> dict[str, torch.Tensor]:
    """SEED's stage-2 objective and its weighted parts.

    Args:
        vq_loss: scalar from the quantizer.
        pred_queries, target_queries: ``(B, N, H)``; the target is detached here.
        pred_embeds, target_embeds: ``(B, E)``; the MSE term is left out only when both are ``None``.
        weights: defaults to SEED's (5, 2, 0.5).

    Returns:
        ``{"vq", "cosine", "mse", "loss"}`` — the parts already multiplied by their weights (``mse``
        only when embeddings are given), and ``loss``, their sum.
    """
    w = weights or Stage2LossWeights()
    parts = {
        "vq": w.vq * vq_loss,
        "cosine": w.cosine * cosine_reconstruction_loss(pred_queries, target_queries.detach()),
    }
    if (pred_embeds is None) != (target_embeds is None):
        raise ValueError("pass both pred_embeds and target_embeds, or neither")
    if pred_embeds is not None:
        if pred_embeds.shape != target_embeds.shape:
            raise ValueError(f"embedding shapes differ: {tuple(pred_embeds.shape)} vs {tuple(target_embeds.shape)}")
        parts["mse"] = w.mse * F.mse_loss(pred_embeds.float(), target_embeds.detach().float())
    parts["loss"] = sum(parts.values())
    return parts
