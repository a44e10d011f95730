"""CLIP score of generated images against their prompts (Hessel et al. 2021, https://arxiv.org/abs/2104.08718).

``CLIPScore = 100 · max(cos(E_image, E_text), 0)`` with the image and text embeddings of a local CLIP
directory (transformers ``CLIPModel`` + its image processor + tokenizer): the embedded default's tiny
CLIP (stage 0) or any real CLIP saved on disk. Nothing is fetched: the directory is opened with
``local_files_only``. (Hessel et al. scale by w = 2.5 for ViT-B/32; we report the plain ×100 form that
text-to-image papers use, so the number does not depend on a constant tuned for one model.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from seedtok.errors import CheckpointError


def _features(output: Any) -> torch.Tensor:
    # transformers v5 returns a ModelOutput whose pooler_output is the projected embedding; v4 a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScore:
    """Scores (image, text) pairs with one CLIP.

    Args:
        model: a ``transformers.CLIPModel`` (eval mode).
        image_processor: its image processor (PIL → ``pixel_values``).
        tokenizer: its tokenizer.
    """

    def __init__(self, model: Any, image_processor: Any, tokenizer: Any) -> None:
        self.model = model.eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    @classmethod
    def from_pretrained(cls, clip_dir: str | os.PathLike, *, device: str | torch.device = "cpu") -> ClipScore:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        path = Path(clip_dir)
        missing = [f for f in ("config.json", "preprocessor_config.json") if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path} is not a CLIP directory (no {missing[0]})")
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot load a CLIPModel (both towers are needed): "
                                  f"{str(e).splitlines()[0]}") from None
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(model.to(device), image_processor, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images → l2-normalised image embeddings ``(B, P)``."""
        px = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return F.normalize(_features(self.model.get_image_features(pixel_values=px.to(self.device))).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → l2-normalised text embeddings ``(B, P)`` (truncated to the text tower's positions)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                           attention_mask=enc["attention_mask"].to(self.device))
        return F.normalize(_features(out).float(), dim=-1)

    def __call__(self, images: Sequence[Image.Image], texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """CLIP score of each (image, text) pair: ``(B,)`` in [0, 100]."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        scores = []
        for s in range(0, len(images), batch_size):
            cos = (self.embed_images(images[s:s + batch_size]) * self.embed_texts(texts[s:s + batch_size])).sum(-1)
            scores.append(100.0 * cos.clamp(min=0))
        return torch.cat(scores) if scores else torch.zeros(0)
