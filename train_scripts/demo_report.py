"""``OUT/report.html`` of ``seed demo``: headline table, image grids and loss curves of every stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from train_scripts.runtime import plot_loss_curves

#: (stage log, the keys to draw, title) for the loss-curve figures.
CURVES = (
    ("clip/log.jsonl", ["loss"], "stage 0: CLIP contrastive loss"),
    ("tokenizer/stage1/log.jsonl", ["loss"], "stage 1: Q-Former contrastive loss"),
    ("tokenizer/stage2/log.jsonl", ["loss"], "stage 2: quantise + reconstruct loss"),
    ("vae/vae_log.jsonl", ["loss"], "decoder: autoencoder loss"),
    ("decoder/log.jsonl", ["loss"], "decoder: UNet v-prediction loss"),
    ("llm/log.jsonl", ["loss"], "LLM: next-token loss"),
)

HEADLINES = (
    ("caption_strict", "captions: strict attribute accuracy (test)", 0.90),
    ("t2i_strict", "text-to-image: strict (test, Shapes scorer)", 0.60),
    ("t2i_compositional_strict", "text-to-image: strict (compositional split)", None),
    ("round_trip_strict", "round trip image → codes → image: strict", 0.70),
    ("decoder_true_embed_strict", "decoder from the true CLIP embedding: strict", 0.85),
    ("vae_recon_strict", "autoencoder reconstruction: strict (decoder ceiling)", None),
    ("tokenizer_t2i_R@1_from_codes", "tokenizer: text→image R@1 from the codes", None),
    ("tokenizer_code_usage", "tokenizer: code usage", None),
    ("clip_val_t2i_R@1", "CLIP: text→image R@1 (validation)", None),
)


def _headline_table(summary: dict[str, Any]) -> dict[str, Any]:
    table = {}
    for key, label, floor in HEADLINES:
        if key in summary:
            v = summary[key]
            table[label] = f"{v:.3f}" + (f"  (floor {floor:.2f}: {'met' if v >= floor else 'not met'})"
                                         if floor is not None else "")
    for stage, seconds in summary.get("stage_seconds", {}).items():
        table[f"wall time: {stage}"] = f"{seconds:.0f} s" if seconds is not None else "-"
    return table


def write_demo_report(cfg, metrics: dict[str, Any]) -> Path:
    """Write ``OUT/report.html`` (and ``OUT/metrics.json`` again, with the report's tables)."""
    from eval.report import (
        caption_section_from_eval,
        figure_section,
        round_trip_section_from_eval,
        t2i_section_from_eval,
        write_report,
    )

    out = Path(cfg.out)
    figures = []
    (out / "curves").mkdir(parents=True, exist_ok=True)
    for rel, keys, title in CURVES:
        log = out / rel
        if log.is_file():
            figures.append(plot_loss_curves(log, out / "curves" / (rel.replace("/", "_") + ".png"), keys, title=title))
    sections = []
    ev = out / "eval"
    if (ev / "tokenizer" / "round_trip" / "metadata.jsonl").is_file():
        sections.append(round_trip_section_from_eval(ev / "tokenizer" / "round_trip"))
    if (ev / "t2i").is_dir():
        sections.append(t2i_section_from_eval(ev / "t2i"))
    if (ev / "t2i_compositional").is_dir():
        sections.append(t2i_section_from_eval(ev / "t2i_compositional",
                                              title="Generated images, compositional split (unseen colour+shape)"))
    if (ev / "caption" / "predictions.jsonl").is_file():
        meta = [json.loads(line) for line in (out / "data" / "test" / "metadata.jsonl").read_text().splitlines()
                if line.strip()]
        sections.append(caption_section_from_eval(ev / "caption", [out / "data" / "test" / m["file_name"]
                                                                    for m in meta]))
    sections.append(figure_section("Loss curves", figures))
    report_metrics = {"headline (held-out test split)": _headline_table(metrics.get("summary", {})),
                      "preset": {"preset": metrics.get("preset"), "chat model": str(out / "model")}}
    intro = (f"seed demo --preset {metrics.get('preset')}: every stage on the embedded default (the Shapes world). "
             f"The chat model in {out / 'model'} works with seed chat, seed generate and seed caption.")
    path = write_report(out, report_metrics, sections, title="SEED toolkit demo", intro=intro)
    # write_report rewrites metrics.json with its tables; keep the full stage metrics there.
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    return path
