"""EmbeddingDecoder and SEED's stage-2 loss (5·VQ + 2·(1−cos) + 0.5·MSE)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seedtok.embedding_decoder import (
    EmbeddingDecoder,
    Stage2LossWeights,
    cosine_reconstruction_loss,
    stage2_loss,
)

TINY = dict(code_dim=8, hidden_size=32, num_queries=6, num_layers=1, num_heads=4, embed_dim=24, down_dims=(16, 8, 4))


def test_shapes_and_the_two_branches_are_separate():
    torch.manual_seed(0)
    decoder = EmbeddingDecoder(**TINY).eval()
    codes = torch.randn(3, 6, 8)
    queries, embeds = decoder(codes)
    assert queries.shape == (3, 6, 32) and embeds.shape == (3, 24) and decoder.embed_dim == 24
    torch.testing.assert_close(decoder.decode_queries(codes), queries)
    torch.testing.assert_close(decoder.decode_embedding(codes), embeds)
    assert [type(m).__name__ for m in decoder.embed_down] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert all(m.bias is None for m in decoder.embed_down if isinstance(m, torch.nn.Linear))
    assert decoder.embed_proj.in_features == 6 * 4
    with pytest.raises(ValueError, match="expected code vectors"):
        decoder(torch.randn(3, 5, 8))


def test_stage2_loss_parts_are_weighted_and_sum_to_the_loss():
    torch.manual_seed(0)
    vq = torch.tensor(0.3)
    pred_q, target_q = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    pred_e, target_e = torch.randn(2, 24), torch.randn(2, 24)
    parts = stage2_loss(vq_loss=vq, pred_queries=pred_q, target_queries=target_q, pred_embeds=pred_e,
                        target_embeds=target_e)
    cos = (1 - F.cosine_similarity(pred_q, target_q, dim=-1)).mean()
    mse = ((pred_e - target_e) ** 2).mean()
    torch.testing.assert_close(parts["vq"], 5 * vq)
    torch.testing.assert_close(parts["cosine"], 2 * cos)
    torch.testing.assert_close(parts["mse"], 0.5 * mse)
    torch.testing.assert_close(parts["loss"], 5 * vq + 2 * cos + 0.5 * mse)
    custom = stage2_loss(vq_loss=vq, pred_queries=pred_q, target_queries=target_q,
                         weights=Stage2LossWeights(vq=1.0, cosine=0.0, mse=9.0))
    assert "mse" not in custom and torch.allclose(custom["loss"], vq)
    assert cosine_reconstruction_loss(target_q, target_q).abs() < 1e-6
    with pytest.raises(ValueError, match="both"):
        stage2_loss(vq_loss=vq, pred_queries=pred_q, target_queries=target_q, pred_embeds=pred_e)


def test_decoder_learns_to_reconstruct_a_small_batch():
    torch.manual_seed(0)
    decoder = EmbeddingDecoder(**TINY)
    codes = torch.randn(8, 6, 8)
    target_q, target_e = torch.randn(8, 6, 32), torch.randn(8, 24)
    opt = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        pq, pe = decoder(codes)
        parts = stage2_loss(vq_loss=torch.zeros(()), pred_queries=pq, target_queries=target_q, pred_embeds=pe,
                            target_embeds=target_e)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        losses.append(parts["loss"].item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
