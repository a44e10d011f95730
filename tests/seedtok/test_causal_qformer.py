"""CausalQFormer: truly causal under eager and sdpa attention; BLIP-2 initialisation loads exact weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from seedtok.errors import CheckpointError, ConfigError
from seedtok.qformer import CausalQFormer, causal_query_mask

TINY = dict(vision_width=24, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_queries=6,
            dropout=0.0)


def _perturb_query(qformer: CausalQFormer, feats: torch.Tensor, j: int) -> torch.Tensor:
    """Max change of each output position when query j's learned embedding is perturbed."""
    with torch.no_grad():
        base = qformer(feats)
        saved = qformer.query_tokens.clone()
        qformer.query_tokens[:, j] += torch.randn_like(qformer.query_tokens[:, j])
        moved = qformer(feats)
        qformer.query_tokens.copy_(saved)
    return (moved - base).abs().amax(dim=(0, 2))  # (N,)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_outputs_depend_only_on_earlier_queries(attn):
    torch.manual_seed(0)
    qformer = CausalQFormer(**TINY, attn_implementation=attn).eval()
    assert qformer.qformer.config._attn_implementation == attn
    feats = torch.randn(2, 10, 24)
    N = TINY["num_queries"]
    for j in range(N):
        delta = _perturb_query(qformer, feats, j)
        assert torch.all(delta[:j] == 0), f"{attn}: outputs before {j} moved: {delta[:j]}"
        assert torch.all(delta[j:] > 1e-5), f"{attn}: outputs from {j} on did not move: {delta[j:]}"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bidirectional_variant_leaks_as_a_control(attn):
    torch.manual_seed(0)
    qformer = CausalQFormer(**TINY, causal=False, attn_implementation=attn).eval()
    delta = _perturb_query(qformer, torch.randn(2, 10, 24), TINY["num_queries"] - 1)
    assert torch.all(delta > 1e-5)


def test_causal_under_bf16_autocast_and_mask_values():
    mask = causal_query_mask(2, 3, torch.float32, torch.device("cpu"))
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0, 0, 1] == torch.finfo(torch.float32).min and mask[0, 0, 2, 0] == 0 and mask[0, 0, 1, 1] == 0
    torch.manual_seed(0)
    qformer = CausalQFormer(**TINY).eval()
    feats = torch.randn(2, 10, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta = _perturb_query(qformer, feats, 3)
    assert torch.all(delta[:3] == 0) and torch.all(delta[3:] > 0)


def test_vision_mask_hides_padded_vision_tokens():
    torch.manual_seed(0)
    qformer = CausalQFormer(**TINY).eval()
    feats = torch.randn(1, 10, 24)
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[:, 7:] = 0
    changed = feats.clone()
    changed[:, 7:] = torch.randn(1, 3, 24)
    with torch.no_grad():
        torch.testing.assert_close(qformer(feats, mask), qformer(changed, mask))
        assert not torch.allclose(qformer(feats), qformer(changed))


def test_text_branch_encodes_captions():
    qformer = CausalQFormer(**TINY, text_vocab_size=50, max_text_len=16).eval()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        out = qformer.encode_text(ids, mask)
        assert out.shape == (2, 7, 32)
        ids2 = ids.clone()
        ids2[1, 5:] = (ids[1, 5:] + 1) % 50  # padding content must not matter
        torch.testing.assert_close(qformer.encode_text(ids2, mask)[1, :5], out[1, :5])
    with pytest.raises(ConfigError, match="no text branch"):
        CausalQFormer(**TINY).encode_text(ids)


def _save_tiny_blip2(path, cls_name="Blip2ForConditionalGeneration", text=False):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Blip2Config(
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            encoder_hidden_size=24, vocab_size=60, max_position_embeddings=32,
                            use_qformer_text_input=text),
        text_config=tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                                 vocab_size=60, max_position_embeddings=64, word_embed_proj_dim=32).to_dict(),
        num_query_tokens=5,
    )
    model = getattr(tf, cls_name)(config)
    with torch.no_grad():  # BLIP-2 initialises these to constants; make the comparison meaningful
        model.query_tokens.normal_()
        model.vision_model.post_layernorm.weight.normal_()
    model.save_pretrained(path)
    return model


def test_from_blip2_loads_identical_weights(tmp_path):
    blip2 = _save_tiny_blip2(tmp_path / "blip2")
    qformer = CausalQFormer.from_blip2(tmp_path / "blip2")
    assert (qformer.num_queries, qformer.hidden_size, qformer.vision_width) == (5, 32, 24)
    assert qformer.qformer.config.cross_attention_frequency == 2 and qformer.causal
    ours = qformer.state_dict()
    torch.testing.assert_close(ours["query_tokens"], blip2.query_tokens, rtol=0, atol=0)
    torch.testing.assert_close(ours["vision_norm.weight"], blip2.vision_model.post_layernorm.weight, rtol=0, atol=0)
    theirs = blip2.qformer.state_dict()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[f"qformer.{key}"], value, rtol=0, atol=0)
    assert len(ours) == len(theirs) + 3  # + query_tokens, vision_norm.{weight,bias}

    # With causal=False it is BLIP-2's Q-Former: same outputs as transformers' on the same image features.
    bidir = CausalQFormer.from_blip2(tmp_path / "blip2", causal=False).eval()
    blip2.eval()
    with torch.no_grad():
        pixel_values = torch.randn(2, 3, 32, 32)
        hidden = blip2.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
        expected = blip2.get_image_features(pixel_values=pixel_values).qformer_outputs.last_hidden_state
        torch.testing.assert_close(bidir(hidden), expected, rtol=1e-4, atol=1e-5)


def test_from_blip2_with_text_branch(tmp_path):
    retrieval = _save_tiny_blip2(tmp_path / "itm", "Blip2ForImageTextRetrieval", text=True)
    qformer = CausalQFormer.from_blip2(tmp_path / "itm", text=True)
    torch.testing.assert_close(qformer.text_embeddings.word_embeddings.weight,
                               retrieval.embeddings.word_embeddings.weight, rtol=0, atol=0)
    key = "encoder.layer.1.output.dense.weight"  # the text FFN
    torch.testing.assert_close(qformer.qformer.state_dict()[key], retrieval.qformer.state_dict()[key], rtol=0, atol=0)
    # The image-only loader skips the text branch of the same checkpoint ...
    assert CausalQFormer.from_blip2(tmp_path / "itm").text_embeddings is None
    # ... and a captioning checkpoint has none to give.
    _save_tiny_blip2(tmp_path / "gen")
    with pytest.raises(CheckpointError, match="missing"):
        CausalQFormer.from_blip2(tmp_path / "gen", text=True)


def test_from_blip2_rejects_incomplete_or_foreign_checkpoints(tmp_path):
    path = tmp_path / "gen"
    _save_tiny_blip2(path)
    sd = load_file(path / "model.safetensors")
    del sd["qformer.encoder.layer.1.attention.attention.key.weight"]
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing 1 weight.*layer.1.attention.attention.key.weight"):
        CausalQFormer.from_blip2(path)
    sd["qformer.encoder.layer.1.attention.attention.key.weight"] = torch.zeros(32, 31)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="wrong shape"):
        CausalQFormer.from_blip2(path)
    with pytest.raises(CheckpointError, match="no config.json"):
        CausalQFormer.from_blip2(tmp_path / "nothing")
