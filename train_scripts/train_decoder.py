"""The embedded default's unCLIP decoder: a tiny Stable unCLIP trained on the Shapes world.

SEED paints its decoded image embedding with Stable unCLIP (``seedtok/unclip.py``). With no
pretrained weights here, this recipe trains a pipeline of the same class, conditioned on the stage-0
CLIP's projected image embedding (64-d, raw — the pipeline's image normaliser holds its statistics):

1. **Setup** — Shapes train / test arrays, the CLIP image embeddings of every scene (cached).
2. **VAE** — a small ``AutoencoderKL`` (64 px → 16×16×4 latents by default), L1 + L2 loss with the
   shape pixels weighted ``vae_fg_weight``× (white background dominates the plain loss and the
   shapes' colours and corners come late), a tiny KL. Resumable; saved to ``OUT/vae``.
3. **Latents** — posterior means of every training scene, scaled to unit variance (the VAE's
   ``scaling_factor``).
4. **UNet** — v-prediction on a zero-terminal-SNR cosine schedule, condition = the pipeline's own
   ``class_labels`` (noised embedding ⊕ sinusoid(noise level)), dropped to zeros with probability
   ``p_uncond`` for classifier-free guidance. Half of every batch is drawn from the highest-noise
   timesteps (``high_noise_fraction``, t ≥ ``high_noise_from``): only there is the image's layout
   absent from the input, so only there must the UNet read it from the embedding — with uniform
   timesteps the layout (position) was learned several times slower. AdamW, warmup + cosine, EMA
   (diffusers ``EMAModel``), bf16 autocast, atomic resumable checkpoints, a sample grid PNG every
   ``sample_every`` steps (top row: truth, bottom row: decoded from the truth's embedding).
5. **Save** — ``OUT/decoder``: a ``StableUnCLIPImg2ImgPipeline`` directory (EMA weights) + sampling
   defaults; optionally attached to a SEED tokenizer directory (``--tokenizer``) as its
   ``image_decoder/``.
6. **Eval** — decode the test split's true CLIP embeddings and score them with the exact Shapes
   scorer; for reference, the same score of the nearest training image in embedding space (what the
   embedding itself can tell apart). With ``--tokenizer``, also the round trip image → codes →
   embedding → image.

    seed tokenizer train-decoder --clip runs/clip/model --out runs/decoder [--tokenizer runs/tok/model]
    seed tokenizer reconstruct --model runs/tok/model img1.png img2.png --out recon/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data_pipelines.shapes import ShapesConfig
from data_pipelines.shapes_arrays import ShapesArrays, load_shapes_arrays
from seedtok.errors import CheckpointError, ConfigError, DataError
from seedtok.schema import ConfigBase, option
from train_scripts.runtime import (
    CheckpointManager,
    MetricsLogger,
    autocast,
    check_finite,
    init_distributed,
    load_state_strict,
    quiet_libraries,
    resolve_precision,
    seed_everything,
    warmup_cosine,
)


@dataclass
class DecoderTrainConfig(ConfigBase):
    out: str = option("runs/decoder", help="output directory (the decoder lands in OUT/decoder)")
    clip: str = option("", help="stage-0 CLIP directory: the embedding space the decoder is conditioned on")
    tokenizer: str = option("", help="a SEED tokenizer directory to attach the decoder to (as image_decoder/) "
                                     "and to score the image → codes → image round trip with")
    init_decoder: str = option("", help="start the UNet from this decoder's weights (a directory written by an "
                                        "earlier run: OUT/decoder, or its unet/ folder) — fine-tuning, on "
                                        "that decoder's own autoencoder unless --vae is given; the settings "
                                        "that shape the UNet must match it")
    tokenizer_condition_fraction: float = option(
        0.0, help="fraction of training rows conditioned on the embedding --tokenizer decodes from the image's "
                  "own codes (image → codes → embedding) instead of its CLIP embedding: the UNet learns to paint "
                  "what the tokenizer hands it (round trip, text → image); 0 = CLIP embeddings only")
    shapes: ShapesConfig = option(default_factory=ShapesConfig, help="Shapes world generator settings")
    n_train: int = option(20000, help="training scenes rendered once and reused")
    n_eval: int = option(500, help="test-split scenes decoded and scored at the end")
    # VAE
    vae: str = option("", help="a trained AutoencoderKL directory to use instead of training one (e.g. the OUT/vae "
                               "of an earlier run, or of a `--vae-only` run that ran in parallel with stage 0)")
    vae_only: bool = option(False, help="train (and score) only the autoencoder, then stop: it needs no CLIP, so it "
                                        "can run while the CLIP trains")
    vae_steps: int = option(1500, help="autoencoder optimizer steps (0 = reuse OUT/vae)")
    vae_decoder_steps: int = option(0, help="after the autoencoder's joint steps (or starting from --vae), this many "
                                            "steps that train only its decoder: the latent space stays as it is — "
                                            "a UNet trained on it stays valid — and the pictures get sharper. The "
                                            "1500-step autoencoder's reconstructions score 0.91 strict (small "
                                            "shapes in pairs blur); 900 decoder-only steps lift them to 0.99")
    vae_decoder_lr: float = option(5e-4, help="peak learning rate of the decoder-only steps")
    vae_batch_size: int = option(32, help="autoencoder batch size")
    vae_lr: float = option(1.5e-3, help="autoencoder peak learning rate")
    vae_block_out_channels: list[int] = option(default_factory=lambda: [16, 32, 64],
                                               help="autoencoder widths; downsampling 2^(levels-1)")
    vae_latent_channels: int = option(4, help="latent channels")
    vae_fg_weight: float = option(9.0, help="extra loss weight of non-background pixels")
    vae_kl_weight: float = option(1e-6, help="KL weight (tiny: a near-deterministic autoencoder)")
    # UNet
    unet_block_out_channels: list[int] = option(default_factory=lambda: [32, 64, 128], help="UNet widths per level")
    unet_attention_levels: list[bool] = option(default_factory=lambda: [False, False, True],
                                               help="self-attention at each level")
    unet_layers_per_block: int = option(1, help="ResNet blocks per level")
    scale_shift: bool = option(True, help="AdaGN: the embedding scales and shifts every ResNet block's features")
    prediction_type: Literal["v_prediction", "epsilon"] = option("v_prediction", help="UNet target")
    zero_snr: bool = option(True, help="zero terminal SNR schedule + trailing timesteps (needs v_prediction)")
    sampler: Literal["ddim", "dpm"] = option("ddim", help="few-step sampler saved with the pipeline")
    steps: int = option(3000, help="UNet optimizer steps")
    batch_size: int = option(64, help="UNet batch size per process")
    lr: float = option(1e-3, help="UNet peak learning rate")
    warmup: int = option(100, help="linear warmup steps (both stages)")
    ema_decay: float = option(0.995, help="EMA decay of the UNet weights that are saved (0 = no EMA)")
    p_uncond: float = option(0.1, help="probability of dropping the condition (classifier-free guidance)")
    high_noise_fraction: float = option(0.5, help="fraction of each batch drawn from t ≥ high_noise_from")
    high_noise_from: int = option(850, help="lowest timestep of the high-noise draw (of 1000)")
    max_noise_level: int = option(0, help="> 0 trains on embeddings noised at levels in [0, this) (Stable "
                                          "unCLIP's noise augmentation; robustness to predicted embeddings)")
    # Sampling defaults saved with the decoder
    num_inference_steps: int = option(20, help="sampling steps")
    guidance_scale: float = option(3.0, help="classifier-free guidance scale")
    noise_level: int = option(0, help="embedding noise level at sampling")
    # Runtime
    precision: str = option("auto", help="auto | bf16 | fp32")
    device: str = option("auto", help="auto | cpu | cuda")
    seed: int = option(0, help="training seed")
    log_every: int = option(50, help="log every N steps")
    sample_every: int = option(500, help="write a sample grid PNG every N UNet steps (0 = never)")
    eval_every: int = option(0, help="score the EMA UNet on eval_n test scenes every N UNet steps (logged as "
                                     "eval_true_embed_* in log.jsonl: accuracy against wall time; 0 = only at the end)")
    eval_n: int = option(100, help="test scenes decoded and scored at each eval_every (at most n_eval; the "
                                   "decoder samples ≈ 29 images/s at 64 px, 20 DDIM steps, one thread)")
    ckpt_every: int = option(500, help="checkpoint every N steps (resumable)")
    resume: bool = option(True, help="resume from OUT's checkpoints if present")
    progress: bool = option(True, help="show progress bars")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def pixels_pm1(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, S, S, 3)`` → float ``(B, 3, S, S)`` in [-1, 1] (what the VAE reads and writes)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def uint8_from_pm1(x: torch.Tensor) -> np.ndarray:
    """float ``(B, 3, S, S)`` in [-1, 1] → uint8 ``(B, S, S, 3)``."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def clip_embeddings(clip_dir: str | Path, images: np.ndarray, batch: int = 500, progress: bool = False) -> torch.Tensor:
    """uint8 ``(n, S, S, 3)`` → raw projected CLIP image embeddings ``(n, E)`` (through the tower's processor)."""
    from PIL import Image

    from seedtok.vision import FrozenVisionTower

    tower = FrozenVisionTower.from_pretrained(clip_dir)
    if tower.embed_dim is None:
        raise ConfigError(f"{clip_dir}: the vision tower has no projected image embedding")
    out = []
    for s in tqdm(range(0, len(images), batch), desc="CLIP embeddings", disable=not progress, leave=False):
        pil = [Image.fromarray(a) for a in images[s:s + batch]]
        out.append(tower.image_embeds(tower.preprocess(pil)).float())
    return torch.cat(out)


def tokenizer_embeddings(tokenizer_dir: str | Path, images: np.ndarray, batch: int = 500,
                         progress: bool = False) -> torch.Tensor:
    """uint8 ``(n, S, S, 3)`` → the embeddings a SEED tokenizer decodes from the images' own codes ``(n, E)``."""
    from PIL import Image

    from seedtok.tokenizer import SeedTokenizer

    tok = SeedTokenizer.from_pretrained(tokenizer_dir, load_image_decoder=False)
    out = []
    for s in tqdm(range(0, len(images), batch), desc="tokenizer embeddings", disable=not progress, leave=False):
        pil = [Image.fromarray(a) for a in images[s:s + batch]]
        out.append(tok.decode_embedding(tok.encode(pil)).float().cpu())
    return torch.cat(out)


def _decoder_unet_state(path: Path) -> dict[str, torch.Tensor]:
    """The UNet weights of a saved decoder directory (``DIR/unet/*.safetensors``) or of a ``unet/`` folder."""
    from safetensors.torch import load_file

    for folder in (path / "unet", path):
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if files:
            return load_file(str(files[0]))
    raise CheckpointError(f"{path}: no UNet weights (expected unet/diffusion_pytorch_model.safetensors)")


def _decoder_vae_dir(path: Path) -> Path:
    """The autoencoder of a saved decoder directory (``DIR/vae``; ``DIR`` may also be its ``unet/`` folder)."""
    for candidate in (path / "vae", path.parent / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConfigError(f"--init-decoder {path}: no vae/ beside its UNet; pass --vae (the autoencoder it was trained on)")


def _cached(path: Path, compute) -> torch.Tensor:
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(value, tmp)
    tmp.replace(path)
    return value


def _fingerprint(model_dir: Path) -> str:
    """A short key for the embedding cache: the directory's path and its weights' size and mtime."""
    import hashlib

    weights = sorted(model_dir.glob("*.safetensors"))
    stats = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    return hashlib.sha256(repr((str(model_dir.resolve()), stats)).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Stage: VAE
# ---------------------------------------------------------------------------------------------
def vae_loss(vae, x: torch.Tensor, fg_weight: float, kl_weight: float) -> torch.Tensor:
    """L1 + L2 reconstruction with shape pixels up-weighted, plus a tiny KL. ``x (B, 3, S, S)`` in [-1, 1]."""
    post = vae.encode(x).latent_dist
    y = vae.decode(post.sample()).sample.float()
    w = 1.0 + fg_weight * (x < 0.99).any(1, keepdim=True).float()  # (B, 1, S, S): non-white pixels
    d = y - x
    rec = ((d.abs() + d.pow(2)) * w).mean() / w.mean()
    return rec + kl_weight * post.kl().mean()


_VAE_ENCODER_PREFIXES = ("encoder.", "quant_conv.")


def vae_directory(cfg: DecoderTrainConfig, out: Path) -> Path:
    """Where the run's autoencoder lives: ``--vae`` as given, or ``OUT/vae`` (trained here, or a
    sharpened copy of ``--vae`` when ``vae_decoder_steps`` > 0)."""
    return Path(cfg.vae) if cfg.vae and cfg.vae_decoder_steps == 0 else out / "vae"


def train_vae(cfg: DecoderTrainConfig, train: ShapesArrays, info, precision: str, out: Path, progress: bool):
    """Train (or resume, or reuse) the autoencoder; returns it in eval mode.

    Two phases over one step counter (so one checkpoint series resumes either): ``vae_steps`` joint
    steps, then ``vae_decoder_steps`` with the encoder frozen, on their own warmup + cosine schedule.
    ``--vae DIR`` with decoder-only steps starts at the second phase from DIR's weights and writes
    the sharpened copy to ``OUT/vae`` (DIR is left as it is).
    """
    from diffusers import AutoencoderKL

    from seedtok.unclip import build_vae

    source = Path(cfg.vae) if cfg.vae else None
    if source is not None and not (source / "config.json").is_file():
        raise CheckpointError(f"--vae {source}: not an autoencoder directory (no config.json)")
    if cfg.vae_decoder_steps < 0:
        raise ConfigError(f"vae_decoder_steps must be ≥ 0 (got {cfg.vae_decoder_steps})")
    refine = source is not None and cfg.vae_decoder_steps > 0
    final = vae_directory(cfg, out)
    if (final / "config.json").is_file():
        return AutoencoderKL.from_pretrained(final).to(info.device).eval()
    if not refine and cfg.vae_steps <= 0:
        raise CheckpointError(f"vae_steps is 0 but there is no trained autoencoder at {final}")
    seed_everything(cfg.seed + info.rank)
    if refine:
        vae = AutoencoderKL.from_pretrained(source).to(info.device)
        joint = 0
    else:
        vae = build_vae(block_out_channels=cfg.vae_block_out_channels,
                        latent_channels=cfg.vae_latent_channels).to(info.device)
        joint = cfg.vae_steps
    total = joint + cfg.vae_decoder_steps
    joint_lr = warmup_cosine(cfg.warmup, max(joint, 1))
    decoder_lr = warmup_cosine(cfg.warmup, max(cfg.vae_decoder_steps, 1))
    lr_ratio = cfg.vae_decoder_lr / cfg.vae_lr
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: joint_lr(s) if s < joint else lr_ratio * decoder_lr(s - joint))
    ckpt = CheckpointManager(out / "vae_checkpoints")
    logger = MetricsLogger(out / "vae_log.jsonl", enabled=info.is_main)
    start = 0
    if cfg.resume and ckpt.latest() is not None:
        start, state, _ = ckpt.load(optimizer=opt, scheduler=sched)
        load_state_strict(vae, state, "autoencoder checkpoint")
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + info.rank + start)
    bar = tqdm(range(start, total), initial=start, total=total, desc="decoder VAE", disable=not progress)
    vae.train()
    for step in bar:
        if step == max(start, joint):
            # Decoder-only phase: the encoder's gradients stay None, so AdamW leaves its weights alone.
            for name, p in vae.named_parameters():
                p.requires_grad_(not name.startswith(_VAE_ENCODER_PREFIXES))
            bar.set_description("decoder VAE (decoder only)")
        idx = torch.randint(0, len(train), (cfg.vae_batch_size,), generator=gen).numpy()
        x = pixels_pm1(train.images[idx]).to(info.device)
        with autocast(precision, info.device):
            loss = vae_loss(vae, x, cfg.vae_fg_weight, cfg.vae_kl_weight)
        check_finite(loss, step + 1)  # 1-based, as logged and checkpointed
        opt.zero_grad(set_to_none=True)
        loss.backward()
        trained = [p for p in vae.parameters() if p.grad is not None]
        if info.distributed:
            # The loss calls vae.encode/decode, not forward, so DDP's hooks would never fire: average by hand.
            for p in trained:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(info.world_size)
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            logger.log(step + 1, loss=loss.item(), lr=sched.get_last_lr()[0])
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if info.is_main and (step + 1) % cfg.ckpt_every == 0 and step + 1 < total:
            ckpt.save(step + 1, vae.state_dict(), optimizer=opt, scheduler=sched, config=cfg.to_dict())
    vae.requires_grad_(True)
    vae.eval()
    if info.is_main:
        vae.save_pretrained(final, safe_serialization=True)
    if info.distributed:
        torch.distributed.barrier()
    return vae


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, device: torch.device, batch: int = 250, progress: bool = False) -> torch.Tensor:
    """uint8 ``(n, S, S, 3)`` → posterior means ``(n, c, h, w)`` (unscaled)."""
    out = []
    for s in tqdm(range(0, len(images), batch), desc="latents", disable=not progress, leave=False):
        out.append(vae.encode(pixels_pm1(images[s:s + batch]).to(device)).latent_dist.mean.float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Stage: UNet
# ---------------------------------------------------------------------------------------------
def sample_timesteps(batch: int, num_train_timesteps: int, high_fraction: float, high_from: int,
                     generator: torch.Generator) -> torch.Tensor:
    """``(batch,)`` timesteps: uniform, except the first ``high_fraction`` drawn from ``[high_from, T)``."""
    t = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    n_high = int(round(high_fraction * batch))
    if n_high:
        t[:n_high] = torch.randint(high_from, num_train_timesteps, (n_high,), generator=generator)
    return t


def diffusion_loss(unet, latents: torch.Tensor, cond: torch.Tensor, timesteps: torch.Tensor, scheduler,
                   noise: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
    """MSE of the UNet's ε / v prediction. ``latents (B, c, h, w)`` scaled, ``cond (B, 2E)`` class labels."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    pred = unet(noisy, timesteps, encoder_hidden_states=text_states, class_labels=cond).sample
    return F.mse_loss(pred.float(), target.float())


def _grid(truth: np.ndarray, decoded: list[np.ndarray]) -> Any:
    from PIL import Image

    top = np.concatenate(list(truth), axis=1)
    bottom = np.concatenate(decoded, axis=1)
    return Image.fromarray(np.concatenate([top, bottom], axis=0))


def train_decoder(cfg: DecoderTrainConfig) -> dict[str, float]:
    """Run the recipe; returns the test metrics. The decoder is written to ``OUT/decoder``."""
    from diffusers.training_utils import EMAModel

    from seedtok.unclip import (
        UnCLIPImageDecoder,
        UnCLIPSamplingConfig,
        assemble_pipeline,
        build_noising,
        build_schedulers,
        build_unet,
        class_labels,
        load_clip_parts,
    )

    # 1. Setup
    if cfg.vae_only:
        return train_autoencoder(cfg)
    quiet_libraries()
    if not cfg.clip:
        raise ConfigError("--clip is required: the stage-0 CLIP directory whose image embeddings the decoder paints")
    if not 0.0 <= cfg.tokenizer_condition_fraction <= 1.0:
        raise ConfigError(f"tokenizer_condition_fraction must be in [0, 1], got {cfg.tokenizer_condition_fraction}")
    if cfg.tokenizer_condition_fraction > 0 and not cfg.tokenizer:
        raise ConfigError("tokenizer_condition_fraction > 0 needs --tokenizer (whose codes' embeddings condition the UNet)")
    if cfg.eval_every < 0 or cfg.eval_n < 1:
        raise ConfigError(f"eval_every must be ≥ 0 and eval_n ≥ 1, got {cfg.eval_every} and {cfg.eval_n}")
    if cfg.zero_snr and cfg.prediction_type != "v_prediction":
        raise ConfigError("zero_snr needs prediction_type v_prediction")
    if cfg.init_decoder and not cfg.vae:
        # The UNet was trained on its decoder's latents: fine-tune it on the same autoencoder.
        cfg = dataclasses.replace(cfg, vae=str(_decoder_vae_dir(Path(cfg.init_decoder))))
    info = init_distributed(cfg.device)
    precision = resolve_precision(cfg.precision, info.device)
    out = Path(cfg.out)
    progress = cfg.progress and info.is_main
    cache = out / "cache"
    train = load_shapes_arrays(cfg.shapes, "train", cfg.n_train, cache_dir=cache, progress=progress)
    test = load_shapes_arrays(cfg.shapes, "test", max(cfg.n_eval, 16), cache_dir=cache, progress=progress)
    if info.is_main:
        cfg.to_yaml(out / "decoder_train.yaml")
    tag = f"{cfg.n_train}_{_fingerprint(Path(cfg.clip))}"
    emb_train = _cached(cache / f"embeds_train_{tag}.pt",
                        lambda: clip_embeddings(cfg.clip, train.images, progress=progress))
    emb_test = _cached(cache / f"embeds_test_{len(test)}_{tag}.pt", lambda: clip_embeddings(cfg.clip, test.images))
    E = emb_train.shape[1]
    if cfg.tokenizer:
        from seedtok.tokenizer import load_config

        if load_config(cfg.tokenizer).embed_dim != E:
            raise ConfigError(f"{cfg.tokenizer} predicts {load_config(cfg.tokenizer).embed_dim}-d embeddings but "
                              f"{cfg.clip} gives {E}-d ones: train the decoder on the tokenizer's CLIP")
    emb_tok = None
    if cfg.tokenizer_condition_fraction > 0:
        emb_tok = _cached(cache / f"tokenizer_embeds_train_{cfg.n_train}_{_fingerprint(Path(cfg.tokenizer))}.pt",
                          lambda: tokenizer_embeddings(cfg.tokenizer, train.images, progress=progress))

    # 2. VAE, 3. latents
    vae = train_vae(cfg, train, info, precision, out, progress)
    vae_dir = vae_directory(cfg, out)
    latents = _cached(cache / f"latents_train_{cfg.n_train}_{_fingerprint(vae_dir)}.pt",
                      lambda: encode_latents(vae, train.images, info.device, progress=progress))
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    c, h, w = latents.shape[1:]

    # 4. UNet
    seed_everything(cfg.seed + info.rank)
    text_width = load_clip_parts(cfg.clip)["text_encoder"].config.hidden_size
    unet = build_unet(embed_dim=E, in_channels=c, sample_size=h, block_out_channels=cfg.unet_block_out_channels,
                      layers_per_block=cfg.unet_layers_per_block, attention_levels=cfg.unet_attention_levels,
                      scale_shift=cfg.scale_shift, cross_attention_dim=text_width).to(info.device)
    if cfg.init_decoder:
        load_state_strict(unet, _decoder_unet_state(Path(cfg.init_decoder)), f"{cfg.init_decoder} (init_decoder)")
    train_sched, sample_sched = build_schedulers(prediction_type=cfg.prediction_type, rescale_zero_snr=cfg.zero_snr,
                                                 sampler=cfg.sampler)
    normalizer, noising = build_noising(embed_mean=emb_train.mean(0), embed_std=emb_train.std(0))
    normalizer.to(info.device)
    model = torch.nn.parallel.DistributedDataParallel(unet) if info.distributed else unet
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps))
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    ckpt = CheckpointManager(out / "checkpoints")
    logger = MetricsLogger(out / "log.jsonl", enabled=info.is_main)
    start = 0
    if cfg.resume and ckpt.latest() is not None:
        start, state, extra = ckpt.load(optimizer=opt, scheduler=sched)
        load_state_strict(unet, state, "decoder UNet checkpoint")
        if ema is not None:
            if "ema" not in extra:
                raise CheckpointError(f"{ckpt.latest()}: no EMA state in the checkpoint")
            ema.load_state_dict(extra["ema"])

    def pipeline_with(weights_unet) -> Any:
        return assemble_pipeline(cfg.clip, vae=vae, unet=weights_unet, scheduler=sample_sched,
                                 image_normalizer=normalizer, image_noising_scheduler=noising)

    sampling = UnCLIPSamplingConfig(num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                                    noise_level=cfg.noise_level)

    def ema_unet():
        if ema is None:
            return unet
        copy = build_unet(embed_dim=E, in_channels=c, sample_size=h, block_out_channels=cfg.unet_block_out_channels,
                          layers_per_block=cfg.unet_layers_per_block, attention_levels=cfg.unet_attention_levels,
                          scale_shift=cfg.scale_shift, cross_attention_dim=text_width).to(info.device)
        ema.copy_to(copy.parameters())
        return copy.eval()

    T = train_sched.config.num_train_timesteps
    text_states = torch.zeros(cfg.batch_size, 1, text_width, device=info.device)  # unused: no cross-attention
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + info.rank + start)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="decoder UNet", disable=not progress)
    unet.train()
    for step in bar:
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen)
        emb = emb_train[idx]
        if emb_tok is not None:
            swap = torch.rand(cfg.batch_size, generator=gen) < cfg.tokenizer_condition_fraction
            emb = torch.where(swap[:, None], emb_tok[idx], emb)
        z0, emb = latents[idx].to(info.device), emb.to(info.device)
        if cfg.max_noise_level > 0:
            levels = torch.randint(0, cfg.max_noise_level, (cfg.batch_size,), generator=gen)
        else:
            levels = torch.zeros(cfg.batch_size, dtype=torch.long)
        cond = class_labels(emb, levels.to(info.device), normalizer, noising,
                            noise=torch.randn(emb.shape, generator=gen).to(info.device))
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.p_uncond
        cond[drop.to(info.device)] = 0.0  # the pipeline's unconditional branch is an all-zero class_labels
        t = sample_timesteps(cfg.batch_size, T, cfg.high_noise_fraction, cfg.high_noise_from, gen).to(info.device)
        noise = torch.randn(z0.shape, generator=gen).to(info.device)
        with autocast(precision, info.device):
            loss = diffusion_loss(model, z0, cond, t, train_sched, noise, text_states)
        check_finite(loss, step + 1)  # 1-based, as logged and checkpointed
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(unet.parameters())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logger.log(step + 1, loss=loss.item(), lr=sched.get_last_lr()[0])
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if info.is_main and cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            n = 8
            dec = UnCLIPImageDecoder(pipeline_with(ema_unet()), sampling)
            imgs = dec.decode(emb_test[:n], seed=cfg.seed, output_type="np")
            path = out / "samples" / f"step_{step + 1:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            _grid(test.images[:n], imgs).save(path)
            unet.train()
        if info.is_main and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            dec = UnCLIPImageDecoder(pipeline_with(ema_unet()), sampling)
            n = min(cfg.eval_n, cfg.n_eval, len(test))
            scores = evaluate_decoder(dec, test, emb_test, n, seed=cfg.seed)
            logger.log(step + 1, **{f"eval_{k}": v for k, v in scores.items()})
            bar.write(f"step {step + 1}: true-embedding strict {scores['true_embed_strict']:.3f} on {n} test scenes")
            unet.train()
        if info.is_main and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps):
            # Also at the last step: a finished run can be extended with a larger --steps.
            ckpt.save(step + 1, unet.state_dict(), optimizer=opt, scheduler=sched, config=cfg.to_dict(),
                      extra={"ema": ema.state_dict()} if ema is not None else None)

    # 5. Save
    metrics: dict[str, float] = {}
    if info.is_main:
        decoder = UnCLIPImageDecoder(pipeline_with(ema_unet()), sampling)
        decoder.save_pretrained(out / "decoder")
        if cfg.tokenizer:
            from seedtok.tokenizer import IMAGE_DECODER_DIR

            decoder.save_pretrained(Path(cfg.tokenizer) / IMAGE_DECODER_DIR)
        # 6. Eval
        metrics = evaluate_decoder(decoder, test, emb_test, cfg.n_eval, seed=cfg.seed, progress=progress)
        metrics.update(embedding_ceiling(train, emb_train, test, emb_test, cfg.n_eval))
        if cfg.tokenizer:
            metrics.update(evaluate_round_trip(cfg.tokenizer, test, cfg.n_eval, seed=cfg.seed, progress=progress))
        logger.log(cfg.steps, **metrics)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if info.distributed:
        torch.distributed.barrier()
    return metrics


def train_autoencoder(cfg: DecoderTrainConfig) -> dict[str, float]:
    """``vae_only``: train (or reuse) ``OUT/vae`` and score its reconstructions of the test split —
    the ceiling of every image the decoder will paint."""
    quiet_libraries()
    info = init_distributed(cfg.device)
    precision = resolve_precision(cfg.precision, info.device)
    out = Path(cfg.out)
    progress = cfg.progress and info.is_main
    cache = out / "cache"
    train = load_shapes_arrays(cfg.shapes, "train", cfg.n_train, cache_dir=cache, progress=progress)
    test = load_shapes_arrays(cfg.shapes, "test", max(cfg.n_eval, 16), cache_dir=cache, progress=progress)
    if info.is_main:
        cfg.to_yaml(out / "decoder_train.yaml")
    vae = train_vae(cfg, train, info, precision, out, progress)
    metrics: dict[str, float] = {}
    if info.is_main:
        with torch.no_grad():
            z = encode_latents(vae, test.images[:cfg.n_eval], info.device)
            recon = [uint8_from_pm1(vae.decode(z[s:s + 250].to(info.device)).sample.float().cpu())
                     for s in range(0, len(z), 250)]
        metrics = _summary("vae_recon", np.concatenate(recon), test.attributes[:cfg.n_eval])
        (out / "vae_metrics.json").write_text(json.dumps(metrics, indent=1))
    if info.distributed:
        torch.distributed.barrier()
    return metrics


# ---------------------------------------------------------------------------------------------
# Eval
# ---------------------------------------------------------------------------------------------
def _summary(prefix: str, images: Sequence[Any], attributes: Sequence[dict]) -> dict[str, float]:
    from eval.shapes_scorer import aggregate, score_image

    acc = aggregate(score_image(im, a) for im, a in zip(images, attributes))["accuracy"]
    return {f"{prefix}_{k}": float(v) for k, v in acc.items()}


def evaluate_decoder(decoder, test: ShapesArrays, emb_test: torch.Tensor, n: int, *, seed: int = 0,
                     progress: bool = False) -> dict[str, float]:
    """Shapes scores of images decoded from the first ``n`` test scenes' true CLIP embeddings."""
    n = min(n, len(test))
    images = decoder.decode(emb_test[:n], seed=seed, output_type="np", progress=progress)
    return _summary("true_embed", images, test.attributes[:n])


def embedding_ceiling(train: ShapesArrays, emb_train: torch.Tensor, test: ShapesArrays, emb_test: torch.Tensor,
                      n: int) -> dict[str, float]:
    """Scores of the nearest training image (cosine) to each test embedding: what the embedding tells apart.

    A decoder conditioned on the embedding alone cannot be expected to beat this by much: where two
    scenes (e.g. a pair and its mirror) embed alike, no decoder can tell which one to paint.
    """
    n = min(n, len(test))
    a = F.normalize(emb_train.float(), dim=-1)
    b = F.normalize(emb_test[:n].float(), dim=-1)
    nearest = (b @ a.t()).argmax(1).numpy()
    return _summary("nn_ceiling", [train.images[j] for j in nearest], test.attributes[:n])


def evaluate_round_trip(tokenizer_dir: str | Path, test: ShapesArrays, n: int, *, seed: int = 0,
                        progress: bool = False) -> dict[str, float]:
    """Shapes scores of image → SEED codes → embedding → image for the first ``n`` test scenes."""
    from seedtok.tokenizer import SeedTokenizer

    tok = SeedTokenizer.from_pretrained(tokenizer_dir)
    n = min(n, len(test))
    images = []
    for s in range(0, n, 64):
        pil = [test.pil(i) for i in range(s, min(n, s + 64))]
        images.extend(tok.decode_image(tok.encode(pil), seed=seed + s, output_type="np"))
    return _summary("round_trip", images, test.attributes[:n])


# ---------------------------------------------------------------------------------------------
# Reconstruct (image → codes → embedding → image)
# ---------------------------------------------------------------------------------------------
def add_reconstruct_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``seed tokenizer reconstruct``."""
    parser.add_argument("--model", required=True, type=Path, metavar="DIR",
                        help="a SEED tokenizer directory (with image_decoder/), or a chat-model directory holding one")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMG", help="input images")
    parser.add_argument("--out", required=True, type=Path, metavar="OUTDIR",
                        help="output directory; each PNG keeps its input's file stem")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed; image i uses seed + i (default: 0)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the decoder's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the decoder's)")
    parser.add_argument("--noise-level", type=int, default=None, help="embedding noise level (default: the decoder's)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def find_tokenizer_dir(model_dir: Path) -> Path:
    """``model_dir`` itself if it is a SEED tokenizer directory, else the one tokenizer directory inside it."""
    from seedtok.tokenizer import load_config

    if not model_dir.is_dir():
        raise CheckpointError(f"model directory not found: {model_dir}")

    def is_tokenizer(d: Path) -> bool:
        try:
            load_config(d)
        except (CheckpointError, ConfigError):
            return False
        return True

    if is_tokenizer(model_dir):
        return model_dir
    found = sorted(d for d in model_dir.iterdir() if d.is_dir() and is_tokenizer(d))
    if len(found) != 1:
        what = "no SEED tokenizer" if not found else f"{len(found)} SEED tokenizers ({', '.join(d.name for d in found)})"
        raise CheckpointError(f"{model_dir}: {what} in it (expected a tokenizer directory or a model directory holding one)")
    return found[0]


def reconstruct_main(args: argparse.Namespace) -> int:
    """``seed tokenizer reconstruct``: each image → codes → embedding → image, written as OUTDIR/<stem>.png."""
    from data_pipelines.images import decode_image
    from seedtok.tokenizer import SeedTokenizer

    # 1. Check inputs (before loading anything heavy)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    stems: dict[str, Path] = {}
    for path in args.images:
        if path.stem in stems:
            raise DataError(f"two inputs share the file stem '{path.stem}' ({stems[path.stem]}, {path}): "
                            "their outputs would overwrite each other")
        stems[path.stem] = path
    tok_dir = find_tokenizer_dir(Path(args.model))
    # 2. Load
    tok = SeedTokenizer.from_pretrained(tok_dir, device=args.device)
    if tok.image_decoder is None:
        raise CheckpointError(f"{tok_dir}: no image decoder (image_decoder/); train one with "
                              "`seed tokenizer train-decoder --tokenizer DIR`")
    tok.image_decoder.to(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    # 3. Reconstruct in batches
    paths = list(args.images)
    bar = tqdm(total=len(paths), desc="reconstruct", unit="img", file=sys.stderr, disable=not args.progress)
    for s in range(0, len(paths), args.batch_size):
        chunk = paths[s:s + args.batch_size]
        images = [decode_image(p) for p in chunk]
        decoded = tok.decode_image(tok.encode(images), seed=args.seed + s, num_inference_steps=args.steps,
                                   guidance_scale=args.guidance, noise_level=args.noise_level)
        for p, im in zip(chunk, decoded):
            im.save(args.out / f"{p.stem}.png")
        bar.update(len(chunk))
    bar.close()
    print(f"wrote {len(paths)} image(s) to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``seed tokenizer train-decoder`` (one per DecoderTrainConfig field, plus --config)."""
    DecoderTrainConfig.add_arguments(parser)


def train_main(args: argparse.Namespace) -> int:
    metrics = train_decoder(DecoderTrainConfig.from_cli(args))
    for k, v in metrics.items():
        print(f"{k}: {v:.4f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train_decoder", description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return train_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
