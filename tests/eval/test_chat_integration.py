"""The eval CLIs on a real (tiny, random) chat-model directory through ``llm_adapters.chat.SeedChat``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "llm_adapters"))

from train_scripts.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    from llm_tiny import build_chat_dir, build_seed_tokenizer_dir

    root = tmp_path_factory.mktemp("chat")
    return build_chat_dir(root, build_seed_tokenizer_dir(root))


def test_caption_eval_runs_the_chat_model(chat_dir, tmp_path):
    out = tmp_path / "cap"
    assert main(["eval", "caption", "--model", str(chat_dir), "--out", str(out), "--n", "4", "--size", "32",
                 "--batch-size", "3", "--no-meteor", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "caption_metrics.json").read_text())
    assert len(rows) == 4 and all(isinstance(r["prediction"], str) for r in rows)
    assert metrics["attributes"]["n"] == 4 and 0 <= metrics["attributes"]["accuracy"]["strict"] <= 1


def test_t2i_eval_runs_the_chat_model_reproducibly(chat_dir, tmp_path):
    clip = chat_dir.parent / "clip"  # the tiny CLIP the SEED tokenizer was built on
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["eval", "t2i", "--model", str(chat_dir), "--out", str(out), "--n", "3", "--samples", "2",
                     "--size", "32", "--clip", str(clip), "--seed", "5", "--no-progress"]) == 0
        runs.append(out)
    metrics = json.loads((runs[0] / "t2i_metrics.json").read_text())
    assert metrics["n_prompts"] == 3 and metrics["n_images"] == 6 and metrics["clip_score"] is not None
    for i in range(3):
        for j in range(2):
            a, b = (np.asarray(Image.open(r / f"{i:05d}" / "samples" / f"{j:04d}.png")) for r in runs)
            assert np.array_equal(a, b)  # same seed, same images
