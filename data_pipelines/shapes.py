"""The Shapes world: the embedded default data set (contract: /work/shared/SHAPES.md, "Shapes world v1").

Small scenes of one or two flat-coloured shapes on a white canvas, each with an exact canonical
caption, a few paraphrases and its attributes as structured data, so that captioning and
text-to-image can be scored exactly (see ``eval/shapes_scorer.py``).

Every record is a pure function of ``(config, split, index)``: its random numbers come from a
``numpy.random.SeedSequence(seed, spawn_key=(split_id, index))``, so record ``i`` is computed
directly (no need to generate ``0 … i-1``), ``train``/``validation``/``test`` are disjoint seed
streams, and the same seed and image size give byte-identical images on every machine (PCG64's
stream is fixed across numpy versions and we map its doubles to choices ourselves).

Geometry (every length a fraction of the side ``S``, rounded to the nearest pixel):

* box sides: small ``round(0.22·S)``, large ``round(0.40·S)``; a box is ``[x0, y0, x1, y1]`` in
  half-open pixel bounds, i.e. the shape covers columns ``x0 … x1-1`` and ``x1 - x0`` is the side;
* single object: box centre = centre of one of the 3×3 cells + an integer jitter in
  ``[-round(0.05·S), round(0.05·S)]`` per axis, rounded to the pixel grid and clamped inside the canvas;
* pair: box centres ≥ 0.35·S apart along the relation's axis and ≤ 0.10·S apart along the other
  (both bounds exact, before rounding); additionally (our choice, stricter than the contract) the
  boxes are separated by a clear gap of at least ``round(0.05·S)`` pixels, so two objects of the
  same colour never touch and a scorer always sees two components.

Splits: ``train``, ``validation`` and ``test`` never use a held-out (colour, shape) combination;
every scene of ``compositional`` contains at least one held-out combination (its other object, in
a pair, may be any combination).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from seedtok.errors import ConfigError
from seedtok.schema import ConfigBase, option

# ---- vocabulary (SHAPES.md "Vocabulary"; keep these numbers exact) ----------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (245, 140, 20),
    "yellow": (235, 205, 30),
    "green": (40, 160, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.22, "large": 0.40}  # box side as a fraction of S
# Row-major 3×3 grid: POSITIONS[3 * row + col].
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
JITTER = 0.05  # ± fraction of S added to a single object's cell centre
MIN_APART = 0.35  # pair: box centres at least this far apart along the relation axis
MAX_OFF_AXIS = 0.10  # pair: and at most this far apart along the other axis
MIN_GAP = 0.05  # pair: clear gap between the two boxes (our choice, see module docstring)
IMAGE_SIZES: tuple[int, ...] = (32, 64, 128, 256)
SPLITS: tuple[str, ...] = ("train", "validation", "test", "compositional")
_SPLIT_ID = {name: i for i, name in enumerate(SPLITS)}
COMBINATIONS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)

# Words the paraphrases may use instead of the canonical ones (the scorer's parser knows all of them).
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {"circle": ("circle", "disc"), "square": ("square",),
                                           "triangle": ("triangle",)}
# Position phrases other than the canonical "in the {position}".
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("at the top left", "in the top left corner", "in the upper left", "at the upper left corner"),
    "top": ("at the top", "in the top middle", "near the top"),
    "top right": ("at the top right", "in the top right corner", "in the upper right", "at the upper right corner"),
    "left": ("on the left", "at the left", "in the middle left"),
    "center": ("in the middle", "in the centre", "at the center"),
    "right": ("on the right", "at the right", "in the middle right"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "in the lower left",
                    "at the lower left corner"),
    "bottom": ("at the bottom", "in the bottom middle", "near the bottom"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "in the lower right",
                     "at the lower right corner"),
}
# Relation phrases other than the canonical word.
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "on the left of"),
    "right of": ("to the right of", "on the right of"),
    "above": ("over",),
    "below": ("under", "beneath", "underneath"),
}
N_TEMPLATES = 6  # paraphrase templates per kind (see _paraphrases)


def to_pixels(fraction: float, image_size: int) -> int:
    """``fraction · S`` rounded to the nearest pixel (halves up, unlike Python's banker's ``round``)."""
    return math.floor(fraction * image_size + 0.5)


def box_side(size: str, image_size: int) -> int:
    """Side in pixels of a ``small``/``large`` box: 14 / 26 at S = 64."""
    return to_pixels(SIZES[size], image_size)


def cell_centre(position: str, image_size: int) -> tuple[float, float]:
    """Exact (x, y) centre of a grid cell; cells are S/3 wide."""
    row, col = divmod(POSITIONS.index(position), 3)
    return (col + 0.5) * image_size / 3, (row + 0.5) * image_size / 3


def relation_between(a: tuple[float, float], b: tuple[float, float]) -> str:
    """The relation that reads ``a REL b`` for two (x, y) centres, by the axis they differ most on."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def mirror_attributes(attributes: dict[str, Any], axis: str, image_size: int) -> dict[str, Any]:
    """The scene reflected left↔right (``axis="x"``) or top↔bottom (``axis="y"``): a copy.

    Boxes, grid positions and the relation are reflected; shapes stay upright (a triangle's apex
    stays at the top), so the result is again a scene of this world — the counterfactual that a
    bag-of-objects image embedding cannot tell from the original (used as a hard negative).
    """
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    S = image_size
    flip_rel = {"x": {"left of": "right of", "right of": "left of"},
                "y": {"above": "below", "below": "above"}}[axis]
    out = {"kind": attributes["kind"], "relation": attributes.get("relation"), "objects": []}
    for obj in attributes["objects"]:
        o = dict(obj)
        x0, y0, x1, y1 = obj["box"]
        o["box"] = [S - x1, y0, S - x0, y1] if axis == "x" else [x0, S - y1, x1, S - y0]
        if obj.get("position") is not None:
            row, col = divmod(POSITIONS.index(obj["position"]), 3)
            row, col = (row, 2 - col) if axis == "x" else (2 - row, col)
            o["position"] = POSITIONS[3 * row + col]
        out["objects"].append(o)
    if out["relation"] is not None:
        out["relation"] = flip_rel.get(out["relation"], out["relation"])
    return out


def swap_bindings(attributes: dict[str, Any], what: str) -> dict[str, Any]:
    """A pair scene with the two objects' colours (``what="colour"``) or shapes swapped: a copy.

    Boxes and sizes stay where they are, so the layout is valid; only which attribute goes with
    which object changes (the binding a bag-of-words embedding misses).
    """
    if attributes["kind"] != "pair":
        raise ValueError("swap_bindings needs a pair scene")
    if what not in ("colour", "shape"):
        raise ValueError(f"what must be 'colour' or 'shape', got {what!r}")
    a, b = (dict(o) for o in attributes["objects"])
    a[what], b[what] = b[what], a[what]
    return {"kind": "pair", "relation": attributes["relation"], "objects": [a, b]}


# ---- captions -------------------------------------------------------------------------------

def _noun_phrase(obj: dict[str, Any]) -> str:
    return f"{obj['size']} {obj['colour']} {obj['shape']}"


def canonical_caption(attributes: dict[str, Any]) -> str:
    """``a large red circle in the top left`` / ``a small blue square left of a large yellow triangle``."""
    objs = attributes["objects"]
    if attributes["kind"] == "single":
        return f"a {_noun_phrase(objs[0])} in the {objs[0]['position']}"
    return f"a {_noun_phrase(objs[0])} {attributes['relation']} a {_noun_phrase(objs[1])}"


def ordered_caption(attributes: dict[str, Any]) -> str:
    """The canonical caption with a pair told from its left / top object (``left of`` / ``above``).

    The same scene as :func:`canonical_caption` (the Shapes parser scores both alike), but a pure
    function of what the image shows: the canonical caption's object order follows the relation
    the generator drew, so one image has two equally likely canonical captions.
    """
    if attributes["kind"] == "pair" and attributes["relation"] in ("right of", "below"):
        objs = attributes["objects"]
        attributes = {**attributes, "objects": [objs[1], objs[0]],
                      "relation": INVERSE_RELATION[attributes["relation"]]}
    return canonical_caption(attributes)


def _pick(u: float, options: tuple[Any, ...] | list[Any]) -> Any:
    """Map a uniform draw in [0, 1) to one of ``options``."""
    return options[min(int(u * len(options)), len(options) - 1)]


def _object_text(obj: dict[str, Any], style: int, u: np.ndarray) -> str:
    """A noun phrase for ``obj``: plain, with synonyms, or the comma form ``red circle, large,``."""
    if style == 0:
        return _noun_phrase(obj)
    if style == 1:
        return f"{_pick(u[0], SIZE_WORDS[obj['size']])} {obj['colour']} {_pick(u[1], SHAPE_WORDS[obj['shape']])}"
    return f"{obj['colour']} {obj['shape']}, {obj['size']},"


def _paraphrases(attributes: dict[str, Any], k: int, v: np.ndarray) -> list[str]:
    """``k`` paraphrases from distinct templates; none equals the canonical caption.

    ``v`` holds 32 uniform draws: ``v[:N_TEMPLATES]`` order the templates, the rest pick words.
    The templates differ from each other in structure, so distinct templates give distinct texts.
    """
    objs = attributes["objects"]
    out = []
    for j, t in enumerate(np.argsort(v[:N_TEMPLATES], kind="stable")[:k]):
        w = v[8 + 4 * j: 12 + 4 * j]  # four word choices per paraphrase
        style = int(w[3] < 0.5)  # plain or synonyms (the comma form has templates of its own)
        if attributes["kind"] == "single":
            obj = objs[0]
            o = _object_text(obj, style, w)
            where = _pick(w[2], ("in the " + obj["position"],) + POSITION_PHRASES[obj["position"]])
            if t == 0:
                text = f"a {o} {_pick(w[2], POSITION_PHRASES[obj['position']])}"
            elif t == 1:
                text = f"there is a {o} {where}"
            elif t == 2:
                text = f"{where} there is a {o}"
            elif t == 3:
                text = f"a {_object_text(obj, 2, w)} {where}"
            elif t == 4:
                text = f"a {o} can be seen {where}"
            else:
                text = f"an image of a {o} {where}"
        else:
            rel = attributes["relation"]
            inv = INVERSE_RELATION[rel]
            o0, o1 = _object_text(objs[0], style, w), _object_text(objs[1], style, w[::-1])
            rel_any = _pick(w[2], (rel,) + RELATION_PHRASES[rel])
            if t == 0:
                text = f"a {o0} {_pick(w[2], RELATION_PHRASES[rel])} a {o1}"
            elif t == 1:  # the same scene told from the other object
                text = f"a {o1} {_pick(w[2], (inv,) + RELATION_PHRASES[inv])} a {o0}"
            elif t == 2:
                text = f"there is a {o0} {rel_any} a {o1}"
            elif t == 3:
                text = f"{rel_any} a {o1} there is a {o0}"
            elif t == 4:
                text = f"a {_object_text(objs[0], 2, w)} {rel_any} a {_object_text(objs[1], 2, w)}"
            else:
                text = f"an image of a {o0} {rel_any} a {o1}"
        # "a orange square" → "an orange square" (the canonical caption always starts "a small/large").
        out.append(re.sub(r"\ba (?=[aeiou])", "an ", text.rstrip(",")))
    return out


# ---- config ---------------------------------------------------------------------------------

@dataclass
class ShapesConfig(ConfigBase):
    """How to generate the Shapes world (SHAPES.md); saved as ``shapes_config.yaml`` next to every output."""

    image_size: int = option(64, help="side S of the square canvas in pixels: 32, 64, 128 or 256")
    seed: int = option(0, help="world seed; the same seed and size give byte-identical images")
    pair_fraction: float = option(0.5, help="probability that a scene has two objects and a relation")
    held_out_combinations: list[tuple[str, str]] = option(
        default_factory=list,
        help="(colour, shape) pairs never seen in train/validation/test; only the compositional split uses them",
    )
    n_paraphrases: int = option(3, help=f"paraphrases per record, 0 … {N_TEMPLATES}")

    def __post_init__(self) -> None:
        if self.image_size not in IMAGE_SIZES:
            raise ConfigError(f"image_size must be one of {', '.join(map(str, IMAGE_SIZES))}, got {self.image_size}")
        if self.seed < 0:
            raise ConfigError(f"seed must be ≥ 0, got {self.seed}")
        if not 0.0 <= self.pair_fraction <= 1.0:
            raise ConfigError(f"pair_fraction must be in [0, 1], got {self.pair_fraction}")
        if not 0 <= self.n_paraphrases <= N_TEMPLATES:
            raise ConfigError(f"n_paraphrases must be in [0, {N_TEMPLATES}], got {self.n_paraphrases}")
        for combo in self.held_out_combinations:
            if len(combo) != 2 or combo[0] not in COLOURS or combo[1] not in SHAPES:
                raise ConfigError(
                    f"held-out combination {list(combo)!r} is not [colour, shape] "
                    f"(colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)})"
                )


# ---- the world ------------------------------------------------------------------------------

@dataclass
class ShapesRecord:
    """One scene: ``image`` is an (S, S) RGB PIL image; ``attributes`` is JSON-able (see ShapesWorld)."""

    id: str
    image: Image.Image
    text: str
    paraphrases: list[str]
    attributes: dict[str, Any]


class ShapesWorld:
    """Generates records of the Shapes world; ``record(split, i)`` is a pure function of the config.

    ``attributes`` of a record::

        {"kind": "single" | "pair",
         "objects": [{"colour", "shape", "size", "box": [x0, y0, x1, y1], "position": grid name | None}],
         "relation": "left of" | "right of" | "above" | "below" | None}

    ``position`` is set for a single object (None in a pair); a pair reads ``objects[0] REL objects[1]``.
    """

    def __init__(self, config: ShapesConfig | None = None) -> None:
        self.config = config = config or ShapesConfig()
        S = self.image_size = config.image_size
        held = {tuple(c) for c in config.held_out_combinations}
        self.held_out: tuple[tuple[str, str], ...] = tuple(c for c in COMBINATIONS if c in held)
        self.allowed: tuple[tuple[str, str], ...] = tuple(c for c in COMBINATIONS if c not in held)
        if not self.allowed:
            raise ConfigError("held_out_combinations holds every (colour, shape) combination: train would be empty")
        if config.pair_fraction > 0 and len(self.allowed) < 2:
            raise ConfigError("pairs need two different allowed (colour, shape) combinations; hold out fewer")
        self.sides = {size: box_side(size, S) for size in SIZES}
        self.jitter = to_pixels(JITTER, S)
        self.gap = to_pixels(MIN_GAP, S)
        # Pair placement bounds for each (first side, second side), where "first" is the object with the
        # smaller coordinate along the relation axis. With o = the boxes' top-left corners:
        #   along: d = o2 - o1 ∈ [lo, hi]  (centres ≥ 0.35·S apart, clear gap, both inside the canvas)
        #   across: e = o2' - o1' ∈ [elo, ehi]  (centres ≤ 0.10·S apart)
        # computed with exact fractions so that "≥ 0.35·S" holds with no float slack.
        self._pair_bounds: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        for s1 in self.sides.values():
            for s2 in self.sides.values():
                half_diff = Fraction(s2 - s1, 2)  # centre offset minus origin offset
                lo = max(math.ceil(Fraction(str(MIN_APART)) * S - half_diff), s1 + self.gap)
                hi = S - s2
                elo = math.ceil(-Fraction(str(MAX_OFF_AXIS)) * S - half_diff)
                ehi = math.floor(Fraction(str(MAX_OFF_AXIS)) * S - half_diff)
                if lo > hi:  # cannot happen for the allowed sizes; guards future edits of the numbers
                    raise ConfigError(f"pair geometry infeasible at image_size {S}")
                self._pair_bounds[(s1, s2)] = (lo, hi, elo, ehi)

    # -- sampling ----------------------------------------------------------------------------
    def _rng(self, split: str, index: int) -> np.random.Generator:
        if split not in _SPLIT_ID:
            raise ConfigError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
        if index < 0:
            raise ConfigError(f"record index must be ≥ 0, got {index}")
        if split == "compositional" and not self.held_out:
            raise ConfigError("the compositional split needs held_out_combinations (e.g. [[red, circle]])")
        ss = np.random.SeedSequence(self.config.seed, spawn_key=(_SPLIT_ID[split], index))
        return np.random.Generator(np.random.PCG64(ss))

    def _combos(self, split: str, u: np.ndarray, pair: bool) -> list[tuple[str, str]]:
        """(colour, shape) of each object; a pair never repeats a combination."""
        if split != "compositional":
            first = _pick(u[0], self.allowed)
            if not pair:
                return [first]
            return [first, _pick(u[1], [c for c in self.allowed if c != first])]
        held = _pick(u[0], self.held_out)
        if not pair:
            return [held]
        other = _pick(u[1], [c for c in COMBINATIONS if c != held])
        return [held, other] if u[2] < 0.5 else [other, held]

    def _place_single(self, side: int, position: str, u: np.ndarray) -> list[int]:
        S, J = self.image_size, self.jitter
        cx, cy = cell_centre(position, S)
        jx, jy = _pick(u[0], range(-J, J + 1)), _pick(u[1], range(-J, J + 1))
        x0 = min(max(math.floor(cx + jx - side / 2 + 0.5), 0), S - side)
        y0 = min(max(math.floor(cy + jy - side / 2 + 0.5), 0), S - side)
        return [x0, y0, x0 + side, y0 + side]

    def _place_pair(self, s0: int, s1: int, relation: str, u: np.ndarray) -> tuple[list[int], list[int]]:
        S = self.image_size
        # "first" has the smaller coordinate along the axis: obj0 for left of/above, obj1 otherwise.
        swap = relation in ("right of", "below")
        sa, sb = (s1, s0) if swap else (s0, s1)
        lo, hi, elo, ehi = self._pair_bounds[(sa, sb)]
        d = _pick(u[0], range(lo, hi + 1))
        a = _pick(u[1], range(0, S - sb - d + 1))
        e = _pick(u[2], range(elo, ehi + 1))
        a2 = _pick(u[3], range(max(0, -e), min(S - sa, S - sb - e) + 1))
        along, across = (a, a + d), (a2, a2 + e)
        if relation in ("left of", "right of"):
            first = [along[0], across[0], along[0] + sa, across[0] + sa]
            second = [along[1], across[1], along[1] + sb, across[1] + sb]
        else:
            first = [across[0], along[0], across[0] + sa, along[0] + sa]
            second = [across[1], along[1], across[1] + sb, along[1] + sb]
        return (second, first) if swap else (first, second)

    def scene(self, split: str, index: int) -> tuple[dict[str, Any], np.random.Generator]:
        """The scene's attributes (and the generator, positioned for the paraphrase draws)."""
        rng = self._rng(split, index)
        u = rng.random(16)
        pair = bool(u[0] < self.config.pair_fraction)
        combos = self._combos(split, u[1:4], pair)
        sizes = [_pick(u[4 + i], tuple(SIZES)) for i in range(len(combos))]
        if not pair:
            position = _pick(u[6], POSITIONS)
            box = self._place_single(self.sides[sizes[0]], position, u[7:9])
            objects = [dict(colour=combos[0][0], shape=combos[0][1], size=sizes[0], box=box, position=position)]
            relation = None
        else:
            relation = _pick(u[6], RELATIONS)
            boxes = self._place_pair(self.sides[sizes[0]], self.sides[sizes[1]], relation, u[7:11])
            objects = [dict(colour=c, shape=s, size=z, box=b, position=None)
                       for (c, s), z, b in zip(combos, sizes, boxes)]
        return {"kind": "pair" if pair else "single", "objects": objects, "relation": relation}, rng

    # -- rendering ---------------------------------------------------------------------------
    def render(self, attributes: dict[str, Any]) -> Image.Image:
        """Draw a scene: white (S, S) RGB canvas, filled shapes, no outline."""
        S = self.image_size
        image = Image.new("RGB", (S, S), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for obj in attributes["objects"]:
            x0, y0, x1, y1 = obj["box"]
            fill = COLOURS[obj["colour"]]
            # PIL's bounds are inclusive, ours half-open: the last covered pixel is x1 - 1.
            if obj["shape"] == "circle":
                draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
            elif obj["shape"] == "square":
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
            else:  # apex at the top-centre of the box, base along its bottom edge
                draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
        return image

    # -- records -----------------------------------------------------------------------------
    def record(self, split: str, index: int) -> ShapesRecord:
        """Record ``index`` of ``split`` (computed directly, deterministic)."""
        attributes, rng = self.scene(split, index)
        paraphrases = _paraphrases(attributes, self.config.n_paraphrases, rng.random(32))
        return ShapesRecord(
            id=f"{split}-{index:08d}",
            image=self.render(attributes),
            text=canonical_caption(attributes),
            paraphrases=paraphrases,
            attributes=attributes,
        )

    def generate(self, split: str, n: int, start: int = 0) -> Iterator[ShapesRecord]:
        """Records ``start … start + n - 1`` of ``split``."""
        if n < 0 or start < 0:
            raise ConfigError(f"n and start must be ≥ 0, got n={n}, start={start}")
        for i in range(start, start + n):
            yield self.record(split, i)
