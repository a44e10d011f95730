"""``seed eval caption``: the core scores any captioner exactly; the CLI writes predictions and metrics."""

from __future__ import annotations

import json

import pytest
from eval_tiny import SHAPES32, FakeChat

from data_pipelines.shapes import ShapesConfig
from data_pipelines.shapes_arrays import load_shapes_arrays
from eval.caption_eval import evaluate_captioner, format_caption_metrics
from seedtok.errors import DataError
from train_scripts.cli import main


@pytest.fixture(scope="module")
def scenes():
    return load_shapes_arrays(SHAPES32, "test", 24, progress=False)


def test_half_right_captioner_scores_half(scenes, monkeypatch):
    fake = FakeChat(scenes)
    metrics, rows = evaluate_captioner(fake.caption, scenes, batch_size=5, with_meteor=False, progress=False)
    assert metrics["n"] == 24
    assert metrics["attributes"]["accuracy"]["strict"] == pytest.approx(0.5)
    assert metrics["attributes"]["accuracy"]["colour"] == pytest.approx(0.5)  # only colour is ever wrong
    assert metrics["attributes"]["accuracy"]["shape"] == 1.0
    assert [r["strict"] for r in rows] == [i % 2 == 0 for i in range(24)]
    assert rows[0]["prediction"] == rows[0]["reference"] == scenes.captions[0]
    assert 0.5 < metrics["ngram"]["BLEU-1"] < 1.0
    assert "strict" in format_caption_metrics(metrics)


def test_paraphrases_are_right_and_miscounted_batches_are_refused(scenes):
    by_image = {scenes.images[i].tobytes(): scenes.paraphrases[i][0] for i in range(len(scenes))}

    def paraphraser(images):
        import numpy as np

        return [by_image[np.asarray(im).tobytes()] for im in images]

    metrics, _ = evaluate_captioner(paraphraser, scenes, with_meteor=False, progress=False)
    assert metrics["attributes"]["accuracy"]["strict"] == 1.0
    assert metrics["ngram"]["BLEU-4"] == pytest.approx(1.0)  # the paraphrase is one of the references
    with pytest.raises(DataError, match="one string per image"):
        evaluate_captioner(lambda ims: ["a red circle"], scenes, batch_size=4, with_meteor=False, progress=False)


def test_cli_writes_predictions_and_metrics(scenes, monkeypatch, tmp_path):
    fake = FakeChat(scenes).install(monkeypatch)
    out = tmp_path / "cap"
    rc = main(["eval", "caption", "--model", str(tmp_path / "model"), "--out", str(out), "--n", "24",
               "--size", "32", "--no-meteor", "--no-progress", "--num-beams", "3"])
    assert rc == 0 and fake.loaded == [str(tmp_path / "model")] and fake.caption_kwargs["num_beams"] == 3
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "caption_metrics.json").read_text())
    assert len(rows) == 24 and rows[1]["strict"] is False
    assert metrics["attributes"]["accuracy"]["strict"] == pytest.approx(0.5)
    assert metrics["split"] == "test" and metrics["ngram"]["absent"] == {"METEOR": "not requested"}
    assert metrics["num_beams"] == 3
    assert main(["eval", "caption", "--model", "m", "--out", str(out), "--num-beams", "0"]) == 2
    # The compositional split needs held-out pairs: one-line error, exit status 2.
    assert main(["eval", "caption", "--model", "m", "--out", str(out), "--split", "compositional"]) == 2


def test_cli_scores_on_the_world_the_model_directory_records(monkeypatch, tmp_path):
    """A chat model trained on Shapes records its world (`seed llm train` writes shapes_config.yaml);
    without world flags, `seed eval caption` renders that world's test split — held-out pairs and all."""
    from data_pipelines.writers import CONFIG_FILE

    world = ShapesConfig(image_size=32, held_out_combinations=[["red", "triangle"], ["blue", "circle"]])
    scenes = load_shapes_arrays(world, "test", 12, progress=False)
    assert scenes.images.tobytes() != load_shapes_arrays(SHAPES32, "test", 12, progress=False).images.tobytes()
    fake = FakeChat(scenes).install(monkeypatch)  # knows only this world's images
    model = tmp_path / "model"
    world.to_yaml(model / CONFIG_FILE)
    out = tmp_path / "cap"
    assert main(["eval", "caption", "--model", str(model), "--out", str(out), "--n", "12", "--no-meteor",
                 "--no-progress"]) == 0 and fake.loaded == [str(model)]
    metrics = json.loads((out / "caption_metrics.json").read_text())
    assert metrics["attributes"]["n"] == 12 and metrics["attributes"]["accuracy"]["strict"] == pytest.approx(0.5)
