"""The Shapes world follows SHAPES.md exactly: geometry, colours, captions, splits, determinism, writers, CLI."""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from data_pipelines.shapes import (
    COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    ShapesConfig,
    ShapesWorld,
    canonical_caption,
    cell_centre,
    ordered_caption,
)
from data_pipelines.writers import write_shapes
from seedtok.errors import ConfigError, DataError

SIDES = {32: (7, 13), 64: (14, 26), 128: (28, 51), 256: (56, 102)}  # round(0.22·S), round(0.40·S)
JITTER = {32: 2, 64: 3, 128: 6, 256: 13}  # round(0.05·S)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---- determinism ---------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_images_and_records():
    a, b = ShapesWorld(ShapesConfig(seed=7)), ShapesWorld(ShapesConfig(seed=7))
    for i in range(20):
        ra, rb = a.record("train", i), b.record("train", i)
        assert png_bytes(ra.image) == png_bytes(rb.image)
        assert (ra.id, ra.text, ra.paraphrases, ra.attributes) == (rb.id, rb.text, rb.paraphrases, rb.attributes)


def test_record_is_computed_directly_and_matches_generate():
    world = ShapesWorld()
    streamed = list(world.generate("validation", 5, start=40))
    assert [r.id for r in streamed] == [f"validation-{i:08d}" for i in range(40, 45)]
    for r in streamed:
        direct = world.record("validation", int(r.id.split("-")[1]))
        assert direct.image.tobytes() == r.image.tobytes() and direct.attributes == r.attributes


def test_different_seed_or_split_gives_different_images():
    base = [ShapesWorld(ShapesConfig(seed=0)).record("train", i).image.tobytes() for i in range(20)]
    other_seed = [ShapesWorld(ShapesConfig(seed=1)).record("train", i).image.tobytes() for i in range(20)]
    other_split = [ShapesWorld(ShapesConfig(seed=0)).record("test", i).image.tobytes() for i in range(20)]
    assert sum(x != y for x, y in zip(base, other_seed)) >= 18
    assert sum(x != y for x, y in zip(base, other_split)) >= 18
    # Disjoint streams: scene i of train and of test are unrelated draws. (Identical single scenes
    # still recur by chance across and within splits: the single-object state space is ~16k scenes.)
    w = ShapesWorld()
    assert sum(w.scene("train", i)[0] != w.scene("test", i)[0] for i in range(200)) >= 195


# ---- spec conformance ------------------------------------------------------------------------------

def _check_record(rec, S: int) -> None:
    img = np.asarray(rec.image)
    assert rec.image.mode == "RGB" and img.shape == (S, S, 3)
    attrs = rec.attributes
    objs = attrs["objects"]
    small, large = SIDES[S]
    inside = np.zeros((S, S), bool)
    for o in objs:
        x0, y0, x1, y1 = o["box"]
        assert all(isinstance(v, int) for v in o["box"])
        assert 0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S
        assert x1 - x0 == y1 - y0 == {"small": small, "large": large}[o["size"]]
        assert o["colour"] in COLOURS and o["shape"] in SHAPES
        # exact RGB at the box centre, and the drawn object fills its box exactly (bounding box)
        assert tuple(img[(y0 + y1) // 2, (x0 + x1) // 2]) == COLOURS[o["colour"]]
        region = np.zeros((S, S), bool)
        region[y0:y1, x0:x1] = True
        drawn = (img == COLOURS[o["colour"]]).all(-1) & region
        ys, xs = np.nonzero(drawn)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == o["box"]
        fill = drawn.sum() / (x1 - x0) ** 2
        expected_fill = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}[o["shape"]]
        assert abs(fill - expected_fill) < 0.05, (o, fill)
        if o["shape"] == "triangle":  # apex on the top row, centred; base along the bottom row
            top, bottom = np.nonzero(drawn[y0])[0], np.nonzero(drawn[y1 - 1])[0]
            assert len(top) <= 2 and abs(top.mean() + 0.5 - (x0 + x1) / 2) <= 0.5
            assert bottom.min() == x0 and bottom.max() == x1 - 1
        inside |= region
    assert (img[~inside] == 255).all(), "pixels outside every box must be white"

    if attrs["kind"] == "single":
        (o,) = objs
        assert attrs["relation"] is None and o["position"] in POSITIONS
        cx, cy = cell_centre(o["position"], S)
        bx, by = (o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2
        assert abs(bx - cx) <= JITTER[S] + 0.5 and abs(by - cy) <= JITTER[S] + 0.5
        assert rec.text == f"a {o['size']} {o['colour']} {o['shape']} in the {o['position']}"
    else:
        a, b = objs
        assert attrs["relation"] in RELATIONS and a["position"] is None and b["position"] is None
        assert (a["colour"], a["shape"]) != (b["colour"], b["shape"])
        ca = ((a["box"][0] + a["box"][2]) / 2, (a["box"][1] + a["box"][3]) / 2)
        cb = ((b["box"][0] + b["box"][2]) / 2, (b["box"][1] + b["box"][3]) / 2)
        dx, dy = cb[0] - ca[0], cb[1] - ca[1]
        along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[
            attrs["relation"]
        ]
        assert along >= 0.35 * S and abs(across) <= 0.10 * S, (attrs, along, across)
        ax0, ay0, ax1, ay1 = a["box"]
        bx0, by0, bx1, by1 = b["box"]
        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, "boxes overlap"
        assert rec.text == (
            f"a {a['size']} {a['colour']} {a['shape']} {attrs['relation']} a {b['size']} {b['colour']} {b['shape']}"
        )
    assert re.fullmatch(r"[a-z ]+", rec.text) and not rec.text.endswith(".")
    assert rec.text == canonical_caption(attrs)
    assert len(rec.paraphrases) == 3 and len(set(rec.paraphrases)) == 3 and rec.text not in rec.paraphrases
    json.dumps(attrs)  # JSON-able


def test_spec_conformance_at_64px_over_400_records():
    world = ShapesWorld(ShapesConfig(image_size=64))
    recs = list(world.generate("train", 400))
    for rec in recs:
        _check_record(rec, 64)
    kinds = [r.attributes["kind"] for r in recs]
    assert 0.4 < kinds.count("pair") / len(kinds) < 0.6
    singles = [r.attributes for r in recs if r.attributes["kind"] == "single"]
    pairs = [r.attributes for r in recs if r.attributes["kind"] == "pair"]
    assert {a["objects"][0]["position"] for a in singles} == set(POSITIONS)
    assert {a["relation"] for a in pairs} == set(RELATIONS)
    assert {o["colour"] for r in recs for o in r.attributes["objects"]} == set(COLOURS)
    assert {o["shape"] for r in recs for o in r.attributes["objects"]} == set(SHAPES)
    assert {o["size"] for r in recs for o in r.attributes["objects"]} == {"small", "large"}


@pytest.mark.parametrize("size", [32, 128, 256])
def test_spec_conformance_at_other_sizes(size):
    for rec in ShapesWorld(ShapesConfig(image_size=size)).generate("test", 120 if size < 256 else 40):
        _check_record(rec, size)


def test_canonical_caption_examples():
    single = {"kind": "single", "relation": None,
              "objects": [{"colour": "red", "shape": "circle", "size": "large", "position": "top left"}]}
    centre = {"kind": "single", "relation": None,
              "objects": [{"colour": "green", "shape": "square", "size": "small", "position": "center"}]}
    pair = {"kind": "pair", "relation": "left of", "objects": [
        {"colour": "blue", "shape": "square", "size": "small"},
        {"colour": "yellow", "shape": "triangle", "size": "large"}]}
    assert canonical_caption(single) == "a large red circle in the top left"
    assert canonical_caption(centre) == "a small green square in the center"
    assert canonical_caption(pair) == "a small blue square left of a large yellow triangle"


def test_ordered_caption_tells_a_pair_from_its_left_or_top_object():
    from eval.shapes_scorer import score_caption

    records = list(ShapesWorld(ShapesConfig(pair_fraction=1.0)).generate("train", 80))
    seen = set()
    for r in records:
        a = r.attributes
        text = ordered_caption(a)
        assert (" left of " in text) != (" above " in text), text  # only the two forward relations
        assert score_caption(text, a)["strict"]  # the same scene as the canonical caption
        if a["relation"] in ("left of", "above"):
            assert text == canonical_caption(a)
        else:  # the generator told it from the other object: swapped, relation inverted
            assert text != canonical_caption(a)
        seen.add(a["relation"])
    assert seen == set(RELATIONS)
    single = ShapesWorld(ShapesConfig(pair_fraction=0.0)).record("train", 0).attributes
    assert ordered_caption(single) == canonical_caption(single)


def test_held_out_combinations_only_in_compositional():
    held = [("red", "circle"), ("blue", "square")]
    world = ShapesWorld(ShapesConfig(held_out_combinations=held))
    for split in ("train", "validation", "test"):
        for i in range(300):
            combos = {(o["colour"], o["shape"]) for o in world.scene(split, i)[0]["objects"]}
            assert not combos & set(held), (split, i, combos)
    seen = set()
    for i in range(200):
        attrs = world.scene("compositional", i)[0]
        combos = [(o["colour"], o["shape"]) for o in attrs["objects"]]
        assert set(combos) & set(held)
        assert len(set(combos)) == len(combos)
        seen |= set(combos) & set(held)
    assert seen == set(held)
    for rec in world.generate("compositional", 50):
        _check_record(rec, 64)


def test_config_errors_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="image_size"):
        ShapesConfig(image_size=50)
    with pytest.raises(ConfigError, match="held-out combination"):
        ShapesConfig(held_out_combinations=[("pink", "circle")])
    with pytest.raises(ConfigError, match="held_out_combinations"):
        ShapesWorld().record("compositional", 0)
    with pytest.raises(ConfigError, match="every"):
        ShapesWorld(ShapesConfig(held_out_combinations=[(c, s) for c in COLOURS for s in SHAPES]))
    with pytest.raises(ConfigError, match="unknown split"):
        ShapesWorld().record("dev", 0)
    with pytest.raises(ConfigError, match="image_size"):
        ShapesConfig.from_dict({"image_size": 100})
    cfg = ShapesConfig(held_out_combinations=[("red", "circle")], n_paraphrases=2)
    assert ShapesConfig.from_dict(cfg.to_dict()) == cfg


# ---- writers ---------------------------------------------------------------------------------------

def _expected(n: int, split: str = "test", config: ShapesConfig | None = None, start: int = 0):
    return {r.id: r for r in ShapesWorld(config).generate(split, n, start)}


def test_imagefolder_round_trip_with_datasets(tmp_path):
    import datasets

    out = write_shapes(tmp_path / "test", "test", 40, "imagefolder", start=5, progress=False)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all((out / r["file_name"]).is_file() for r in rows)
    assert ShapesConfig.from_yaml(out / "shapes_config.yaml") == ShapesConfig()
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    expected = _expected(40, start=5)
    assert sorted(ds["id"]) == sorted(expected)
    for row in ds:
        rec = expected[row["id"]]
        assert row["text"] == rec.text and row["paraphrases"] == rec.paraphrases
        assert row["attributes"] == rec.attributes
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(rec.image))


def test_hf_round_trip(tmp_path):
    import datasets

    cfg = ShapesConfig(image_size=32, seed=3)
    out = write_shapes(tmp_path / "hf", "validation", 30, "hf", cfg, progress=False)
    ds = datasets.load_from_disk(str(out))
    assert isinstance(ds.features["image"], datasets.Image) and len(ds) == 30
    expected = _expected(30, "validation", cfg)
    for row in ds:
        rec = expected[row["id"]]
        assert (row["text"], row["paraphrases"], row["attributes"]) == (rec.text, rec.paraphrases, rec.attributes)
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(rec.image))


def test_wds_round_trip_with_datasets(tmp_path):
    import datasets

    out = write_shapes(tmp_path / "wds", "train", 25, "wds", shard_size=10, progress=False)
    shards = sorted(glob.glob(str(out / "*.tar")))
    assert len(shards) == 3
    ds = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train",
                               cache_dir=str(tmp_path / "cache"))
    expected = _expected(25, "train")
    assert sorted(ds["__key__"]) == sorted(expected)
    for row in ds:
        rec = expected[row["__key__"]]
        assert row["txt"] == rec.text and row["json"]["attributes"] == rec.attributes
        assert np.array_equal(np.asarray(row["png"].convert("RGB")), np.asarray(rec.image))
    # byte-identical shards for the same seed
    again = write_shapes(tmp_path / "wds2", "train", 25, "wds", shard_size=10, progress=False)
    assert [open(p, "rb").read() for p in shards] == [
        open(p, "rb").read() for p in sorted(glob.glob(str(again / "*.tar")))]


def test_writer_refuses_foreign_dirs_and_replaces_own_output(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        write_shapes(foreign, "test", 3, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    write_shapes(foreign, "test", 3, overwrite=True, progress=False)
    assert not (foreign / "notes.txt").exists() and len(list(foreign.glob("*.png"))) == 3

    out = write_shapes(tmp_path / "out", "test", 5, progress=False)
    write_shapes(out, "test", 2, "wds", progress=False)  # same split: replaced without --overwrite
    assert not list(out.glob("*.png")) and len(list(out.glob("*.tar"))) == 1
    with pytest.raises(DataError, match="test split"):
        write_shapes(out, "train", 2, progress=False)
    with pytest.raises(ConfigError, match="format"):
        write_shapes(tmp_path / "x", "test", 2, "zip", progress=False)


def test_killed_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    out = write_shapes(tmp_path / "out", "test", 4, progress=False)
    before = sorted(p.name for p in out.iterdir())
    real = ShapesWorld.record

    def failing(self, split, index):
        if index == 7:
            raise KeyboardInterrupt
        return real(self, split, index)

    monkeypatch.setattr(ShapesWorld, "record", failing)
    with pytest.raises(KeyboardInterrupt):
        write_shapes(out, "test", 10, progress=False)
    with pytest.raises(KeyboardInterrupt):
        write_shapes(tmp_path / "new", "test", 10, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier output is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial dirs, no "new"


# ---- CLI -------------------------------------------------------------------------------------------

def _run_cli(argv: list[str]) -> int:
    from data_pipelines import cli

    parser = argparse.ArgumentParser(prog="seed")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_300_pngs_and_metadata(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert _run_cli(["data", "shapes", "--out", str(out), "--n", "300", "--split", "test",
                     "--format", "imagefolder"]) == 0
    assert len(list(out.glob("*.png"))) == 300
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 300 and rows[0]["text"] == ShapesWorld().record("test", 0).text
    assert "wrote 300 test records" in capsys.readouterr().out


def test_cli_held_out_size_and_errors(tmp_path):
    out = tmp_path / "comp"
    assert _run_cli(["data", "shapes", "--out", str(out), "--n", "20", "--split", "compositional",
                     "--held-out", "red circle, blue square", "--size", "32", "--seed", "4", "--format", "wds"]) == 0
    cfg = ShapesConfig.from_yaml(out / "shapes_config.yaml")
    assert cfg.held_out_combinations == [("red", "circle"), ("blue", "square")]
    assert (cfg.image_size, cfg.seed) == (32, 4)
    with pytest.raises(ConfigError, match="held-out"):
        _run_cli(["data", "shapes", "--out", str(tmp_path / "b"), "--n", "2", "--held-out", "red"])
    with pytest.raises(ConfigError, match="image_size"):
        _run_cli(["data", "shapes", "--out", str(tmp_path / "b"), "--n", "2", "--size", "100"])


# ---- counterfactual scenes (hard negatives) -------------------------------------------------------

def test_mirrored_and_swapped_scenes_are_scenes_of_this_world():
    """Mirroring reflects boxes, positions and relations; swapping rebinds colours. The scorer, which
    reads only pixels, agrees with the new attributes (so they are valid training negatives)."""
    from data_pipelines.shapes import mirror_attributes, swap_bindings
    from eval.shapes_scorer import score_image

    world = ShapesWorld(ShapesConfig(image_size=64))
    checked = {"x": 0, "y": 0, "swap": 0}
    for i in range(120):
        a = world.record("train", i).attributes
        for axis in ("x", "y"):
            m = mirror_attributes(a, axis, 64)
            assert score_image(np.asarray(world.render(m)), m)["strict"]
            assert mirror_attributes(m, axis, 64) == a  # an involution
            if a["kind"] == "pair" and (axis == "x") == (a["relation"] in ("left of", "right of")):
                assert m["relation"] != a["relation"]
            checked[axis] += 1
        if axis == "x" and a["kind"] == "single":
            # left-right mirror of a shape drawn upright is the flipped image, pixel for pixel (±1 px edges)
            same = (np.asarray(world.render(mirror_attributes(a, "x", 64))) == np.fliplr(np.asarray(world.render(a))))
            assert same.all(-1).mean() > 0.99
        if a["kind"] == "pair" and a["objects"][0]["colour"] != a["objects"][1]["colour"]:
            s = swap_bindings(a, "colour")
            assert s["objects"][0]["colour"] == a["objects"][1]["colour"]
            assert canonical_caption(s) != canonical_caption(a)
            assert score_image(np.asarray(world.render(s)), s)["strict"]
            checked["swap"] += 1
    assert min(checked.values()) > 20
    with pytest.raises(ValueError):
        mirror_attributes(a, "z", 64)
