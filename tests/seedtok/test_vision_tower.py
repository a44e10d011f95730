"""FrozenVisionTower: CLIP / SigLIP / ViT / DINOv2 directories, frozen, features from the chosen layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from seedtok_tiny import CLIP_PROJECTION, build_vision_dir

from seedtok.errors import CheckpointError, ConfigError
from seedtok.vision import FrozenVisionTower

# kind → (prefix tokens, projected embedding size or None)
KINDS = {"clip": (1, CLIP_PROJECTION), "clip_vision": (1, CLIP_PROJECTION), "siglip": (0, 32), "vit": (1, None),
         "dinov2": (1, None)}


def _reference_hidden_states(kind, model, pixel_values):
    with torch.no_grad():
        if kind == "clip":
            return model.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        if kind == "siglip":
            return model.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        return model(pixel_values=pixel_values, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tower_is_frozen_and_returns_the_chosen_layer(kind, tmp_path):
    model_dir, reference = build_vision_dir(kind, tmp_path / kind)
    prefix, embed_dim = KINDS[kind]
    pixel_values = torch.randn(2, 3, 32, 32)
    hidden = _reference_hidden_states(kind, reference, pixel_values)  # embeddings + 2 layers

    tower = FrozenVisionTower.from_pretrained(model_dir)  # layer=-2: penultimate, as SEED
    assert all(not p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training and not tower.model.training  # stays in eval mode
    feats = tower(pixel_values)
    assert feats.shape == (2, 16 + prefix, 32) and tower.hidden_size == 32
    torch.testing.assert_close(feats, hidden[-2])
    assert not torch.allclose(feats, hidden[-1])

    last = FrozenVisionTower.from_pretrained(model_dir, layer=-1, keep_cls=False)
    torch.testing.assert_close(last(pixel_values), hidden[-1][:, prefix:])

    assert tower.embed_dim == embed_dim
    if embed_dim is None:
        with pytest.raises(ConfigError, match="no projected image embedding"):
            tower.image_embeds(pixel_values)
    else:
        with torch.no_grad():
            if kind in ("clip", "siglip"):
                expected = reference.get_image_features(pixel_values=pixel_values)
                expected = expected if torch.is_tensor(expected) else expected.pooler_output
            else:
                expected = reference(pixel_values=pixel_values).image_embeds
        torch.testing.assert_close(tower.image_embeds(pixel_values), expected)


def test_preprocess_uses_the_directorys_processor(clip_dir):
    tower = FrozenVisionTower.from_pretrained(clip_dir)
    images = [Image.fromarray(np.full((40, 50, 3), 200, np.uint8)), Image.new("L", (32, 32))]
    pixel_values = tower.preprocess(images)
    assert pixel_values.shape == (2, 3, 32, 32) and pixel_values.dtype == torch.float32
    assert tower(pixel_values).shape == (2, 17, 32)


def test_save_pretrained_round_trip(clip_dir, tmp_path):
    tower = FrozenVisionTower.from_pretrained(clip_dir)
    tower.save_pretrained(tmp_path / "copy")
    again = FrozenVisionTower.from_pretrained(tmp_path / "copy")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again(x), tower(x))
    torch.testing.assert_close(again.image_embeds(x), tower.image_embeds(x))


def test_bad_directories_are_one_line_checkpoint_errors(clip_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        FrozenVisionTower.from_pretrained(tmp_path / "missing")
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         vocab_size=50)).save_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="model type 'bert' is not a supported vision tower"):
        FrozenVisionTower.from_pretrained(tmp_path / "bert")
    no_processor, _ = build_vision_dir("vit", tmp_path / "vit")
    (no_processor / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        FrozenVisionTower.from_pretrained(no_processor)
    with pytest.raises(ConfigError, match="vision layer 5 is out of range"):
        FrozenVisionTower.from_pretrained(clip_dir, layer=5)


def test_missing_vision_weights_are_an_error_not_random_init(tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir, _ = build_vision_dir("dinov2", tmp_path / "dino")
    sd = load_file(model_dir / "model.safetensors")
    del sd["encoder.layer.1.mlp.fc1.weight"]
    save_file(sd, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing from the checkpoint: encoder.layer.1.mlp.fc1.weight"):
        FrozenVisionTower.from_pretrained(model_dir)
