"""Exact GenEval-style scoring on the Shapes world (contract: /work/shared/SHAPES.md, "Scoring").

Two directions:

* **image → attributes** (text-to-image): :func:`detect_scene` finds, for every palette colour, the
  pixels nearest to it (within ``tolerance`` in RGB, and nearer to it than to the white background),
  labels their 4-connected components, keeps those of at least ``min_area·S²`` pixels and reads each
  one's shape from its fill ratio of its bounding box (triangle ≈ 1/2, circle ≈ π/4, square ≈ 1),
  its size from its box side, its position from its centroid's grid cell and a pair's relation from
  the two centroids. :func:`score_image` compares that with the truth.
* **caption → attributes** (captioning): :func:`parse_caption` reads the vocabulary (canonical words
  and the paraphrases' synonyms, any word order the paraphrase templates use) and
  :func:`score_caption` compares it with the truth; ``A left of B`` equals ``B right of A``.

Scores are per-scene booleans — ``count``, ``colour``, ``shape``, ``size``, ``position`` (single) or
``relation`` (pair), and ``strict`` (all of them) — averaged by :func:`aggregate`.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines.shapes import (
    BACKGROUND,
    COLOURS,
    INVERSE_RELATION,
    POSITIONS,
    SHAPES,
    SIZES,
    relation_between,
)
from seedtok.errors import DataError

ATTRIBUTES = ("count", "colour", "shape", "size", "position", "relation", "strict")
# Fill ratio of the bounding box: triangle 1/2, circle π/4, square 1 (PIL's drawings measure
# 0.50–0.54, 0.75–0.79 and 1.0 at the world's sizes). Triangle | circle splits halfway; circle | square
# splits at 0.86 rather than halfway (0.89) because blur rounds a square's corners and lowers its fill
# (to ~0.83 for a small square blurred by σ = 1.5 px at 64 px) while a circle's stays at most π/4.
TRIANGLE_CIRCLE_FILL = (0.5 + math.pi / 4) / 2  # ≈ 0.64
CIRCLE_SQUARE_FILL = 0.86
SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2  # box side / S between small and large

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (6, 3)
_NAMES = tuple(COLOURS)


# ---- image → scene --------------------------------------------------------------------------

def _label_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal, non-negative ``classes`` (H, W) → labels (H, W), -1 outside.

    A vectorised union-find (hook the larger root under the smaller, then pointer-jump to the roots)
    over the edges between equal neighbours; labels are the flat index of each component's first
    pixel. Written here because scipy.ndimage.label is the only well-kept labeller and scipy is not a
    dependency of the toolkit; a Python flood fill would be ~100× slower at 256 px.
    """
    H, W = classes.shape
    idx = np.arange(H * W).reshape(H, W)
    same_h = (classes[:, 1:] == classes[:, :-1]) & (classes[:, 1:] >= 0)
    same_v = (classes[1:, :] == classes[:-1, :]) & (classes[1:, :] >= 0)
    p = np.concatenate([idx[:, :-1][same_h], idx[:-1, :][same_v]])
    q = np.concatenate([idx[:, 1:][same_h], idx[1:, :][same_v]])
    parent = np.arange(H * W)
    while True:
        rp, rq = parent[p], parent[q]
        differ = rp != rq
        if not differ.any():
            break
        rp, rq = rp[differ], rq[differ]
        np.minimum.at(parent, np.maximum(rp, rq), np.minimum(rp, rq))  # parent[i] ≤ i: no cycles
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return np.where(classes.ravel() >= 0, parent, -1).reshape(H, W)


def _classify_pixels(rgb: np.ndarray, tolerance: float) -> np.ndarray:
    """(H, W, 3) uint8 → (H, W) palette index, or -1 for background / no palette colour near enough.

    A pixel is read as a mix ``white + t·(colour - white)`` of the background and the nearest palette
    colour (nearest to the segment between them, so a blurred orange edge stays orange rather than
    drifting to yellow). It belongs to the colour when the colour covers at least half of it
    (``t ≥ 0.5``: a blurred edge neither grows nor shrinks the shape) and it lies within
    ``tolerance`` of the segment.
    """
    white = np.array(BACKGROUND, dtype=np.float32)
    v = _PALETTE - white  # (6, 3) directions from white to each colour
    vv = (v * v).sum(-1)  # (6,)
    q = rgb.reshape(-1, 3).astype(np.float32) - white  # (N, 3)
    qq = (q * q).sum(-1)  # (N,)
    # t ≥ 0.5 needs |q| ≥ |v|/2 (Cauchy–Schwarz): skip the (mostly white) rest exactly, for speed.
    cand = np.flatnonzero(qq >= 0.25 * vv.min())
    q, qq = q[cand], qq[cand, None]
    qv = q @ v.T  # (M, 6)
    t = np.clip(qv / vv, 0.0, 1.0)  # (M, 6) coverage of each colour
    d2 = qq - 2 * t * qv + t * t * vv  # (M, 6) |q - t·v|²: distance to each colour's segment
    nearest = d2.argmin(-1)
    rows = np.arange(len(q))
    ok = (t[rows, nearest] >= 0.5) & (d2[rows, nearest] <= tolerance**2)
    out = np.full(rgb.shape[0] * rgb.shape[1], -1, dtype=np.int64)
    out[cand[ok]] = nearest[ok]
    return out.reshape(rgb.shape[:2])


def detect_scene(
    image: Image.Image | np.ndarray, *, tolerance: float = 80.0, min_area: float = 0.01
) -> dict[str, Any]:
    """Read the objects of a Shapes image.

    Args:
        image: PIL image or (H, W, 3) uint8 array, any side from 32 to 256 (need not be square).
        tolerance: largest RGB distance from a pixel to its nearest palette colour.
        min_area: smallest component kept, as a fraction of W·H (0.01 → 41 px at 64², while the
            smallest object, a small triangle, covers ≈ 100).

    Returns:
        ``{"kind": "single"|"pair"|"none"|"many", "objects": [...], "relation": str | None}``; each
        object has colour, shape, size, box (half-open), position (grid cell of its centroid),
        centroid (x, y) and area, largest first. ``relation`` reads objects[0] REL objects[1] for two.
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DataError(f"expected an RGB image, got an array of shape {rgb.shape}")
    H, W = rgb.shape[:2]
    S = (H + W) / 2
    classes = _classify_pixels(rgb, tolerance)
    labels = _label_components(classes)
    flat = labels.ravel()
    fg = np.flatnonzero(flat >= 0)
    roots, inverse, counts = np.unique(flat[fg], return_inverse=True, return_counts=True)
    objects = []
    for k in np.flatnonzero(counts >= min_area * H * W):
        pix = fg[inverse == k]
        ys, xs = np.divmod(pix, W)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        fill = counts[k] / ((x1 - x0) * (y1 - y0))
        shape = "triangle" if fill < TRIANGLE_CIRCLE_FILL else "circle" if fill < CIRCLE_SQUARE_FILL else "square"
        side = ((x1 - x0) + (y1 - y0)) / 2
        cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5  # pixel centres
        col, row = min(int(3 * cx / W), 2), min(int(3 * cy / H), 2)
        objects.append({
            "colour": _NAMES[classes.ravel()[roots[k]]],
            "shape": shape,
            "size": "small" if side < SIZE_THRESHOLD * S else "large",
            "box": [x0, y0, x1, y1],
            "position": POSITIONS[3 * row + col],
            "centroid": (cx, cy),
            "area": int(counts[k]),
        })
    objects.sort(key=lambda o: -o["area"])
    kind = {0: "none", 1: "single", 2: "pair"}.get(len(objects), "many")
    relation = relation_between(objects[0]["centroid"], objects[1]["centroid"]) if kind == "pair" else None
    return {"kind": kind, "objects": objects, "relation": relation}


def _quote(value: Any, limit: int = 80) -> str:
    """``repr`` shortened: an error message quoting a 100k-character caption must stay one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _as_attributes(truth: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(truth, str):
        parsed = parse_caption(truth)
        if parsed is None:
            raise DataError(f"cannot read Shapes attributes from the caption {_quote(truth)}")
        missing = [k for o in parsed["objects"] for k in ("colour", "shape", "size") if o[k] is None]
        if missing or (parsed["kind"] == "single" and parsed["objects"][0]["position"] is None):
            raise DataError(f"the caption {_quote(truth)} does not name every attribute of its scene")
        return parsed
    if not isinstance(truth, dict) or truth.get("kind") not in ("single", "pair") or not isinstance(
        truth.get("objects"), list | tuple
    ) or len(truth["objects"]) != (1 if truth.get("kind") == "single" else 2):
        raise DataError(f"not Shapes attributes: {_quote(truth)}")
    return truth


def _match(expected: Sequence[dict], found: Sequence[dict | None]) -> int:
    """Number of colour/shape/size agreements between aligned objects."""
    return sum(
        f is not None and e.get(a) is not None and e[a] == f.get(a)
        for e, f in zip(expected, found)
        for a in ("colour", "shape", "size")
    )


def _score(kind: str, expected: list[dict], found: list[dict | None], relation_ok: bool | None,
           count_ok: bool) -> dict[str, Any]:
    """Per-scene booleans: an attribute is right when it is right for every object."""
    scores: dict[str, Any] = {"kind": kind, "count": count_ok}
    for a in ("colour", "shape", "size"):
        scores[a] = all(f is not None and e[a] == f.get(a) for e, f in zip(expected, found))
    if kind == "single":
        scores["position"] = found[0] is not None and expected[0]["position"] == found[0].get("position")
    else:
        scores["relation"] = bool(relation_ok)
    scores["strict"] = all(v for k, v in scores.items() if k != "kind")
    return scores


def score_image(
    image: Image.Image | np.ndarray, truth: dict[str, Any] | str, *, tolerance: float = 80.0,
    min_area: float = 0.01,
) -> dict[str, Any]:
    """Score a (generated) image against a scene's attributes, or against a caption (parsed first).

    The detected objects are aligned with the expected ones to agree on the most attributes; extra
    or missing objects make ``count`` (and so ``strict``) false.
    """
    truth = _as_attributes(truth)
    scene = detect_scene(image, tolerance=tolerance, min_area=min_area)
    expected, detected = truth["objects"], scene["objects"][:6]  # extras beyond 6 cannot all match
    count_ok = len(scene["objects"]) == len(expected)
    if truth["kind"] == "single":
        best = max(detected, key=lambda d: (_match(expected, [d]), d["position"] == expected[0]["position"]),
                   default=None)
        return _score("single", expected, [best], None, count_ok)
    candidates: list[tuple[dict | None, dict | None]] = list(itertools.permutations(detected, 2))
    candidates += [(d, None) for d in detected] + [(None, d) for d in detected] + [(None, None)]

    def merit(c: tuple[dict | None, dict | None]) -> tuple[int, bool]:
        rel_ok = None not in c and relation_between(c[0]["centroid"], c[1]["centroid"]) == truth["relation"]
        return _match(expected, list(c)) + rel_ok, rel_ok

    best_pair = max(candidates, key=merit)
    return _score("pair", expected, list(best_pair), merit(best_pair)[1], count_ok)


# ---- caption → attributes -------------------------------------------------------------------

# Words the parser accepts for each value (canonical first). Unknown words are ignored.
_COLOUR_WORDS = {c: c for c in COLOURS} | {"violet": "purple"}
_SHAPE_WORDS = {s: s for s in SHAPES} | {"disc": "circle", "disk": "circle", "ball": "circle",
                                         "dot": "circle", "box": "square"}
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small",
               "large": "large", "big": "large", "huge": "large"}
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left": "left", "right": "right"}
_CENTRE = {"center", "centre", "middle", "central"}
# Relation phrases as token tuples, longest first so "to the left of" wins over "left of".
_RELATION_PHRASES: list[tuple[tuple[str, ...], str]] = sorted(
    [
        (tuple(phrase.split()), rel)
        for phrase, rel in [
            ("to the left of", "left of"), ("on the left of", "left of"), ("left of", "left of"),
            ("to the right of", "right of"), ("on the right of", "right of"), ("right of", "right of"),
            ("on top of", "above"), ("above", "above"), ("over", "above"),
            ("below", "below"), ("under", "below"), ("beneath", "below"), ("underneath", "below"),
        ]
    ],
    key=lambda p: -len(p[0]),
)
# "... in the top left of the image" names a position, not a relation to another object.
_FRAME = re.compile(r"\b(?:left|right)\s+(?:side\s+)?of\s+(?:the\s+)?(?:image|picture|canvas|frame|scene|photo)\b")


def _tokens(text: str) -> list[str]:
    text = text.lower().replace("-", " ")
    text = _FRAME.sub(lambda m: m.group(0).split()[0], text)
    return re.findall(r"[a-z]+|,", text)


def parse_caption(text: str) -> dict[str, Any] | None:
    """Attributes named by a caption, or None when it cannot be read as a Shapes scene.

    Returns ``{"kind", "objects": [{"colour", "shape", "size", "position"}], "relation"}`` like a
    record's attributes without boxes; an attribute the caption leaves out is None. None is returned
    for no object, more than two, an object given two values of one attribute, a pair without
    exactly one relation, or a single object with contradictory position words.
    """
    toks = _tokens(text)
    objects: list[dict[str, Any]] = []
    pending: dict[str, Any] = {}
    after: dict[str, Any] | None = None  # the object whose "…, large," may still follow its noun
    relations: list[str] = []
    relation_first = False
    pos_words: list[str] = []

    def put(obj: dict[str, Any], key: str, value: str) -> bool:
        if obj.get(key) not in (None, value):
            return False
        obj[key] = value
        return True

    def close() -> None:
        nonlocal pending
        if pending:
            objects.append(pending)
            pending = {}

    i = 0
    while i < len(toks):
        tok = toks[i]
        phrase = next((p for p in _RELATION_PHRASES if tuple(toks[i:i + len(p[0])]) == p[0]), None)
        if phrase is not None:
            close()
            relation_first |= not objects
            relations.append(phrase[1])
            after = None
            i += len(phrase[0])
            continue
        i += 1
        if tok == ",":
            continue
        if tok in _COLOUR_WORDS or tok in _SIZE_WORDS:
            key, value = ("colour", _COLOUR_WORDS[tok]) if tok in _COLOUR_WORDS else ("size", _SIZE_WORDS[tok])
            if after is not None and after.get(key) is None:
                after[key] = value  # "a red circle, large": the size follows the noun
                continue
            after = None
            if not put(pending, key, value):
                return None
        elif tok in _SHAPE_WORDS:
            if not put(pending, "shape", _SHAPE_WORDS[tok]):
                return None
            after = pending
            close()
        else:
            after = None
            if tok in _VERTICAL or tok in _HORIZONTAL or tok in _CENTRE:
                pos_words.append(tok)
    close()
    if not 1 <= len(objects) <= 2:
        return None
    for obj in objects:
        for key in ("colour", "shape", "size"):
            obj.setdefault(key, None)
        obj["position"] = None
    if len(objects) == 1:
        if relations:
            return None
        vertical = {_VERTICAL[w] for w in pos_words if w in _VERTICAL}
        horizontal = {_HORIZONTAL[w] for w in pos_words if w in _HORIZONTAL}
        if len(vertical) > 1 or len(horizontal) > 1:
            return None
        name = " ".join([*vertical, *horizontal]) or ("center" if any(w in _CENTRE for w in pos_words) else None)
        objects[0]["position"] = name
        return {"kind": "single", "objects": objects, "relation": None}
    if len(relations) != 1:
        return None
    if relation_first:  # "left of a yellow triangle there is a blue square": the subject comes second
        objects.reverse()
    return {"kind": "pair", "objects": objects, "relation": relations[0]}


def score_caption(text: str, truth: dict[str, Any]) -> dict[str, Any]:
    """Score a caption against a scene's attributes (``parsed`` is False when it cannot be read).

    For a pair, ``A REL B`` and ``B inverse(REL) A`` are the same scene: both alignments are tried.
    """
    truth = _as_attributes(truth)
    expected = truth["objects"]
    parsed = parse_caption(text)
    if parsed is None:
        scores = _score(truth["kind"], expected, [None] * len(expected), False, False)
        return {**scores, "parsed": False}
    count_ok = len(parsed["objects"]) == len(expected)
    found: list[dict | None] = [*parsed["objects"], None][: len(expected)]
    if truth["kind"] == "single":
        return {**_score("single", expected, found, None, count_ok), "parsed": True}
    if not count_ok:
        return {**_score("pair", expected, found, False, False), "parsed": True}
    straight = (found, parsed["relation"] == truth["relation"])
    swapped = (found[::-1], parsed["relation"] == INVERSE_RELATION[truth["relation"]])
    aligned, rel_ok = max((straight, swapped), key=lambda c: _match(expected, c[0]) + c[1])
    return {**_score("pair", expected, aligned, rel_ok, True), "parsed": True}


def scene_key(attributes: dict[str, Any]) -> tuple:
    """A hashable normal form: equal for captions/scenes with the same attributes (boxes ignored)."""
    objs = [(o["colour"], o["shape"], o["size"]) for o in attributes["objects"]]
    if attributes["kind"] == "single":
        return ("single", objs[0], attributes["objects"][0]["position"])
    rel = attributes["relation"]
    if rel in ("right of", "below"):
        objs, rel = objs[::-1], INVERSE_RELATION[rel]
    return ("pair", *objs, rel)


# ---- aggregation ----------------------------------------------------------------------------

def aggregate(scores: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each boolean over the scenes that have it, overall and split by single/pair.

    Returns ``{"n": int, "accuracy": {attr: float}, "single": {...}, "pair": {...}}``, where each
    part holds ``n`` and its accuracies (``position`` only over singles, ``relation`` only over pairs).
    """
    scores = list(scores)

    def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
        acc = {}
        for a in ATTRIBUTES + ("parsed",):
            vals = [bool(r[a]) for r in rows if a in r]
            if vals:
                acc[a] = sum(vals) / len(vals)
        return {"n": len(rows), "accuracy": acc}

    out = summary(scores)
    for kind in ("single", "pair"):
        out[kind] = summary([r for r in scores if r.get("kind") == kind])
    return out


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table of :func:`aggregate`'s output: one row per attribute, columns all/single/pair."""
    cols = [("all", summary), ("single", summary["single"]), ("pair", summary["pair"])]
    lines = [f"{'attribute':<10}" + "".join(f"{name:>10}" for name, _ in cols),
             f"{'n':<10}" + "".join(f"{part['n']:>10}" for _, part in cols)]
    for a in ATTRIBUTES + ("parsed",):
        if a not in summary["accuracy"]:
            continue
        cells = [part["accuracy"].get(a) for _, part in cols]
        lines.append(f"{a:<10}" + "".join(f"{'-':>10}" if c is None else f"{c:>10.3f}" for c in cells))
    return "\n".join(lines)


def score_folder(
    folder: str | os.PathLike,
    *,
    tolerance: float = 80.0,
    min_area: float = 0.01,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every image of an image folder against its ``metadata.jsonl`` truth.

    Rows need ``file_name`` and ``attributes`` (or a caption in ``text``). Returns the
    :func:`aggregate` summary plus ``per_image`` scores. A missing folder, malformed row or
    unreadable image is a :class:`~seedtok.errors.DataError` naming it.
    """
    import json
    import sys
    from pathlib import Path

    from tqdm.auto import tqdm

    from data_pipelines.images import decode_image

    root = Path(folder)
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(f"{meta} not found (expected an image folder with metadata.jsonl)")
    rows = []
    # Bytes that are not UTF-8 become U+FFFD: a bad caption then fails to parse and is named, not
    # the whole file refused with a codec error.
    for line_no, line in enumerate(meta.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{meta}:{line_no}: not valid JSON") from None
        if not isinstance(row, dict) or "file_name" not in row or not ("attributes" in row or "text" in row):
            raise DataError(f"{meta}:{line_no}: needs file_name and attributes (or text)")
        rows.append((line_no, row))
    if not rows:
        raise DataError(f"{meta} has no rows")
    per_image = []
    for line_no, row in tqdm(rows, desc="scoring", unit="img", file=sys.stderr, disable=not progress, leave=False):
        image = decode_image(root / str(row["file_name"]))
        truth = row.get("attributes") or row["text"]
        try:
            scores = score_image(image, truth, tolerance=tolerance, min_area=min_area)
        except DataError as e:
            raise DataError(f"{meta}:{line_no}: {e}") from None
        per_image.append({"file_name": row["file_name"], **scores})
    return {**aggregate(per_image), "per_image": per_image}
