"""Converter from SEED's released tokenizer checkpoint: key names and shapes as in AILab-CVC/SEED
(``Blip2QformerQuantizer``), parity with a reference computation, strictness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seedtok.convert_seed import convert_seed_checkpoint, convert_seed_state_dict
from seedtok.errors import CheckpointError
from seedtok.tokenizer import SeedTokenizer

TINY = dict(hidden=32, layers=3, intermediate=64, vision_width=32, num_queries=8, codebook=(64, 8), depth=2,
            down=(16, 8, 4), embed_dim=24)
FULL = dict(hidden=768, layers=12, intermediate=3072, vision_width=1408, num_queries=32, codebook=(8192, 32),
            depth=4, down=(256, 128, 32), embed_dim=1024)


def official_state_dict(hidden, layers, intermediate, vision_width, num_queries, codebook, depth, down, embed_dim,
                        device=None, extras=True) -> dict[str, torch.Tensor]:
    """A random state dict with the key names and shape pattern of SEED-LLaMA's tokenizer checkpoint."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g) * 0.2

    sd = {"query_tokens": t(1, num_queries, hidden), "ln_vision.weight": 1 + t(vision_width),
          "ln_vision.bias": t(vision_width), "Qformer.bert.embeddings.LayerNorm.weight": 1 + t(hidden),
          "Qformer.bert.embeddings.LayerNorm.bias": t(hidden)}
    for i in range(layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        kinds = ["attention", "crossattention"] if i % 2 == 0 else ["attention"]  # cross-attention every 2 layers
        for kind in kinds:
            kv_in = vision_width if kind == "crossattention" else hidden
            for name, d_in in (("query", hidden), ("key", kv_in), ("value", kv_in)):
                sd[f"{p}{kind}.self.{name}.weight"], sd[f"{p}{kind}.self.{name}.bias"] = t(hidden, d_in), t(hidden)
            sd[f"{p}{kind}.output.dense.weight"], sd[f"{p}{kind}.output.dense.bias"] = t(hidden, hidden), t(hidden)
            sd[f"{p}{kind}.output.LayerNorm.weight"], sd[f"{p}{kind}.output.LayerNorm.bias"] = 1 + t(hidden), t(hidden)
        sd[f"{p}intermediate_query.dense.weight"] = t(intermediate, hidden)
        sd[f"{p}intermediate_query.dense.bias"] = t(intermediate)
        sd[f"{p}output_query.dense.weight"], sd[f"{p}output_query.dense.bias"] = t(hidden, intermediate), t(hidden)
        sd[f"{p}output_query.LayerNorm.weight"], sd[f"{p}output_query.LayerNorm.bias"] = 1 + t(hidden), t(hidden)
    K, D = codebook
    sd["quantize.embedding.weight"] = t(K, D)
    sd["encode_task_layer.0.weight"], sd["encode_task_layer.0.bias"] = t(hidden, hidden), t(hidden)
    sd["encode_task_layer.2.weight"], sd["encode_task_layer.2.bias"] = t(D, hidden), t(D)
    sd["decode_task_layer.0.weight"], sd["decode_task_layer.0.bias"] = t(D, D), t(D)
    sd["decode_task_layer.2.weight"], sd["decode_task_layer.2.bias"] = t(hidden, D), t(hidden)
    for branch, pos in (("blocks", "pos_embed"), ("blocks_image", "pos_embed_image")):
        sd[pos] = t(1, num_queries, hidden)
        for j in range(depth):
            p = f"{branch}.{j}."
            sd[p + "norm1.weight"], sd[p + "norm1.bias"] = 1 + t(hidden), t(hidden)
            sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = t(3 * hidden, hidden), t(3 * hidden)
            sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = t(hidden, hidden), t(hidden)
            sd[p + "norm2.weight"], sd[p + "norm2.bias"] = 1 + t(hidden), t(hidden)
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = t(4 * hidden, hidden), t(4 * hidden)
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = t(hidden, 4 * hidden), t(hidden)
    widths = [hidden, *down]
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        sd[f"image_down.{2 * k}.weight"] = t(b, a)
    sd["distill_image_proj.weight"], sd["distill_image_proj.bias"] = t(embed_dim, num_queries * down[-1]), t(embed_dim)
    if extras:  # present in LAVIS-style checkpoints, unused by the image tokenizer
        sd["visual_encoder.blocks.0.attn.qkv.weight"] = t(3 * vision_width, vision_width)
        sd["Qformer.bert.embeddings.word_embeddings.weight"] = t(50, hidden)
        sd["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = t(intermediate, hidden)
        sd["Qformer.cls.predictions.bias"] = t(50)
        sd["vision_proj.weight"] = t(16, hidden)
    return sd


# ---- a reference of SEED's computations, written from the model description -----------------------


def _vit_block(x, sd, p, heads):
    B, N, C = x.shape
    h = F.layer_norm(x, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
    qkv = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(B, N, 3, heads, C // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, hd)
    attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
    x = x + ((attn @ v).transpose(1, 2).reshape(B, N, C) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"])
    h = F.layer_norm(x, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
    h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
    return x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]


def _up(sd, quant):
    h = torch.tanh(quant @ sd["decode_task_layer.0.weight"].T + sd["decode_task_layer.0.bias"])
    return h @ sd["decode_task_layer.2.weight"].T + sd["decode_task_layer.2.bias"]


def reference_embedding(sd, indices, depth, heads):
    x = _up(sd, sd["quantize.embedding.weight"][indices]) + sd["pos_embed_image"]
    for j in range(depth):
        x = _vit_block(x, sd, f"blocks_image.{j}.", heads)
    x = F.relu(x @ sd["image_down.0.weight"].T)
    x = F.relu(x @ sd["image_down.2.weight"].T)
    x = (x @ sd["image_down.4.weight"].T).flatten(1)
    return x @ sd["distill_image_proj.weight"].T + sd["distill_image_proj.bias"]


def reference_queries(sd, indices, depth, heads):
    x = _up(sd, sd["quantize.embedding.weight"][indices]) + sd["pos_embed"]
    for j in range(depth):
        x = _vit_block(x, sd, f"blocks.{j}.", heads)
    return x


def reference_codes(sd, query_output):
    h = torch.tanh(query_output @ sd["encode_task_layer.0.weight"].T + sd["encode_task_layer.0.bias"])
    z = h @ sd["encode_task_layer.2.weight"].T + sd["encode_task_layer.2.bias"]  # (B, N, D)
    e = sd["quantize.embedding.weight"]
    d = (z**2).sum(-1, keepdim=True) + (e**2).sum(-1) - 2 * z @ e.T  # plain Euclidean, as SEED
    return d.argmin(-1)


# ---- tests ------------------------------------------------------------------------------------------


def test_converted_model_matches_the_reference_computation():
    sd = official_state_dict(**TINY)
    config, state = convert_seed_state_dict(sd, num_heads=4, decoder_num_heads=4)
    assert config.quantizer.codebook_update == "learned" and not config.quantizer.l2_normalize
    assert (config.quantizer.commitment_weight, config.quantizer.codebook_weight) == (1.0, 0.25)
    assert (config.qformer.num_layers, config.qformer.cross_attention_frequency, config.num_queries) == (3, 2, 8)
    assert config.decoder.down_dims == [16, 8, 4] and config.embed_dim == 24 and config.vision.width == 32
    model = SeedTokenizer(config)  # decode-only: no vision tower needed
    model.load_own_state_dict(state)
    model.eval()

    indices = torch.randint(0, 64, (3, 8))
    with torch.no_grad():
        torch.testing.assert_close(model.decode_embedding(indices), reference_embedding(sd, indices, 2, 4),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.decode_queries(indices), reference_queries(sd, indices, 2, 4),
                                   rtol=1e-4, atol=1e-5)
        queries = torch.randn(3, 8, 32)
        assert torch.equal(model.quantize(queries).indices, reference_codes(sd, queries))
    # Q-Former weights are carried over unchanged
    assert torch.equal(state["qformer.qformer.encoder.layer.2.crossattention.attention.key.weight"],
                       sd["Qformer.bert.encoder.layer.2.crossattention.self.key.weight"])
    assert torch.equal(state["qformer.vision_norm.weight"], sd["ln_vision.weight"])


def test_official_full_size_shape_table_on_meta_tensors():
    sd = official_state_dict(**FULL, device="meta")
    config, state = convert_seed_state_dict(sd)  # the strict shape check against the model runs inside
    q, d = config.qformer, config.decoder
    assert (q.hidden_size, q.num_layers, q.num_heads, q.intermediate_size, q.cross_attention_frequency) == (
        768, 12, 12, 3072, 2)
    assert (config.num_queries, config.vision.width, config.embed_dim) == (32, 1408, 1024)
    assert (config.quantizer.codebook_size, config.quantizer.dim) == (8192, 32)
    assert (d.num_layers, d.num_heads, d.mlp_ratio, d.down_dims) == (4, 12, 4.0, [256, 128, 32])
    assert state["qformer.qformer.encoder.layer.0.crossattention.attention.value.weight"].shape == (768, 1408)
    assert state["decoder.embed_blocks.3.self_attn.in_proj_weight"].shape == (2304, 768)
    assert state["decoder.embed_proj.weight"].shape == (1024, 1024)
    assert all(v.is_meta for v in state.values())


def test_unconverted_missing_or_foreign_keys_are_errors():
    sd = official_state_dict(**TINY)
    with pytest.raises(CheckpointError, match="no conversion: mystery.weight"):
        convert_seed_state_dict({**sd, "mystery.weight": torch.zeros(1)}, num_heads=4, decoder_num_heads=4)
    broken = dict(sd)
    del broken["blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match="missing 1 weight.*decoder.query_blocks.1.linear2.bias"):
        convert_seed_state_dict(broken, num_heads=4, decoder_num_heads=4)
    broken = dict(sd)
    broken["decode_task_layer.2.weight"] = torch.zeros(32, 9)
    with pytest.raises(CheckpointError, match="wrong shape: decoder.code_up.2.weight"):
        convert_seed_state_dict(broken, num_heads=4, decoder_num_heads=4)
    with pytest.raises(CheckpointError, match="reverse Q-Former"):
        convert_seed_state_dict({**sd, "reverse_tokens": torch.zeros(1, 1, 32)})
    with pytest.raises(CheckpointError, match="'query_tokens' is missing"):
        convert_seed_state_dict({"foo": torch.zeros(1)})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_convert_checkpoint_end_to_end(clip_dir, tmp_path, suffix):
    from safetensors.torch import save_file

    sd = official_state_dict(**TINY, extras=False)
    src = tmp_path / f"seed_quantizer{suffix}"
    if suffix == ".pth":
        torch.save(sd, src)
    else:
        save_file(sd, src)
    out = convert_seed_checkpoint(src, clip_dir, tmp_path / "converted", num_heads=4, decoder_num_heads=4)
    tok = SeedTokenizer.from_pretrained(out)
    indices = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(tok.decode_embedding(indices), reference_embedding(sd, indices, 2, 4),
                                   rtol=1e-4, atol=1e-5)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference_codes(sd, tok.qformer(tok.vision_tower(pixel_values)))
    assert torch.equal(tok.encode(pixel_values).codes, expected)


def test_vision_width_mismatch_is_an_error(clip_dir, tmp_path):
    sd = official_state_dict(**{**TINY, "vision_width": 48}, extras=False)
    torch.save(sd, tmp_path / "seed.pt")
    with pytest.raises(CheckpointError, match="32-d features, the SEED checkpoint expects 48-d"):
        convert_seed_checkpoint(tmp_path / "seed.pt", clip_dir, tmp_path / "out", num_heads=4, decoder_num_heads=4)
    assert not (tmp_path / "out").exists()
