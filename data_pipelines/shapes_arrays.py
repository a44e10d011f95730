"""A split of the Shapes world as arrays in memory, cached on disk for the training recipes.

Recipes on the embedded default train on tens of thousands of 64-px scenes; rendering them is
fast (thousands a second) but re-rendering for every stage and every resumed run is waste, so
:func:`load_shapes_arrays` renders a split once into an ``.npz`` (uint8 pixels + captions +
attributes as JSON) keyed by the generator config, and reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from data_pipelines.shapes import ShapesConfig, ShapesWorld


@dataclass
class ShapesArrays:
    """``n`` scenes of one split.

    Attributes:
        images: uint8 (n, S, S, 3).
        captions: canonical captions, n strings.
        paraphrases: n lists of paraphrases.
        attributes: n structured attribute dicts (SHAPES.md).
        ids: n record ids.
    """

    images: np.ndarray
    captions: list[str]
    paraphrases: list[list[str]]
    attributes: list[dict[str, Any]]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def texts(self, i: int) -> list[str]:
        """The canonical caption followed by its paraphrases."""
        return [self.captions[i], *self.paraphrases[i]]

    def pil(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i])


def _cache_key(config: ShapesConfig, split: str, n: int, start: int) -> str:
    blob = json.dumps({"cfg": config.to_dict(), "split": split, "n": n, "start": start, "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def render_shapes_arrays(config: ShapesConfig, split: str, n: int, start: int = 0, progress: bool = True) -> ShapesArrays:
    world = ShapesWorld(config)
    s = config.image_size
    images = np.empty((n, s, s, 3), dtype=np.uint8)
    captions, paraphrases, attributes, ids = [], [], [], []
    it = world.generate(split, n, start=start)
    for i, rec in enumerate(tqdm(it, total=n, desc=f"shapes {split}", disable=not progress, leave=False)):
        images[i] = np.asarray(rec.image, dtype=np.uint8)
        captions.append(rec.text)
        paraphrases.append(list(rec.paraphrases))
        attributes.append(rec.attributes)
        ids.append(rec.id)
    return ShapesArrays(images, captions, paraphrases, attributes, ids)


def load_shapes_arrays(
    config: ShapesConfig,
    split: str,
    n: int,
    *,
    start: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ShapesArrays:
    """Render (or load from ``cache_dir``) ``n`` scenes of ``split``."""
    if cache_dir is None:
        return render_shapes_arrays(config, split, n, start, progress)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"shapes_{split}_{n}_{_cache_key(config, split, n, start)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return ShapesArrays(z["images"], meta["captions"], meta["paraphrases"], meta["attributes"], meta["ids"])
    arr = render_shapes_arrays(config, split, n, start, progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(
        {"captions": arr.captions, "paraphrases": arr.paraphrases, "attributes": arr.attributes, "ids": arr.ids}
    )
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, images=arr.images, meta=np.array(meta))
    os.replace(tmp, path)
    return arr
