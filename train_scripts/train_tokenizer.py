"""Stages 1 and 2 of the SEED tokenizer: causal Q-Former contrastive, then quantise + reconstruct.

Stage 1 (``--stage 1``) trains the causal Q-Former on frozen ViT features with an image–text
contrastive loss on its **last** causal query (the only one that has seen every other query),
projected into the text embedding space of the frozen CLIP text tower (SEED: BLIP-2 text
features, 256-d). Stage 2 (``--stage 2``) freezes the Q-Former and trains ``code_proj``, the
quantizer and the embedding decoder with SEED's loss, ``5·VQ + 2·(1 − cos)`` to the Q-Former
outputs ``+ 0.5·MSE`` to the unCLIP image embedding (``--qformer-lr-scale`` also fine-tunes the
Q-Former there, the stage-1 queries staying the reconstruction targets), plus the options of the
1D-tokenizer papers:

* nested dropout (FlexTok, arXiv:2502.13967): the decoder sees only a random prefix of the codes,
  so every prefix decodes to a usable embedding and early codes carry the coarse content;
* an entropy loss (GigaTok, arXiv:2504.08736): low per-token assignment entropy, high codebook
  entropy over the batch;
* random token corruption: a fraction of the codes replaced by random codes before decoding, so
  the decoder tolerates an LLM's sampling errors.

Everything frozen is computed **once** per run and kept in memory: the ViT features and CLIP
image/text embeddings (stage 1), and the frozen Q-Former's outputs (stage 2). The loops then only
touch the trainable parts, which is what makes these stages take a minute on a CPU.

    seed tokenizer train --stage 1 --vision-path runs/demo/clip/model --out runs/tok1
    seed tokenizer train --stage 2 --init-from runs/tok1/model --out runs/tok2
    torchrun --nproc_per_node 2 -m train_scripts.train_tokenizer --stage 2 …   (DDP over gloo/NCCL)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from data_pipelines.shapes import ShapesConfig
from data_pipelines.shapes_arrays import load_shapes_arrays
from eval.tokenizer_metrics import FrozenBank, build_bank, evaluate_bank, recall_from_embeddings
from seedtok.embedding_decoder import Stage2LossWeights, stage2_loss
from seedtok.errors import ConfigError
from seedtok.quantizers import CodeUsageTracker, QuantizerConfig
from seedtok.schema import ConfigBase, option
from seedtok.tokenizer import (
    DecoderConfig,
    QFormerConfig,
    SeedTokenizer,
    SeedTokenizerConfig,
    VisionTowerConfig,
)
from train_scripts.runtime import (
    CheckpointManager,
    MetricsLogger,
    autocast,
    check_finite,
    checkpoint_or_stop,
    init_distributed,
    load_state_strict,
    quiet_libraries,
    resolve_precision,
    seed_everything,
)


def embedded_default_tokenizer_config(vision_path: str = "") -> SeedTokenizerConfig:
    """The embedded default's architecture: SEED's layout at a size that trains in minutes on a CPU.

    32 causal queries and an l2-normalised EMA VQ with dead-code restarts (SEED's plain Euclidean
    VQ collapses); K = 1024 codes of dim 16 — the Shapes world holds far less information than
    natural images, and a smaller vocabulary is easier for the LLM to model.
    """
    return SeedTokenizerConfig(
        vision=VisionTowerConfig(path=vision_path, layer=-2, keep_cls=True),
        qformer=QFormerConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                              cross_attention_frequency=2, causal=True, dropout=0.0),
        num_queries=32,
        quantizer=QuantizerConfig(type="vq", codebook_size=1024, dim=16, l2_normalize=True, codebook_update="ema",
                                  decay=0.95, kmeans_init=True, dead_code_threshold=0.02),
        decoder=DecoderConfig(num_layers=2, num_heads=4, mlp_ratio=4.0, down_dims=[64, 32, 16]),
        embed_dim=0,  # 0 = the vision tower's projection size (filled in at build time)
    )


@dataclass
class TokenizerTrainConfig(ConfigBase):
    stage: int = option(1, help="1 = Q-Former image–text contrastive; 2 = quantise + reconstruct (Q-Former frozen)")
    out: str = option("runs/tokenizer", help="output directory; the tokenizer is saved to OUT/model")
    vision_path: str = option("", help="stage 1: frozen CLIP directory (vision tower + text tower + unCLIP space)")
    init_from: str = option("", help="stage 2: the stage-1 tokenizer directory (its Q-Former is frozen)")
    tokenizer: SeedTokenizerConfig = option(
        default_factory=embedded_default_tokenizer_config,
        help="architecture; stage 2 takes vision/qformer/num_queries from init_from, quantizer/decoder from here")
    shapes: ShapesConfig = option(default_factory=ShapesConfig, help="Shapes world settings (the default data)")
    cache_dir: str = option("", help="where rendered Shapes splits are cached (default: OUT/../cache)")
    n_train: int = option(20000, help="training scenes")
    n_val: int = option(1000, help="validation scenes (retrieval / usage scores at the end)")
    steps: int = option(1000, help="optimizer steps")
    batch_size: int = option(256, help="scenes per step per process")
    lr: float = option(2e-3, help="peak learning rate")
    warmup: int = option(40, help="linear warmup steps")
    weight_decay: float = option(0.05, help="AdamW weight decay")
    temperature: float = option(0.05, help="stage 1: contrastive temperature")
    loss_weights: Stage2LossWeights = option(
        default_factory=lambda: Stage2LossWeights(vq=5.0, cosine=2.0, mse=10.0),
        help="stage 2 loss weights (SEED: 5 / 2 / 0.5; the embedded default weighs the embedding MSE "
             "at 10 — its 64-d CLIP embedding is what the decoder is conditioned on)")
    nested_dropout: float = option(0.0, help="stage 2: probability that a sample's decoder sees only a random prefix of its codes")
    entropy_weight: float = option(0.0, help="stage 2 (vq): weight of the GigaTok entropy loss")
    entropy_temperature: float = option(0.01, help="stage 2 (vq): temperature of the code-assignment softmax")
    embed_nce_weight: float = option(1.0, help="stage 2: weight of an InfoNCE between decoded and true unCLIP "
                                                "embeddings in the batch (sharpens what MSE blurs: the "
                                                "directions that tell similar scenes apart)")
    corrupt_prob: float = option(0.0, help="stage 2: fraction of codes replaced by random codes before decoding")
    hard_negatives: int = option(0, help="one-attribute-changed captions per training scene (colour, shape, size, "
                                         "position, relation, order, swapped colours), encoded once by the CLIP "
                                         "text tower; 0 = none (measured on the full schedule: 4 raises the "
                                         "codes' text→image R@1 0.872 → 0.893; the demo's full preset uses 4)")
    readout_weight: float = option(0.0, help="stage 2: weight of a contrastive term on a linear read-out of the "
                                             "concatenated code vectors (a training-only head, dropped): the "
                                             "caption must be linearly readable from the codes themselves, "
                                             "not only through the co-trained decoder; 0 = off")
    caption_weight: float = option(0.0, help="weight of a training-only captioning head (a tiny prefix LM that "
                                              "writes the canonical caption from stage 1's queries / stage 2's "
                                              "code vectors — BLIP-2's image-grounded generation objective), so "
                                              "the caption is readable token by token from the codes, as the "
                                              "LLM must read it; dropped on save; 0 = off")
    qformer_lr_scale: float = option(0.0, help="stage 2: also train the Q-Former, at this fraction of --lr "
                                               "(0 = frozen, as SEED); the stage-1 queries stay the "
                                               "reconstruction targets, so the Q-Former may move what it "
                                               "holds into a form the quantiser keeps")
    hard_negative_weight: float = option(1.0, help="weight of the focused term: stage 1's final query (stage 2's "
                                                   "decoded embedding) must pick its scene's caption over that "
                                                   "scene's hard negatives")
    precision: str = option("auto", help="auto | bf16 | fp32 (the quantizer always runs in fp32)")
    device: str = option("auto", help="auto | cpu | cuda")
    seed: int = option(0, help="training seed")
    log_every: int = option(25, help="log every N steps")
    ckpt_every: int = option(200, help="checkpoint every N steps (resumable)")
    resume: bool = option(True, help="resume from OUT/checkpoints if present")
    stop_after: int = option(0, help="checkpoint and stop after this many steps in this run (0 = run to the end); "
                                     "for time-limited or preemptible jobs — the next run resumes")
    progress: bool = option(True, help="show progress bars")

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2, got {self.stage}")
        if self.hard_negatives < 0 or self.hard_negative_weight < 0:
            raise ConfigError("hard_negatives and hard_negative_weight must be >= 0")
        if self.caption_weight < 0 or self.readout_weight < 0:
            raise ConfigError("caption_weight and readout_weight must be >= 0")
        if self.qformer_lr_scale < 0:
            raise ConfigError(f"qformer_lr_scale must be >= 0, got {self.qformer_lr_scale}")
        if self.qformer_lr_scale > 0 and self.stage != 2:
            raise ConfigError("qformer_lr_scale is a stage-2 option (stage 1 always trains the Q-Former)")
        for name in ("nested_dropout", "corrupt_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# Frozen computations, done once
# ---------------------------------------------------------------------------------------------
def _cache_dir(cfg: TokenizerTrainConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out).parent / "cache"


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def multi_positive_nce(a: torch.Tensor, b: torch.Tensor, keys: list[int], temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE where rows with equal keys are all positives. a, b: (B, E)."""
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).t() / temperature
    k = torch.tensor(keys, device=logits.device)
    target = (k[:, None] == k[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def hard_negative_nce(x: torch.Tensor, pos: torch.Tensor, negs: torch.Tensor, valid: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Each row must pick its own caption over its scene's hard-negative captions (and nothing else).

    x: (B, E) image side; pos: (B, E) its caption; negs: (B, K, E); valid: (B, K) bool (a negative
    that reads like the positive is left out). In the batch-wide InfoNCE a scene's one-attribute-
    changed twin is almost never in the batch, so nothing teaches the Q-Former order, relation or
    which colour goes with which shape; this term is only about those distinctions (as the CLIP
    recipe's counterfactual terms are).
    """
    x = F.normalize(x.float(), dim=-1)
    cand = F.normalize(torch.cat([pos[:, None].float(), negs.float()], 1), dim=-1)  # (B, 1+K, E)
    logits = torch.einsum("be,bke->bk", x, cand) / temperature
    mask = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)
    logits = logits.masked_fill(~mask, float("-inf"))
    return F.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long, device=x.device))


@torch.no_grad()
def hard_negative_text_bank(clip, data, k: int, seed: int,
                            held_out: set[tuple[str, str]], batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` hard-negative captions per scene through the frozen CLIP text tower (an
    :class:`eval.clip_score.ClipScore`), once.

    Returns ``(n, k, E)`` (l2-normalised) embeddings and an ``(n, k)`` mask of negatives that differ
    from the scene's canonical caption.
    """
    import numpy as np

    from train_scripts.train_clip import hard_negative_captions

    rows = hard_negative_captions(data.attributes, k, np.random.default_rng(seed + 17), held_out)
    valid = torch.tensor([[c != data.captions[i] for c in row] for i, row in enumerate(rows)])
    flat = [c for row in rows for c in row]
    emb = torch.cat([clip.embed_texts(flat[s:s + batch]) for s in range(0, len(flat), batch)])
    return emb.view(len(rows), k, -1), valid


def vq_entropy_loss(z: torch.Tensor, codebook: torch.Tensor, temperature: float) -> torch.Tensor:
    """GigaTok-style entropy loss for a cosine VQ: sharp per-token assignments, flat codebook use.

    z: (M, D) pre-quantisation vectors; codebook: (K, D). Returns mean per-token entropy minus the
    entropy of the batch-averaged assignment distribution.
    """
    logits = F.normalize(z.float(), dim=-1) @ F.normalize(codebook.float(), dim=-1).t() / temperature  # (M, K)
    p = logits.softmax(-1)
    per_token = -(p * logits.log_softmax(-1)).sum(-1).mean()
    avg = p.mean(0)
    batch = -(avg * (avg + 1e-10).log()).sum()
    return per_token - batch


class Stage1Trainable(nn.Module):
    """The causal Q-Former plus a projection of its last query (B, H) into the text embedding space
    (B, E), and optionally a captioning head over all N queries. Both heads are training-only,
    dropped after stage 1."""

    def __init__(self, tok: SeedTokenizer, embed_dim: int, caption: nn.Module | None = None):
        super().__init__()
        self.qformer = tok.qformer
        self.head = nn.Linear(tok.qformer.hidden_size, embed_dim)
        self.caption = caption  # CaptionHead (train_scripts/caption_head.py) or None

    def forward(self, features: torch.Tensor,
                caption_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the projected last query (B, E) and, given caption ids (B, L), the captioning loss
        (computed here so that DDP sees every trained parameter inside its forward)."""
        queries = self.qformer(features)
        cap = _caption_loss(self.caption, queries, caption_ids)
        return self.head(queries[:, -1]), cap  # the contrastive side uses the last causal query only


class Stage2Trainable(nn.Module):
    """The parts stage 2 trains, wrapped so DDP sees one module: code_proj, quantizer, decoder — and
    the Q-Former when ``train_qformer`` (then ``forward`` takes ViT features instead of queries)."""

    def __init__(self, tok: SeedTokenizer, readout_dim: int = 0, caption: nn.Module | None = None,
                 train_qformer: bool = False):
        super().__init__()
        self.qformer = tok.qformer if train_qformer else None
        self.code_proj = tok.code_proj
        self.quantizer = tok.quantizer
        self.decoder = tok.decoder
        # Training-only: a linear map from the N concatenated code vectors to the CLIP text space.
        self.readout = (nn.Linear(tok.num_tokens * tok.quantizer.dim, readout_dim) if readout_dim > 0 else None)
        self.caption = caption  # training-only CaptionHead (train_scripts/caption_head.py) or None

    def forward(self, queries: torch.Tensor, cfg: TokenizerTrainConfig, gen: torch.Generator,
                caption_ids: torch.Tensor | None = None):
        """``queries``: the frozen Q-Former's outputs (B, N, H), or the ViT features (B, T, C) when the
        Q-Former trains here. Returns ``(q, z, pred_queries, pred_embeds, heads)``; ``heads`` holds
        the training-only heads' outputs (``readout``: (B, E); ``caption``: the captioning loss) when
        they exist."""
        if self.qformer is not None:
            queries = self.qformer(queries)
        z = self.code_proj(queries)  # (B, N, D)
        with torch.autocast(device_type=queries.device.type, enabled=False):
            q = self.quantizer(z.float())  # fp32 always
        codes_in = q.quantized
        B, N, _ = codes_in.shape
        if cfg.corrupt_prob > 0:
            flip = torch.rand(B, N, generator=gen).to(codes_in.device) < cfg.corrupt_prob
            rand_idx = torch.randint(0, self.quantizer.codebook_size, (B, N), generator=gen).to(codes_in.device)
            rand_codes = self.quantizer.indices_to_codes(rand_idx).to(codes_in.dtype)
            codes_in = torch.where(flip[..., None], rand_codes, codes_in)
        if cfg.nested_dropout > 0:
            # Keep a random prefix of k codes (k uniform in 1..N) for the chosen samples; zero the rest.
            apply = torch.rand(B, generator=gen) < cfg.nested_dropout
            k = torch.randint(1, N + 1, (B,), generator=gen)
            k = torch.where(apply, k, torch.full_like(k, N)).to(codes_in.device)
            keep = torch.arange(N, device=codes_in.device)[None, :] < k[:, None]
            codes_in = codes_in * keep[..., None].to(codes_in.dtype)
        pred_q, pred_e = self.decoder(codes_in)
        heads: dict[str, torch.Tensor] = {}
        if self.readout is not None:
            heads["readout"] = self.readout(q.quantized.flatten(1).float())
        cap = _caption_loss(self.caption, q.quantized, caption_ids)
        if cap is not None:
            heads["caption"] = cap
        return q, z, pred_q, pred_e, heads


def _caption_loss(head: nn.Module | None, codes: torch.Tensor,
                  caption_ids: torch.Tensor | None) -> torch.Tensor | None:
    if head is None or caption_ids is None:
        return None
    return head.loss(codes, caption_ids)


# ---------------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------------
def train_tokenizer(cfg: TokenizerTrainConfig) -> dict[str, float]:
    """Run stage 1 or 2; save the tokenizer to ``OUT/model``; return validation metrics."""
    # 1. Setup
    quiet_libraries()
    info = init_distributed(cfg.device)
    precision = resolve_precision(cfg.precision, info.device)
    seed_everything(cfg.seed + info.rank)
    out = Path(cfg.out)
    progress = cfg.progress and info.is_main

    if cfg.stage == 1:
        if not cfg.vision_path:
            raise ConfigError("stage 1 needs --vision-path (a CLIP directory, e.g. from stage 0)")
        tcfg = cfg.tokenizer.replace(vision=cfg.tokenizer.vision.replace(path=cfg.vision_path))
        tok = _build_fresh(tcfg)
    else:
        if not cfg.init_from:
            raise ConfigError("stage 2 needs --init-from (the stage-1 tokenizer directory)")
        # The Q-Former (and its vision tower) come from stage 1; the quantizer and the embedding
        # decoder — untrained until now — are built from this run's config.
        src = SeedTokenizer.from_pretrained(cfg.init_from)
        tcfg = cfg.tokenizer.replace(vision=src.config.vision, qformer=src.config.qformer,
                                     num_queries=src.config.num_queries)
        tcfg = _resolve_embed_dim(tcfg, src.vision_tower)
        tok = SeedTokenizer(tcfg, src.vision_tower, vision_source=src._vision_source)
        load_state_strict(tok.qformer, src.qformer.state_dict(), f"{cfg.init_from} Q-Former")
        del src
    clip_dir = cfg.vision_path or _stage1_clip_dir(cfg.init_from)
    check_clip_dir(clip_dir)
    tok.to(info.device)

    train = load_shapes_arrays(cfg.shapes, "train", cfg.n_train, cache_dir=_cache_dir(cfg), progress=progress)
    val = load_shapes_arrays(cfg.shapes, "validation", cfg.n_val, cache_dir=_cache_dir(cfg), progress=progress)
    bank = build_bank(clip_dir, tok.vision_tower, train, progress=progress)
    vbank = build_bank(clip_dir, tok.vision_tower, val, progress=progress)
    if cfg.hard_negatives > 0 and cfg.hard_negative_weight > 0:
        from eval.clip_score import ClipScore

        held_out = {tuple(c) for c in cfg.shapes.held_out_combinations}
        clip = ClipScore.from_pretrained(clip_dir)
        bank.extra["neg_text"], bank.extra["neg_valid"] = hard_negative_text_bank(
            clip, train, cfg.hard_negatives, cfg.seed, held_out)
        vbank.extra["neg_text"], vbank.extra["neg_valid"] = hard_negative_text_bank(
            clip, val, cfg.hard_negatives, cfg.seed + 1, held_out)
        del clip

    head = text_tok = None
    if cfg.caption_weight > 0:
        from transformers import AutoTokenizer

        from data_pipelines.shapes import ordered_caption
        from train_scripts.caption_head import CaptionHead, caption_token_ids

        text_tok = AutoTokenizer.from_pretrained(clip_dir)  # check_clip_dir made sure it has one

        # One caption per image (a pair told from its left/top object): the canonical caption's
        # object order follows the generator's draw, which the image does not show.
        ids, vocab = caption_token_ids(text_tok, [ordered_caption(a) for a in train.attributes + val.attributes])
        bank.extra["caption_ids"], vbank.extra["caption_ids"] = ids[:len(train)], ids[len(train):]
        # Stage 1 captions from the continuous queries (BLIP-2's ITG), stage 2 from the code vectors.
        in_dim = tok.qformer.hidden_size if cfg.stage == 1 else tok.quantizer.dim
        head = CaptionHead(in_dim, tok.num_tokens, vocab, ids.shape[1])
    if cfg.stage == 1:
        trainable = Stage1Trainable(tok, bank.text_embeds.shape[-1], head).to(info.device)
        trainable.train()
    else:
        tok.qformer.requires_grad_(False).eval()
        # The stage-1 queries: the decoder's reconstruction targets (and its inputs when frozen).
        bank.extra["queries"] = _frozen_queries(tok, bank.features, progress)
        train_qformer = cfg.qformer_lr_scale > 0
        if train_qformer:
            tok.qformer.requires_grad_(True)
        trainable = Stage2Trainable(tok, bank.text_embeds.shape[-1] if cfg.readout_weight > 0 else 0, head,
                                    train_qformer=train_qformer)
        trainable.to(info.device).train()
    model = trainable
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(trainable, broadcast_buffers=False)
    qformer_params = ({id(p) for p in trainable.qformer.parameters()}
                      if cfg.stage == 2 and trainable.qformer is not None else set())
    groups = [{"params": [p for p in trainable.parameters() if p.requires_grad and id(p) not in qformer_params]}]
    if qformer_params:
        groups.append({"params": [p for p in trainable.qformer.parameters()], "lr": cfg.lr * cfg.qformer_lr_scale})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    from train_scripts.runtime import warmup_cosine

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps))
    ckpt = CheckpointManager(out / "checkpoints")
    logger = MetricsLogger(out / "log.jsonl", enabled=info.is_main)
    start = 0
    if cfg.resume and ckpt.latest() is not None:
        start, state, _ = ckpt.load(optimizer=opt, scheduler=sched)
        load_state_strict(trainable, state, f"stage-{cfg.stage} checkpoint")

    logger.rewind(start)  # rows after the checkpoint belong to work that is being redone

    # 2. Train
    # Batches and augmentation draw from a generator re-seeded every step from (seed, rank, step):
    # a resumed run sees exactly the batches the uninterrupted run would have seen.
    gen = torch.Generator()
    tracker = CodeUsageTracker(tok.codebook_size)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"tokenizer stage {cfg.stage}",
               disable=not progress)
    for step in bar:
        gen.manual_seed(cfg.seed * 1_000_003 + info.rank * 7919 + step)
        idx = torch.randint(0, len(train), (cfg.batch_size,), generator=gen)
        keys = [bank.keys[i] for i in idx.tolist()]
        logs: dict[str, float] = {}
        cap_ids = bank.extra["caption_ids"][idx].to(info.device) if "caption_ids" in bank.extra else None
        with autocast(precision, info.device):
            if cfg.stage == 1:
                var = torch.randint(0, bank.text_embeds.shape[1], (cfg.batch_size,), generator=gen)
                img, cap = model(bank.features[idx].to(info.device).float(), cap_ids)
                pos = bank.text_embeds[idx, var].to(info.device)
                loss = multi_positive_nce(img, pos, keys, cfg.temperature)
                if "neg_text" in bank.extra:
                    hn = hard_negative_nce(img, pos, bank.extra["neg_text"][idx].to(info.device),
                                           bank.extra["neg_valid"][idx].to(info.device), cfg.temperature)
                    loss = loss + cfg.hard_negative_weight * hn
                    logs["hard_negative"] = hn.item()
            else:
                queries = bank.extra["queries"][idx].to(info.device).float()
                inputs = bank.features[idx].to(info.device).float() if trainable.qformer is not None else queries
                q, z, pred_q, pred_e, heads = model(inputs, cfg, gen, cap_ids)
                cap = heads.get("caption")
                parts = stage2_loss(vq_loss=q.loss, pred_queries=pred_q, target_queries=queries,
                                    pred_embeds=pred_e, target_embeds=bank.image_embeds[idx].to(info.device),
                                    weights=cfg.loss_weights)
                loss = parts["loss"]
                if cfg.embed_nce_weight > 0:
                    nce = multi_positive_nce(pred_e, bank.image_embeds[idx].to(info.device), keys, cfg.temperature)
                    loss = loss + cfg.embed_nce_weight * nce
                    logs["embed_nce"] = nce.item()
                if "neg_text" in bank.extra:
                    # The decoded embedding lives in CLIP's joint space: it must pick its scene's
                    # canonical caption over the scene's hard negatives, so the codes keep order,
                    # relation and binding — what a tiny LLM has to read out of them.
                    hn = hard_negative_nce(pred_e, bank.text_embeds[idx, 0].to(info.device),
                                           bank.extra["neg_text"][idx].to(info.device),
                                           bank.extra["neg_valid"][idx].to(info.device), cfg.temperature)
                    loss = loss + cfg.hard_negative_weight * hn
                    logs["hard_negative"] = hn.item()
                if "readout" in heads:
                    r = heads["readout"]
                    pos = bank.text_embeds[idx, 0].to(info.device)
                    ro = multi_positive_nce(r, pos, keys, cfg.temperature)
                    if "neg_text" in bank.extra:
                        ro = ro + hard_negative_nce(r, pos, bank.extra["neg_text"][idx].to(info.device),
                                                    bank.extra["neg_valid"][idx].to(info.device), cfg.temperature)
                    loss = loss + cfg.readout_weight * ro
                    logs["readout"] = ro.item()
                if cfg.entropy_weight > 0 and tok.config.quantizer.type == "vq":
                    book = tok.quantizer.indices_to_codes(torch.arange(tok.codebook_size, device=z.device)[None])[0]
                    ent = vq_entropy_loss(z.reshape(-1, z.shape[-1]), book, cfg.entropy_temperature)
                    loss = loss + cfg.entropy_weight * ent
                    logs["entropy"] = ent.item()
                tracker.update(q.indices)
                logs.update({k: v.item() for k, v in parts.items() if k != "loss"})
                logs.update({k: float(v) for k, v in q.metrics.items()})
            if cap is not None:
                loss = loss + cfg.caption_weight * cap
                logs["caption"] = cap.item()
        check_finite(loss, step + 1)  # 1-based, as logged and checkpointed
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            if cfg.stage == 2:
                tracker.all_reduce()
                logs["window_usage"] = tracker.usage()
                logs["window_perplexity"] = tracker.perplexity()
                tracker.reset()
            logger.log(step + 1, loss=loss.item(), lr=sched.get_last_lr()[0], **logs)
            bar.set_postfix(loss=f"{loss.item():.3f}", **({"usage": f"{logs['window_usage']:.2f}"} if cfg.stage == 2 else {}))
        if checkpoint_or_stop(ckpt, info, step=step + 1, start=start, total=cfg.steps, ckpt_every=cfg.ckpt_every,
                              stop_after=cfg.stop_after, module=trainable, optimizer=opt, scheduler=sched,
                              config=cfg.to_dict(), write=bar.write):
            return {}

    # 3. Save and 4. evaluate (main process)
    metrics: dict[str, float] = {}
    if info.is_main:
        tok.eval()
        tok.save_pretrained(out / "model")
        # Record the CLIP directory actually used, so eval finds its text tower.
        cfg.replace(vision_path=str(Path(clip_dir).resolve())).to_yaml(out / "model" / f"seed_stage{cfg.stage}.yaml")
        if cfg.stage == 1:
            metrics = _stage1_metrics(trainable, vbank)
        else:
            metrics = evaluate_bank(tok, vbank)
        if trainable.caption is not None:
            metrics.update(_caption_head_metrics(tok, trainable.caption, vbank, text_tok, cfg.stage))
        if "neg_text" in vbank.extra:
            metrics["hard_negative_acc"] = _hard_negative_accuracy(tok, trainable, vbank, cfg.stage)
        logger.log(cfg.steps, **{f"val_{k}": v for k, v in metrics.items()})
    if info.distributed:
        torch.distributed.barrier()
    return metrics


def _stage1_clip_dir(init_from: str) -> str:
    """The CLIP directory stage 1 used (its text tower scores stage 2's retrieval)."""
    saved = Path(init_from) / "seed_stage1.yaml"
    if not saved.is_file():
        raise ConfigError(f"{init_from} has no seed_stage1.yaml: pass --vision-path (the CLIP directory)")
    return TokenizerTrainConfig.from_yaml(saved).vision_path


def check_clip_dir(path: str) -> None:
    """Raise a one-line ConfigError unless ``path`` is a full CLIP directory (both towers and a text
    tokenizer): its text tower embeds the captions that score retrieval (``build_bank``)."""
    import json

    p = Path(path)
    config = p / "config.json"
    if not config.is_file():
        raise ConfigError(f"CLIP directory {p}: no config.json")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8", errors="replace")).get("model_type")
    except (ValueError, AttributeError):
        raise ConfigError(f"CLIP directory {p}: config.json is not a JSON object") from None
    if model_type != "clip":
        raise ConfigError(f"{p} is not a full CLIP directory (model_type {model_type!r}, expected 'clip'): "
                          "the text tower is needed to embed captions")
    if not ((p / "tokenizer.json").is_file() or ((p / "vocab.json").is_file() and (p / "merges.txt").is_file())):
        raise ConfigError(f"CLIP directory {p}: no text tokenizer (tokenizer.json, or vocab.json + merges.txt)")


def _build_fresh(tcfg: SeedTokenizerConfig) -> SeedTokenizer:
    from seedtok.vision import FrozenVisionTower

    tower = FrozenVisionTower.from_pretrained(tcfg.vision.path, layer=tcfg.vision.layer, keep_cls=tcfg.vision.keep_cls)
    return SeedTokenizer(_resolve_embed_dim(tcfg, tower), tower, vision_source=tcfg.vision.path)


def _resolve_embed_dim(tcfg: SeedTokenizerConfig, tower) -> SeedTokenizerConfig:
    """``embed_dim = 0`` means: the vision tower's own projection size (the embedded default)."""
    if tcfg.embed_dim:
        return tcfg
    if tower.embed_dim is None:
        raise ConfigError("embed_dim is 0 but the vision tower has no projection: set tokenizer.embed_dim")
    return tcfg.replace(embed_dim=tower.embed_dim)


@torch.no_grad()
def _frozen_queries(tok: SeedTokenizer, features: torch.Tensor, progress: bool, batch: int = 512) -> torch.Tensor:
    out = []
    for s in tqdm(range(0, len(features), batch), desc="frozen Q-Former", disable=not progress, leave=False):
        out.append(tok.qformer(features[s:s + batch].to(tok.device).float()).to(torch.bfloat16))
    return torch.cat(out)


@torch.no_grad()
def _caption_head_metrics(tok: SeedTokenizer, head: nn.Module, vbank: FrozenBank, text_tok, stage: int,
                          batch: int = 512) -> dict[str, float]:
    """How readable the validation scenes' queries (stage 1) or codes (stage 2) are to the captioning
    head: teacher-forced token accuracy, and greedy captions scored by the Shapes parser (strict;
    pairs' relation)."""
    from eval.shapes_scorer import aggregate, score_caption

    head.eval()
    hits = total = 0.0
    scores = []
    for s in range(0, len(vbank.keys), batch):
        queries = tok.qformer(vbank.features[s:s + batch].to(tok.device).float())
        codes = queries if stage == 1 else tok.quantizer.indices_to_codes(tok.quantize(queries).indices)
        ids = vbank.extra["caption_ids"][s:s + batch].to(tok.device)
        n = (ids[:, 1:] != head.pad_id).sum().item()
        hits += head.token_accuracy(codes, ids) * n
        total += n
        out = head.generate(codes, int(ids[0, 0]), text_tok.eos_token_id, ids.shape[1])
        for j, row in enumerate(out.tolist()):
            text = text_tok.decode([t for t in row if t < len(text_tok)], skip_special_tokens=True)
            scores.append(score_caption(text, vbank.data.attributes[s + j]))
    summary = aggregate(scores)
    metrics = {"caption_token_acc": hits / max(1.0, total), "caption_strict": summary["accuracy"]["strict"]}
    if summary["pair"]["n"]:
        metrics["caption_pair_strict"] = summary["pair"]["accuracy"]["strict"]
        metrics["caption_pair_relation"] = summary["pair"]["accuracy"]["relation"]
    return metrics


@torch.no_grad()
def _hard_negative_accuracy(tok: SeedTokenizer, trainable: nn.Module, vbank: FrozenBank, stage: int,
                            batch: int = 512) -> float:
    """Fraction of (scene, hard negative) pairs where the image side — stage 1's final query, stage 2's
    embedding decoded from the codes — is closer to the scene's caption than to the negative."""
    was = trainable.training
    trainable.eval()
    sides = []
    for s in range(0, len(vbank.keys), batch):
        f = vbank.features[s:s + batch].to(tok.device).float()
        if stage == 1:
            sides.append(trainable(f)[0])
        else:
            codes = tok.quantize(tok.qformer(f)).indices
            sides.append(tok.decoder.decode_embedding(tok.quantizer.indices_to_codes(codes)))
    trainable.train(was)
    x = F.normalize(torch.cat(sides).float(), dim=-1)
    pos = (x * F.normalize(vbank.text_embeds[:, 0].float(), dim=-1)).sum(-1, keepdim=True)
    neg = torch.einsum("be,bke->bk", x, F.normalize(vbank.extra["neg_text"].float(), dim=-1))
    valid = vbank.extra["neg_valid"]
    return ((pos > neg) & valid).sum().item() / max(1, valid.sum().item())


def _stage1_metrics(trainable: Stage1Trainable, vbank: FrozenBank) -> dict[str, float]:
    trainable.eval()
    device = next(trainable.parameters()).device
    img = torch.cat([trainable(vbank.features[s:s + 512].to(device).float())[0] for s in range(0, len(vbank.keys), 512)])
    return recall_from_embeddings(img, vbank.text_embeds[:, 0], vbank.keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    TokenizerTrainConfig.add_arguments(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    cfg = TokenizerTrainConfig.from_cli(parser.parse_args(argv))
    metrics = train_tokenizer(cfg)
    if metrics:
        print(" ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["TokenizerTrainConfig", "check_clip_dir", "train_tokenizer"]
