"""The Shapes scorer reads generated images and captions exactly and catches every kind of mistake."""

from __future__ import annotations

import argparse
import copy
import json
from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageFilter

from data_pipelines.shapes import COLOURS, ShapesConfig, ShapesWorld, to_pixels
from data_pipelines.writers import write_shapes
from eval.shapes_scorer import (
    _label_components,
    aggregate,
    detect_scene,
    format_table,
    parse_caption,
    scene_key,
    score_caption,
    score_image,
)
from seedtok.errors import DataError


def _records(n: int, size: int = 64, split: str = "test", **kw):
    return list(ShapesWorld(ShapesConfig(image_size=size, **kw)).generate(split, n))


# ---- image scoring -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64, 128])
def test_generated_images_score_100_percent_strict(size):
    recs = _records(300, size)
    summary = aggregate(score_image(r.image, r.attributes) for r in recs)
    assert summary["n"] == 300 and summary["single"]["n"] + summary["pair"]["n"] == 300
    assert summary["accuracy"] == {k: 1.0 for k in
                                   ("count", "colour", "shape", "size", "position", "relation", "strict")}


def test_256px_and_non_square_images():
    for rec in _records(30, 256):
        assert score_image(rec.image, rec.attributes)["strict"]
    rec = _records(1, 64)[0]
    wide = rec.image.resize((96, 64), Image.NEAREST)  # still readable when the sides differ
    assert detect_scene(wide)["objects"][0]["colour"] == rec.attributes["objects"][0]["colour"]


def test_detect_scene_reads_boxes_exactly():
    for rec in _records(50, 64):
        scene = detect_scene(rec.image)
        assert sorted(o["box"] for o in scene["objects"]) == sorted(o["box"] for o in rec.attributes["objects"])
        assert scene["kind"] == rec.attributes["kind"]


def _first(recs, kind):
    return next(r for r in recs if r.attributes["kind"] == kind)


def test_scorer_catches_moved_recoloured_and_removed_objects():
    world = ShapesWorld()
    recs = list(world.generate("test", 40))
    single, pair = _first(recs, "single"), _first(recs, "pair")

    moved = copy.deepcopy(single.attributes)
    o = moved["objects"][0]
    step = to_pixels(1 / 3, 64) * (1 if o["box"][0] < 32 else -1)  # one cell to the side
    o["box"] = [o["box"][0] + step, o["box"][1], o["box"][2] + step, o["box"][3]]
    s = score_image(world.render(moved), single.attributes)
    assert not s["position"] and not s["strict"] and s["colour"] and s["shape"] and s["size"] and s["count"]

    recoloured = copy.deepcopy(single.attributes)
    old = recoloured["objects"][0]["colour"]
    recoloured["objects"][0]["colour"] = next(c for c in COLOURS if c != old)
    s = score_image(world.render(recoloured), single.attributes)
    assert not s["colour"] and not s["strict"] and s["shape"] and s["position"]

    removed = copy.deepcopy(pair.attributes)
    removed["objects"] = removed["objects"][:1]
    s = score_image(world.render(removed), pair.attributes)
    assert not s["count"] and not s["strict"] and not s["relation"]

    empty = Image.new("RGB", (64, 64), (255, 255, 255))
    assert not any(v for k, v in score_image(empty, single.attributes).items() if k != "kind")

    same_size = next(r for r in recs if r.attributes["kind"] == "pair"
                     and r.attributes["objects"][0]["size"] == r.attributes["objects"][1]["size"])
    swapped = copy.deepcopy(same_size.attributes)  # the two objects trade places: relation reversed
    a, b = swapped["objects"]
    a["box"], b["box"] = b["box"], a["box"]
    s = score_image(world.render(swapped), same_size.attributes)
    assert not s["relation"] and not s["strict"] and s["colour"] and s["shape"] and s["size"] and s["count"]


def test_scorer_catches_wrong_shape_and_size():
    world = ShapesWorld()
    rec = _first(list(world.generate("test", 20)), "single")
    for key, values in (("shape", ("circle", "square", "triangle")), ("size", ("small", "large"))):
        wrong = copy.deepcopy(rec.attributes)
        o = wrong["objects"][0]
        o[key] = next(v for v in values if v != o[key])
        if key == "size":
            side = {"small": 14, "large": 26}[o["size"]]
            x0, y0 = min(o["box"][0], 64 - side), min(o["box"][1], 64 - side)
            o["box"] = [x0, y0, x0 + side, y0 + side]
        s = score_image(world.render(wrong), rec.attributes)
        assert not s[key] and not s["strict"]


def test_mildly_noisy_and_blurred_images_still_score():
    rng = np.random.default_rng(0)
    recs = _records(200, 64)
    scores = []
    for r in recs:
        blurred = np.asarray(r.image.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32)
        noisy = np.clip(blurred + rng.normal(0, 10, blurred.shape), 0, 255).astype(np.uint8)
        scores.append(score_image(noisy, r.attributes))
    assert aggregate(scores)["accuracy"]["strict"] >= 0.95


def test_image_scored_against_a_caption_string():
    for rec in _records(20):
        assert score_image(rec.image, rec.text)["strict"]
        assert score_image(rec.image, rec.paraphrases[0])["strict"]
    with pytest.raises(DataError, match="cannot read"):
        score_image(rec.image, "a photo of a dog")
    with pytest.raises(DataError, match="every attribute"):
        score_image(rec.image, "a red circle")


def test_label_components_matches_a_flood_fill():
    rng = np.random.default_rng(1)
    for _ in range(20):
        classes = rng.integers(-1, 3, size=(17, 23))
        labels = _label_components(classes)
        # reference: breadth-first flood fill, 4-connectivity
        ref = -np.ones_like(classes)
        for y, x in zip(*np.nonzero(classes >= 0)):
            if ref[y, x] >= 0:
                continue
            ref[y, x] = y * 23 + x
            todo = deque([(y, x)])
            while todo:
                cy, cx = todo.popleft()
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < 17 and 0 <= nx < 23 and ref[ny, nx] < 0 and classes[ny, nx] == classes[y, x]:
                        ref[ny, nx] = ref[y, x]
                        todo.append((ny, nx))
        assert np.array_equal(labels, ref)  # both label a component by its first pixel (row-major)


# ---- captions ----------------------------------------------------------------------------------

def test_canonical_captions_and_paraphrases_parse_back():
    recs = _records(600, split="train", n_paraphrases=6)
    for rec in recs:
        key = scene_key(rec.attributes)
        for text in [rec.text, *rec.paraphrases]:
            parsed = parse_caption(text)
            assert parsed is not None and scene_key(parsed) == key, (text, parsed)
            assert score_caption(text, rec.attributes)["strict"], text


def test_parse_caption_examples():
    assert parse_caption("a large red circle in the top left") == {
        "kind": "single", "relation": None,
        "objects": [{"colour": "red", "shape": "circle", "size": "large", "position": "top left"}]}
    assert scene_key(parse_caption("A big red disc, at the upper-left corner of the image.")) == \
        ("single", ("red", "circle", "large"), "top left")
    assert parse_caption("a small green square in the center")["objects"][0]["position"] == "center"
    assert parse_caption("a small green square in the middle left")["objects"][0]["position"] == "left"
    p = parse_caption("to the left of a large yellow triangle there is a small blue square")
    assert p["relation"] == "left of" and p["objects"][0]["colour"] == "blue"
    assert scene_key(parse_caption("a large yellow triangle right of a small blue square")) == scene_key(
        parse_caption("a small blue square left of a large yellow triangle"))
    partial = parse_caption("a red circle")
    assert partial["objects"][0] == {"colour": "red", "shape": "circle", "size": None, "position": None}
    for bad in ("", "a photo of a dog", "a red circle, a blue square and a green triangle",
                "a large small red circle in the top", "a red circle a blue square",
                "a red circle left of a blue square above a green triangle"):
        assert parse_caption(bad) is None, bad


def test_score_caption_catches_each_wrong_attribute():
    single = {"kind": "single", "relation": None,
              "objects": [{"colour": "red", "shape": "circle", "size": "large", "position": "top left", "box": None}]}
    pair = {"kind": "pair", "relation": "left of", "objects": [
        {"colour": "blue", "shape": "square", "size": "small", "position": None},
        {"colour": "yellow", "shape": "triangle", "size": "large", "position": None}]}
    assert score_caption("a large red circle in the top left", single)["strict"]
    for text, wrong in [("a large blue circle in the top left", "colour"),
                        ("a large red square in the top left", "shape"),
                        ("a small red circle in the top left", "size"),
                        ("a large red circle in the top right", "position")]:
        s = score_caption(text, single)
        assert not s[wrong] and not s["strict"] and s["parsed"]
        assert all(s[k] for k in ("count", "colour", "shape", "size", "position") if k != wrong), text
    assert score_caption("a large yellow triangle to the right of a small blue square", pair)["strict"]
    s = score_caption("a small blue square right of a large yellow triangle", pair)
    assert not s["relation"] and s["colour"] and s["shape"] and s["size"]
    s = score_caption("a small blue square", pair)
    assert not s["count"] and not s["strict"]
    s = score_caption("gibberish", pair)
    assert not s["parsed"] and not s["strict"]


def test_aggregate_and_table():
    rows = [
        {"kind": "single", "count": True, "colour": True, "shape": True, "size": True, "position": True, "strict": True},
        {"kind": "single", "count": True, "colour": False, "shape": True, "size": True, "position": True,
         "strict": False},
        {"kind": "pair", "count": True, "colour": True, "shape": True, "size": True, "relation": False,
         "strict": False},
    ]
    out = aggregate(rows)
    assert out["n"] == 3 and out["accuracy"]["colour"] == pytest.approx(2 / 3)
    assert out["accuracy"]["position"] == 1.0 and out["accuracy"]["relation"] == 0.0
    assert out["single"]["accuracy"]["strict"] == 0.5 and out["pair"]["n"] == 1
    table = format_table(out)
    assert "strict" in table and "0.333" in table


# ---- CLI ---------------------------------------------------------------------------------------

def test_eval_cli_scores_an_image_folder(tmp_path, capsys):
    from eval import cli

    out = write_shapes(tmp_path / "data", "test", 60, progress=False)
    # damage one image: paint every object in a colour it does not have → colour wrong for that scene
    row = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    first = out / row["file_name"]
    arr = np.asarray(Image.open(first).convert("RGB")).copy()
    used = {o["colour"] for o in row["attributes"]["objects"]}
    arr[(arr != 255).any(-1)] = COLOURS[next(c for c in COLOURS if c not in used)]
    Image.fromarray(arr).save(first)

    parser = argparse.ArgumentParser(prog="seed")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "shapes", str(out), "--json", str(tmp_path / "scores.json")])
    assert args.func(args) == 0
    result = json.loads((tmp_path / "scores.json").read_text())
    assert result["n"] == 60 and len(result["per_image"]) == 60
    assert result["accuracy"]["strict"] == pytest.approx(59 / 60)
    assert "strict" in capsys.readouterr().out

    args = parser.parse_args(["eval", "shapes", str(tmp_path)])
    with pytest.raises(DataError, match="metadata.jsonl"):
        args.func(args)
