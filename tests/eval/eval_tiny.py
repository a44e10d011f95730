"""Tiny models and fakes shared by the eval tests (built in tmp dirs, nothing downloaded)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from PIL import Image

from data_pipelines.shapes import ShapesConfig, ShapesWorld
from eval.shapes_scorer import parse_caption

SHAPES32 = ShapesConfig(image_size=32)


def build_clip_dir(root: Path) -> Path:
    """A full tiny stage-0 CLIP directory (both towers, tokenizer, image processor), 32 px."""
    from data_pipelines.shapes_arrays import load_shapes_arrays
    from train_scripts.train_clip import ClipTrainConfig, build_clip, save_clip_dir, train_text_tokenizer

    cfg = ClipTrainConfig(shapes=SHAPES32, patch_size=8, vision_width=16, vision_layers=1, text_width=16,
                          text_layers=1, heads=2, projection_dim=8)
    data = load_shapes_arrays(SHAPES32, "train", 32, progress=False)
    tok = train_text_tokenizer([t for i in range(len(data)) for t in data.texts(i)], root / "bpe")
    torch.manual_seed(0)
    return save_clip_dir(build_clip(cfg, vocab_size=len(tok)).eval(), tok, root / "model", cfg)


def build_tokenizer_dir(clip_dir: Path, out: Path, *, image_decoder: bool = True) -> Path:
    """A tiny random SEED tokenizer (4 codes of 16) with an untrained 2-step image decoder, saved to ``out``."""
    from seedtok.quantizers import QuantizerConfig
    from seedtok.tokenizer import (
        DecoderConfig,
        QFormerConfig,
        SeedTokenizer,
        SeedTokenizerConfig,
        VisionTowerConfig,
    )
    from seedtok.unclip import (
        UnCLIPImageDecoder,
        UnCLIPSamplingConfig,
        assemble_pipeline,
        build_noising,
        build_schedulers,
        build_unet,
        build_vae,
    )

    torch.manual_seed(0)
    config = SeedTokenizerConfig(
        vision=VisionTowerConfig(path=str(clip_dir)),
        qformer=QFormerConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64),
        num_queries=4, quantizer=QuantizerConfig(codebook_size=16, dim=4),
        decoder=DecoderConfig(num_layers=1, num_heads=4, down_dims=[8, 4]), embed_dim=8,
    )
    tok = SeedTokenizer.from_config(config)
    if image_decoder:
        unet = build_unet(embed_dim=8, sample_size=16, block_out_channels=(16, 32), attention_levels=(False, False),
                          cross_attention_dim=16)
        normalizer, noising = build_noising(embed_mean=torch.zeros(8), embed_std=torch.ones(8))
        pipe = assemble_pipeline(clip_dir, vae=build_vae(block_out_channels=(16, 16)), unet=unet,
                                 scheduler=build_schedulers()[1], image_normalizer=normalizer,
                                 image_noising_scheduler=noising)
        tok.image_decoder = UnCLIPImageDecoder(pipe, UnCLIPSamplingConfig(num_inference_steps=2, guidance_scale=2.0))
    tok.save_pretrained(out)
    return out


def wrong_caption(attributes: dict) -> str:
    """A caption of the scene with the first object's colour changed (so strict is false)."""
    from data_pipelines.shapes import canonical_caption

    objs = [dict(o) for o in attributes["objects"]]
    objs[0]["colour"] = "purple" if objs[0]["colour"] != "purple" else "red"
    return canonical_caption({**attributes, "objects": objs})


def render_caption(caption: str, image_size: int = 32) -> Image.Image:
    """Paint the scene a canonical caption names (box placed at the cell centres; relation by offsets)."""
    from data_pipelines.shapes import box_side, cell_centre

    parsed = parse_caption(caption)
    world = ShapesWorld(ShapesConfig(image_size=image_size))
    S = image_size
    objs = []
    if parsed["kind"] == "single":
        centres = [cell_centre(parsed["objects"][0]["position"], S)]
    else:
        offset = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}[parsed["relation"]]
        centres = [(S / 2 + offset[0] * S / 4, S / 2 + offset[1] * S / 4),
                   (S / 2 - offset[0] * S / 4, S / 2 - offset[1] * S / 4)]
    for o, (cx, cy) in zip(parsed["objects"], centres):
        side = box_side(o["size"], S)
        x0, y0 = round(cx - side / 2), round(cy - side / 2)
        objs.append({**o, "box": [x0, y0, x0 + side, y0 + side]})
    return world.render({**parsed, "objects": objs})


class FakeChat:
    """Stands in for ``llm_adapters.chat.SeedChat`` on given scenes: right on even-numbered scenes, wrong
    (first object recoloured) on odd ones — for captions (scene found by its image) and for generated
    images (the k-th prompt it is asked for is scene k: captions may repeat, prompts come in order)."""

    def __init__(self, scenes):
        self.scenes = scenes
        self.image_index = {scenes.images[i].tobytes(): i for i in range(len(scenes))}
        assert len(self.image_index) == len(scenes), "scene images must be distinct"
        self.prompts_seen = 0
        self.loaded: list[str] = []
        self.caption_kwargs: dict = {}

    def install(self, monkeypatch) -> FakeChat:
        """Make ``from llm_adapters.chat import SeedChat`` return a class whose from_pretrained gives self."""
        fake = self
        module = types.ModuleType("llm_adapters.chat")

        class SeedChat:
            @classmethod
            def from_pretrained(cls, model_dir, **kw):
                fake.loaded.append(str(model_dir))
                return fake

        module.SeedChat = SeedChat
        monkeypatch.setitem(sys.modules, "llm_adapters.chat", module)
        return self

    def _text(self, i: int) -> str:
        return self.scenes.captions[i] if i % 2 == 0 else wrong_caption(self.scenes.attributes[i])

    def caption(self, images, **kw) -> list[str]:
        import numpy as np

        self.caption_kwargs = kw
        return [self._text(self.image_index[np.asarray(im.convert("RGB")).tobytes()]) for im in images]

    def generate_images(self, prompts, *, n=1, seed=0, **kw) -> list[list[Image.Image]]:
        size = self.scenes.images.shape[1]
        out = []
        for p in prompts:
            k = self.prompts_seen
            assert p == self.scenes.captions[k], "prompts must come in scene order"
            out.append([render_caption(self._text(k), size)] * n)
            self.prompts_seen += 1
        return out
