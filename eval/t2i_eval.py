"""Text-to-image eval: generate images for Shapes prompts in GenEval's folder layout and score them exactly.

Layout (as GenEval, https://github.com/djghosh13/geneval, reads and writes it)::

    OUT/00000/metadata.jsonl      one JSON line: prompt, tag (single | pair), attributes, id
    OUT/00000/samples/0000.png    the prompt's generated images, 0000.png, 0001.png, …
    OUT/00001/…

Generation and scoring are separate steps, so images made by any other tool in this layout can be
scored too:

* :func:`write_geneval_folder` takes any ``generator`` — a callable from a list of prompts to a list of
  images per prompt — so it runs on a chat model (``SeedChat.generate_images``) or a fake in tests.
* :func:`score_geneval_folder` reads the layout back and scores every image with the Shapes scorer
  (per attribute, strict, single vs pair; GenEval averages over images, so do we) and, when a CLIP is
  given, the CLIP score of each image against its prompt.

:func:`run_t2i_eval` is ``seed eval t2i``: prompts are the canonical captions of ``n`` scenes of a
split (``test``, or ``compositional`` for held-out colour/shape combinations); it writes the folder,
``OUT/t2i_metrics.json`` and ``OUT/t2i_scores.jsonl`` (one row per image).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from seedtok.errors import DataError

ImageGenerator = Callable[[list[str]], list[list[Image.Image]]]

METRICS_FILE = "t2i_metrics.json"
SCORES_FILE = "t2i_scores.jsonl"
# Sampling defaults of the image codes, chosen on the validation split (300 scenes, the full preset's
# chat model): temperature 1 / guidance off 0.560 strict, greedy 0.577, temperature 0.7 0.577,
# temperature 1 + guidance 2 0.610, temperature 0.7 + guidance 2 0.623, temperature 0.7 + guidance 3 0.590.
DEFAULT_TEMPERATURE = 0.7
DEFAULT_GUIDANCE = 2.0
_INDEX = re.compile(r"^\d{5}$")


def _index_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and _INDEX.match(d.name)) if root.is_dir() else []


def write_geneval_folder(generator: ImageGenerator, prompts: Sequence[str], out_dir: str | os.PathLike, *,
                         metadata: Sequence[dict[str, Any]] | None = None, batch_size: int = 16,
                         overwrite: bool = False, progress: bool = True) -> Path:
    """Generate images for every prompt and write them in GenEval's layout.

    Args:
        generator: prompts → one list of images per prompt (any number ≥ 1 each).
        prompts: P prompts; prompt ``i`` goes to ``OUT/{i:05d}``.
        metadata: optional P dicts stored beside each prompt (e.g. ``{"tag", "attributes", "id"}``).
        overwrite: replace the numbered folders of an earlier run (else a DataError names them).

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    if metadata is not None and len(metadata) != len(prompts):
        raise DataError(f"{len(prompts)} prompts but {len(metadata)} metadata rows")
    stale = _index_dirs(out)
    if stale and not overwrite:
        raise DataError(f"{out} already holds generated folders ({stale[0].name} …): pass overwrite / --overwrite")
    for d in stale:
        shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", file=sys.stderr, disable=not progress,
               leave=False)
    for s in range(0, len(prompts), batch_size):
        batch = list(prompts[s:s + batch_size])
        images = generator(batch)
        if len(images) != len(batch) or any(len(row) == 0 for row in images):
            raise DataError(f"the generator returned {len(images)} image lists for {len(batch)} prompts "
                            "(expected one non-empty list per prompt)")
        for i, (prompt, row) in enumerate(zip(batch, images), s):
            folder = out / f"{i:05d}"
            (folder / "samples").mkdir(parents=True)
            meta = {"prompt": prompt, **(metadata[i] if metadata is not None else {})}
            (folder / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
            for j, im in enumerate(row):
                im.save(folder / "samples" / f"{j:04d}.png")
        bar.update(len(batch))
    bar.close()
    return out


def read_geneval_folder(out_dir: str | os.PathLike) -> list[tuple[Path, dict[str, Any], list[Path]]]:
    """``[(folder, metadata, sample paths)]`` of a GenEval-layout directory, in index order."""
    root = Path(out_dir)
    folders = _index_dirs(root)
    if not folders:
        raise DataError(f"{root}: no generated folders (expected {root}/00000/metadata.jsonl and samples/)")
    entries = []
    for folder in folders:
        try:
            meta = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            raise DataError(f"{folder}/metadata.jsonl: missing or not a JSON line") from None
        if not isinstance(meta, dict) or "prompt" not in meta:
            raise DataError(f"{folder}/metadata.jsonl: needs a prompt")
        samples = sorted((folder / "samples").glob("*.png"))
        if not samples:
            raise DataError(f"{folder}/samples: no PNG images")
        entries.append((folder, meta, samples))
    return entries


def score_geneval_folder(out_dir: str | os.PathLike, *, clip: Any = None, clip_unavailable: str | None = None,
                         tolerance: float = 80.0, min_area: float = 0.01, progress: bool = True) -> dict[str, Any]:
    """Score every generated image of a GenEval-layout directory.

    Each image is scored against its folder's ``attributes`` (or, without them, the attributes parsed
    from the prompt) by :func:`eval.shapes_scorer.score_image`.

    Args:
        clip: a :class:`eval.clip_score.ClipScore` (or any callable ``(images, texts) → (B,)`` tensor); None
            leaves ``clip_score`` out, with ``clip_unavailable`` as the reason.

    Returns:
        :func:`eval.shapes_scorer.aggregate`'s summary over images, plus ``n_prompts``, ``n_images``,
        ``clip_score`` (mean, or None), ``absent`` ({metric: reason}) and ``per_image`` rows.
    """
    from data_pipelines.images import decode_image
    from eval.shapes_scorer import aggregate, score_image

    entries = read_geneval_folder(out_dir)
    rows: list[dict[str, Any]] = []
    clip_scores: list[float] = []
    bar = tqdm(total=sum(len(s) for _, _, s in entries), desc="scoring", unit="img", file=sys.stderr,
               disable=not progress, leave=False)
    for folder, meta, samples in entries:
        truth = meta.get("attributes") or meta["prompt"]
        images = [decode_image(p) for p in samples]
        scores = [score_image(im, truth, tolerance=tolerance, min_area=min_area) for im in images]
        clip_row = [float(v) for v in clip(images, [meta["prompt"]] * len(images))] if clip is not None else None
        for j, (path, sc) in enumerate(zip(samples, scores)):
            row = {"index": folder.name, "sample": path.name, "prompt": meta["prompt"], **sc}
            if clip_row is not None:
                row["clip_score"] = clip_row[j]
                clip_scores.append(clip_row[j])
            rows.append(row)
        bar.update(len(samples))
    bar.close()
    summary = aggregate(rows)
    absent = {}
    if clip is None:
        absent["clip_score"] = clip_unavailable or "no CLIP given"
    return {**summary, "n_prompts": len(entries), "n_images": len(rows),
            "clip_score": sum(clip_scores) / len(clip_scores) if clip_scores else None,
            "absent": absent, "per_image": rows}


def resolve_clip_dir(model_dir: str | os.PathLike, clip_dir: str | os.PathLike | None) -> tuple[Path | None, str | None]:
    """The CLIP directory to score with, or ``(None, reason)``.

    ``clip_dir`` if given; else the CLIP the chat model's SEED tokenizer was trained against (recorded
    in ``seed_tokenizer/seed_stage2.yaml`` by the tokenizer recipe). The tokenizer's own
    ``vision_tower/`` is not enough: it holds the image tower only, and a CLIP score needs both.
    """
    if clip_dir is not None:
        return Path(clip_dir), None
    from eval.tokenizer_metrics import recorded_clip_dir

    tok_dir = Path(model_dir) / "seed_tokenizer"
    recorded = recorded_clip_dir(str(tok_dir)) if tok_dir.is_dir() else None
    if recorded is None:
        return None, f"{tok_dir} records no CLIP directory: pass --clip DIR"
    path = Path(recorded)
    path = path if path.is_absolute() else tok_dir / path
    if not (path / "config.json").is_file():
        return None, f"the recorded CLIP directory {path} is missing: pass --clip DIR"
    return path, None


def format_t2i_metrics(metrics: dict[str, Any]) -> str:
    from eval.shapes_scorer import format_table

    clip = metrics.get("clip_score")
    clip_line = f"CLIP score {clip:.2f}" if clip is not None else f"CLIP score absent: {metrics['absent']['clip_score']}"
    return f"{metrics['n_prompts']} prompts, {metrics['n_images']} images; {clip_line}\n{format_table(metrics)}"


def run_t2i_eval(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, split: str = "test", n: int = 300,
                 samples: int = 1, seed: int = 0, guidance_scale: float = DEFAULT_GUIDANCE,
                 do_sample: bool = True, temperature: float = DEFAULT_TEMPERATURE, top_k: int = 0, clip_dir: str | os.PathLike | None = None,
                 data_dir: str | os.PathLike | None = None, shapes=None, batch_size: int = 16,
                 overwrite: bool = True, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """``seed eval t2i``: generate ``samples`` images for each of ``n`` prompts with the chat model, score them.

    Prompts are the canonical captions of the scenes; batch ``b`` of prompts starting at index ``s``
    samples with seed ``seed + s`` (results do not depend on anything else but the batch size).
    """
    from eval.clip_score import ClipScore
    from eval.scenes import load_scenes
    from llm_adapters.chat import SeedChat

    scenes = load_scenes(split, n, data_dir=data_dir, shapes=shapes, progress=progress)
    chat = SeedChat.from_pretrained(model_dir, device=device)
    where, reason = resolve_clip_dir(model_dir, clip_dir)
    clip = ClipScore.from_pretrained(where, device=device) if where is not None else None
    start = [0]

    def generator(prompts: list[str]) -> list[list[Image.Image]]:
        images = chat.generate_images(prompts, n=samples, seed=seed + start[0], do_sample=do_sample,
                                      temperature=temperature, top_k=top_k, guidance_scale=guidance_scale,
                                      batch_size=batch_size)
        start[0] += len(prompts)
        return images

    metadata = [{"tag": a["kind"], "attributes": a, "id": i} for a, i in zip(scenes.attributes, scenes.ids)]
    write_geneval_folder(generator, scenes.captions, out_dir, metadata=metadata, batch_size=batch_size,
                         overwrite=overwrite, progress=progress)
    result = score_geneval_folder(out_dir, clip=clip, clip_unavailable=reason, progress=progress)
    per_image = result.pop("per_image")
    metrics = {"model": str(model_dir), "split": split if data_dir is None else str(data_dir),
               "samples_per_prompt": samples, "seed": seed, "guidance_scale": guidance_scale,
               "clip_dir": str(where) if where is not None else None, **result}
    out = Path(out_dir)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    with open(out / SCORES_FILE, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in per_image)
    return metrics
