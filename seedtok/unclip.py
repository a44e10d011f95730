"""unCLIP image decoder: an image embedding ``(B, E)`` → pixels, over diffusers' Stable unCLIP pipeline.

SEED turns its 32 codes into a CLIP ViT-H image embedding (1024-d) and paints it with Stable unCLIP
(Ramesh et al., "Hierarchical Text-Conditional Image Generation with CLIP Latents",
arXiv:2204.06125; the SD 2.1 variant): ``StableUnCLIPImg2ImgPipeline(image_embeds=…,
noise_level=0)``, guidance 10, 20 steps. The embedding reaches the UNet through the class-embedding
projection that is added to the time embedding, after the pipeline's image normaliser and noising
scheduler have (optionally) noised it and appended a sinusoidal embedding of the noise level::

    image_embeds (B, E) ──normalise → add noise(noise_level) → unnormalise──► (B, E)
                        ──concat sinusoid(noise_level)──► class_labels (B, 2E)
    latents (B, c, h, w) ──UNet2DConditionModel(t, class_labels)──► ε / v ──scheduler──► … ──VAE──► image

Both paths of the toolkit go through that one pipeline class:

* **real weights** — a local ``stable-diffusion-2-1-unclip`` directory, loaded as is;
* **embedded default** — a tiny directory of the same layout trained on the Shapes world
  (``train_scripts/train_decoder.py``): a small :class:`~diffusers.AutoencoderKL` (64 px → 16×16×4
  latents), a small UNet conditioned through the same class-embedding projection (optionally as
  AdaGN scale/shift, ``resnet_time_scale_shift="scale_shift"``) with *no* cross-attention blocks (the
  prompt is always empty), and the stage-0 CLIP as image encoder, text encoder and tokenizer.

Classifier-free guidance: the pipeline's unconditional branch is an all-zero ``class_labels`` vector
(embedding *and* noise-level part), so the recipe drops the condition to zeros.

:class:`UnCLIPImageDecoder` is the toolkit's API over either directory: embeddings in, PIL images
out, seeded per image (the same seed gives the same image whatever the batching), batched, with the
sampling defaults (steps, guidance, noise level) saved next to the pipeline in ``seed_decoder.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from seedtok.errors import CheckpointError, ConfigError, DataError
from seedtok.io import atomic_directory, save_json
from seedtok.schema import ConfigBase, option

SAMPLING_NAME = "seed_decoder.json"
MODEL_INDEX = "model_index.json"


@dataclass
class UnCLIPSamplingConfig(ConfigBase):
    """How the decoder samples (defaults: SEED's Stable unCLIP settings)."""

    num_inference_steps: int = option(20, help="denoising steps")
    guidance_scale: float = option(10.0, help="classifier-free guidance scale (≤ 1 turns guidance off)")
    noise_level: int = option(0, help="noise added to the image embedding before conditioning (0 = none)")
    batch_size: int = option(16, help="images decoded per pipeline call")


# ---- the decoder ----------------------------------------------------------------------------------


class UnCLIPImageDecoder:
    """unCLIP image embeddings → images with a :class:`~diffusers.StableUnCLIPImg2ImgPipeline`.

    Args:
        pipeline: the Stable unCLIP pipeline (real weights or the embedded default).
        sampling: sampling defaults; ``None`` takes SEED's (20 steps, guidance 10, noise level 0).
        source: the directory the pipeline was loaded from, if any.
    """

    def __init__(self, pipeline: Any, sampling: UnCLIPSamplingConfig | None = None,
                 source: str | os.PathLike | None = None):
        self.pipeline = pipeline
        self.sampling = sampling or UnCLIPSamplingConfig()
        self.source = Path(source) if source is not None else None
        pipeline.set_progress_bar_config(disable=True)

    # ---- sizes ----------------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        """Size ``E`` of the image embedding the UNet is conditioned on."""
        return int(self.pipeline.image_normalizer.config.embedding_dim)

    @property
    def image_size(self) -> int:
        """Default output side in pixels (the UNet's sample size × the VAE's scale factor)."""
        return int(self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor)

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    def to(self, device: str | torch.device) -> UnCLIPImageDecoder:
        self.pipeline.to(device)
        return self

    # ---- save / load ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> UnCLIPImageDecoder:
        """Load a local Stable unCLIP (img2img) directory: ``model_index.json`` + one folder per component.

        ``seed_decoder.json`` (sampling defaults), when present, overrides SEED's defaults.
        """
        from diffusers import StableUnCLIPImg2ImgPipeline

        model_dir = Path(model_dir)
        if not (model_dir / MODEL_INDEX).is_file():
            raise CheckpointError(f"not a diffusers pipeline directory (no {MODEL_INDEX}): {model_dir}")
        index = json.loads((model_dir / MODEL_INDEX).read_text())
        if index.get("_class_name") not in ("StableUnCLIPImg2ImgPipeline", "StableUnCLIPPipeline"):
            raise CheckpointError(f"{model_dir}: expected a StableUnCLIPImg2ImgPipeline directory, "
                                  f"found {index.get('_class_name')!r}")
        try:
            with _quiet_libraries():
                pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{model_dir}: cannot load the unCLIP pipeline ({str(e).splitlines()[0]})") from None
        sampling = None
        if (model_dir / SAMPLING_NAME).is_file():
            try:
                sampling = UnCLIPSamplingConfig.from_dict(json.loads((model_dir / SAMPLING_NAME).read_text()))
            except ValueError as e:
                raise CheckpointError(f"{model_dir / SAMPLING_NAME}: {str(e).splitlines()[0]}") from None
        return cls(pipe.to(device), sampling, source=model_dir)

    def save_pretrained(self, save_dir: str | os.PathLike) -> Path:
        """Write the pipeline (safetensors) and ``seed_decoder.json`` atomically."""
        save_dir = Path(save_dir)
        with atomic_directory(save_dir) as tmp, _quiet_libraries():
            self.pipeline.save_pretrained(tmp, safe_serialization=True)
            save_json(self.sampling.to_dict(), tmp / SAMPLING_NAME)
        return save_dir

    # ---- decode ---------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, image_embeds: torch.Tensor, *, seed: int | Sequence[int] = 0,
               num_inference_steps: int | None = None, guidance_scale: float | None = None,
               noise_level: int | None = None, batch_size: int | None = None, progress: bool = False,
               output_type: Literal["pil", "np"] = "pil") -> list[Any]:
        """Paint ``image_embeds (B, E)`` (raw, unnormalised, as the CLIP projection gives them).

        Args:
            image_embeds: ``(B, E)`` float tensor.
            seed: one seed (image ``i`` then uses ``seed + i``) or one seed per image; each image's
                noise comes from its own generator, so batching does not change the result.
            num_inference_steps, guidance_scale, noise_level, batch_size: override :attr:`sampling`.
            progress: tqdm bar over the images (stderr).
            output_type: ``"pil"`` → list of PIL images; ``"np"`` → list of ``(H, W, 3)`` uint8 arrays.
        """
        # 1. Check inputs
        s = self.sampling
        steps = s.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = s.guidance_scale if guidance_scale is None else guidance_scale
        level = s.noise_level if noise_level is None else noise_level
        bs = s.batch_size if batch_size is None else batch_size
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.ndim != 2:
            raise DataError(f"image_embeds must be a (batch, {self.embed_dim}) tensor, got "
                            f"{tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__}")
        if image_embeds.shape[1] != self.embed_dim:
            raise DataError(f"image_embeds are {image_embeds.shape[1]}-d, this decoder is conditioned on "
                            f"{self.embed_dim}-d embeddings")
        if not torch.isfinite(image_embeds).all():
            raise DataError("image_embeds contain NaN or inf")
        if steps < 1 or bs < 1:
            raise ConfigError(f"num_inference_steps and batch_size must be ≥ 1 (got {steps}, {bs})")
        max_level = self.pipeline.image_noising_scheduler.config.num_train_timesteps
        if not 0 <= level < max_level:
            raise ConfigError(f"noise_level must be in [0, {max_level}), got {level}")
        n = image_embeds.shape[0]
        seeds = [seed + i for i in range(n)] if isinstance(seed, int) else [int(x) for x in seed]
        if len(seeds) != n:
            raise DataError(f"got {len(seeds)} seeds for {n} embeddings")

        # 2. Decode in batches, one generator per image
        from tqdm.auto import tqdm

        pipe = self.pipeline
        dtype = pipe.unet.dtype
        images: list[Any] = []
        bar = tqdm(total=n, desc="decoding", unit="img", disable=not progress, leave=False)
        for start in range(0, n, bs):
            chunk = image_embeds[start:start + bs].to(self.device, dtype)
            gens = [torch.Generator(device="cpu").manual_seed(x) for x in seeds[start:start + bs]]
            # The latents are drawn here (per-image generators on CPU) rather than inside the pipeline,
            # so the noise does not depend on the device or on how the images were batched.
            latents = torch.stack([
                torch.randn(self._latent_shape(), generator=g, dtype=torch.float32) for g in gens
            ]).to(self.device, dtype)
            out = pipe(
                image_embeds=chunk, prompt=[""] * len(chunk), num_inference_steps=steps, guidance_scale=guidance,
                noise_level=level, generator=gens, latents=latents, output_type="np",
            ).images  # (b, H, W, 3) float in [0, 1]
            arrays = (out * 255).round().clip(0, 255).astype("uint8")
            images.extend(_to_pil(arrays) if output_type == "pil" else list(arrays))
            bar.update(len(chunk))
        bar.close()
        return images

    __call__ = decode

    def _latent_shape(self) -> tuple[int, int, int]:
        unet = self.pipeline.unet.config
        return (unet.in_channels, unet.sample_size, unet.sample_size)


def _to_pil(arrays: Any) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(a) for a in arrays]


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence diffusers' / transformers' load reports and bars (we check what matters ourselves)."""
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl

    levels = dl.get_verbosity(), tl.get_verbosity()
    bars = dl.is_progress_bar_enabled(), tl.is_progress_bar_enabled()
    dl.set_verbosity_error()
    tl.set_verbosity_error()
    dl.disable_progress_bar()
    tl.disable_progress_bar()
    try:
        yield
    finally:
        dl.set_verbosity(levels[0])
        tl.set_verbosity(levels[1])
        if bars[0]:
            dl.enable_progress_bar()
        if bars[1]:
            tl.enable_progress_bar()


# ---- the embedded default: builders -----------------------------------------------------------------


def build_vae(*, block_out_channels: Sequence[int] = (32, 64, 64), latent_channels: int = 4,
              layers_per_block: int = 1, norm_num_groups: int = 16, mid_attention: bool = False) -> Any:
    """A small :class:`~diffusers.AutoencoderKL`: downsamples by ``2 ** (len(block_out_channels) - 1)``."""
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups, mid_block_add_attention=mid_attention,
    )


def build_unet(*, embed_dim: int, in_channels: int = 4, sample_size: int = 16,
               block_out_channels: Sequence[int] = (32, 64, 128), layers_per_block: int = 1,
               attention_levels: Sequence[bool] = (False, False, True), attention_head_dim: int = 32,
               scale_shift: bool = True, cross_attention_dim: int = 128, norm_num_groups: int = 16) -> Any:
    """A small Stable-unCLIP-style :class:`~diffusers.UNet2DConditionModel`.

    The embedding enters only through ``class_embed_type="projection"`` (input ``2E``: the embedding
    and the sinusoid of its noise level, as the pipeline builds ``class_labels``); ``scale_shift``
    turns that time+class embedding into AdaGN (a per-channel scale and shift after each ResNet
    block's second norm) instead of an added bias. Attention levels use self-attention only: the
    pipeline's text context (an empty prompt) carries nothing. ``cross_attention_dim`` must still
    match the text encoder's width because the pipeline passes its states along.
    """
    from diffusers import UNet2DConditionModel

    if len(attention_levels) != len(block_out_channels):
        raise ConfigError(f"attention_levels has {len(attention_levels)} entries for {len(block_out_channels)} levels")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2D",
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
        cross_attention_dim=cross_attention_dim, class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * embed_dim,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
    )


def build_schedulers(*, prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction",
                     beta_schedule: str = "squaredcos_cap_v2", num_train_timesteps: int = 1000,
                     sampler: Literal["ddim", "dpm"] = "ddim", rescale_zero_snr: bool = True) -> tuple[Any, Any]:
    """The training scheduler (DDPM) and the few-step sampler (DDIM or DPM-Solver++) on the same betas.

    ``rescale_zero_snr`` (Lin et al., arXiv:2305.08891) makes the last timestep pure noise and uses
    "trailing" timesteps, so a 20-step sampler starts from what the model saw in training; it needs
    v-prediction.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if rescale_zero_snr and prediction_type != "v_prediction":
        raise ConfigError("rescale_zero_snr needs prediction_type 'v_prediction'")
    common = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                  prediction_type=prediction_type, rescale_betas_zero_snr=rescale_zero_snr,
                  timestep_spacing="trailing" if rescale_zero_snr else "leading")
    train = DDPMScheduler(**common, clip_sample=False)
    if sampler == "ddim":
        sample = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    elif sampler == "dpm":
        extra = {"final_sigmas_type": "zero"} if rescale_zero_snr else {}
        sample = DPMSolverMultistepScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
            prediction_type=prediction_type, rescale_betas_zero_snr=rescale_zero_snr,
            timestep_spacing="trailing" if rescale_zero_snr else "linspace", algorithm_type="dpmsolver++",
            **extra,
        )
    else:
        raise ConfigError(f"unknown sampler {sampler!r} (ddim, dpm)")
    return train, sample


def build_noising(*, embed_mean: torch.Tensor, embed_std: torch.Tensor, num_train_timesteps: int = 1000) -> tuple[Any, Any]:
    """The image normaliser (embedding statistics) and the noising scheduler of Stable unCLIP."""
    from diffusers import DDPMScheduler
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )

    if embed_mean.ndim != 1 or embed_mean.shape != embed_std.shape:
        raise DataError(f"embedding mean and std must be (E,) vectors, got {tuple(embed_mean.shape)} "
                        f"and {tuple(embed_std.shape)}")
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=embed_mean.shape[0])
    with torch.no_grad():
        normalizer.mean.copy_(embed_mean.view(1, -1))
        normalizer.std.copy_(embed_std.clamp_min(1e-6).view(1, -1))
    noising = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2")
    return normalizer, noising


def load_clip_parts(clip_dir: str | os.PathLike) -> dict[str, Any]:
    """The stage-0 CLIP directory as Stable unCLIP's image encoder, image processor, text encoder, tokenizer.

    The text side only encodes the empty prompt the decoder always uses, but the pipeline needs it.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from seedtok.vision import FrozenVisionTower

    clip_dir = Path(clip_dir)
    with _quiet_libraries():
        tower = FrozenVisionTower.from_pretrained(clip_dir)
    if tower.embed_dim is None or type(tower.model).__name__ != "CLIPVisionModelWithProjection":
        raise CheckpointError(f"{clip_dir}: the unCLIP image encoder must be a CLIP vision tower with its projection")
    try:
        with _quiet_libraries():
            text_config = CLIPTextConfig.from_pretrained(clip_dir, local_files_only=True)
            text, info = CLIPTextModel.from_pretrained(clip_dir, config=text_config, local_files_only=True,
                                                       output_loading_info=True)
            tokenizer = CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{clip_dir}: not a full CLIP directory with a text tower and tokenizer "
                              f"({str(e).splitlines()[0]})") from None
    if info.get("missing_keys"):
        raise CheckpointError(f"{clip_dir}: text weights missing: {', '.join(sorted(info['missing_keys'])[:3])}")
    # The pipeline pads prompts to model_max_length; a trained BPE tokenizer leaves it "infinite".
    tokenizer.model_max_length = text_config.max_position_embeddings
    return {"image_encoder": tower.model, "feature_extractor": tower.image_processor, "text_encoder": text.eval(),
            "tokenizer": tokenizer}


def assemble_pipeline(clip_dir: str | os.PathLike, *, vae: Any, unet: Any, scheduler: Any,
                      image_normalizer: Any, image_noising_scheduler: Any) -> Any:
    """A :class:`~diffusers.StableUnCLIPImg2ImgPipeline` from the embedded default's parts."""
    from diffusers import StableUnCLIPImg2ImgPipeline

    parts = load_clip_parts(clip_dir)
    if parts["text_encoder"].config.hidden_size != unet.config.cross_attention_dim:
        raise ConfigError(f"unet.cross_attention_dim is {unet.config.cross_attention_dim} but the text encoder "
                          f"is {parts['text_encoder'].config.hidden_size}-d")
    if unet.config.projection_class_embeddings_input_dim != 2 * image_normalizer.config.embedding_dim:
        raise ConfigError("the UNet's class projection takes "
                          f"{unet.config.projection_class_embeddings_input_dim} inputs, expected 2 × "
                          f"{image_normalizer.config.embedding_dim} (embedding + noise-level sinusoid)")
    return StableUnCLIPImg2ImgPipeline(
        **parts, image_normalizer=image_normalizer, image_noising_scheduler=image_noising_scheduler,
        unet=unet, scheduler=scheduler, vae=vae,
    )


def class_labels(image_embeds: torch.Tensor, noise_level: torch.Tensor, image_normalizer: Any,
                 image_noising_scheduler: Any, noise: torch.Tensor | None = None) -> torch.Tensor:
    """What the pipeline feeds the UNet as ``class_labels``: noised embedding ⊕ sinusoid(noise level).

    Mirrors ``StableUnCLIPImg2ImgPipeline.noise_image_embeddings`` for a *per-sample* noise level
    (training draws one per image). Args: ``image_embeds (B, E)``, ``noise_level (B,)`` long.
    Returns ``(B, 2E)``.
    """
    if noise is None:
        noise = torch.randn_like(image_embeds)
    with torch.no_grad():  # a fixed preprocessing of the condition (the normaliser's statistics are not trained)
        return _class_labels(image_embeds, noise_level, image_normalizer, image_noising_scheduler, noise)


def _class_labels(image_embeds: torch.Tensor, noise_level: torch.Tensor, image_normalizer: Any,
                  image_noising_scheduler: Any, noise: torch.Tensor) -> torch.Tensor:
    from diffusers.models.embeddings import get_timestep_embedding

    x = image_normalizer.scale(image_embeds)
    x = image_noising_scheduler.add_noise(x, timesteps=noise_level, noise=noise)
    x = image_normalizer.unscale(x)
    level = get_timestep_embedding(noise_level, image_embeds.shape[-1], flip_sin_to_cos=True,
                                   downscale_freq_shift=0).to(x.dtype)
    return torch.cat([x, level], dim=1)
