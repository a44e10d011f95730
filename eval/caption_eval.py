"""Captioning eval: caption held-out images, score with BLEU/METEOR/ROUGE-L/CIDEr and exact Shapes attributes.

The core, :func:`evaluate_captioner`, takes any ``captioner`` — a callable from a list of PIL images to
one caption each — so it runs on a chat model (``SeedChat.caption``), a baseline, or a fake in tests.
:func:`run_caption_eval` is ``seed eval caption``: it loads a chat-model directory, captions ``n``
scenes of a split and writes ``OUT/predictions.jsonl`` (one row per image: id, prediction, reference,
attribute scores) and ``OUT/caption_metrics.json``.

References for the n-gram metrics are each scene's canonical caption and its paraphrases, so a correct
paraphrase is not punished much; the exact attribute accuracy (:mod:`eval.shapes_scorer`) is the
number that says whether the caption is *right*.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from data_pipelines.shapes_arrays import ShapesArrays
from eval.caption_metrics import attribute_accuracy, caption_metrics
from seedtok.errors import ConfigError, DataError

Captioner = Callable[[list[Image.Image]], list[str]]

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "caption_metrics.json"


def caption_all(captioner: Captioner, images: Sequence[Image.Image], *, batch_size: int = 32,
                progress: bool = True) -> list[str]:
    """Run ``captioner`` over ``images`` in batches; check it returns one string per image."""
    out: list[str] = []
    bar = tqdm(total=len(images), desc="captioning", unit="img", file=sys.stderr, disable=not progress, leave=False)
    for s in range(0, len(images), batch_size):
        batch = list(images[s:s + batch_size])
        captions = list(captioner(batch))
        if len(captions) != len(batch) or not all(isinstance(c, str) for c in captions):
            raise DataError(f"the captioner returned {len(captions)} captions for {len(batch)} images "
                            "(expected one string per image)")
        out.extend(captions)
        bar.update(len(batch))
    bar.close()
    return out


def evaluate_captioner(captioner: Captioner, scenes: ShapesArrays, *, batch_size: int = 32,
                       with_meteor: bool = True, progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Caption every scene and score the captions.

    Returns:
        ``(metrics, rows)``: ``metrics = {"n", "ngram": caption_metrics(...), "attributes": aggregate
        summary}``; ``rows`` one dict per scene (id, prediction, reference, strict and per-attribute
        booleans) for ``predictions.jsonl``.
    """
    images = [scenes.pil(i) for i in range(len(scenes))]
    predictions = caption_all(captioner, images, batch_size=batch_size, progress=progress)
    return score_predictions(predictions, scenes, with_meteor=with_meteor)


def score_predictions(predictions: Sequence[str], scenes: ShapesArrays, *,
                      with_meteor: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score given captions of ``scenes`` (see :func:`evaluate_captioner`)."""
    if len(predictions) != len(scenes):
        raise DataError(f"{len(predictions)} predictions for {len(scenes)} scenes")
    references = [scenes.texts(i) for i in range(len(scenes))]
    ngram = caption_metrics(predictions, references, with_meteor=with_meteor)
    attrs = attribute_accuracy(predictions, scenes.attributes)
    per = attrs.pop("per_caption")
    rows = [{"id": scenes.ids[i], "prediction": predictions[i], "reference": scenes.captions[i], **per[i]}
            for i in range(len(scenes))]
    return {"n": len(scenes), "ngram": ngram, "attributes": attrs}, rows


def write_caption_eval(out_dir: str | os.PathLike, metrics: dict[str, Any], rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``predictions.jsonl`` and ``caption_metrics.json`` into ``out_dir``; return ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / PREDICTIONS_FILE, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    return out


def format_caption_metrics(metrics: dict[str, Any]) -> str:
    """Plain-text summary: the n-gram metrics on one line, then the attribute table."""
    from eval.shapes_scorer import format_table

    ng = metrics["ngram"]
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    line = "  ".join(f"{k} {'—' if ng[k] is None else f'{ng[k]:.3f}'}" for k in names)
    notes = "".join(f"\n({k} absent: {why})" for k, why in ng.get("absent", {}).items())
    return f"{line}{notes}\n{format_table(metrics['attributes'])}"


def run_caption_eval(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, split: str = "test", n: int = 300,
                     data_dir: str | os.PathLike | None = None, shapes=None, batch_size: int = 32,
                     max_new_tokens: int = 64, num_beams: int = 1, with_meteor: bool = True, device: str = "cpu",
                     progress: bool = True) -> dict[str, Any]:
    """``seed eval caption``: caption ``n`` scenes with the chat model in ``model_dir`` and score them
    (greedy captions, or beam search with ``num_beams`` > 1)."""
    if num_beams < 1:
        raise ConfigError(f"num_beams must be ≥ 1, got {num_beams}")
    from eval.scenes import load_scenes
    from llm_adapters.chat import SeedChat

    scenes = load_scenes(split, n, data_dir=data_dir, shapes=shapes, progress=progress)
    chat = SeedChat.from_pretrained(model_dir, device=device)

    def captioner(images: list[Image.Image]) -> list[str]:
        return chat.caption(images, max_new_tokens=max_new_tokens, batch_size=batch_size, num_beams=num_beams)

    metrics, rows = evaluate_captioner(captioner, scenes, batch_size=batch_size, with_meteor=with_meteor,
                                       progress=progress)
    metrics = {"model": str(model_dir), "split": split if data_dir is None else str(data_dir), "num_beams": num_beams,
               **metrics}
    write_caption_eval(out_dir, metrics, rows)
    return metrics
