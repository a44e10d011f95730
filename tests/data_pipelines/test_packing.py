"""Packing: first-fit decreasing, the row layout, and — the point — a packed row computes exactly
what each of its samples computes alone (transformers' position-id packing detection, and the
explicit 4-D block mask), for logits and for the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipelines.packing import (
    IGNORE_INDEX,
    TokenizedSample,
    block_causal_mask,
    collate_packed,
    collate_padded,
    first_fit_decreasing,
    pack,
    sequence_index,
)
from seedtok.errors import DataError


def _samples(lengths, seed=0, vocab=64):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(3, vocab, n)
        labels = ids.copy()
        labels[: n // 3] = IGNORE_INDEX  # a prompt without loss
        out.append(TokenizedSample(ids, labels))
    return out


def test_first_fit_decreasing_fills_bins_and_keeps_every_item():
    lengths = [7, 3, 9, 1, 5, 5, 2, 8]
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 40 tokens in bins of 10, filled exactly: 9+1, 8+2, 7+3, 5+5
    with pytest.raises(DataError, match="does not fit"):
        first_fit_decreasing([11], 10)


def test_collate_packed_layout():
    rows = [[s for s in _samples([4, 3])], [s for s in _samples([2], seed=1)]]
    b = collate_packed(rows, 8, pad_id=0)
    assert b.input_ids.shape == (2, 8)
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert b.position_ids[1].tolist() == [0, 1, 0, 1, 2, 3, 4, 5]
    assert b.labels[0, 0] == IGNORE_INDEX and b.labels[0, 4] == IGNORE_INDEX  # each sample's first token
    assert (b.labels[1, 2:] == IGNORE_INDEX).all() and (b.input_ids[1, 2:] == 0).all()
    assert (b.num_tokens, b.num_samples) == (9, 3)
    assert sequence_index(b.position_ids)[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    with pytest.raises(DataError, match="more than seq_len"):
        collate_packed([_samples([5, 5])], 8, 0)


def _tiny_llama(impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation=impl)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_row_equals_each_sample_alone(impl):
    model = _tiny_llama(impl)
    samples = _samples([9, 5, 7, 3, 1, 6])
    rows = pack(samples, 16)
    assert len(rows) == 2  # 31 tokens in rows of 16
    batch = collate_packed(rows, 16, pad_id=0)
    with torch.no_grad():
        native = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        masked = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                       attention_mask=block_causal_mask(batch.position_ids)).logits
        for r, row in enumerate(rows):
            at = 0
            for s in row:
                alone = model(input_ids=torch.as_tensor(s.input_ids)[None], use_cache=False).logits[0]
                torch.testing.assert_close(native[r, at:at + len(s)], alone, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(masked[r, at:at + len(s)], alone, atol=1e-5, rtol=1e-5)
                at += len(s)
        # A packed row WITHOUT restarting positions would attend across samples: the check can fail.
        plain = model(input_ids=batch.input_ids, use_cache=False).logits
        s0, s1 = rows[0][0], rows[0][1]
        alone = model(input_ids=torch.as_tensor(s1.input_ids)[None], use_cache=False).logits[0]
        assert not torch.allclose(plain[0, len(s0):len(s0) + len(s1)], alone, atol=1e-3)


def test_packed_loss_is_the_token_mean_of_the_samples_alone():
    model = _tiny_llama("sdpa")
    samples = _samples([9, 5, 7, 3, 6], seed=3)
    batch = collate_packed(pack(samples, 16), 16, pad_id=0)
    with torch.no_grad():
        packed = model(**batch.model_inputs()).loss
        total = count = 0.0
        for s in samples:
            labels = torch.as_tensor(s.labels).clone()
            labels[0] = IGNORE_INDEX
            n = int((labels[1:] != IGNORE_INDEX).sum())
            total += model(input_ids=torch.as_tensor(s.input_ids)[None], labels=labels[None]).loss * n
            count += n
    assert batch.num_loss_tokens == count
    torch.testing.assert_close(packed, total / count, atol=1e-5, rtol=1e-5)


def test_collate_padded_masks_padding():
    out = collate_padded(_samples([3, 5]), pad_id=0)
    assert out["input_ids"].shape == (2, 5)
    assert out["attention_mask"].sum(1).tolist() == [3, 5]
    assert (out["labels"][0, 3:] == IGNORE_INDEX).all()
