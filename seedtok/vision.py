"""A frozen vision tower: patch features from one hidden layer of a local Hugging Face vision model.

SEED feeds its Q-Former the penultimate layer of EVA-CLIP ViT-g/14 (arXiv:2307.08041); here any
local CLIP, SigLIP, ViT or DINOv2 directory plays that role. The tower is loaded with
``local_files_only=True`` and without ``trust_remote_code``, frozen (``requires_grad=False``,
always in eval mode, run under ``no_grad``), and brings its own image processor from the same
directory.

For CLIP-like towers :meth:`FrozenVisionTower.image_embeds` also returns the projected image
embedding — the target an unCLIP decoder is conditioned on (SEED stage 2 regresses the CLIP ViT-H
``image_embeds``; in the embedded default the tower's own projection plays that part).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seedtok.errors import CheckpointError, ConfigError, DataError


@dataclass(frozen=True)
class _TowerKind:
    """How to load one family of vision models."""

    model_class: str  # transformers class name
    prefix_tokens: int  # CLS-like tokens before the patch tokens
    embeds: str | None  # where the projected image embedding comes from: "image_embeds", "pooler_output"


# model_type (of the directory's config.json) → how to load its vision part. A full two-tower
# config (clip, siglip) is reduced to its vision_config.
_KINDS: dict[str, _TowerKind] = {
    "clip": _TowerKind("CLIPVisionModelWithProjection", 1, "image_embeds"),
    "clip_vision_model": _TowerKind("CLIPVisionModelWithProjection", 1, "image_embeds"),
    "siglip": _TowerKind("SiglipVisionModel", 0, "pooler_output"),
    "siglip_vision_model": _TowerKind("SiglipVisionModel", 0, "pooler_output"),
    "vit": _TowerKind("ViTModel", 1, None),
    "dinov2": _TowerKind("Dinov2Model", 1, None),
}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report: we check the loading info ourselves and raise instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _has_key(model_dir: Path, key: str) -> bool:
    """Whether the directory's (possibly sharded) safetensors checkpoint holds ``key``."""
    from seedtok.io import load_hf_tensors

    try:
        return bool(load_hf_tensors(model_dir, select=lambda k: k == key))
    except CheckpointError:
        return False


class FrozenVisionTower(nn.Module):
    """A frozen Hugging Face vision model returning the features of one hidden layer.

    Args:
        model: the transformers vision model (``CLIPVisionModelWithProjection``, ``SiglipVisionModel``,
            ``ViTModel``, ``Dinov2Model``).
        image_processor: its image processor (turns PIL images into ``pixel_values``).
        layer: index into ``hidden_states`` (``0`` = embeddings, ``-1`` = last block, ``-2`` =
            penultimate block as in SEED).
        keep_cls: keep the CLS token in front of the patch tokens.
        prefix_tokens: number of CLS-like tokens the model puts before the patches.
        embeds_from: output field holding the projected image embedding, or ``None``.
    """

    def __init__(self, model: nn.Module, image_processor: Any, *, layer: int = -2, keep_cls: bool = True,
                 prefix_tokens: int = 1, embeds_from: str | None = None):
        super().__init__()
        num_layers = model.config.num_hidden_layers
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ConfigError(f"vision layer {layer} is out of range for a {num_layers}-layer tower "
                              f"(valid: {-(num_layers + 1)}..{num_layers})")
        self.model = model
        self.image_processor = image_processor
        self.layer = layer
        self.keep_cls = keep_cls
        self.prefix_tokens = prefix_tokens
        self.embeds_from = embeds_from
        self.requires_grad_(False)
        super().train(False)

    # ---- loading / saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *, layer: int = -2, keep_cls: bool = True,
                        dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> FrozenVisionTower:
        """Load a local vision model directory (config.json + safetensors + preprocessor_config.json).

        A full CLIP / SigLIP directory (text tower included) is read for its vision part only.
        Missing or mis-shaped vision weights are a CheckpointError (transformers would otherwise
        initialise them at random with a warning).
        """
        import transformers
        from transformers import AutoConfig, AutoImageProcessor

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise CheckpointError(f"not a Hugging Face model directory (no config.json): {model_dir}")
        try:
            config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{model_dir}: unreadable config.json ({str(e).splitlines()[0]})") from None
        kind = _KINDS.get(config.model_type)
        if kind is None:
            raise CheckpointError(
                f"{model_dir}: model type '{config.model_type}' is not a supported vision tower "
                f"(supported: {', '.join(sorted(_KINDS))})"
            )
        model_class = getattr(transformers, kind.model_class)
        embeds_from = kind.embeds
        if hasattr(config, "vision_config"):
            vision_config = config.vision_config
            if hasattr(config, "projection_dim") and hasattr(vision_config, "projection_dim"):
                # The two-tower config keeps the projection size at the top level.
                vision_config.projection_dim = config.projection_dim
            config = vision_config
        if kind.model_class == "CLIPVisionModelWithProjection" and not _has_key(model_dir, "visual_projection.weight"):
            # A vision-only CLIP saved without its projection: features only, no image embedding.
            model_class, embeds_from = transformers.CLIPVisionModel, None
        extra = {"add_pooling_layer": False} if kind.model_class == "ViTModel" else {}
        try:
            with _quiet_transformers():
                model, info = model_class.from_pretrained(
                    model_dir, config=config, local_files_only=True, dtype=dtype, output_loading_info=True,
                    ignore_mismatched_sizes=True, attn_implementation=attn_implementation, **extra,
                )
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{model_dir}: cannot load the vision model ({str(e).splitlines()[0]})") from None
        missing = sorted(info.get("missing_keys", []))
        if missing:
            raise CheckpointError(f"{model_dir}: vision weights missing from the checkpoint: {', '.join(missing[:3])}")
        mismatched = info.get("mismatched_keys", [])
        if mismatched:
            key = mismatched[0][0] if isinstance(mismatched[0], tuple) else mismatched[0]
            raise CheckpointError(f"{model_dir}: vision weight '{key}' does not match the config's shape")
        if not (model_dir / "preprocessor_config.json").is_file():
            raise CheckpointError(
                f"{model_dir}: no preprocessor_config.json — save the tower's image processor next to it "
                "(image_processor.save_pretrained(dir))"
            )
        # The PIL backend: no torchvision here, and it matches the reference preprocessing exactly.
        processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True, backend="pil")
        return cls(model, processor, layer=layer, keep_cls=keep_cls, prefix_tokens=kind.prefix_tokens,
                   embeds_from=embeds_from)

    def save_pretrained(self, model_dir: str | os.PathLike) -> Path:
        """Write the model and its image processor in Hugging Face format (loadable by from_pretrained)."""
        model_dir = Path(model_dir)
        self.model.save_pretrained(model_dir)
        self.image_processor.save_pretrained(model_dir)
        return model_dir

    # ---- properties ---------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        """Width ``C`` of the features."""
        return self.model.config.hidden_size

    @property
    def embed_dim(self) -> int | None:
        """Size of :meth:`image_embeds`, or ``None`` if the tower has no image embedding."""
        if self.embeds_from == "image_embeds":
            return self.model.config.projection_dim
        if self.embeds_from == "pooler_output":
            return self.model.config.hidden_size
        return None

    def train(self, mode: bool = True) -> FrozenVisionTower:
        """Stay in eval mode: the tower is frozen (no dropout, no drop-path) whatever the parent does."""
        return super().train(False)

    # ---- forward ------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images → ``pixel_values`` ``(B, 3, H, W)`` float32 with the tower's own processor."""
        if len(images) == 0:
            raise DataError("no images to preprocess")
        for i, im in enumerate(images):
            # transformers' processors would open a string themselves — and fetch a URL over the
            # network: only already-decoded images cross this boundary (decode files with
            # data_pipelines.images.decode_image, which also guards against bombs and truncation).
            if not (hasattr(im, "convert") or isinstance(im, np.ndarray | torch.Tensor)):
                raise DataError(f"image {i} is a {type(im).__name__}, not a PIL image or array "
                                "(decode files first, e.g. data_pipelines.images.decode_image(path))")
        images = [im.convert("RGB") if hasattr(im, "convert") else im for im in images]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def _run(self, pixel_values: torch.Tensor) -> Any:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise DataError(f"pixel_values must have shape (B, 3, H, W), got {tuple(pixel_values.shape)}")
        size = getattr(self.model.config, "image_size", None)
        # CLIP, SigLIP and ViT position embeddings fit one resolution (DINOv2 interpolates): say so
        # here rather than let the embedding layer raise from deep inside transformers.
        if isinstance(size, int) and self.model.config.model_type != "dinov2" and tuple(pixel_values.shape[-2:]) != (size, size):
            raise DataError(f"images are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} but the vision tower takes "
                            f"{size}x{size} (preprocess() resizes PIL images to the tower's size)")
        param = next(self.model.parameters())
        with torch.no_grad():
            return self.model(pixel_values=pixel_values.to(param.device, param.dtype), output_hidden_states=True)

    def _features(self, out: Any) -> torch.Tensor:
        feats = out.hidden_states[self.layer]  # (B, T, C)
        return feats if self.keep_cls else feats[:, self.prefix_tokens:]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values (B, 3, H, W)`` → features ``(B, T, C)`` of the chosen hidden layer."""
        return self._features(self._run(pixel_values))

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values (B, 3, H, W)`` → the projected image embedding ``(B, E)`` (not normalised)."""
        return self.features_and_embeds(pixel_values)[1]

    def features_and_embeds(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(B, T, C)`` and image embedding ``(B, E)`` from one pass of the tower."""
        if self.embeds_from is None:
            raise ConfigError(
                f"the vision tower ({type(self.model).__name__}) has no projected image embedding; "
                "use a CLIP or SigLIP tower or pass the target embeddings explicitly"
            )
        out = self._run(pixel_values)
        return self._features(out), getattr(out, self.embeds_from)
