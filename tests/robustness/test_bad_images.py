"""Every image of the corpus through every entry point that takes images.

| entry point                                  | bad image (truncated, empty, text, bomb)   | odd image (CMYK, 16-bit, 1-bit, P, RGBA, GIF, 1×1) |
|----------------------------------------------|--------------------------------------------|----------------------------------------------------|
| ``decode_image``                             | ImageDecodeError(reason)                   | RGB                                                |
| ``load_records(check_images=True)``          | skip:<reason>, counted                     | record kept                                        |
| ``seed data inspect DIR --check-images``     | counted per reason, exit 0                 | counted ok                                         |
| ``SeedTokenizer.encode`` (opened PIL image)  | —  (cannot be opened)                      | (1, N) codes in [0, K)                             |
| ``score_folder`` / ``seed eval shapes DIR``  | DataError naming the file / exit 2         | scored                                             |

(tests/data_pipelines/test_images.py checks the decoded pixel values of the odd ones.)
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import corpus
import pytest
from conftest import assert_one_line_error, run_seed
from PIL import Image

from data_pipelines.images import ImageDecodeError, decode_image
from data_pipelines.loaders import LoadStats, load_records
from seedtok.errors import DataError

IMAGE_NAMES = sorted(corpus.IMAGES)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_decode_image(bad, name):
    expected = corpus.IMAGES[name][1]
    if expected == "ok":
        img = decode_image(bad.images / name)
        assert img.mode == "RGB" and min(img.size) >= 1
        return
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bad.images / name)
    assert info.value.reason == expected
    assert str(bad.images / name) in str(info.value) and "\n" not in str(info.value)


def test_loader_skips_and_counts_every_bad_image(bad):
    stats = LoadStats()
    kept = [r.id for r in load_records(bad.images, check_images=True, stats=stats)]
    assert sorted(kept) == corpus.ODD_IMAGES
    assert stats.decode.skipped == Counter(corpus.IMAGES[n][1] for n in corpus.BAD_IMAGES)
    assert stats.decode.ok == len(corpus.ODD_IMAGES)


def test_loader_on_error_raise_names_the_first_bad_image(bad):
    with pytest.raises(DataError, match="truncated.png|zero_bytes|text_named|bomb"):
        list(load_records(bad.images, check_images=True, on_error="raise"))


def test_cli_inspect_counts_every_bad_image_in_one_pass(bad):
    rc, out, err = run_seed("data", "inspect", bad.images, "--check-images", "--json")
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    report = json.loads(out)
    assert report["n_records"] == len(corpus.ODD_IMAGES)
    assert report["image_check"]["skipped"] == dict(Counter(corpus.IMAGES[n][1] for n in corpus.BAD_IMAGES))


@pytest.fixture(scope="module")
def tok(models):
    from seedtok.tokenizer import SeedTokenizer

    return SeedTokenizer.from_pretrained(models.tokenizer)


@pytest.mark.parametrize("name", corpus.ODD_IMAGES)
def test_tokenizer_encodes_odd_modes_as_opened(tok, bad, name):
    """What a user holding ``Image.open(path)`` passes: CMYK, I;16, 1, P, RGBA, animated GIF, 1×1."""
    with Image.open(bad.images / name) as img:
        codes = tok.encode([img])
    assert codes.codes.shape == (1, tok.num_tokens)
    assert 0 <= int(codes.codes.min()) and int(codes.codes.max()) < tok.codebook_size


@pytest.mark.parametrize("value", ["path", "url", None, 3, b"\x89PNG"], ids=["path", "url", "none", "int", "bytes"])
def test_tokenizer_refuses_what_is_not_a_decoded_image(tok, bad, value):
    """Strings are never opened (a URL would be fetched by the processor): a one-line DataError."""
    value = {"path": str(bad.images / "good.png"), "url": "http://example.invalid/x.jpg"}.get(value, value)
    with pytest.raises(DataError, match="not a PIL image"):
        tok.encode([value])
    with pytest.raises(DataError, match="no images"):
        tok.encode([])


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_eval_shapes_scores_odd_images_and_names_bad_ones(bad, tmp_path, seed_cli, name):
    """``seed eval shapes`` scores generated images: a bad one is an error naming it (fail fast, exit 2)."""
    d = tmp_path / "gen"
    d.mkdir()
    shutil.copy(bad.images / name, d / name)
    corpus.write_jsonl(d / "metadata.jsonl", [{"file_name": name, "text": "a large red circle in the centre"}])
    rc, out, err = seed_cli("eval", "shapes", d)
    if corpus.IMAGES[name][1] == "ok":
        assert rc == 0 and "Traceback" not in err
        assert json.loads((d / "shapes_scores.json").read_text())["n"] == 1
    else:
        assert_one_line_error(rc, err, name)


def test_eval_shapes_subprocess_exit_status(bad, tmp_path):
    d = tmp_path / "gen"
    shutil.copytree(bad.images, d)
    rc, _, err = run_seed("eval", "shapes", d)
    assert_one_line_error(rc, err, "truncated.png")  # the first bad row of metadata.jsonl


def test_bomb_is_refused_before_allocating(bad):
    """The bomb's header claims 10^10 pixels: refused on the header, in well under a second."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="too large|exceeds"):
        decode_image(bad.images / "bomb.png")
    assert time.perf_counter() - t0 < 1.0
