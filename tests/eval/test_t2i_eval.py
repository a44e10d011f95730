"""``seed eval t2i``: GenEval layout, exact scoring of any generator, CLIP score with a local CLIP."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from eval_tiny import SHAPES32, FakeChat, build_clip_dir, render_caption

from data_pipelines.shapes_arrays import load_shapes_arrays
from eval.clip_score import ClipScore
from eval.t2i_eval import read_geneval_folder, score_geneval_folder, write_geneval_folder
from seedtok.errors import CheckpointError, DataError
from train_scripts.cli import main


@pytest.fixture(scope="module")
def scenes():
    return load_shapes_arrays(SHAPES32, "test", 20, progress=False)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_clip_dir(tmp_path_factory.mktemp("clip"))


def test_render_caption_fake_is_exact(scenes):
    from eval.shapes_scorer import score_image

    assert all(score_image(render_caption(c, 32), a)["strict"] for c, a in zip(scenes.captions, scenes.attributes))


def test_geneval_layout_and_half_right_generator(scenes, tmp_path):
    fake = FakeChat(scenes)
    meta = [{"tag": a["kind"], "attributes": a} for a in scenes.attributes]
    out = write_geneval_folder(lambda ps: fake.generate_images(ps, n=2), scenes.captions, tmp_path / "gen",
                               metadata=meta, batch_size=6, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}" for i in range(20)]
    assert sorted(p.name for p in (out / "00003" / "samples").iterdir()) == ["0000.png", "0001.png"]
    first = json.loads((out / "00000" / "metadata.jsonl").read_text())
    assert first["prompt"] == scenes.captions[0] and first["tag"] == scenes.attributes[0]["kind"]
    result = score_geneval_folder(out, progress=False)
    assert result["n_prompts"] == 20 and result["n_images"] == 40
    assert result["accuracy"]["strict"] == pytest.approx(0.5) and result["accuracy"]["shape"] == 1.0
    assert result["single"]["n"] + result["pair"]["n"] == 40
    assert result["clip_score"] is None and "clip_score" in result["absent"]
    assert [r["strict"] for r in result["per_image"][:4]] == [True, True, False, False]
    # Without attributes the truth is parsed from the prompt: same verdicts.
    for folder, meta_row, _ in read_geneval_folder(out):
        (folder / "metadata.jsonl").write_text(json.dumps({"prompt": meta_row["prompt"]}) + "\n")
    assert score_geneval_folder(out, progress=False)["accuracy"]["strict"] == pytest.approx(0.5)
    # A second run refuses to mix with the first unless told to overwrite.
    with pytest.raises(DataError, match="overwrite"):
        write_geneval_folder(lambda ps: 1 / 0, scenes.captions[:3], out, progress=False)
    fake.prompts_seen = 0
    write_geneval_folder(lambda ps: fake.generate_images(ps), scenes.captions[:3], out, overwrite=True,
                         progress=False)
    assert len(read_geneval_folder(out)) == 3
    with pytest.raises(DataError, match="one non-empty list per prompt"):
        write_geneval_folder(lambda ps: [[]] * len(ps), ["a red circle in the top"], tmp_path / "e", progress=False)


def test_clip_score_is_100_times_clamped_cosine(clip_dir, scenes):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    scorer = ClipScore.from_pretrained(clip_dir)
    images = [scenes.pil(i) for i in range(6)]
    texts = scenes.captions[:6]
    got = scorer(images, texts, batch_size=4)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    px = AutoImageProcessor.from_pretrained(clip_dir, backend="pil")(images=images, return_tensors="pt")["pixel_values"]
    enc = AutoTokenizer.from_pretrained(clip_dir)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=px).pooler_output
        txt = model.get_text_features(**enc).pooler_output
    want = 100 * F.cosine_similarity(img, txt, dim=-1).clamp(min=0)
    assert got.shape == (6,) and torch.allclose(got, want, atol=1e-4)
    assert ((got >= 0) & (got <= 100)).all()
    with pytest.raises(CheckpointError, match="not a CLIP directory"):
        ClipScore.from_pretrained(clip_dir.parent)


def test_cli_generates_scores_and_rescores(scenes, clip_dir, monkeypatch, tmp_path):
    fake = FakeChat(scenes).install(monkeypatch)
    out = tmp_path / "t2i"
    rc = main(["eval", "t2i", "--model", str(tmp_path / "model"), "--out", str(out), "--n", "20", "--size", "32",
               "--samples", "2", "--clip", str(clip_dir), "--batch-size", "8", "--no-progress"])
    assert rc == 0 and fake.loaded
    metrics = json.loads((out / "t2i_metrics.json").read_text())
    assert metrics["accuracy"]["strict"] == pytest.approx(0.5) and metrics["n_images"] == 40
    assert 0 <= metrics["clip_score"] <= 100 and metrics["absent"] == {}
    assert len((out / "t2i_scores.jsonl").read_text().splitlines()) == 40
    # Without --model: re-score the folder as it is (no CLIP → absent with the reason).
    assert main(["eval", "t2i", "--out", str(out), "--no-progress"]) == 0
    rescored = json.loads((out / "t2i_metrics.json").read_text())
    assert rescored["accuracy"] == metrics["accuracy"] and rescored["clip_score"] is None
    # No CLIP recorded anywhere and none given: the CLIP score is absent, the rest still runs.
    fake.prompts_seen = 0
    rc = main(["eval", "t2i", "--model", str(tmp_path / "model"), "--out", str(out), "--n", "4", "--size", "32",
               "--no-progress"])
    metrics = json.loads((out / "t2i_metrics.json").read_text())
    assert rc == 0 and metrics["clip_score"] is None and "--clip" in metrics["absent"]["clip_score"]
