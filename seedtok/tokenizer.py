"""The SEED tokenizer: image → N causal discrete codes, and codes → an unCLIP image embedding.

    image ──FrozenVisionTower──► (B, T, C) ──CausalQFormer──► (B, N, H) ──code_proj──► (B, N, D)
          ──Quantizer──► codes (B, N) ∈ [0, K)
    codes ──indices_to_codes──► (B, N, D) ──EmbeddingDecoder──► queries (B, N, H), embedding (B, E)

SEED: arXiv:2307.08041 (SEED tokenizer) and arXiv:2310.01218 (SEED-LLaMA). ``code_proj`` is SEED's
``encode_task_layer`` (Linear–Tanh–Linear down to the codebook dimension).

Saved layout (``save_pretrained``)::

    DIR/config.json          SeedTokenizerConfig
    DIR/model.safetensors    every weight except the vision tower's
    DIR/vision_tower/        the frozen tower + image processor in Hugging Face format
                             (or config.vision.path names an external directory)
    DIR/image_decoder/       optional: the unCLIP decoder (a Stable unCLIP pipeline directory,
                             ``seedtok.unclip.UnCLIPImageDecoder``) that ``decode_image`` uses

The codes → pixels decoder (Stable unCLIP or the embedded diffusion decoder) is a separate model:
it attaches itself as ``tokenizer.image_decoder`` and saves and loads on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from seedtok.embedding_decoder import EmbeddingDecoder, Stage2LossWeights, stage2_loss
from seedtok.errors import CheckpointError, ConfigError, DataError
from seedtok.io import atomic_directory, check_state_dict, load_safetensors, save_json, save_safetensors
from seedtok.qformer import CausalQFormer
from seedtok.quantizers import Quantizer, QuantizerConfig, QuantizerOutput, build_quantizer
from seedtok.schema import ConfigBase, option
from seedtok.types import ImageCodes
from seedtok.vision import FrozenVisionTower

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VISION_DIR = "vision_tower"
IMAGE_DECODER_DIR = "image_decoder"  # the unCLIP decoder (seedtok.unclip), when one is attached
# Submodules whose weights are not part of model.safetensors (saved in their own formats).
_EXTERNAL = ("vision_tower.", "image_decoder.")


# ---- config -------------------------------------------------------------------------------------


@dataclass
class VisionTowerConfig(ConfigBase):
    """Which frozen vision tower, and which of its layers."""

    path: str = option("", help="local Hugging Face vision model directory (CLIP, SigLIP, ViT, DINOv2); "
                                "a relative path in a saved tokenizer resolves against the tokenizer's directory")
    layer: int = option(-2, help="hidden layer whose features feed the Q-Former (-2 = penultimate, as SEED)")
    keep_cls: bool = option(True, help="keep the CLS token in front of the patch tokens")
    width: int = option(0, help="feature width C; 0 = read it from the tower (saved tokenizers record it)")


@dataclass
class QFormerConfig(ConfigBase):
    """Sizes of the causal Q-Former (defaults: SEED's BERT-base)."""

    hidden_size: int = option(768, help="width H")
    num_layers: int = option(12, help="transformer layers")
    num_heads: int = option(12, help="attention heads")
    intermediate_size: int = option(3072, help="FFN width")
    cross_attention_frequency: int = option(2, help="a cross-attention block every this many layers")
    causal: bool = option(True, help="causal mask among the queries (SEED); false = BLIP-2's bidirectional")
    dropout: float = option(0.1, help="hidden and attention dropout")
    text_vocab_size: int = option(0, help="> 0 adds BLIP-2's text branch (for image-text contrastive training)")
    max_text_len: int = option(512, help="text positions of the text branch")
    attn_implementation: Literal["sdpa", "eager"] = option("sdpa", help="attention kernel")


@dataclass
class DecoderConfig(ConfigBase):
    """Sizes of the embedding decoder (defaults: SEED's released head)."""

    num_layers: int = option(4, help="transformer blocks per branch")
    num_heads: int = option(12, help="attention heads")
    mlp_ratio: float = option(4.0, help="FFN width / hidden size")
    down_dims: list[int] = option(default_factory=lambda: [256, 128, 32],
                                  help="per-token MLP widths before flattening into the embedding projection")


@dataclass
class SeedTokenizerConfig(ConfigBase):
    """Everything that defines a SEED tokenizer's architecture (defaults: SEED's sizes)."""

    vision: VisionTowerConfig = option(default_factory=VisionTowerConfig, help="frozen vision tower")
    qformer: QFormerConfig = option(default_factory=QFormerConfig, help="causal Q-Former")
    num_queries: int = option(32, help="number of causal queries = codes per image N")
    quantizer: QuantizerConfig = option(default_factory=QuantizerConfig, help="quantizer")
    decoder: DecoderConfig = option(default_factory=DecoderConfig, help="embedding decoder")
    embed_dim: int = option(1024, help="size E of the unCLIP image embedding the decoder predicts")


@dataclass
class TokenizerOutput:
    """One stage-2 training step's result.

    Attributes:
        loss: scalar to backpropagate (``losses["loss"]``).
        losses: weighted parts ``vq``, ``cosine``, ``mse`` and their sum ``loss``.
        metrics: quantizer batch metrics (``usage``, ``perplexity``).
        codes: ``(B, N)`` long codes of the batch.
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor]
    codes: torch.Tensor


# ---- model --------------------------------------------------------------------------------------


class SeedTokenizer(nn.Module):
    """Vision tower + causal Q-Former + quantizer + embedding decoder.

    Args:
        config: the architecture.
        vision_tower: the frozen tower; may be ``None`` for a decode-only tokenizer (codes →
            embedding), in which case ``config.vision.width`` must be set.
        vision_source: the directory the tower was loaded from (lets ``save_pretrained`` reference
            or copy it).
    """

    def __init__(self, config: SeedTokenizerConfig, vision_tower: FrozenVisionTower | None = None,
                 vision_source: str | os.PathLike | None = None):
        super().__init__()
        width = config.vision.width
        if vision_tower is not None:
            if width not in (0, vision_tower.hidden_size):
                raise ConfigError(f"vision.width is {width} but the vision tower's features are "
                                  f"{vision_tower.hidden_size}-d")
            width = vision_tower.hidden_size
            if (vision_tower.layer, vision_tower.keep_cls) != (config.vision.layer, config.vision.keep_cls):
                raise ConfigError(f"the vision tower uses layer={vision_tower.layer}, keep_cls={vision_tower.keep_cls} "
                                  f"but the config says layer={config.vision.layer}, keep_cls={config.vision.keep_cls}")
        if width <= 0:
            raise ConfigError("vision.width is unknown: pass a vision tower or set vision.width")
        for what, heads in (("qformer", config.qformer.num_heads), ("decoder", config.decoder.num_heads)):
            if heads < 1 or config.qformer.hidden_size % heads:
                raise ConfigError(f"{what}.num_heads ({heads}) must divide qformer.hidden_size "
                                  f"({config.qformer.hidden_size})")
        self.config = config.replace(vision=config.vision.replace(width=width))
        self.vision_tower = vision_tower
        q = config.qformer
        self.qformer = CausalQFormer(
            vision_width=width, hidden_size=q.hidden_size, num_layers=q.num_layers, num_heads=q.num_heads,
            intermediate_size=q.intermediate_size, num_queries=config.num_queries,
            cross_attention_frequency=q.cross_attention_frequency, causal=q.causal, dropout=q.dropout,
            text_vocab_size=q.text_vocab_size, max_text_len=q.max_text_len, attn_implementation=q.attn_implementation,
        )
        self.quantizer: Quantizer = build_quantizer(config.quantizer)
        D, H = self.quantizer.dim, q.hidden_size
        self.code_proj = nn.Sequential(nn.Linear(H, H), nn.Tanh(), nn.Linear(H, D))
        d = config.decoder
        self.decoder = EmbeddingDecoder(
            code_dim=D, hidden_size=H, num_queries=config.num_queries, num_layers=d.num_layers,
            num_heads=d.num_heads, mlp_ratio=d.mlp_ratio, embed_dim=config.embed_dim, down_dims=d.down_dims,
        )
        # Extension point for the codes → pixels decoder; saved and loaded on its own.
        self.image_decoder: nn.Module | None = None
        self._vision_source = Path(vision_source) if vision_source is not None else None

    # ---- sizes ----------------------------------------------------------------------------------

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def num_tokens(self) -> int:
        """Codes per image ``N``."""
        return self.config.num_queries

    @property
    def device(self) -> torch.device:
        """Device of the trainable part (the vision tower may live elsewhere)."""
        return self.qformer.query_tokens.device

    # ---- encode ---------------------------------------------------------------------------------

    def _tower(self) -> FrozenVisionTower:
        if self.vision_tower is None:
            raise ConfigError("this tokenizer was loaded without its vision tower (load_vision=False)")
        return self.vision_tower

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images → ``pixel_values (B, 3, H, W)`` with the tower's image processor."""
        return self._tower().preprocess(images)

    def _pixels(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        return images if isinstance(images, torch.Tensor) else self.preprocess(images)

    def encode_features(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        """Images or ``pixel_values`` → causal Q-Former outputs ``(B, N, H)`` (differentiable w.r.t. the Q-Former)."""
        features = self._tower()(self._pixels(images))  # (B, T, C), no grad: the tower is frozen
        return self.qformer(features.to(self.device))

    def quantize(self, queries: torch.Tensor) -> QuantizerOutput:
        """Q-Former outputs ``(B, N, H)`` → quantizer output (code vectors, codes, loss, metrics)."""
        return self.quantizer(self.code_proj(queries))

    @torch.no_grad()
    def encode(self, images: Sequence[Any] | torch.Tensor) -> ImageCodes:
        """Images (PIL list) or ``pixel_values (B, 3, H, W)`` → :class:`ImageCodes` ``(B, N)``.

        Runs in eval mode (no dropout, no codebook updates) and restores the previous mode.
        """
        with _eval_mode(self):
            indices = self.quantize(self.encode_features(images)).indices
        return ImageCodes(indices, self.codebook_size)

    # ---- decode ---------------------------------------------------------------------------------

    def _code_vectors(self, codes: ImageCodes | torch.Tensor) -> torch.Tensor:
        if not isinstance(codes, ImageCodes):
            codes = ImageCodes(codes, self.codebook_size)
        elif codes.codebook_size != self.codebook_size:
            raise DataError(f"codes are for a codebook of {codes.codebook_size}, this tokenizer has "
                            f"{self.codebook_size}")
        if codes.num_tokens != self.num_tokens:
            raise DataError(f"expected {self.num_tokens} codes per image, got {codes.num_tokens}")
        return self.quantizer.indices_to_codes(codes.codes.to(self.device))  # (B, N, D)

    @torch.no_grad()
    def decode_embedding(self, codes: ImageCodes | torch.Tensor) -> torch.Tensor:
        """Codes ``(B, N)`` → unCLIP image embedding ``(B, E)`` (the diffusion decoder's condition)."""
        with _eval_mode(self):
            return self.decoder.decode_embedding(self._code_vectors(codes))

    @torch.no_grad()
    def decode_queries(self, codes: ImageCodes | torch.Tensor) -> torch.Tensor:
        """Codes ``(B, N)`` → reconstructed causal Q-Former outputs ``(B, N, H)``."""
        with _eval_mode(self):
            return self.decoder.decode_queries(self._code_vectors(codes))

    def decode_image(self, codes: ImageCodes | torch.Tensor, *, seed: int | Sequence[int] = 0,
                     num_inference_steps: int | None = None, guidance_scale: float | None = None,
                     noise_level: int | None = None, batch_size: int | None = None, progress: bool = False,
                     output_type: Literal["pil", "np"] = "pil") -> list[Any]:
        """Codes ``(B, N)`` → embedding ``(B, E)`` → images with the attached unCLIP decoder.

        Sampling arguments default to the decoder's saved settings; image ``i`` uses ``seed + i``
        (see :meth:`seedtok.unclip.UnCLIPImageDecoder.decode`). Returns PIL images (or uint8 arrays).
        """
        if self.image_decoder is None:
            raise ConfigError("this tokenizer has no image decoder: attach one (tokenizer.image_decoder = "
                              "UnCLIPImageDecoder.from_pretrained(DIR)) or load a directory with image_decoder/")
        embeds = self.decode_embedding(codes)  # (B, E)
        return self.image_decoder.decode(embeds, seed=seed, num_inference_steps=num_inference_steps,
                                         guidance_scale=guidance_scale, noise_level=noise_level,
                                         batch_size=batch_size, progress=progress, output_type=output_type)

    # ---- training (stage 2) -----------------------------------------------------------------------

    def forward(self, pixel_values: torch.Tensor, target_embeds: torch.Tensor | None = None,
                weights: Stage2LossWeights | None = None) -> TokenizerOutput:
        """One SEED stage-2 step: quantize the Q-Former outputs and decode them back.

        Args:
            pixel_values: ``(B, 3, H, W)``.
            target_embeds: ``(B, E)`` unCLIP image embeddings to regress; ``None`` takes them from
                the vision tower's own projection (CLIP / SigLIP towers) in the same pass.
            weights: loss weights (default SEED's 5 / 2 / 0.5).

        The Q-Former outputs are the reconstruction target (detached); freezing the Q-Former
        (``requires_grad_(False)``) is the recipe's choice.
        """
        tower = self._tower()
        if target_embeds is None:
            features, target_embeds = tower.features_and_embeds(pixel_values)
        else:
            features = tower(pixel_values)
        if target_embeds.shape[-1] != self.config.embed_dim:
            raise DataError(f"target embeddings are {target_embeds.shape[-1]}-d, the decoder predicts "
                            f"{self.config.embed_dim}-d (embed_dim)")
        queries = self.qformer(features.to(self.device))  # (B, N, H)
        q = self.quantize(queries)
        pred_queries, pred_embeds = self.decoder(q.quantized)
        losses = stage2_loss(vq_loss=q.loss, pred_queries=pred_queries, target_queries=queries,
                             pred_embeds=pred_embeds, target_embeds=target_embeds.to(pred_embeds.device),
                             weights=weights)
        return TokenizerOutput(loss=losses["loss"], losses=losses, metrics=q.metrics, codes=q.indices)

    # ---- weights --------------------------------------------------------------------------------

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that go into ``model.safetensors`` (everything but the vision tower and image decoder)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(_EXTERNAL)}

    def load_own_state_dict(self, state_dict: dict[str, torch.Tensor], what: str = "tokenizer weights") -> None:
        """Load :meth:`own_state_dict`-style weights; missing, unexpected or mis-shaped keys raise CheckpointError."""
        check_state_dict(self.own_state_dict(), state_dict, what)
        # The check above is the strict one; strict=False only because the vision tower's and
        # image decoder's keys are (by design) not in this state dict.
        result = self.load_state_dict(state_dict, strict=False)
        stray = [k for k in result.missing_keys if not k.startswith(_EXTERNAL)] + list(result.unexpected_keys)
        if stray:
            raise CheckpointError(f"{what}: keys did not load: {', '.join(stray[:3])}")

    # ---- save / load ----------------------------------------------------------------------------

    def save_pretrained(self, save_dir: str | os.PathLike, *, vision: Literal["copy", "reference"] = "copy") -> Path:
        """Write ``config.json``, ``model.safetensors`` and (``vision="copy"``) ``vision_tower/`` atomically.

        ``vision="reference"`` records the absolute path of the tower's directory instead of copying it.
        """
        save_dir = Path(save_dir)
        source = self._vision_source
        if vision == "copy" and self.vision_tower is None and (source is None or not source.is_dir()):
            raise ConfigError("no vision tower to copy: load the tokenizer with its vision tower")
        if vision == "reference" and source is None:
            raise ConfigError("the vision tower was not loaded from a directory, so it cannot be "
                              "referenced: save it with vision='copy'")
        with atomic_directory(save_dir) as tmp:
            if vision == "copy":
                vision_path = VISION_DIR
                if self.vision_tower is not None:
                    self.vision_tower.save_pretrained(tmp / VISION_DIR)
                else:  # loaded with load_vision=False: copy the directory it came from
                    shutil.copytree(source, tmp / VISION_DIR)
            else:
                vision_path = str(source.resolve())
            config = self.config.replace(vision=self.config.vision.replace(path=vision_path))
            save_json(config.to_dict(), tmp / CONFIG_NAME)
            save_safetensors(self.own_state_dict(), tmp / WEIGHTS_NAME)
            # An unCLIP decoder (seedtok.unclip.UnCLIPImageDecoder) is saved beside the weights; any other
            # module attached here stays outside the checkpoint (it saves and loads on its own).
            if hasattr(self.image_decoder, "save_pretrained"):
                self.image_decoder.save_pretrained(tmp / IMAGE_DECODER_DIR)
        return save_dir

    @classmethod
    def from_config(cls, config: SeedTokenizerConfig) -> SeedTokenizer:
        """A freshly initialised tokenizer around the vision tower at ``config.vision.path``."""
        if not config.vision.path:
            raise ConfigError("vision.path is empty: name a local vision model directory")
        source = Path(config.vision.path)
        tower = FrozenVisionTower.from_pretrained(source, layer=config.vision.layer, keep_cls=config.vision.keep_cls)
        return cls(config, tower, vision_source=source)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *, load_vision: bool = True,
                        device: str | torch.device = "cpu", load_image_decoder: bool = True) -> SeedTokenizer:
        """Load a directory written by :meth:`save_pretrained` (in eval mode).

        ``load_vision=False`` skips the vision tower (enough for ``decode_embedding``/``decode_queries``).
        ``image_decoder/``, if present, is loaded as ``image_decoder`` unless ``load_image_decoder=False``.
        """
        model_dir = Path(model_dir)
        config = load_config(model_dir)
        source = None
        if config.vision.path:
            source = Path(config.vision.path)
            source = source if source.is_absolute() else model_dir / source
        tower = None
        if load_vision:
            if source is None:
                raise CheckpointError(f"{model_dir}: config.json names no vision tower (vision.path is empty)")
            tower = FrozenVisionTower.from_pretrained(source, layer=config.vision.layer,
                                                      keep_cls=config.vision.keep_cls)
        model = cls(config, tower, vision_source=source)
        model.load_own_state_dict(load_safetensors(model_dir / WEIGHTS_NAME), what=str(model_dir / WEIGHTS_NAME))
        if load_image_decoder and (model_dir / IMAGE_DECODER_DIR).is_dir():
            from seedtok.unclip import UnCLIPImageDecoder  # lazy: diffusers is only needed to paint images

            model.image_decoder = UnCLIPImageDecoder.from_pretrained(model_dir / IMAGE_DECODER_DIR, device=device)
            if model.image_decoder.embed_dim != config.embed_dim:
                raise CheckpointError(f"{model_dir / IMAGE_DECODER_DIR}: the decoder is conditioned on "
                                      f"{model.image_decoder.embed_dim}-d embeddings, the tokenizer predicts "
                                      f"{config.embed_dim}-d")
        return model.to(device).eval()


def load_config(model_dir: str | os.PathLike) -> SeedTokenizerConfig:
    """The :class:`SeedTokenizerConfig` of a saved tokenizer directory."""
    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is a file, not a tokenizer directory")
    if not model_dir.is_dir():
        raise CheckpointError(f"tokenizer directory not found: {model_dir}")
    path = model_dir / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no {CONFIG_NAME}")
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise CheckpointError(f"{path}: not valid JSON") from None
    try:
        return SeedTokenizerConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode for a block, then restore every submodule's previous mode."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
