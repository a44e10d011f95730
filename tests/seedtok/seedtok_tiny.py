"""Tiny random models saved as local Hugging Face directories, built by the seedtok tests.

Vision towers: hidden 32, 2 layers, 32-px images, patch 8.
"""

from __future__ import annotations

from pathlib import Path

import torch

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
            max_position_embeddings=16)
CLIP_PROJECTION = 24


def build_vision_dir(kind: str, path: Path) -> tuple[Path, torch.nn.Module]:
    """Save a tiny random model of ``kind`` with its image processor; return (dir, reference model)."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "clip":
        model = tf.CLIPModel(tf.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=CLIP_PROJECTION))
        processor = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif kind == "clip_vision":  # vision-only CLIP, projection included
        model = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**VISION, projection_dim=CLIP_PROJECTION))
        processor = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif kind == "siglip":
        model = tf.SiglipModel(tf.SiglipConfig(vision_config=VISION, text_config=TEXT))
        processor = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
    elif kind == "vit":
        model = tf.ViTModel(tf.ViTConfig(**VISION))
        processor = tf.ViTImageProcessor(size={"height": 32, "width": 32})
    elif kind == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(**VISION))
        processor = tf.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        raise ValueError(kind)
    model.eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model
