"""A training-only captioning head for tokenizer stage 2 (image-grounded text generation).

SEED's Causal Q-Former starts from BLIP-2's Q-Former, which was pre-trained with three
objectives: contrastive (ITC), matching (ITM) and image-grounded text *generation* (ITG). The
embedded default trains its Q-Former from nothing and had only the contrastive one. Measured on the
Shapes world (session-3 notes in the README): the quantised codes do keep a pair's relation (the
embedding decoded from them picks the scene's caption over its mirror's 93% of the time), but only
a reader co-trained with them can find it; a fresh reader — a probe, or the LLM learning image-token
rows from scratch — stays at chance on the relation. This head makes the codes carry the caption
in a form a small causal text model can read token by token, which is what the LLM has to do.

It is a tiny prefix language model over ``[code vectors ; caption tokens]``: the N quantised code
vectors (after the straight-through estimator, so the gradient reaches the code projection and
the codebook) are projected to the head's width, the caption is embedded with the CLIP text
tokenizer's ids, and a causal transformer predicts each caption token. It is dropped on save.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seedtok.errors import ConfigError


class CaptionHead(nn.Module):
    """Prefix LM: N code vectors (B, N, D) condition a caption (B, L) of token ids.

    Args:
        code_dim: D, the quantiser's code dimension.
        num_codes: N, codes per image.
        vocab_size: the caption tokenizer's vocabulary size; its last id is padding
            (:func:`caption_token_ids`'s convention), never a target.
        max_len: longest caption in tokens (including BOS/EOS).
        width / layers / heads: the transformer's size (kept small: the codes must do the work).
    """

    def __init__(self, code_dim: int, num_codes: int, vocab_size: int, max_len: int,
                 width: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.num_codes = num_codes
        self.pad_id = vocab_size - 1
        self.code_in = nn.Linear(code_dim, width)
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(num_codes + max_len, width))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab_size)

    def forward(self, codes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """codes: (B, N, D) float; ids: (B, L) long, BOS first. Returns logits (B, L, V): position t
        predicts token t + 1 (the last one predicts past the end and is ignored by the loss)."""
        B, N, _ = codes.shape
        L = ids.shape[1]
        x = torch.cat([self.code_in(codes.float()), self.tok_emb(ids)], 1) + self.pos[: N + L]
        mask = nn.Transformer.generate_square_subsequent_mask(N + L, device=x.device, dtype=x.dtype)
        h = self.blocks(x, mask=mask, is_causal=True)
        return self.out(self.norm(h[:, N:]))

    def loss(self, codes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the caption's real tokens (pads ignored)."""
        logits = self(codes, ids)[:, :-1]
        target = ids[:, 1:].masked_fill(ids[:, 1:] == self.pad_id, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def token_accuracy(self, codes: torch.Tensor, ids: torch.Tensor) -> float:
        """Teacher-forced next-token accuracy over real caption tokens (a validation readout)."""
        pred = self(codes, ids)[:, :-1].argmax(-1)
        target = ids[:, 1:]
        real = target != self.pad_id
        return ((pred == target) & real).sum().item() / max(1, real.sum().item())

    @torch.no_grad()
    def generate(self, codes: torch.Tensor, bos_id: int, eos_id: int, max_len: int) -> torch.Tensor:
        """Greedy captions (B, ≤ max_len) starting with BOS; rows stop at EOS (the rest is EOS)."""
        ids = torch.full((codes.shape[0], 1), bos_id, dtype=torch.long, device=codes.device)
        done = torch.zeros(codes.shape[0], dtype=torch.bool, device=codes.device)
        for _ in range(max_len - 1):
            nxt = self(codes, ids)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == eos_id
            if bool(done.all()):
                break
        return ids


def caption_token_ids(tok, captions: Sequence[str]) -> tuple[torch.Tensor, int]:
    """Captions → (n, L) ids with a text tokenizer (the CLIP directory's own; BOS … EOS, right-padded).

    Returns ``(ids, vocab_size)``. The pad id is a dedicated extra id, ``vocab_size - 1``
    (:attr:`CaptionHead.pad_id`), so it never collides with EOS, which is a real target.
    """
    enc = tok(list(captions), add_special_tokens=True)["input_ids"]
    if not enc:
        raise ConfigError("caption head: no captions to tokenize")
    pad_id = len(tok)
    L = max(len(e) for e in enc)
    ids = torch.full((len(enc), L), pad_id, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
    return ids, pad_id + 1
