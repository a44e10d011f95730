"""``report.html`` is one self-contained page (embedded PNGs, no script, no network) plus ``metrics.json``."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from eval.report import (
    Section,
    caption_section,
    figure_section,
    flatten_metrics,
    generation_section,
    reconstruction_section,
    write_report,
)


def _image(colour) -> Image.Image:
    return Image.new("RGB", (8, 8), colour)


def test_write_report_embeds_everything(tmp_path):
    curve = tmp_path / "loss.png"
    _image("blue").save(curve)
    metrics = {
        "caption": {"attributes": {"accuracy": {"strict": np.float32(0.75)}}, "ngram": {"BLEU-4": 0.5, "METEOR": None}},
        "t2i": {"strict": 0.6, "per_image": [{"strict": True}]},
        "wall_time_s": 12,
    }
    sections = [
        reconstruction_section([_image("red")], [np.full((8, 8, 3), 200, np.uint8)], ok=[False]),
        generation_section(["a <b>red</b> circle"], [[_image("red"), _image("green")]], ok=[[True, False]]),
        caption_section([_image("yellow")], ["a yellow square"], references=["a large yellow square"], ok=[True]),
        figure_section("Loss curves", [curve, None]),
    ]
    path = write_report(tmp_path / "out", metrics, sections, title="Demo", intro="tiny run")
    page = path.read_text()
    assert path.name == "report.html"
    assert "<script" not in page and "http://" not in page and "https://" not in page
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == 6  # original, reconstruction, 2 generated, captioned image, loss curve
    first = Image.open(io.BytesIO(base64.b64decode(uris[0])))
    assert first.getpixel((0, 0)) == (255, 0, 0)
    assert base64.b64decode(uris[-1]) == curve.read_bytes()  # PNG files are embedded byte for byte
    assert "a &lt;b&gt;red&lt;/b&gt; circle" in page and "<b>red</b>" not in page
    marks = re.findall(r'<td class="(ok|bad)', page)
    assert sorted(marks) == ["bad", "bad", "ok", "ok"]
    assert "attributes.accuracy.strict" in page and "0.7500" in page and "per_image" not in page
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["caption"]["attributes"]["accuracy"]["strict"] == 0.75 and saved["t2i"]["per_image"]
    # Re-writing replaces the page.
    write_report(tmp_path / "out", {"x": 1}, [Section("Empty")])
    assert "Empty" in path.read_text() and "Demo" not in path.read_text()


def test_flatten_and_mismatched_sections():
    rows = dict(flatten_metrics({"a": {"b": 1, "c": [1, 2]}, "d": [{"x": 1}], "e": "txt"}))
    assert rows == {"a.b": 1, "a.c": "1, 2", "e": "txt"}
    with pytest.raises(ValueError):
        reconstruction_section([_image("red")], [])
    with pytest.raises(ValueError):
        caption_section([_image("red")], ["a", "b"])


def test_sections_from_eval_outputs(tmp_path):
    from data_pipelines.shapes import ShapesConfig
    from data_pipelines.shapes_arrays import load_shapes_arrays
    from eval.caption_eval import write_caption_eval
    from eval.report import caption_section_from_eval, round_trip_section_from_eval, t2i_section_from_eval
    from eval.t2i_eval import write_geneval_folder
    from eval.tokenizer_eval import write_round_trip_folder

    scenes = load_shapes_arrays(ShapesConfig(image_size=32), "test", 3, progress=False)
    images = [scenes.pil(i) for i in range(3)]
    write_caption_eval(tmp_path / "cap", {}, [{"prediction": f"p{i}", "reference": scenes.captions[i],
                                               "strict": i == 0} for i in range(3)])
    write_geneval_folder(lambda ps: [[images[0], images[1]] for _ in ps], ["x", "y", "z"], tmp_path / "t2i",
                         progress=False)
    (tmp_path / "t2i" / "t2i_scores.jsonl").write_text(json.dumps(
        {"index": "00001", "sample": "0001.png", "strict": False}) + "\n")
    write_round_trip_folder(tmp_path / "rt", scenes, images[::-1], [{"strict": i == 1} for i in range(3)])
    sections = [caption_section_from_eval(tmp_path / "cap", images, limit=2),
                t2i_section_from_eval(tmp_path / "t2i", limit=2),
                round_trip_section_from_eval(tmp_path / "rt")]
    assert [len(s.rows) for s in sections] == [2, 2, 3]
    assert [c.ok for c in sections[1].rows[1][1:]] == [None, False]
    assert sections[2].rows[0][0].text == scenes.captions[0]
    page = write_report(tmp_path / "report", {}, sections).read_text()
    assert page.count("data:image/png;base64,") == 2 + 4 + 6
