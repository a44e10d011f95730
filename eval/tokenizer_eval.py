"""Tokenizer eval: code usage, perplexity and retrieval (:mod:`eval.tokenizer_metrics`) plus the round trip.

The round trip is image → SEED codes → unCLIP embedding → image, scored with the Shapes scorer against
the original scene's attributes (strict = every attribute of every object survives). Its core,
:func:`round_trip`, takes any ``reconstruct`` callable (PIL images → PIL images), so it is testable
with fakes. :func:`run_tokenizer_eval` is ``seed eval tokenizer``: it accepts a tokenizer directory or
a chat-model directory holding one (``seed_tokenizer/``) and writes ``OUT/tokenizer_metrics.json`` and
the reconstructions as an image folder ``OUT/round_trip/`` (PNG + ``metadata.jsonl`` with the
original's attributes and the scores, so ``seed eval shapes OUT/round_trip`` re-scores it).
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
from seedtok.errors import CheckpointError, ConfigError, DataError

Reconstructor = Callable[[list[Image.Image]], list[Image.Image]]

METRICS_FILE = "tokenizer_metrics.json"
ROUND_TRIP_DIR = "round_trip"


def round_trip(reconstruct: Reconstructor, scenes: ShapesArrays, *, batch_size: int = 64,
               progress: bool = True) -> tuple[dict[str, Any], list[Image.Image]]:
    """Reconstruct every scene and score the reconstruction against the scene's attributes.

    Returns:
        ``(summary, reconstructions)``: :func:`eval.shapes_scorer.aggregate`'s summary plus ``per_image``
        scores, and the reconstructed PIL images in scene order.
    """
    from eval.shapes_scorer import aggregate, score_image

    recon: list[Image.Image] = []
    bar = tqdm(total=len(scenes), desc="round trip", unit="img", file=sys.stderr, disable=not progress, leave=False)
    for s in range(0, len(scenes), batch_size):
        batch = [scenes.pil(i) for i in range(s, min(len(scenes), s + batch_size))]
        out = list(reconstruct(batch))
        if len(out) != len(batch):
            raise DataError(f"the reconstructor returned {len(out)} images for {len(batch)}")
        recon.extend(out)
        bar.update(len(batch))
    bar.close()
    per = [{"id": scenes.ids[i], **score_image(im, scenes.attributes[i])} for i, im in enumerate(recon)]
    return {**aggregate(per), "per_image": per}, recon


def write_round_trip_folder(out_dir: str | os.PathLike, scenes: ShapesArrays, reconstructions: Sequence[Image.Image],
                            per_image: Sequence[dict[str, Any]]) -> Path:
    """Reconstructions as an image folder: ``00000.png`` … and ``metadata.jsonl`` (truth + scores), with the
    originals beside them in ``originals/`` (``original`` in each row) for side-by-side reports."""
    out = Path(out_dir)
    (out / "originals").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (im, scores) in enumerate(zip(reconstructions, per_image)):
        name = f"{i:05d}.png"
        im.save(out / name)
        scenes.pil(i).save(out / "originals" / name)
        rows.append({"file_name": name, "original": f"originals/{name}", "id": scenes.ids[i],
                     "text": scenes.captions[i], "attributes": scenes.attributes[i], "scores": scores})
    with open(out / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return out


def format_tokenizer_metrics(metrics: dict[str, Any]) -> str:
    """Plain text: the tokenizer metrics one per line, then the round trip's attribute table."""
    from eval.shapes_scorer import format_table

    lines = []
    for key, value in metrics.get("tokenizer", {}).items():
        lines.append(f"{key:<16}{value:.4f}" if isinstance(value, float) else f"{key:<16}{value}")
    if "round_trip" in metrics:
        lines += ["round trip (image → codes → image):", format_table(metrics["round_trip"])]
    lines += [f"{part} absent: {why}" for part, why in metrics.get("absent", {}).items()]
    return "\n".join(lines)


def find_tokenizer_dir(model_dir: str | os.PathLike) -> Path:
    """``model_dir`` if it is a SEED tokenizer directory, else its ``seed_tokenizer/`` (a chat-model directory)."""
    from seedtok.tokenizer import load_config

    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(f"model directory not found: {root}")
    for candidate in (root, root / "seed_tokenizer"):
        try:
            load_config(candidate)
        except (CheckpointError, ConfigError):
            continue
        return candidate
    raise CheckpointError(f"{root}: neither a SEED tokenizer directory nor a chat-model directory with seed_tokenizer/")


def run_tokenizer_eval(model_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                       clip_dir: str | os.PathLike | None = None, split: str = "test", n: int = 1000,
                       n_round_trip: int = 300, seed: int = 0, data_dir: str | os.PathLike | None = None,
                       shapes=None, batch_size: int = 64, device: str = "cpu",
                       progress: bool = True) -> dict[str, Any]:
    """``seed eval tokenizer``: tokenizer metrics on ``n`` scenes and the round trip on the first ``n_round_trip``.

    A part that cannot run is listed in ``absent`` with the reason (no CLIP directory for the retrieval
    metrics; no ``image_decoder/`` for the round trip) instead of failing the whole eval.
    Reconstruction of the batch starting at scene ``s`` samples with seed ``seed + s``.
    """
    from eval.scenes import head, load_scenes
    from eval.tokenizer_metrics import build_bank, evaluate_bank, recorded_clip_dir
    from seedtok.tokenizer import SeedTokenizer

    tok_dir = find_tokenizer_dir(model_dir)
    tok = SeedTokenizer.from_pretrained(tok_dir, device=device)
    scenes = load_scenes(split, max(n, n_round_trip), data_dir=data_dir, shapes=shapes, progress=progress)
    metrics: dict[str, Any] = {"model": str(tok_dir), "split": split if data_dir is None else str(data_dir)}
    absent: dict[str, str] = {}

    # 1. Code usage, perplexity, embedding cosine, retrieval (needs the CLIP text tower).
    clip = str(clip_dir) if clip_dir is not None else recorded_clip_dir(str(tok_dir))
    if clip is None:
        absent["tokenizer"] = f"{tok_dir} records no CLIP directory: pass --clip DIR"
    elif not (Path(clip) / "config.json").is_file():
        absent["tokenizer"] = f"CLIP directory {clip} not found: pass --clip DIR"
    else:
        sub = head(scenes, n)
        bank = build_bank(clip, tok.vision_tower, sub, progress=progress)
        metrics["tokenizer"] = {"n": len(sub), **evaluate_bank(tok, bank)}

    # 2. Round trip: image → codes → embedding → image, scored exactly.
    if tok.image_decoder is None:
        absent["round_trip"] = f"{tok_dir} has no image decoder (image_decoder/)"
    elif n_round_trip > 0:
        rt_scenes = head(scenes, n_round_trip)
        start = [seed]

        def reconstruct(images: list[Image.Image]) -> list[Image.Image]:
            out = tok.decode_image(tok.encode(images), seed=start[0])
            start[0] += len(images)
            return out

        summary, recon = round_trip(reconstruct, rt_scenes, batch_size=batch_size, progress=progress)
        per_image = summary.pop("per_image")
        metrics["round_trip"] = summary
        if out_dir is not None:
            write_round_trip_folder(Path(out_dir) / ROUND_TRIP_DIR, rt_scenes, recon, per_image)
    metrics["absent"] = absent
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics
