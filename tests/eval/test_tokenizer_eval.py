"""``seed eval tokenizer``: the round trip scores any reconstructor exactly; the wrapper runs a tiny tokenizer."""

from __future__ import annotations

import json

import pytest
from eval_tiny import SHAPES32, build_clip_dir, build_tokenizer_dir
from PIL import Image

from data_pipelines.shapes_arrays import load_shapes_arrays
from eval.tokenizer_eval import find_tokenizer_dir, round_trip
from seedtok.errors import CheckpointError
from train_scripts.cli import main


@pytest.fixture(scope="module")
def scenes():
    return load_shapes_arrays(SHAPES32, "test", 16, progress=False)


def test_round_trip_identity_is_perfect_and_blanks_fail(scenes):
    summary, recon = round_trip(lambda ims: ims, scenes, batch_size=5, progress=False)
    assert summary["accuracy"]["strict"] == 1.0 and len(recon) == 16 and len(summary["per_image"]) == 16
    calls = []

    def half_blank(images):
        calls.append(len(images))
        return [im if (sum(calls[:-1]) + j) % 2 == 0 else Image.new("RGB", im.size, "white")
                for j, im in enumerate(images)]

    summary, _ = round_trip(half_blank, scenes, batch_size=5, progress=False)
    assert calls == [5, 5, 5, 1]
    assert summary["accuracy"]["strict"] == pytest.approx(0.5) and summary["accuracy"]["count"] == pytest.approx(0.5)


def test_run_tokenizer_eval_on_a_tiny_tokenizer(tmp_path):
    clip = build_clip_dir(tmp_path / "clip")
    model = tmp_path / "chat"
    build_tokenizer_dir(clip, model / "seed_tokenizer")
    assert find_tokenizer_dir(model) == model / "seed_tokenizer"
    assert find_tokenizer_dir(model / "seed_tokenizer") == model / "seed_tokenizer"
    with pytest.raises(CheckpointError, match="neither"):
        find_tokenizer_dir(tmp_path)
    out = tmp_path / "out"
    rc = main(["eval", "tokenizer", "--model", str(model), "--clip", str(clip), "--out", str(out), "--n", "12",
               "--round-trip-n", "6", "--size", "32", "--batch-size", "4", "--no-progress"])
    assert rc == 0
    metrics = json.loads((out / "tokenizer_metrics.json").read_text())
    assert metrics["tokenizer"]["n"] == 12 and 0 < metrics["tokenizer"]["code_usage"] <= 1
    assert 0 <= metrics["tokenizer"]["t2i_R@1"] <= 1
    assert metrics["round_trip"]["n"] == 6 and metrics["absent"] == {}
    assert 0 <= metrics["round_trip"]["accuracy"]["strict"] <= 1  # untrained decoder: the value is noise
    rows = [json.loads(line) for line in (out / "round_trip" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and (out / "round_trip" / rows[0]["file_name"]).is_file()
    # The folder re-scores with `seed eval shapes` to the same strict score.
    assert main(["eval", "shapes", str(out / "round_trip")]) == 0
    rescored = json.loads((out / "round_trip" / "shapes_scores.json").read_text())
    assert rescored["accuracy"]["strict"] == metrics["round_trip"]["accuracy"]["strict"]
    # No CLIP and no decoder: both parts absent with their reasons, no failure.
    bare = build_tokenizer_dir(clip, tmp_path / "bare", image_decoder=False)
    rc = main(["eval", "tokenizer", "--model", str(bare), "--out", str(tmp_path / "o2"), "--n", "4", "--size", "32",
               "--no-progress"])
    metrics = json.loads((tmp_path / "o2" / "tokenizer_metrics.json").read_text())
    assert rc == 0 and set(metrics["absent"]) == {"tokenizer", "round_trip"}
