"""The scenes an eval runs on: a Shapes split rendered from its config, or an image folder already on disk.

Both give a :class:`~data_pipelines.shapes_arrays.ShapesArrays` (uint8 images, canonical captions,
paraphrases, attributes, ids), so the caption, text-to-image and tokenizer evals share one input.
An image folder is what ``seed data shapes`` (and the demo's ``data`` stage) writes: PNGs plus
``metadata.jsonl`` rows ``{file_name, text, paraphrases, attributes}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from data_pipelines.shapes import ShapesConfig
from data_pipelines.shapes_arrays import ShapesArrays, load_shapes_arrays
from seedtok.errors import DataError


def load_folder_scenes(folder: str | os.PathLike, n: int | None = None) -> ShapesArrays:
    """The first ``n`` rows (all if None) of an image folder with Shapes ``metadata.jsonl``."""
    from data_pipelines.images import decode_image

    root = Path(folder)
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(f"{meta} not found (expected an image folder written by `seed data shapes`)")
    rows = []
    for line_no, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{meta}:{line_no}: not valid JSON") from None
        if not isinstance(row, dict) or not {"file_name", "text", "attributes"} <= row.keys():
            raise DataError(f"{meta}:{line_no}: needs file_name, text and attributes")
        rows.append(row)
        if n is not None and len(rows) == n:
            break
    if not rows:
        raise DataError(f"{meta} has no rows")
    images = [np.asarray(decode_image(root / r["file_name"]).convert("RGB"), dtype=np.uint8) for r in rows]
    if len({im.shape for im in images}) != 1:
        raise DataError(f"{root}: the images differ in size")
    return ShapesArrays(
        images=np.stack(images),
        captions=[r["text"] for r in rows],
        paraphrases=[list(r.get("paraphrases") or []) for r in rows],
        attributes=[r["attributes"] for r in rows],
        ids=[str(r.get("id", Path(r["file_name"]).stem)) for r in rows],
    )


def head(scenes: ShapesArrays, k: int) -> ShapesArrays:
    """The first ``k`` scenes."""
    return ShapesArrays(scenes.images[:k], scenes.captions[:k], scenes.paraphrases[:k], scenes.attributes[:k],
                        scenes.ids[:k])


def load_scenes(split: str = "test", n: int = 300, *, data_dir: str | os.PathLike | None = None,
                shapes: ShapesConfig | None = None, progress: bool = True) -> ShapesArrays:
    """``n`` scenes from ``data_dir`` if given, else rendered from ``shapes`` (default config) and ``split``."""
    if n < 1:
        raise DataError(f"the number of scenes must be ≥ 1, got {n}")
    if data_dir is not None:
        return load_folder_scenes(data_dir, n)
    return load_shapes_arrays(shapes or ShapesConfig(), split, n, progress=progress)
