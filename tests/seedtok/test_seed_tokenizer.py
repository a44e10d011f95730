"""SeedTokenizer: encode/decode, stage-2 forward, atomic save and strict load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from seedtok.errors import CheckpointError, ConfigError, DataError
from seedtok.quantizers import QuantizerConfig
from seedtok.tokenizer import (
    DecoderConfig,
    QFormerConfig,
    SeedTokenizer,
    SeedTokenizerConfig,
    VisionTowerConfig,
    load_config,
)
from seedtok.types import ImageCodes


def tiny_config(clip_dir, **quantizer) -> SeedTokenizerConfig:
    return SeedTokenizerConfig(
        vision=VisionTowerConfig(path=str(clip_dir)),
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, dropout=0.1),
        num_queries=8,
        quantizer=QuantizerConfig(codebook_size=64, dim=8, **quantizer),
        decoder=DecoderConfig(num_layers=1, num_heads=4, down_dims=[16, 8, 4]),
        embed_dim=24,  # the tiny CLIP's projection: its image_embeds are the unCLIP target
    )


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture
def tokenizer(clip_dir) -> SeedTokenizer:
    torch.manual_seed(0)
    return SeedTokenizer.from_config(tiny_config(clip_dir))


def test_encode_decode_shapes_and_types(tokenizer):
    assert (tokenizer.codebook_size, tokenizer.num_tokens) == (64, 8)
    assert tokenizer.config.vision.width == 32  # recorded from the tower
    codes = tokenizer.encode(_images(3))
    assert isinstance(codes, ImageCodes) and codes.codes.shape == (3, 8) and codes.codebook_size == 64
    pixel_values = tokenizer.preprocess(_images(3))
    assert torch.equal(tokenizer.encode(pixel_values).codes, codes.codes)
    assert tokenizer.decode_embedding(codes).shape == (3, 24)
    assert tokenizer.decode_queries(codes.codes).shape == (3, 8, 32)
    with pytest.raises(DataError, match="outside"):
        tokenizer.decode_embedding(torch.full((1, 8), 64))
    with pytest.raises(DataError, match="expected 8 codes"):
        tokenizer.decode_embedding(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(DataError, match="codebook of 128"):
        tokenizer.decode_embedding(ImageCodes(torch.zeros(1, 8, dtype=torch.long), 128))


def test_codes_are_causal(tokenizer):
    """Code i depends on the image only through queries 0..i: perturbing a later query changes nothing before it."""
    pixel_values = tokenizer.preprocess(_images(4))
    before = tokenizer.encode(pixel_values).codes
    with torch.no_grad():
        tokenizer.qformer.query_tokens[:, 5] += 3 * torch.randn_like(tokenizer.qformer.query_tokens[:, 5])
    after = tokenizer.encode(pixel_values).codes
    assert torch.equal(before[:, :5], after[:, :5])
    assert not torch.equal(before[:, 5:], after[:, 5:])


def test_encode_does_not_touch_training_state(tokenizer):
    tokenizer.train()
    state = {k: v.clone() for k, v in tokenizer.own_state_dict().items()}
    tokenizer.encode(_images(2))  # EMA codebook must not update, dropout must be off
    assert tokenizer.training and tokenizer.qformer.training and not tokenizer.vision_tower.training
    for k, v in tokenizer.own_state_dict().items():
        assert torch.equal(v, state[k]), k
    a, b = tokenizer.encode(_images(2)).codes, tokenizer.encode(_images(2)).codes
    assert torch.equal(a, b)


def test_stage2_forward_returns_losses_and_learns(tokenizer):
    torch.manual_seed(0)
    pixel_values = tokenizer.preprocess(_images(8))
    tokenizer.qformer.requires_grad_(False)  # stage 2: the Q-Former is frozen
    tokenizer.train()
    params = [p for p in tokenizer.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    first = None
    for _ in range(25):
        out = tokenizer(pixel_values)
        assert set(out.losses) == {"vq", "cosine", "mse", "loss"}
        assert out.codes.shape == (8, 8) and set(out.metrics) == {"usage", "perplexity"}
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else {k: v.item() for k, v in out.losses.items()}
    last = {k: v.item() for k, v in out.losses.items()}
    assert last["cosine"] < 0.7 * first["cosine"] and last["mse"] < 0.7 * first["mse"], (first, last)
    with pytest.raises(DataError, match="target embeddings are 5-d"):
        tokenizer(pixel_values, target_embeds=torch.zeros(8, 5))


def test_save_load_round_trip_gives_identical_codes(tokenizer, tmp_path):
    tokenizer.train()
    tokenizer(tokenizer.preprocess(_images(4)))  # move the EMA codebook away from its init
    tokenizer.eval()
    images = _images(5)
    codes = tokenizer.encode(images).codes
    embeds = tokenizer.decode_embedding(codes)
    out = tokenizer.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vision_tower"]
    assert json.loads((out / "config.json").read_text())["vision"]["path"] == "vision_tower"
    assert not any(k.startswith("vision_tower.") for k in load_file(out / "model.safetensors"))

    loaded = SeedTokenizer.from_pretrained(out)
    assert not loaded.training and loaded.config == tokenizer.config.replace(
        vision=tokenizer.config.vision.replace(path="vision_tower"))
    assert torch.equal(loaded.encode(images).codes, codes)
    torch.testing.assert_close(loaded.decode_embedding(codes), embeds)

    # decode-only load (no vision tower), then re-save it with the tower copied from its directory
    decode_only = SeedTokenizer.from_pretrained(out, load_vision=False)
    assert decode_only.vision_tower is None
    torch.testing.assert_close(decode_only.decode_embedding(codes), embeds)
    with pytest.raises(ConfigError, match="without its vision tower"):
        decode_only.encode(images)
    decode_only.save_pretrained(tmp_path / "again")
    assert torch.equal(SeedTokenizer.from_pretrained(tmp_path / "again").encode(images).codes, codes)

    # a reference instead of a copy
    ref = tokenizer.save_pretrained(tmp_path / "ref", vision="reference")
    assert not (ref / "vision_tower").exists()
    assert torch.equal(SeedTokenizer.from_pretrained(ref).encode(images).codes, codes)


@pytest.mark.parametrize("quantizer", [dict(codebook_update="learned"), dict(type="fsq", codebook_size=60,
                                                                             levels=[5, 4, 3])])
def test_round_trip_with_other_quantizers(clip_dir, tmp_path, quantizer):
    torch.manual_seed(0)
    cfg = tiny_config(clip_dir)
    cfg = cfg.replace(quantizer=cfg.quantizer.replace(**quantizer))
    tok = SeedTokenizer.from_config(cfg)
    images = _images(3)
    tok.save_pretrained(tmp_path / "t")
    assert torch.equal(SeedTokenizer.from_pretrained(tmp_path / "t").encode(images).codes, tok.encode(images).codes)


def _tamper(path, change):
    sd = load_file(path / "model.safetensors")
    change(sd)
    save_file(sd, path / "model.safetensors")


def test_missing_extra_or_mis_shaped_weights_are_checkpoint_errors(tokenizer, tmp_path):
    path = tokenizer.save_pretrained(tmp_path / "tok")
    key = "decoder.embed_proj.weight"
    _tamper(path, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=f"missing 1 weight.*{key}"):
        SeedTokenizer.from_pretrained(path)

    path = tokenizer.save_pretrained(tmp_path / "tok")
    _tamper(path, lambda sd: sd.update({"decoder.surprise": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="unexpected weight.*decoder.surprise"):
        SeedTokenizer.from_pretrained(path)

    path = tokenizer.save_pretrained(tmp_path / "tok")
    _tamper(path, lambda sd: sd.update({key: torch.zeros(24, 33)}))
    with pytest.raises(CheckpointError, match=r"wrong shape: decoder.embed_proj.weight \[24, 33\] vs expected \[24, 32\]"):
        SeedTokenizer.from_pretrained(path)


def test_bad_directories_and_configs(tokenizer, tmp_path, clip_dir):
    with pytest.raises(CheckpointError, match="not found"):
        SeedTokenizer.from_pretrained(tmp_path / "nothing")
    path = tokenizer.save_pretrained(tmp_path / "tok")
    cfg = json.loads((path / "config.json").read_text())
    cfg["qformer"]["hidden_sise"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="config.json: unknown QFormerConfig key 'qformer.hidden_sise'"):
        load_config(path)
    with pytest.raises(ConfigError, match="vision.width is 16"):
        SeedTokenizer(tiny_config(clip_dir).replace(vision={"path": str(clip_dir), "width": 16}),
                      tokenizer.vision_tower)
    with pytest.raises(ConfigError, match="layer=-2, keep_cls=True but the config says layer=-1"):
        SeedTokenizer(tiny_config(clip_dir).replace(vision={"path": str(clip_dir), "layer": -1}),
                      tokenizer.vision_tower)
    with pytest.raises(ConfigError, match="vision.width is unknown"):
        SeedTokenizer(tiny_config(clip_dir))
    in_memory = SeedTokenizer(tiny_config(clip_dir), tokenizer.vision_tower)
    with pytest.raises(ConfigError, match="cannot be referenced"):
        in_memory.save_pretrained(tmp_path / "x", vision="reference")
    assert not (tmp_path / "x").exists()


def test_image_decoder_is_an_extension_point_outside_the_checkpoint(tokenizer, tmp_path):
    assert tokenizer.image_decoder is None
    tokenizer.image_decoder = torch.nn.Linear(24, 3)  # e.g. a diffusion decoder attaches itself
    assert not any(k.startswith("image_decoder.") for k in tokenizer.own_state_dict())
    path = tokenizer.save_pretrained(tmp_path / "tok")
    assert SeedTokenizer.from_pretrained(path).image_decoder is None
