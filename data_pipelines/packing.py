"""Sequence packing: several tokenised samples per fixed-length row, none attending to another.

A row of length ``L`` holds samples back to back, then padding::

    input_ids     [s1 s1 s1 s1 | s2 s2 s2 | s3 s3 | pad pad]
    position_ids  [ 0  1  2  3 |  0  1  2 |  0  1 |   0   1]
    labels        [-100 .. .. | -100 .. .. | -100 .. | -100 -100]

Position ids restart at 0 for every sample. transformers (≥ 4.53, here 5.x) reads this layout
natively: when ``attention_mask`` is ``None`` and there is no KV cache, ``masking_utils``
derives a sequence index from every drop in ``position_ids`` (``find_packed_sequence_indices``)
and builds a block-diagonal causal mask for sdpa / eager / flex, and flash-attention uses the
same positions for varlen kernels. So a packed row needs no custom mask and no model patch — only
``position_ids`` and ``use_cache=False``. (``block_causal_mask`` below builds the equivalent 4-D
mask explicitly for models that lack this detection; the tests pin that both agree with running
each sample alone.)

The first token of each sample has label ``-100``: the causal-LM loss shifts labels by one, so
that position would otherwise ask the previous sample's last token to predict this sample's start.

Bins are filled by first-fit decreasing over a window of samples (a classic bin-packing
heuristic, ≤ 11/9·OPT + 1 rows): with short, similar samples (Shapes pairs) rows come out > 97%
full, where padding each sample to the longest in its batch wastes a third or more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from seedtok.errors import DataError

IGNORE_INDEX = -100


@dataclass
class TokenizedSample:
    """One training sample: ``input_ids`` and ``labels`` of equal length (``-100`` = no loss)."""

    input_ids: np.ndarray  # (T,) int64
    labels: np.ndarray  # (T,) int64

    def __post_init__(self) -> None:
        self.input_ids = np.asarray(self.input_ids, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.input_ids.shape != self.labels.shape or self.input_ids.ndim != 1:
            raise DataError(f"input_ids {self.input_ids.shape} and labels {self.labels.shape} must be equal 1-D")

    def __len__(self) -> int:
        return len(self.input_ids)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items of ``lengths`` into bins of ``capacity``; returns bins as lists of item indices.

    Items are placed longest first into the first bin with room. Ties keep input order, so the
    result is a pure function of the inputs. An item longer than ``capacity`` is a DataError.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise DataError(f"sample of {n} tokens does not fit a row of {capacity}")
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


@dataclass
class PackedBatch:
    """Rows of packed samples, ready for a causal LM.

    Attributes:
        input_ids: ``(B, L)`` long.
        labels: ``(B, L)`` long, ``-100`` where no loss (padding, prompts, each sample's first token).
        position_ids: ``(B, L)`` long, restarting at 0 for every sample (and for the padding tail).
        num_tokens: real (non-padding) tokens in the batch.
        num_samples: samples in the batch.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    num_tokens: int
    num_samples: int

    @property
    def num_loss_tokens(self) -> int:
        """Tokens that are predicted (labels after the causal shift that are not ``-100``)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``LlamaForCausalLM.forward`` (no attention mask: packing is
        detected from ``position_ids``)."""
        return {"input_ids": self.input_ids, "labels": self.labels, "position_ids": self.position_ids,
                "use_cache": False}

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.labels.to(device), self.position_ids.to(device),
                           self.num_tokens, self.num_samples)


def collate_packed(rows: Sequence[Sequence[TokenizedSample]], seq_len: int, pad_id: int) -> PackedBatch:
    """Lay out ``rows`` (each a list of samples whose lengths sum to ≤ ``seq_len``) as a PackedBatch."""
    B = len(rows)
    ids = np.full((B, seq_len), pad_id, dtype=np.int64)
    labels = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((B, seq_len), dtype=np.int64)
    n_tok = n_samples = 0
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s)
            if at + n > seq_len:
                raise DataError(f"row {r} holds {at + n} tokens, more than seq_len={seq_len}")
            ids[r, at:at + n] = s.input_ids
            labels[r, at:at + n] = s.labels
            labels[r, at] = IGNORE_INDEX  # nothing before a sample's first token may predict it
            pos[r, at:at + n] = np.arange(n)
            at += n
            n_samples += 1
        pos[r, at:] = np.arange(seq_len - at)  # padding: a segment of its own, never a label
        n_tok += at
    return PackedBatch(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(pos), n_tok, n_samples)


def pack(samples: Sequence[TokenizedSample], seq_len: int) -> list[list[TokenizedSample]]:
    """First-fit-decreasing rows of ``samples`` for rows of ``seq_len`` tokens."""
    bins = first_fit_decreasing([len(s) for s in samples], seq_len)
    return [[samples[i] for i in sorted(b)] for b in bins]


def collate_padded(samples: Sequence[TokenizedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """The unpacked alternative: one sample per row, right-padded to the longest in the batch.

    Returns ``input_ids``, ``labels`` and ``attention_mask`` ``(B, T_max)``.
    """
    T = max(len(s) for s in samples)
    B = len(samples)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for r, s in enumerate(samples):
        ids[r, :len(s)] = s.input_ids
        labels[r, :len(s)] = s.labels
        mask[r, :len(s)] = 1
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask)}


def sequence_index(position_ids: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` position ids → ``(B, L)`` index of the sample each token belongs to (0, 1, …)."""
    start = torch.ones_like(position_ids, dtype=torch.bool)
    start[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return start.long().cumsum(-1) - 1


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 4-D additive mask ``(B, 1, L, L)``: 0 where token ``i`` may attend to ``j`` (same sample,
    ``j ≤ i``), the dtype's minimum elsewhere — for attention code that does not detect packing."""
    seq = sequence_index(position_ids)  # (B, L)
    L = seq.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()
    allowed = (seq[:, :, None] == seq[:, None, :]) & causal  # (B, L, L)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seq.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


__all__ = [
    "IGNORE_INDEX", "PackedBatch", "TokenizedSample", "block_causal_mask", "collate_packed", "collate_padded",
    "first_fit_decreasing", "pack", "sequence_index",
]
