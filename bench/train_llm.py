"""LLM training throughput: this toolkit's path vs a plain HF Trainer + peft LoRA baseline.

    .venv/bin/python -m bench.train_llm [--seed-tokenizer DIR] [--steps 40] [--threads 1] [--json out.json]

Both sides train the same model (the embedded default's tiny LLaMA with the image tokens, LoRA
r16 on every linear layer + the image-token rows) on the same data, in one run: Shapes scenes as
SEED-LLaMA's three kinds of sequence (``data_pipelines.shapes_mix``) — by default 40% multi-turn
conversations, 20% interleaved documents, 40% pairs (image→text / text→image 50/50); pass
``--conversation-fraction 0 --document-fraction 0`` for pairs only.

* **ours** — ``train_scripts.train_llm``: images encoded once into the code cache, samples packed
  into fixed-length rows (256 tokens; position ids restarting per sample), DeepSpeed ZeRO-2;
* **baseline** — ``transformers.Trainer`` with a peft LoRA model, a collator that encodes each
  batch's images with the SEED tokenizer on the fly and pads to the longest sample.

Tokens/s counts real (non-padding) tokens. Model FLOPs per token = 6 · (matmul parameters) +
12 · layers · width · (mean attended context); MFU divides the achieved model FLOP/s by a bf16 (or
fp32) matmul peak measured in the same run with the same thread count. The one-time encode of
the code cache is reported on its own row (the baseline pays it on every epoch). Without
``--seed-tokenizer`` the embedded default's tokenizer architecture is built with random weights
(speed does not depend on them). The last line reads ``ratio: <ours ÷ baseline tokens/s>``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def matmul_peak(dtype: torch.dtype, n: int = 1024, seconds: float = 1.5) -> float:
    """Sustained FLOP/s of an (n × n) @ (n × n) matmul in ``dtype`` on this process's threads."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flops_per_token(config: Any, mean_context: float) -> float:
    """Training FLOPs per token: 6 per matmul parameter (forward + backward) plus attention scores."""
    d, L, ff, V = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    matmul = L * (2 * d * d + 2 * d * kv + 3 * d * ff) + d * V  # q, o, k, v, gate/up/down, lm_head
    return 6 * matmul + 12 * L * d * mean_context


def _build_default_tokenizer(tmp: Path):
    from bench.tokenizer import _build_default

    tok = _build_default(tmp)
    tok.save_pretrained(tmp / "seed_tok")
    return str(tmp / "seed_tok")


class _Baseline:
    """The plain path: a Dataset of sample plans, and a collator that encodes the batch's images with
    the SEED tokenizer on the fly, builds the same sequences and pads them."""

    def __init__(self, builder: Any, seed_tok: Any, arrays: Any, pad_id: int, seed: int, fractions: dict[str, float]):
        self.builder, self.seed_tok, self.arrays, self.pad_id = builder, seed_tok, arrays, pad_id
        self.seed, self.fractions = seed, fractions
        self.texts = [arrays.texts(i) for i in range(len(arrays))]
        self.tokens = self.slots = 0
        self.contexts = 0.0

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from data_pipelines.shapes_mix import shapes_plan

        return {"plan": shapes_plan(i, self.texts, np.random.default_rng([self.seed, i]), **self.fractions)}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from data_pipelines.packing import collate_padded
        from data_pipelines.shapes_mix import build_plan

        scenes = sorted({j for it in items for j in it["plan"].scenes})
        codes = self.seed_tok.encode([self.arrays.pil(j) for j in scenes]).codes  # on the fly, every batch
        row = {j: k for k, j in enumerate(scenes)}
        samples = [build_plan(self.builder, it["plan"], lambda j: codes[row[j]]) for it in items]
        batch = collate_padded([s for s in samples if s is not None], self.pad_id)
        lengths = batch["attention_mask"].sum(1)
        self.tokens += int(lengths.sum())
        self.slots += batch["input_ids"].numel()
        self.contexts += float(((lengths + 1) * lengths / 2).sum())
        return batch


def run_baseline(out: Path, seed_tok_dir: str, n_train: int, steps: int, batch_size: int, bf16: bool,
                 cache_dir: Path, seed: int, fractions: dict[str, float], max_len: int) -> dict[str, float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from data_pipelines.sequences import SequenceBuilder
    from data_pipelines.shapes import ShapesConfig
    from data_pipelines.shapes_arrays import load_shapes_arrays
    from llm_adapters.builders import LlamaPreset, build_chat_model
    from llm_adapters.lora import LoraSettings, apply_lora
    from llm_adapters.sp_tokenizer import SP_MODEL_NAME, llama_tokenizer_from_sentencepiece
    from seedtok.tokenizer import SeedTokenizer

    seed_tok = SeedTokenizer.from_pretrained(seed_tok_dir, load_image_decoder=False)
    arrays = load_shapes_arrays(ShapesConfig(), "train", n_train, cache_dir=cache_dir, progress=False)
    # The text tokenizer ours trained, wrapped the same way.
    tokenizer = llama_tokenizer_from_sentencepiece((out / "text_tokenizer" / SP_MODEL_NAME).read_bytes(), out / "hf_tok")
    model, processor = build_chat_model(tokenizer, seed_tok, preset=LlamaPreset(), seed=seed)
    model = apply_lora(model, processor.vocab, LoraSettings(dropout=0.0))
    data = _Baseline(SequenceBuilder(processor, max_len=max_len), seed_tok, arrays, tokenizer.pad_token_id, seed,
                     fractions)

    class Clock(TrainerCallback):
        """Tokens and seconds between the end of step 2 (after warm-up) and the end of the last step;
        each batch is collated right before its step, so the token count matches the steps timed."""

        def __init__(self):
            self.marks: dict[int, tuple[float, int, float, int]] = {}

        def on_step_end(self, args, state, control, **kw):
            self.marks[state.global_step] = (time.perf_counter(), data.tokens, data.contexts, data.slots)

    clock = Clock()
    args = TrainingArguments(output_dir=str(out / "hf"), per_device_train_batch_size=batch_size, max_steps=steps,
                             learning_rate=1e-3, warmup_steps=2, bf16=bf16, use_cpu=True, report_to=[],
                             save_strategy="no", logging_steps=10**9, dataloader_num_workers=0,
                             remove_unused_columns=False, disable_tqdm=True, seed=seed)
    Trainer(model=model, args=args, train_dataset=data, data_collator=data.collate, callbacks=[clock]).train()
    (t0, n0, c0, s0), (t1, n1, c1, s1) = clock.marks[2], clock.marks[steps]
    return {"tokens_per_s": (n1 - n0) / (t1 - t0), "mean_context": (c1 - c0) / (n1 - n0), "seconds": t1 - t0,
            "fill": (n1 - n0) / (s1 - s0)}


def run_ours(out: Path, seed_tok_dir: str, n_train: int, steps: int, micro_batch: int, seq_len: int, bf16: bool,
             cache_dir: Path, seed: int, fractions: dict[str, float], log_every: int = 5) -> dict[str, float]:
    from train_scripts.runtime import read_jsonl
    from train_scripts.train_llm import LLMTrainConfig, train_llm

    cfg = LLMTrainConfig.from_dict(dict(
        out=str(out), seed_tokenizer=seed_tok_dir, cache_dir=str(cache_dir), n_train=n_train, n_val=0,
        finetune="lora", lora={"dropout": 0.0}, seq_len=seq_len, micro_batch=micro_batch, steps=steps, lr=1e-3,
        warmup=2, log_every=log_every, ckpt_every=10**6, precision="bf16" if bf16 else "fp32", progress=False,
        tensorboard=False, resume=False, seed=seed, **fractions))
    train_llm(cfg)
    rows = [r for r in read_jsonl(out / "log.jsonl") if "tokens" in r][1:]  # the first window warms up
    tokens = sum(r["tokens"] for r in rows)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in rows)
    steps_logged = log_every * len(rows)
    return {"tokens_per_s": tokens / seconds, "fill": float(np.mean([r["fill"] for r in rows])), "seconds": seconds,
            "samples_per_step": sum(r["samples"] for r in rows) / steps_logged}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed-tokenizer", default=None, help="SEED tokenizer directory (default: random embedded default)")
    parser.add_argument("--n-train", type=int, default=4000, help="Shapes scenes")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per side")
    parser.add_argument("--micro-batch", type=int, default=16, help="ours: packed rows per step")
    parser.add_argument("--seq-len", type=int, default=256, help="ours: packed row length (tokens)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="baseline: samples per step (default: ours' mean samples per step)")
    parser.add_argument("--conversation-fraction", type=float, default=0.4, help="multi-turn conversations in the mix")
    parser.add_argument("--document-fraction", type=float, default=0.2, help="interleaved documents in the mix")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--fp32", action="store_true", help="also run both sides in fp32")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from data_pipelines.code_cache import CodeCache, image_key
    from data_pipelines.shapes import ShapesConfig
    from data_pipelines.shapes_arrays import load_shapes_arrays
    from seedtok.tokenizer import SeedTokenizer
    from train_scripts.runtime import bf16_supported, quiet_libraries

    quiet_libraries()
    bf16 = bf16_supported(torch.device("cpu"))
    peaks = {"fp32": matmul_peak(torch.float32)}
    if bf16:
        peaks["bf16"] = matmul_peak(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        seed_tok_dir = args.seed_tokenizer or _build_default_tokenizer(tmp)
        cache_dir = tmp / "cache"
        # One-time cost of the code cache (ours pays it once per data set, reused by every run).
        seed_tok = SeedTokenizer.from_pretrained(seed_tok_dir, load_image_decoder=False)
        arrays = load_shapes_arrays(ShapesConfig(), "train", args.n_train, cache_dir=cache_dir, progress=False)
        t = time.perf_counter()
        CodeCache.for_tokenizer(cache_dir / "codes", seed_tok).encode(
            seed_tok, list(arrays.images), [image_key(im) for im in arrays.images], progress=False)
        encode_rate = args.n_train / (time.perf_counter() - t)

        fractions = dict(caption_fraction=0.5, uncond_fraction=0.1, conversation_fraction=args.conversation_fraction,
                         document_fraction=args.document_fraction)
        rows: list[tuple[str, dict[str, float]]] = []
        precisions = [bf16] + ([False] if args.fp32 and bf16 else [])
        for use_bf16 in precisions:
            tag = "bf16" if use_bf16 else "fp32"
            ours = run_ours(tmp / f"ours_{tag}", seed_tok_dir, args.n_train, args.steps, args.micro_batch, args.seq_len,
                            use_bf16, cache_dir, seed=0, fractions=fractions)
            # Same model init and tokenizer for the baseline: it reads the text tokenizer ours trained; the
            # same number of samples per step as ours on average.
            batch = args.batch_size or max(1, round(ours["samples_per_step"]))
            base = run_baseline(tmp / f"ours_{tag}", seed_tok_dir, args.n_train, args.steps, batch,
                                use_bf16, cache_dir, seed=0, fractions=fractions, max_len=args.seq_len)
            rows += [(f"ours ({tag}, packed + code cache + DeepSpeed)", {**ours, "peak": peaks[tag]}),
                     (f"baseline ({tag}, HF Trainer + peft, padded, encode on the fly)", {**base, "peak": peaks[tag]})]
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(tmp / f"ours_{'bf16' if bf16 else 'fp32'}" / "model")
        mean_ctx = rows[1][1]["mean_context"]  # the same samples on both sides: one context length

    fpt = flops_per_token(config, mean_ctx)
    width = max(len(name) for name, _ in rows)
    print(f"bench/train_llm — {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"{args.steps} steps per side, matmul peak " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
          + " (MFU against the row's precision)")
    print(f"{'path':<{width}}  {'tokens/s':>9}  {'fill':>5}  {'TFLOP/s':>7}  {'MFU':>6}  {'ratio':>6}")
    ref = rows[0][1]["tokens_per_s"]
    results = {}
    for name, r in rows:
        achieved = r["tokens_per_s"] * fpt
        print(f"{name:<{width}}  {r['tokens_per_s']:>9.0f}  {r['fill']:>5.2f}  {achieved / 1e12:>7.3f}  "
              f"{achieved / r['peak']:>6.1%}  {r['tokens_per_s'] / ref:>6.2f}")
        results[name] = {**r, "mfu": achieved / r["peak"]}
    print(f"{'code cache: one-time encode':<{width}}  {encode_rate:>9.0f} images/s")
    ratio = rows[0][1]["tokens_per_s"] / rows[1][1]["tokens_per_s"]
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": results, "peak_flops": peaks, "flops_per_token": fpt,
                                               "encode_images_per_s": encode_rate, "ratio": ratio}, indent=1))
    print(f"ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
