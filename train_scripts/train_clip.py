"""Stage 0 of the embedded default: a tiny CLIP trained contrastively on the Shapes world.

SEED tokenises images from a frozen EVA-CLIP ViT and decodes to the image embedding of a CLIP
ViT-H (the space Stable unCLIP is conditioned on). With no pretrained weights on this machine the
embedded default trains its own CLIP (transformers ``CLIPModel``) and saves it as an ordinary CLIP
directory, which then plays all three roles: frozen vision tower (stage 1/2 features), text tower
(stage 1 contrastive), and the "unCLIP embedding" space that the diffusion decoder is conditioned
on.

Recipe: setup (data, BPE tokenizer, model) → train (AdamW, warmup + cosine, bf16 autocast where
the CPU has it, DDP over gloo/NCCL under torchrun) → save (CLIP dir + tokenizer + image
processor + resolved config) → eval (text→image retrieval on the validation split).

Captions repeat across scenes (the world has finitely many attribute combinations), so the
contrastive target is multi-positive: image i and text j match when their scenes have the same
canonical caption — the plain diagonal target would push apart true matches.

    seed tokenizer train-clip --out runs/clip [--steps 600 …]
    torchrun --nproc_per_node 2 -m train_scripts.train_clip --out runs/clip
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data_pipelines.shapes import ShapesConfig
from data_pipelines.shapes_arrays import ShapesArrays, load_shapes_arrays

# CLIP's usual normalisation constants; the saved image processor carries the same numbers.
from eval.tokenizer_metrics import (
    CLIP_MEAN,
    CLIP_STD,
    caption_keys,
    pixels_from_uint8,
    recall_from_embeddings,
)
from seedtok.schema import ConfigBase, option
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
    warmup_cosine,
)


@dataclass
class ClipTrainConfig(ConfigBase):
    out: str = option("runs/clip", help="output directory (the CLIP dir is written to OUT/model)")
    shapes: ShapesConfig = option(default_factory=ShapesConfig, help="Shapes world generator settings")
    n_train: int = option(30000, help="training scenes rendered once and reused")
    n_val: int = option(1000, help="validation scenes for the retrieval score")
    patch_size: int = option(16, help="ViT patch size in pixels (16 at 64 px: 16 patches + CLS)")
    vision_width: int = option(128, help="ViT hidden size")
    vision_layers: int = option(4, help="ViT layers")
    text_width: int = option(96, help="text transformer hidden size")
    text_layers: int = option(2, help="text transformer layers")
    heads: int = option(4, help="attention heads (both towers)")
    projection_dim: int = option(64, help="joint embedding size (the embedded default's unCLIP embedding size)")
    hard_negatives: bool = option(True, help="add a caption with one attribute changed per scene as an extra "
                                              "image→text negative (NegCLIP-style): teaches binding and relations")
    n_text_negatives: int = option(4, help="hard-negative captions prepared per scene; each step draws one")
    image_negatives: bool = option(True, help="render one counterfactual image per scene (mirrored, or a pair with "
                                              "its colours/shapes swapped) as an extra text→image negative: "
                                              "forces the image embedding to encode order and binding")
    cf_steps: int = option(0, help="optional phase 2: steps after the main schedule on batches where every scene "
                                   "comes with its mirror image AND the mirror's caption (half of them pairs), "
                                   "contrasted both ways, at a constant lr. The main phase's focused terms reach "
                                   "~0.99 pair-vs-mirror accuracy by step ~1400 of the default schedule but only "
                                   "~0.73 by step 600, where a short phase 2 lifts it (≈0.57→0.97 in 100 steps "
                                   "measured from step 800)")
    cf_lr: float = option(3e-4, help="constant learning rate of phase 2")
    hard_negative_weight: float = option(1.0, help="weight of the focused two-way terms: each caption against its own "
                                                    "image vs the counterfactual image, each image against its "
                                                    "caption vs the hard-negative caption. Within the batch-wide "
                                                    "InfoNCE alone the mirror negatives stayed at chance (0.5) for "
                                                    "1000 steps; with these terms they are learned")
    logit_scale_init: float = option(3.0, help="initial log of the contrastive logit scale")
    max_text_len: int = option(24, help="text positions (Shapes captions and paraphrases need ≤ 20)")
    steps: int = option(1500, help="optimizer steps")
    batch_size: int = option(256, help="scenes per step per process")
    lr: float = option(2e-3, help="peak learning rate")
    warmup: int = option(40, help="linear warmup steps")
    weight_decay: float = option(0.1, help="AdamW weight decay")
    precision: str = option("auto", help="auto | bf16 | fp32 (auto = bf16 where the hardware is fast at it)")
    device: str = option("auto", help="auto | cpu | cuda")
    seed: int = option(0, help="training seed")
    log_every: int = option(25, help="log every N steps")
    eval_every: int = option(200, help="validation retrieval every N steps (0 = only at the end)")
    ckpt_every: int = option(200, help="checkpoint every N steps (resumable)")
    resume: bool = option(True, help="resume from OUT/checkpoints if present")
    stop_after: int = option(0, help="checkpoint and stop after this many steps in this run (0 = run to the end); "
                                     "for time-limited or preemptible jobs — the next run resumes")
    progress: bool = option(True, help="show progress bars")


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------
def train_text_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 400):
    """A CLIP-format BPE tokenizer (``vocab.json`` + ``merges.txt``) trained on the corpus.

    CLIP's own vocabulary is 49k tokens; the Shapes corpus needs a few hundred. We train a BPE
    with the ``tokenizers`` library using CLIP's conventions (``</w>`` word-end suffix,
    ``<|startoftext|>``/``<|endoftext|>``) and load it with transformers' ``CLIPTokenizer``, so
    the saved directory is an ordinary CLIP tokenizer.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    raw = out_dir / "bpe"
    raw.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(raw))
    _renumber_bpe_vocab(raw / "vocab.json", raw / "merges.txt", ["<|startoftext|>", "<|endoftext|>"])
    # transformers v5 ignores vocab_file=… in the constructor; from_pretrained reads the files.
    tok = CLIPTokenizer.from_pretrained(str(raw))
    return tok


def _renumber_bpe_vocab(vocab_path: Path, merges_path: Path, specials: list[str]) -> None:
    """Give the BPE vocabulary ids that depend only on its merges.

    The ``tokenizers`` trainer numbers the ``</w>`` tokens in hash-map order (a per-process random
    seed; huggingface/tokenizers#1794), so on the Shapes corpus three processes wrote three
    vocabularies with the same merges — and the CLIP's embedding rows, and its whole training run,
    differed between runs of one seed. Ids here: the special tokens, the alphabet sorted, then each
    merge's result in merge order. Left upstream: on exact count ties those hash-ordered ids also
    break the tie between merges, so a corpus with many ties can still learn different merges.
    """
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    merged = ["".join(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    merged_set = set(merged)
    order = [t for t in specials if t in vocab]
    order += sorted(t for t in vocab if t not in merged_set and t not in specials)
    order += list(dict.fromkeys(t for t in merged if t not in specials))
    if sorted(order) != sorted(vocab):
        raise RuntimeError(f"{vocab_path}: BPE vocabulary and merges disagree ({len(order)} vs {len(vocab)} tokens)")
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(order)}, ensure_ascii=False), encoding="utf-8")


def build_clip(cfg: ClipTrainConfig, vocab_size: int):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=cfg.text_width,
            intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.heads,
            max_position_embeddings=cfg.max_text_len,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=cfg.shapes.image_size,
            patch_size=cfg.patch_size,
            hidden_size=cfg.vision_width,
            intermediate_size=4 * cfg.vision_width,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.heads,
        ),
        projection_dim=cfg.projection_dim,
    )
    return CLIPModel(config)


def build_image_processor(image_size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def tokenize_all(tok, data: ShapesArrays, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids for every (scene, text variant): ids (n, V, L), mask (n, V, L)."""
    n_var = 1 + max(len(p) for p in data.paraphrases)
    texts = []
    for i in range(len(data)):
        t = data.texts(i)
        texts.extend(t + [t[0]] * (n_var - len(t)))  # pad short lists with the canonical caption
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    ids = enc["input_ids"].view(len(data), n_var, max_len)
    mask = enc["attention_mask"].view(len(data), n_var, max_len)
    return ids, mask


def perturb_attributes(attrs: dict, rng: np.random.Generator) -> dict:
    """A copy of a scene's attributes with exactly one thing changed (a hard negative caption).

    Singles: colour, shape, size or position. Pairs: additionally the relation, the two objects'
    order (same relation) or their colours swapped — what a bag-of-words text encoder gets wrong.
    """
    from data_pipelines.shapes import COLOURS, POSITIONS, RELATIONS, SHAPES

    a = json.loads(json.dumps(attrs))
    objs = a["objects"]
    choices = ["colour", "shape", "size"] + (["position"] if a["kind"] == "single" else ["relation", "order", "swap_colours"])
    what = choices[int(rng.integers(len(choices)))]
    o = objs[int(rng.integers(len(objs)))]
    if what == "colour":
        o["colour"] = str(rng.choice([c for c in COLOURS if c != o["colour"]]))
    elif what == "shape":
        o["shape"] = str(rng.choice([x for x in SHAPES if x != o["shape"]]))
    elif what == "size":
        o["size"] = "small" if o["size"] == "large" else "large"
    elif what == "position":
        o["position"] = str(rng.choice([p for p in POSITIONS if p != o["position"]]))
    elif what == "relation":
        a["relation"] = str(rng.choice([r for r in RELATIONS if r != a["relation"]]))
    elif what == "order":
        a["objects"] = objs[::-1]
    elif objs[0]["colour"] != objs[1]["colour"]:
        objs[0]["colour"], objs[1]["colour"] = objs[1]["colour"], objs[0]["colour"]
    else:
        a["relation"] = str(rng.choice([r for r in RELATIONS if r != a["relation"]]))
    return a


def _uses_held_out(attrs: dict, held_out: set[tuple[str, str]]) -> bool:
    return any((o["colour"], o["shape"]) in held_out for o in attrs["objects"])


def hard_negative_captions(attributes: list[dict], k: int, rng: np.random.Generator,
                           held_out: set[tuple[str, str]]) -> list[list[str]]:
    """``k`` one-attribute-changed captions per scene; never one naming a held-out combination
    (the compositional split must stay unseen, even as a negative)."""
    from data_pipelines.shapes import canonical_caption

    out = []
    for a in attributes:
        row = []
        for _ in range(k):
            for _attempt in range(20):
                neg = perturb_attributes(a, rng)
                if not _uses_held_out(neg, held_out):
                    break
            row.append(canonical_caption(neg))
        out.append(row)
    return out


def counterfactual_scene(attrs: dict, rng: np.random.Generator, image_size: int,
                         held_out: set[tuple[str, str]]) -> dict:
    """One scene that a bag-of-objects embedding confuses with ``attrs``.

    Singles: the mirror image (on the axis that moves the object, when one does). Pairs: half the
    time the mirror along the relation's axis (same objects, order reversed), half the time the
    two objects' colours (or shapes) swapped; a swap that would create a held-out combination falls
    back to the mirror.
    """
    from data_pipelines.shapes import POSITIONS, mirror_attributes, swap_bindings

    if attrs["kind"] == "single":
        row, col = divmod(POSITIONS.index(attrs["objects"][0]["position"]), 3)
        axes = [ax for ax, moved in (("x", col != 1), ("y", row != 1)) if moved] or ["x"]
        return mirror_attributes(attrs, axes[int(rng.integers(len(axes)))], image_size)
    a, b = attrs["objects"]
    if rng.random() < 0.5:
        what = "colour" if a["colour"] != b["colour"] else "shape"
        swapped = swap_bindings(attrs, what)
        if not _uses_held_out(swapped, held_out):
            return swapped
    axis = "x" if attrs["relation"] in ("left of", "right of") else "y"
    return mirror_attributes(attrs, axis, image_size)


def multi_positive_targets(keys: list[int]) -> torch.Tensor:
    """(B, B) row-normalised match matrix: 1 where two scenes share a canonical caption."""
    k = torch.tensor(keys)
    match = (k[:, None] == k[None, :]).float()
    return match / match.sum(1, keepdim=True)


def _soft_targets(row_keys: list[int], col_keys: list[int], device: torch.device) -> torch.Tensor:
    """(R, C) row-normalised: 1 where the row's and column's scenes share a canonical caption."""
    match = (torch.tensor(row_keys)[:, None] == torch.tensor(col_keys)[None, :]).float()
    return (match / match.sum(1, keepdim=True)).to(device)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, keys: list[int],
                     neg: torch.Tensor | None = None, neg_keys: list[int] | None = None,
                     img_neg: torch.Tensor | None = None, img_neg_keys: list[int] | None = None) -> torch.Tensor:
    """Symmetric InfoNCE with multi-positive targets. img, txt: (B, D) unnormalised.

    ``neg`` (M, D) are extra hard-negative texts for the image→text direction and ``img_neg``
    (M', D) extra hard-negative images for text→image; a negative whose caption happens to equal
    a scene's own caption (``neg_keys`` / ``img_neg_keys``) counts as a positive for it.
    """
    img = F.normalize(img.float(), dim=-1)
    txt = F.normalize(txt.float(), dim=-1)
    scale = scale.exp().clamp(max=100)
    texts, text_keys = txt, list(keys)
    if neg is not None:
        texts, text_keys = torch.cat([txt, F.normalize(neg.float(), dim=-1)]), text_keys + list(neg_keys)
    images, image_keys = img, list(keys)
    if img_neg is not None:
        images = torch.cat([img, F.normalize(img_neg.float(), dim=-1)])
        image_keys = image_keys + list(img_neg_keys)
    i2t = F.cross_entropy(scale * img @ texts.t(), _soft_targets(keys, text_keys, img.device))
    t2i = F.cross_entropy(scale * txt @ images.t(), _soft_targets(keys, image_keys, img.device))
    return 0.5 * (i2t + t2i)


def hard_negative_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, keys: list[int],
                       neg: torch.Tensor | None = None, neg_keys: list[int] | None = None,
                       img_neg: torch.Tensor | None = None, img_neg_keys: list[int] | None = None) -> torch.Tensor:
    """Focused two-way terms: row i's caption picks its image over its counterfactual image, and
    row i's image picks its caption over its hard-negative caption. ``(B, D)`` each, row-aligned.

    Rows whose negative has the positive's caption (a mirror that changes nothing) are left out.
    In the batch-wide softmax a single counterfactual is one candidate among hundreds of easy
    ones; here it is the only one, so the gradient goes to exactly the distinction it tests.
    """
    k = torch.tensor(keys)
    scale = scale.exp().clamp(max=100)
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    terms = []
    for anchor, pos, other, other_keys in ((txt, img, img_neg, img_neg_keys), (img, txt, neg, neg_keys)):
        if other is None:
            continue
        keep = (k != torch.tensor(other_keys)).to(img.device)
        if not keep.any():
            continue
        other = F.normalize(other.float(), dim=-1)
        logits = scale * torch.stack([(anchor * pos).sum(-1), (anchor * other).sum(-1)], dim=1)[keep]
        terms.append(F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=img.device)))
    return torch.stack(terms).mean() if terms else img.new_zeros(())


@torch.no_grad()
def retrieval_at_k(model, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, keys: list[int],
                   ks=(1, 5), batch: int = 256) -> dict[str, float]:
    """Text→image and image→text recall@k; a hit is any scene with the query's canonical caption."""
    model.eval()
    img, txt = [], []
    for s in range(0, len(pixels), batch):
        img.append(model.get_image_features(pixel_values=pixels[s:s + batch]).pooler_output)
        txt.append(model.get_text_features(input_ids=ids[s:s + batch], attention_mask=mask[s:s + batch]).pooler_output)
    return recall_from_embeddings(torch.cat(img), torch.cat(txt), keys, ks)


# ---------------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------------
def train_clip(cfg: ClipTrainConfig) -> dict[str, float]:
    """Run stage 0; returns the validation metrics. The CLIP directory lands in ``cfg.out/model``."""
    # 1. Setup
    quiet_libraries()
    info = init_distributed(cfg.device)
    precision = resolve_precision(cfg.precision, info.device)
    seed_everything(cfg.seed + info.rank)
    out = Path(cfg.out)
    cache = out.parent / "cache" if out.parent != out else out / "cache"
    progress = cfg.progress and info.is_main

    train = load_shapes_arrays(cfg.shapes, "train", cfg.n_train, cache_dir=cache, progress=progress)
    val = load_shapes_arrays(cfg.shapes, "validation", cfg.n_val, cache_dir=cache, progress=progress)
    corpus = [t for i in range(len(train)) for t in train.texts(i)]
    tok = train_text_tokenizer(corpus, out / "tokenizer_work")
    ids, mask = tokenize_all(tok, train, cfg.max_text_len)
    key_index: dict[str, int] = {}
    keys = [key_index.setdefault(c, len(key_index)) for c in train.captions]
    held_out = {tuple(c) for c in cfg.shapes.held_out_combinations}
    neg_ids = neg_mask = neg_keys = None
    if cfg.hard_negatives and cfg.n_text_negatives > 0:
        rng = np.random.default_rng(cfg.seed + 17)
        neg_captions = hard_negative_captions(train.attributes, cfg.n_text_negatives, rng, held_out)
        flat = [c for row in neg_captions for c in row]
        neg_keys = torch.tensor([key_index.setdefault(c, len(key_index)) for c in flat]).view(len(train), -1)
        enc = tok(flat, padding="max_length", truncation=True, max_length=cfg.max_text_len, return_tensors="pt")
        neg_ids = enc["input_ids"].view(len(train), cfg.n_text_negatives, -1)
        neg_mask = enc["attention_mask"].view(len(train), cfg.n_text_negatives, -1)
    cf_images = cf_keys = None
    if cfg.image_negatives:
        from data_pipelines.shapes import ShapesWorld, canonical_caption

        world, rng = ShapesWorld(cfg.shapes), np.random.default_rng(cfg.seed + 29)
        cf_images = np.empty_like(train.images)
        cf_keys = []
        for i, a in enumerate(tqdm(train.attributes, desc="counterfactual scenes", disable=not progress)):
            cf = counterfactual_scene(a, rng, cfg.shapes.image_size, held_out)
            cf_images[i] = np.asarray(world.render(cf))
            cf_keys.append(key_index.setdefault(canonical_caption(cf), len(key_index)))

    mirror = mirror_set(train, cfg, tok, key_index, progress) if cfg.cf_steps > 0 else None

    model = build_clip(cfg, vocab_size=len(tok)).to(info.device)
    with torch.no_grad():
        model.logit_scale.fill_(cfg.logit_scale_init)
    ddp = model
    if info.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _two_phase(cfg.warmup, cfg.steps, cfg.cf_lr / cfg.lr))
    total = cfg.steps + max(0, cfg.cf_steps)
    ckpt = CheckpointManager(out / "checkpoints")
    logger = MetricsLogger(out / "log.jsonl", enabled=info.is_main)

    start = 0
    if cfg.resume and ckpt.latest() is not None:
        start, state, _ = ckpt.load(optimizer=opt, scheduler=sched)
        load_state_strict(model, state, "stage-0 checkpoint")
        seed_everything(cfg.seed + info.rank + start)

    logger.rewind(start)  # rows after the checkpoint belong to work that is being redone

    # 2. Train
    # Batches and augmentation draw from a generator re-seeded every step from (seed, rank, step):
    # a resumed run sees exactly the batches the uninterrupted run would have seen.
    gen = torch.Generator()
    batch = _Batcher(train, ids, mask, keys, cfg, info.device, precision, neg_ids, neg_mask, neg_keys,
                     cf_images, cf_keys, mirror)
    bar = tqdm(range(start, total), initial=start, total=total, desc="stage 0 CLIP", disable=not progress)
    model.train()
    for step in bar:
        gen.manual_seed(cfg.seed * 1_000_003 + info.rank * 7919 + step)
        loss = batch.mirror_loss(ddp, model, gen) if step >= cfg.steps else batch.main_loss(ddp, model, gen)
        check_finite(loss, step + 1)  # 1-based, as logged and checkpointed
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            logger.log(step + 1, loss=loss.item(), lr=sched.get_last_lr()[0], logit_scale=model.logit_scale.exp().item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if info.is_main and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
            m = _val_retrieval(model, tok, val, cfg, info.device)
            logger.log(step + 1, **m)
            bar.write(f"step {step + 1}: " + " ".join(f"{k}={v:.3f}" for k, v in m.items()))
            model.train()
        if checkpoint_or_stop(ckpt, info, step=step + 1, start=start, total=total, ckpt_every=cfg.ckpt_every,
                              stop_after=cfg.stop_after, module=model, optimizer=opt, scheduler=sched,
                              config=cfg.to_dict(), write=bar.write):
            return {}

    # 3. Save (main process) and 4. eval
    metrics: dict[str, float] = {}
    if info.is_main:
        model.eval()
        save_clip_dir(model, tok, out / "model", cfg)
        metrics = _val_retrieval(model, tok, val, cfg, info.device)
        logger.log(total, **metrics)
    if info.distributed:
        torch.distributed.barrier()
    return metrics


@dataclass
class _MirrorSet:
    """Every training scene's mirror: image, canonical caption ids and caption key, and which scenes are pairs."""

    images: np.ndarray
    ids: torch.Tensor
    mask: torch.Tensor
    keys: list[int]
    pairs: torch.Tensor


def mirror_set(train: ShapesArrays, cfg: ClipTrainConfig, tok, key_index: dict[str, int], progress: bool) -> _MirrorSet:
    """Phase 2's data: singles mirrored on an axis that moves them, pairs along their relation's axis."""
    from data_pipelines.shapes import POSITIONS, ShapesWorld, canonical_caption, mirror_attributes

    world = ShapesWorld(cfg.shapes)
    images = np.empty_like(train.images)
    captions = []
    for i, a in enumerate(tqdm(train.attributes, desc="mirror scenes", disable=not progress)):
        if a["kind"] == "pair":
            axis = "x" if a["relation"] in ("left of", "right of") else "y"
        else:
            axis = "y" if POSITIONS.index(a["objects"][0]["position"]) % 3 == 1 else "x"
        m = mirror_attributes(a, axis, cfg.shapes.image_size)
        images[i] = np.asarray(world.render(m))
        captions.append(canonical_caption(m))
    enc = tok(captions, padding="max_length", truncation=True, max_length=cfg.max_text_len, return_tensors="pt")
    pairs = torch.tensor([i for i, a in enumerate(train.attributes) if a["kind"] == "pair"])
    return _MirrorSet(images, enc["input_ids"], enc["attention_mask"],
                      [key_index.setdefault(c, len(key_index)) for c in captions], pairs)


@dataclass
class _Batcher:
    """Draws a step's batch (from the step's generator) and returns its loss, for either phase."""

    train: ShapesArrays
    ids: torch.Tensor
    mask: torch.Tensor
    keys: list[int]
    cfg: ClipTrainConfig
    device: torch.device
    precision: str
    neg_ids: torch.Tensor | None
    neg_mask: torch.Tensor | None
    neg_keys: torch.Tensor | None
    cf_images: np.ndarray | None
    cf_keys: list[int] | None
    mirror: _MirrorSet | None

    def _forward(self, ddp, images: np.ndarray, b_ids: torch.Tensor, b_mask: torch.Tensor):
        with autocast(self.precision, self.device):
            # One pass of each tower over positives and negatives; CLIPModel's own logits are
            # unused — the losses build multi-positive targets from the captions.
            return ddp(input_ids=b_ids.to(self.device), attention_mask=b_mask.to(self.device),
                       pixel_values=pixels_from_uint8(images).to(self.device))

    def main_loss(self, ddp, model, gen: torch.Generator) -> torch.Tensor:
        """Phase 1: batch-wide multi-positive InfoNCE with hard negatives (+ the focused two-way terms)."""
        cfg = self.cfg
        idx = torch.randint(0, len(self.train), (cfg.batch_size,), generator=gen)
        var = torch.randint(0, self.ids.shape[1], (cfg.batch_size,), generator=gen)
        nvar = torch.randint(0, max(1, cfg.n_text_negatives), (cfg.batch_size,), generator=gen)
        B = len(idx)
        images = self.train.images[idx.numpy()]
        if self.cf_images is not None:
            images = np.concatenate([images, self.cf_images[idx.numpy()]])
        b_ids, b_mask = self.ids[idx, var], self.mask[idx, var]
        if self.neg_ids is not None:
            b_ids = torch.cat([b_ids, self.neg_ids[idx, nvar]])
            b_mask = torch.cat([b_mask, self.neg_mask[idx, nvar]])
        out = self._forward(ddp, images, b_ids, b_mask)
        b_keys = [self.keys[i] for i in idx.tolist()]
        negs = (
            out.text_embeds[B:] if self.neg_ids is not None else None,
            self.neg_keys[idx, nvar].tolist() if self.neg_ids is not None else None,
            out.image_embeds[B:] if self.cf_images is not None else None,
            [self.cf_keys[i] for i in idx.tolist()] if self.cf_images is not None else None,
        )
        loss = contrastive_loss(out.image_embeds[:B], out.text_embeds[:B], model.logit_scale, b_keys, *negs)
        if cfg.hard_negative_weight > 0:
            loss = loss + cfg.hard_negative_weight * hard_negative_loss(
                out.image_embeds[:B], out.text_embeds[:B], model.logit_scale, b_keys, *negs)
        return loss

    def mirror_loss(self, ddp, model, gen: torch.Generator) -> torch.Tensor:
        """Phase 2: half pairs, half any scene; each with its mirror image and the mirror's caption.

        InfoNCE over all 2B images and 2B texts, plus the two-way terms in both directions (own
        caption: own image vs mirror; mirror caption: mirror image vs own) — so the text tower has
        to tell "A left of B" from "A right of B" as much as the image tower has to.
        """
        cfg, m = self.cfg, self.mirror
        half = cfg.batch_size // 2
        idx = torch.cat([m.pairs[torch.randint(0, len(m.pairs), (half,), generator=gen)],
                         torch.randint(0, len(self.train), (cfg.batch_size - half,), generator=gen)])
        var = torch.randint(0, self.ids.shape[1], (cfg.batch_size,), generator=gen)
        B = len(idx)
        images = np.concatenate([self.train.images[idx.numpy()], m.images[idx.numpy()]])
        b_ids = torch.cat([self.ids[idx, var], m.ids[idx]])
        b_mask = torch.cat([self.mask[idx, var], m.mask[idx]])
        out = self._forward(ddp, images, b_ids, b_mask)
        own_keys = [self.keys[i] for i in idx.tolist()]
        mir_keys = [m.keys[i] for i in idx.tolist()]
        img, txt, scale = out.image_embeds, out.text_embeds, model.logit_scale
        loss = contrastive_loss(img, txt, scale, own_keys + mir_keys)
        loss = loss + cfg.hard_negative_weight * 0.5 * (
            hard_negative_loss(img[:B], txt[:B], scale, own_keys, txt[B:], mir_keys, img[B:], mir_keys)
            + hard_negative_loss(img[B:], txt[B:], scale, mir_keys, txt[:B], own_keys, img[:B], own_keys))
        return loss


def _val_retrieval(model, tok, val: ShapesArrays, cfg: ClipTrainConfig, device: torch.device) -> dict[str, float]:
    v_ids, v_mask = tokenize_all(tok, val, cfg.max_text_len)
    m = retrieval_at_k(model, pixels_from_uint8(val.images).to(device), v_ids[:, 0].to(device),
                       v_mask[:, 0].to(device), caption_keys(val.captions))
    m.update(counterfactual_accuracy(model, val, cfg, v_ids[:, 0].to(device), v_mask[:, 0].to(device), device))
    return {f"val_{k}": v for k, v in m.items()}


@torch.no_grad()
def counterfactual_accuracy(model, data: ShapesArrays, cfg: ClipTrainConfig, ids: torch.Tensor, mask: torch.Tensor,
                            device: torch.device, batch: int = 250) -> dict[str, float]:
    """How often a caption prefers its own image to the scene's counterfactual (mirror / swapped
    binding), over scenes whose counterfactual has a different caption: ``cf_single``, ``cf_pair``.
    0.5 is a bag-of-objects embedding; the diffusion decoder can only paint what this separates."""
    from data_pipelines.shapes import ShapesWorld, canonical_caption

    model.eval()
    world, rng = ShapesWorld(cfg.shapes), np.random.default_rng(12345)
    held_out = {tuple(c) for c in cfg.shapes.held_out_combinations}
    cfs = [counterfactual_scene(a, rng, cfg.shapes.image_size, held_out) for a in data.attributes]
    cf_pixels = pixels_from_uint8(np.stack([np.asarray(world.render(c)) for c in cfs]))
    wins: dict[str, list[float]] = {"single": [], "pair": []}
    for s in range(0, len(data), batch):
        sl = slice(s, s + batch)
        own = F.normalize(model.get_image_features(pixel_values=pixels_from_uint8(data.images[sl]).to(device))
                          .pooler_output.float(), dim=-1)
        cf = F.normalize(model.get_image_features(pixel_values=cf_pixels[sl].to(device)).pooler_output.float(), dim=-1)
        txt = F.normalize(model.get_text_features(input_ids=ids[sl], attention_mask=mask[sl]).pooler_output.float(),
                          dim=-1)
        better = ((txt * own).sum(-1) > (txt * cf).sum(-1)).tolist()
        for j, b in enumerate(better):
            i = s + j
            if canonical_caption(cfs[i]) != data.captions[i]:
                wins[data.attributes[i]["kind"]].append(float(b))
    return {f"cf_{k}": float(np.mean(v)) if v else float("nan") for k, v in wins.items()}


def save_clip_dir(model, tok, path: Path, cfg: ClipTrainConfig) -> Path:
    """An ordinary CLIP directory: config + safetensors, tokenizer, image processor, our config —
    swapped in by renames (:func:`seedtok.io.atomic_directory`), so a crash never leaves a partial one."""
    from seedtok.io import atomic_directory

    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        build_image_processor(cfg.shapes.image_size).save_pretrained(tmp)
        cfg.to_yaml(tmp / "seed_stage0.yaml")
    return path


def _two_phase(warmup: int, steps: int, phase2_ratio: float):
    """Warmup + cosine over the main ``steps``, then a constant ``phase2_ratio`` × the peak rate."""
    main = warmup_cosine(warmup, steps)

    def f(step: int) -> float:
        return main(step) if step < steps else phase2_ratio

    return f


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ClipTrainConfig.add_arguments(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = ClipTrainConfig.from_cli(args)
    metrics = train_clip(cfg)
    if metrics:
        print(" ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
