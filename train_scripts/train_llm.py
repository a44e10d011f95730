"""SEED-LLaMA training: interleaved text–image next-token prediction under DeepSpeed, full or LoRA.

Recipe (arXiv:2310.01218, §3.3): the LLM sees images as ``<img>`` + 32 code tokens + ``</img>``
and is trained on image→text and text→image pairs (50/50), interleaved documents and multi-turn
instructions (loss on answers). What makes it fast on small hardware:

* images are encoded **once** into a code cache (``data_pipelines.code_cache``) — the loop reads
  integers and never runs the vision tower;
* samples are **packed** into fixed-length rows with position ids restarting per sample
  (``data_pipelines.packing``) — no padding, no attention across samples;
* DeepSpeed (ZeRO-2 by default, ``zero3`` / ``zero3_offload`` shipped) with bf16 where the CPU or
  GPU has it; gloo on CPU, NCCL on GPU.

Run::

    seed llm train --seed-tokenizer runs/demo/tokenizer/model --out runs/llm          # 1 process
    deepspeed --num_gpus 2 -m train_scripts.train_llm --seed-tokenizer … --out …      # 2 processes
    torchrun --nproc_per_node 2 -m train_scripts.train_llm --seed-tokenizer … --out …

The embedded default (``--model ""``) trains a sentencepiece tokenizer on the corpus and a tiny
LLaMA from scratch on the Shapes world (full fine-tuning); ``--model DIR`` starts from a local
LLaMA directory (add ``--finetune lora`` for LoRA). The defaults are the embedded-default recipe:
LLaMA 256 × 4 layers (4.0 M parameters with 593 text + 1026 image tokens), 30 000 scenes, rows of
256 tokens × 16 per step, 3000 steps of AdamW (lr 1e-3, 100 warm-up, cosine to 1e-4, wd 0.1,
β 0.9/0.95), bf16, ZeRO-2. Measured with the embedded-default SEED tokenizer (K = 1024, 32 codes),
one process, one thread on a shared 2-core machine: 33 min, 5.7 k tokens/s; on 500 test scenes
caption strict 0.58 (singles 0.97, pairs 0.18) and text→image strict 0.64 at the code level
(generated codes' decoded embedding matched to the nearest caption; true codes: 0.65) — pairs are
bounded by how little of their spatial relation that tokenizer's codes keep. Outputs::

    OUT/model/            chat-model directory (llm_adapters.chat_model; adapter/ for LoRA)
    OUT/checkpoints/      resumable DeepSpeed checkpoints (train_scripts.deepspeed_runtime)
    OUT/log.jsonl, OUT/loss.png, OUT/tensorboard/, OUT/metrics.json, OUT/train_config.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from data_pipelines.shapes import ShapesConfig
from llm_adapters.builders import LlamaPreset
from llm_adapters.lora import LoraSettings
from seedtok.errors import ConfigError
from seedtok.schema import ConfigBase, option
from train_scripts.runtime import (
    DistInfo,
    MetricsLogger,
    all_reduce_mean,
    barrier,
    bf16_supported,
    check_finite,
    plot_loss_curves,
    quiet_libraries,
    resolve_precision,
    seed_everything,
    warmup_cosine,
)


@dataclass
class LLMTrainConfig(ConfigBase):
    out: str = option("runs/llm", help="output directory (model/, checkpoints/, logs)")
    seed_tokenizer: str = option("", help="SEED tokenizer directory (seed tokenizer train … OUT/model)")
    model: str = option("", help="local LLaMA directory to start from; empty = the embedded default "
                                 "(sentencepiece on the corpus + a tiny LLaMA from scratch)")
    preset: LlamaPreset = option(default_factory=LlamaPreset, help="embedded default: LLaMA sizes")
    text_vocab_size: int = option(1000, help="embedded default: sentencepiece vocabulary (upper bound)")
    embed_init: str = option("mean", help="how the image rows start: 'mean' (--model: the mean text row; a fresh "
                                          "model: random like every row) or 'codebook' (the SEED codebook's "
                                          "geometry, projected)")
    data: list[str] = option(default_factory=list, help="record sources (any format seed data inspect reads: "
                                                        "pairs, interleaved documents, conversations); "
                                                        "empty = the Shapes world")
    shapes: ShapesConfig = option(default_factory=ShapesConfig, help="Shapes world settings (the default data)")
    n_train: int = option(30000, help="Shapes training scenes")
    n_val: int = option(300, help="Shapes validation scenes for the final per-direction loss (0 = none)")
    cache_dir: str = option("", help="Shapes arrays and the code cache (CACHE/codes); default OUT/../cache")
    finetune: Literal["full", "lora"] = option("full", help="full fine-tuning, or LoRA (peft) over a frozen base")
    lora: LoraSettings = option(default_factory=LoraSettings, help="LoRA settings (finetune=lora)")
    seq_len: int = option(256, help="packed row length in tokens (≤ the model's max positions; longer samples are "
                                    "skipped — raise it for long documents)")
    micro_batch: int = option(16, help="packed rows per process per micro-step")
    grad_accum: int = option(1, help="micro-steps per optimizer step")
    pack_window: int = option(1024, help="samples packed together (first-fit decreasing)")
    steps: int = option(3000, help="optimizer steps")
    lr: float = option(1e-3, help="peak learning rate")
    min_lr_ratio: float = option(0.1, help="final learning rate / peak (cosine decay)")
    warmup: int = option(100, help="linear warmup steps")
    weight_decay: float = option(0.1, help="AdamW weight decay (not on norms and biases)")
    betas: tuple[float, float] = option((0.9, 0.95), help="AdamW betas")
    eps: float = option(1e-8, help="AdamW epsilon")
    grad_clip: float = option(1.0, help="gradient clipping (global norm)")
    caption_fraction: float = option(0.5, help="pairs drawn as image→text (the rest text→image), SEED: 0.5")
    caption_targets: Literal["all", "canonical", "ordered"] = option(
        "ordered", help="Shapes: what the model learns to say about an image — ordered = the canonical caption "
                        "told from a pair's left/top object (one caption per image; with a tokenizer trained with "
                        "--caption-weight it doubled pairs-strict captions, 0.25 → 0.49); canonical = the "
                        "canonical caption; all = it or any paraphrase. Prompts always use every paraphrase")
    uncond_fraction: float = option(0.1, help="text→image turns with an empty prompt (trains classifier-free guidance)")
    conversation_fraction: float = option(0.0, help="Shapes: multi-turn conversations (describe / draw) among the samples")
    document_fraction: float = option(0.0, help="Shapes: interleaved documents (2–4 captioned scenes) among the samples")
    deepspeed: str = option("zero2", help="DeepSpeed config: zero2 | zero3 | zero3_offload (shipped) or a JSON path")
    precision: Literal["auto", "bf16", "fp32"] = option("auto", help="auto = bf16 where the hardware has it")
    device: str = option("auto", help="auto | cpu | cuda")
    threads: int = option(0, help="torch threads per process (0 = torch's default)")
    seed: int = option(0, help="seed of the model init, data order and sampling")
    log_every: int = option(20, help="log every N steps")
    ckpt_every: int = option(500, help="checkpoint every N steps (resumable)")
    keep_checkpoints: int = option(2, help="checkpoints kept")
    resume: bool = option(True, help="resume from OUT/checkpoints if present")
    stop_after: int = option(0, help="checkpoint and stop after this many steps in this run (0 = run to the end)")
    progress: bool = option(True, help="show progress bars")
    tensorboard: bool = option(True, help="also write TensorBoard scalars to OUT/tensorboard")

    def __post_init__(self) -> None:
        for name in ("caption_fraction", "uncond_fraction", "min_lr_ratio", "conversation_fraction",
                     "document_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.conversation_fraction + self.document_fraction > 1.0:
            raise ConfigError("conversation_fraction + document_fraction must be ≤ 1")
        for name in ("seq_len", "micro_batch", "grad_accum", "steps", "pack_window", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# Data: Shapes or records → code cache → sample source
# ---------------------------------------------------------------------------------------------
def _cache_dir(cfg: LLMTrainConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out).parent / "cache"


@dataclass
class TrainData:
    """What the recipe trains on: per-item codes and texts (pairs) or records, plus corpus text."""

    kind: Literal["shapes", "records"]
    codes: Any  # shapes: (n, N) int array; records: per record, a list of (N,) arrays
    texts: Any  # shapes: per scene, [caption, *paraphrases]; records: the records
    corpus: list[str]  # text for the embedded default's sentencepiece model
    answers: list[str] | None = None  # shapes: per scene, the caption-direction target (caption_targets)


def load_train_data(cfg: LLMTrainConfig, seed_tok: Any, info: DistInfo) -> TrainData:
    """Load the data and encode every image once into the code cache (rank 0 encodes, others read)."""
    from data_pipelines.code_cache import CodeCache, image_key

    cache = CodeCache.for_tokenizer(_cache_dir(cfg) / "codes", seed_tok, description=cfg.seed_tokenizer)
    progress = cfg.progress and info.is_main
    if not cfg.data:
        from data_pipelines.shapes_arrays import load_shapes_arrays

        if not info.is_main:
            barrier(info)  # rank 0 renders and caches first
        arr = load_shapes_arrays(cfg.shapes, "train", cfg.n_train, cache_dir=_cache_dir(cfg), progress=progress)
        keys = [image_key(im) for im in arr.images]
        if info.is_main:
            cache.encode(seed_tok, list(arr.images), keys, progress=progress)
            barrier(info)
        cache.reload()
        texts = [arr.texts(i) for i in range(len(arr))]
        answers = None
        if cfg.caption_targets == "canonical":
            answers = list(arr.captions)
        elif cfg.caption_targets == "ordered":
            from data_pipelines.shapes import ordered_caption

            answers = [ordered_caption(a) for a in arr.attributes]
        return TrainData("shapes", cache.as_array(keys), texts, [t for ts in texts for t in ts], answers)

    from data_pipelines.loaders import load_records
    from data_pipelines.records import ImageSegment

    records = [rec for path in cfg.data for rec in load_records(path)]
    if not records:
        raise ConfigError(f"no records in {', '.join(cfg.data)}")
    refs = [s.image for rec in records for s in rec.segments if isinstance(s, ImageSegment)]
    keys = [ref.sha256() for ref in refs]
    if info.is_main:
        cache.encode(seed_tok, refs, keys, progress=progress)
    barrier(info)
    cache.reload()
    flat = cache.as_array(keys)
    codes, at = [], 0
    for rec in records:
        n = len(rec.images)
        codes.append(list(flat[at:at + n]))
        at += n
    corpus = [t for rec in records for t in rec.iter_texts()]
    return TrainData("records", codes, records, corpus)


def build_source(cfg: LLMTrainConfig, data: TrainData, builder: Any) -> Any:
    from data_pipelines.sequences import RecordSource
    from data_pipelines.shapes_mix import ShapesMixSource

    if data.kind == "shapes":
        return ShapesMixSource(builder, data.codes, data.texts, caption_fraction=cfg.caption_fraction,
                               uncond_fraction=cfg.uncond_fraction, conversation_fraction=cfg.conversation_fraction,
                               document_fraction=cfg.document_fraction, answers=data.answers)
    return RecordSource(builder, data.texts, data.codes, caption_fraction=cfg.caption_fraction,
                        uncond_fraction=cfg.uncond_fraction)


# ---------------------------------------------------------------------------------------------
# Model: the LLM with image tokens (+ LoRA)
# ---------------------------------------------------------------------------------------------
def build_model(cfg: LLMTrainConfig, seed_tok: Any, corpus: list[str], info: DistInfo) -> tuple[Any, Any]:
    """``(model, processor)``: the embedded default's tiny LLaMA + sentencepiece, or a local LLaMA."""
    from llm_adapters.builders import build_chat_model
    from llm_adapters.chat_template import CAPTION_INSTRUCTION

    if cfg.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(cfg.model).is_dir():
            raise ConfigError(f"--model {cfg.model}: not a directory")
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        model, processor = build_chat_model(tokenizer, seed_tok, model=base, init=cfg.embed_init, seed=cfg.seed,
                                            seed_tokenizer_dir=cfg.seed_tokenizer)
    else:
        import tempfile

        from llm_adapters.sp_tokenizer import (
            SP_MODEL_NAME,
            llama_tokenizer_from_sentencepiece,
            train_llama_tokenizer,
        )

        # The text tokenizer is trained once (rank 0) and reused by resumed runs: the model's ids depend on it.
        sp_path = Path(cfg.out) / "text_tokenizer" / SP_MODEL_NAME
        if info.is_main and not sp_path.is_file():
            train_llama_tokenizer([*corpus, CAPTION_INSTRUCTION], sp_path.parent, vocab_size=cfg.text_vocab_size)
        barrier(info)
        with tempfile.TemporaryDirectory() as tmp:  # each process wraps its own copy (no shared writes)
            tokenizer = llama_tokenizer_from_sentencepiece(sp_path.read_bytes(), tmp)
        model, processor = build_chat_model(tokenizer, seed_tok, preset=cfg.preset, init=cfg.embed_init,
                                            seed=cfg.seed, seed_tokenizer_dir=cfg.seed_tokenizer)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                          f"{model.config.max_position_embeddings}")
    if cfg.finetune == "lora":
        from llm_adapters.lora import apply_lora

        model = apply_lora(model, processor.vocab, cfg.lora)
    model.train()
    return model, processor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on norms, biases and LoRA/token deltas' 1-D params."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def gathered_trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 values of every trainable parameter, whole (ZeRO partitions gathered; bf16 runs read the
    fp32 master copy). Collective under ZeRO-3: every process must call it."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)
            out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    return out


def save_final_model(cfg: LLMTrainConfig, model: Any, processor: Any, state: dict[str, torch.Tensor]) -> Path:
    """Write OUT/model (rank 0): the full fp32 weights, or the saved base + the trained adapter.

    Trained on the Shapes world (no ``--data``), the directory also records that world as
    ``shapes_config.yaml``, so that ``seed eval`` scores it on the same world (its held-out
    combinations above all) without being told.
    """
    from llm_adapters.chat_model import ADAPTER_DIR, TRAINING_WORLD_FILE, save_chat_model
    from seedtok.io import atomic_directory

    def record_world(directory: Path) -> None:
        if not cfg.data:
            cfg.shapes.to_yaml(directory / TRAINING_WORLD_FILE)

    out = Path(cfg.out) / "model"
    if cfg.finetune == "lora":
        staging = _base_dir(cfg)
        with atomic_directory(out) as tmp:
            shutil.copytree(staging, tmp, dirs_exist_ok=True)
            shutil.rmtree(tmp / ADAPTER_DIR, ignore_errors=True)
            model.save_pretrained(tmp / ADAPTER_DIR, state_dict=state)
            record_world(tmp)
        shutil.rmtree(staging, ignore_errors=True)
        return out
    base = type(model)(model.config)  # fresh fp32 module: the engine's may be bf16 or ZeRO-3 partitioned
    if model.config.tie_word_embeddings and "lm_head.weight" not in state:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    from train_scripts.runtime import load_state_strict

    load_state_strict(base, state, "trained weights")
    base.generation_config = model.generation_config
    return save_chat_model(out, base.eval(), processor, add_files=record_world)


def _base_dir(cfg: LLMTrainConfig) -> Path:
    return Path(cfg.out) / ".lora-base"


# ---------------------------------------------------------------------------------------------
# Validation: loss per direction on held-out scenes
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def direction_losses(engine: Any, builder: Any, codes: np.ndarray, captions: list[str], seq_len: int,
                     pad_id: int, device: torch.device, rows: int = 8) -> dict[str, float]:
    """Mean token loss of caption (image → text) and generation (text → image) turns."""
    from data_pipelines.packing import collate_packed, pack

    engine.eval()
    out = {}
    for name, make in (("caption", builder.caption), ("generation", builder.generation)):
        samples = [s for s in (make(c, t) for c, t in zip(codes, captions)) if s is not None]
        packed = pack(samples, seq_len)
        total = count = 0.0
        for i in range(0, len(packed), rows):
            batch = collate_packed(packed[i:i + rows], seq_len, pad_id).to(device)
            n = batch.num_loss_tokens
            total += engine(**batch.model_inputs()).loss.float().item() * n
            count += n
        out[f"val_{name}_loss"] = total / max(count, 1)
    engine.train()
    return out


# ---------------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------------
def _quiet_deepspeed() -> None:
    """DeepSpeed logs every engine detail at INFO, and torch warns about its collectives' names: our
    own progress bar and logs say what matters."""
    import logging
    import warnings

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def train_llm(cfg: LLMTrainConfig) -> dict[str, float]:
    """Train; write OUT/model and the logs; return the final metrics (empty if stopped early)."""
    import deepspeed

    from data_pipelines.packed_stream import PackedStream
    from data_pipelines.sequences import SequenceBuilder
    from seedtok.tokenizer import SeedTokenizer
    from train_scripts.deepspeed_runtime import (
        DeepSpeedCheckpointer,
        fill_auto,
        init_deepspeed_distributed,
        load_ds_config,
    )
    from train_scripts.tensorboard_log import scalar_writer

    # 1. Setup
    t_start = time.perf_counter()
    quiet_libraries()
    _quiet_deepspeed()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if not cfg.seed_tokenizer:
        raise ConfigError("--seed-tokenizer is required (a SEED tokenizer directory)")
    ds_template = load_ds_config(cfg.deepspeed)  # fail fast on a bad config name, before any work
    info = init_deepspeed_distributed(cfg.device)
    if cfg.precision == "bf16" and not bf16_supported(info.device):
        if info.device.type != "cpu":
            raise ConfigError(f"bf16 is not supported on {info.device} here (use --precision fp32)")
        # A CPU without AVX-512 bf16 / AMX still computes bf16 correctly (emulated), only slower than fp32:
        # an explicit request is honoured; `auto` picks fp32 there.
        warnings.warn("this CPU has no native bf16 (no avx512_bf16): bf16 runs emulated, slower than fp32",
                      stacklevel=2)
    bf16 = resolve_precision(cfg.precision, info.device) == "bf16"
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    progress = cfg.progress and info.is_main
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(out / "train_config.yaml")

    # 2. Data and model
    seed_tok = SeedTokenizer.from_pretrained(cfg.seed_tokenizer, load_image_decoder=False)
    data = load_train_data(cfg, seed_tok, info)
    model, processor = build_model(cfg, seed_tok, data.corpus, info)
    if cfg.finetune == "lora" and info.is_main and not _base_dir(cfg).is_dir():
        # The frozen base is saved now, in the precision it was built in (DeepSpeed's bf16 mode
        # casts the module); the final directory is this base + the trained adapter.
        from llm_adapters.chat_model import save_chat_model

        save_chat_model(_base_dir(cfg), model, processor)
    barrier(info)
    pad_id = processor.tokenizer.pad_token_id
    builder = SequenceBuilder(processor, max_len=cfg.seq_len)
    stream = PackedStream(build_source(cfg, data, builder), cfg.seq_len, pad_id, seed=cfg.seed,
                          window=cfg.pack_window)

    # 3. DeepSpeed engine
    hidden = model.config.hidden_size
    ds_config = fill_auto(ds_template, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum,
                          world_size=info.world_size, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                          weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, bf16=bf16, hidden_size=hidden)
    schedule = warmup_cosine(cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    if info.is_main:
        (out / "ds_config.json").write_text(json.dumps(ds_config, indent=1))

    ckpt = DeepSpeedCheckpointer(out / "checkpoints", keep=cfg.keep_checkpoints)
    start = 0
    if cfg.resume and ckpt.latest() is not None:
        start, data_state = ckpt.load(engine, info)
        stream.load_state_dict(data_state)
    logger = MetricsLogger(out / "log.jsonl", enabled=info.is_main)
    logger.rewind(start)
    tb = scalar_writer(out / "tensorboard") if cfg.tensorboard and info.is_main else None

    # 4. Train
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if progress:
        tqdm.write(f"{cfg.finetune} fine-tuning: {n_train:,} of {n_params:,} parameters trainable; "
                   f"{info.world_size} process(es); {'bf16' if bf16 else 'fp32'}; ZeRO-{ds_config.get('zero_optimization', {}).get('stage', 0)}")
    window: dict[str, float] = {"loss": 0.0, "n": 0, "tokens": 0, "slots": 0, "samples": 0, "seconds": 0.0}
    all_tokens = all_seconds = 0.0
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="llm", disable=not progress)
    stopped = False
    for step in bar:
        t0 = time.perf_counter()
        for _ in range(cfg.grad_accum):
            batch = stream.next_batch(cfg.micro_batch, info.rank, info.world_size).to(info.device)
            loss = engine(**batch.model_inputs()).loss
            check_finite(loss, step)
            engine.backward(loss)
            engine.step()
            window["loss"] += loss.item()
            window["n"] += 1
            window["tokens"] += batch.num_tokens
            window["slots"] += batch.input_ids.numel()
            window["samples"] += batch.num_samples
        window["seconds"] += time.perf_counter() - t0
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            stats = torch.tensor([window["tokens"], window["slots"], window["samples"]], dtype=torch.float64)
            if info.distributed:
                torch.distributed.all_reduce(stats)
            seconds = all_reduce_mean(window["seconds"], info)  # processes run in lockstep
            row = {"loss": all_reduce_mean(window["loss"] / window["n"], info), "lr": scheduler.get_last_lr()[0],
                   "tokens": float(stats[0]), "tokens_per_s": float(stats[0]) / max(seconds, 1e-9),
                   "fill": float(stats[0] / stats[1]),
                   "samples": float(stats[2])}
            all_tokens += float(stats[0])
            all_seconds += seconds
            logger.log(done, **row)
            if tb is not None:
                for k, v in row.items():
                    tb.add_scalar(f"train/{k}", v, done)
                tb.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            window = dict.fromkeys(window, 0)
        stop = bool(cfg.stop_after) and done - start >= cfg.stop_after and done < cfg.steps
        if (done % cfg.ckpt_every == 0 and done < cfg.steps) or stop:
            state = gathered_trainable_state(model)
            ckpt.save(engine, info, done, trainable_state=state, data_state=stream.state_dict(), config=cfg.to_dict())
            if stop:
                if progress:
                    bar.write(f"stopped after step {done} (stop_after={cfg.stop_after}); re-run to resume")
                stopped = True
                break
    bar.close()
    if stopped:
        if tb is not None:
            tb.close()
        return {}

    # 5. Save: the last checkpoint (resumable) and the chat-model directory
    state = gathered_trainable_state(model)
    ckpt.save(engine, info, cfg.steps, trainable_state=state, data_state=stream.state_dict(), config=cfg.to_dict())
    if info.is_main:
        save_final_model(cfg, model, processor, state)
    barrier(info)

    # 6. Validation loss per direction, logs, metrics
    metrics: dict[str, float] = {}
    if cfg.n_val > 0 and data.kind == "shapes":
        from data_pipelines.code_cache import CodeCache, image_key
        from data_pipelines.shapes_arrays import load_shapes_arrays

        val = load_shapes_arrays(cfg.shapes, "validation", cfg.n_val, cache_dir=_cache_dir(cfg), progress=False)
        cache = CodeCache.for_tokenizer(_cache_dir(cfg) / "codes", seed_tok)
        keys = [image_key(im) for im in val.images]
        if info.is_main:
            cache.encode(seed_tok, list(val.images), keys, progress=False)
        barrier(info)
        cache.reload()
        metrics.update(direction_losses(engine, builder, cache.as_array(keys), val.captions, cfg.seq_len, pad_id,
                                        info.device))
    if all_seconds > 0:
        metrics["tokens_per_s"] = all_tokens / all_seconds
    metrics["wall_seconds"] = time.perf_counter() - t_start
    if info.is_main:
        logger.log(cfg.steps, **metrics)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        plot_loss_curves(out / "log.jsonl", out / "loss.png", ["loss"], title="LLM training loss")
        if tb is not None:
            for k, v in metrics.items():
                tb.add_scalar(f"final/{k}", v, cfg.steps)
            tb.close()
    barrier(info)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    LLMTrainConfig.add_arguments(parser)
    # The deepspeed launcher appends --local_rank=N (the env var LOCAL_RANK carries the same).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    cfg = LLMTrainConfig.from_cli(parser.parse_args(argv))
    metrics = train_llm(cfg)
    if metrics and os.environ.get("RANK", "0") == "0":
        print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["LLMTrainConfig", "train_llm"]
