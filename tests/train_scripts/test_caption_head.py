"""The tokenizer's training-only captioning head: causal, pad-blind, and it learns to caption codes."""

from __future__ import annotations

import torch

from train_scripts.caption_head import CaptionHead

PAD = 9  # the head's pad id: vocab_size - 1


def _head(seed: int = 0) -> CaptionHead:
    torch.manual_seed(seed)
    return CaptionHead(code_dim=4, num_codes=3, vocab_size=10, max_len=6, width=32, layers=1, heads=2)


def test_logits_are_causal_over_the_caption():
    head = _head().eval()
    codes = torch.randn(2, 3, 4)
    ids = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 5, 4, 3, 2, 1]])
    changed = ids.clone()
    changed[:, 4:] = 7
    a, b = head(codes, ids), head(codes, changed)
    assert a.shape == (2, 6, 10)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # positions before the change see nothing of it
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    # …and every position sees the codes.
    assert not torch.allclose(head(codes + 1.0, ids)[:, 0], a[:, 0])


def test_loss_ignores_padding():
    head = _head().eval()
    codes = torch.randn(2, 3, 4)
    ids = torch.tensor([[0, 1, 2, 3, PAD, PAD], [0, 5, 4, 3, 2, PAD]])
    ref = head.loss(codes, ids)
    # Removing the padded tail changes nothing either: the loss covers real tokens only.
    short = head.loss(codes[:1], ids[:1, :4])
    full = head.loss(codes[:1], ids[:1])
    torch.testing.assert_close(short, full)
    assert torch.isfinite(ref)


def test_head_learns_to_caption_codes():
    """Two code patterns, two captions that differ only in their middle token (as a relation does)."""
    head = _head(1)
    codes = torch.randn(2, 3, 4)
    ids = torch.tensor([[0, 1, 2, 3, 8, PAD], [0, 1, 6, 3, 8, PAD]])
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    before = head.token_accuracy(codes, ids)
    for _ in range(150):
        loss = head.loss(codes, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert head.token_accuracy(codes, ids) == 1.0 > before
    # Greedy decoding writes each pattern's caption and stops at EOS (8).
    assert head.generate(codes, bos_id=0, eos_id=8, max_len=6).tolist() == [[0, 1, 2, 3, 8], [0, 1, 6, 3, 8]]
