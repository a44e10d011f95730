"""Tar shards and captions of the corpus through the loaders and ``seed data inspect`` / ``seed eval shapes``.

Shards: a truncated shard keeps the samples before the cut and records one file error; a zero-byte
shard is a file error; members with absolute or ``..`` names and links are skipped as
``unsafe_member`` and nothing is ever extracted to disk. Captions: control characters are
stripped, invalid UTF-8 and lone surrogates become U+FFFD, a 100k-character caption is skipped as
``text_too_long``, an empty one as ``empty_text``.
"""

from __future__ import annotations

import json
from collections import Counter

import corpus
import pytest
from conftest import assert_one_line_error, run_seed

from data_pipelines.loaders import LoadStats, load_records
from data_pipelines.records import clean_text
from seedtok.errors import DataError

# ---- tar shards -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(corpus.SHARDS))
def test_loader_on_each_bad_shard(bad, name):
    _, n_records, skipped, n_errors = corpus.SHARDS[name]
    stats = LoadStats()
    records = list(load_records(bad.shards / name, stats=stats))
    if n_records >= 0:
        assert len(records) == n_records
    else:  # a cut gzip stream: how many samples precede the cut depends on compression
        assert len(records) < 4
    assert dict(stats.skipped) == skipped
    assert len(stats.errors) == n_errors
    assert all(name in e and "\n" not in e for e in stats.errors)
    for rec in records:  # what was kept is whole: every image decodes
        rec.load_images()


def test_traversal_members_are_never_written_anywhere(bad):
    before = {p for p in bad.root.parent.rglob("*")}
    list(load_records(bad.shards / "traversal.tar"))
    after = {p for p in bad.root.parent.rglob("*")}
    assert after == before  # streaming read: no extraction, no temporary files


@pytest.mark.parametrize("name", sorted(corpus.SHARDS))
def test_loader_on_error_raise_is_one_line(bad, name):
    _, _, skipped, n_errors = corpus.SHARDS[name]
    if not skipped and not n_errors:
        pytest.skip("nothing wrong to raise about")
    with pytest.raises(DataError) as info:
        list(load_records(bad.shards / name, on_error="raise"))
    assert name in str(info.value) and "\n" not in str(info.value)


def test_cli_inspect_all_shards_in_one_call(bad):
    """One ``seed data inspect 'DIR/*.tar*'`` over every bad shard: exit 0 (records survived), every
    problem counted."""
    rc, out, err = run_seed("data", "inspect", f"{bad.shards}/*.tar*", "--json")
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    report = json.loads(out)
    expected = Counter()
    for _, _, skipped, _ in corpus.SHARDS.values():
        expected.update(skipped)
    assert report["skipped"] == dict(expected)
    assert len(report["errors"]) == sum(e for *_, e in corpus.SHARDS.values())
    assert report["n_records"] >= sum(max(n, 0) for _, n, _, _ in corpus.SHARDS.values())


def test_cli_inspect_shard_without_records_exits_2(bad, seed_cli):
    rc, _, err = seed_cli("data", "inspect", bad.shards / "zero_bytes.tar")
    assert_one_line_error(rc, err, "no usable records", "zero_bytes.tar")


# ---- captions -------------------------------------------------------------------------------------

FORMATS = ("imagefolder", "webdataset", "coco")


def _expected(name: str, fmt: str) -> str:
    text = corpus.CAPTIONS[name][1]
    if name == "lone_surrogate" and fmt == "webdataset":
        return "a \ufffd\ufffd\ufffd circle"  # raw .txt bytes: the 3 bytes of the encoded surrogate
    return text


def _by_caption(records, fmt: str) -> dict[str, str]:
    # COCO ids are "<image_id>-<annotation id>"; the others use the caption's name as the id.
    return {(r.id.split("-", 1)[1] if fmt == "coco" else r.id): r.text for r in records}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(corpus.CAPTIONS))
def test_loader_cleans_or_skips_each_caption(bad, fmt, name):
    stats = LoadStats()
    got = _by_caption(load_records(bad.captions[fmt], stats=stats), fmt)
    expected = _expected(name, fmt)
    if expected.startswith("skip:"):
        assert name not in got
        assert stats.skipped[expected[5:]] >= 1
    else:
        assert got[name] == expected
        got[name].encode("utf-8")  # no lone surrogates left: every kept text can be written back out


def test_caption_counts_per_format(bad):
    skips = Counter(e[5:] for _, e in corpus.CAPTIONS.values() if e.startswith("skip:"))
    for fmt in FORMATS:
        stats = LoadStats()
        n = len(list(load_records(bad.captions[fmt], stats=stats)))
        assert n == len(corpus.CAPTIONS) - sum(skips.values())
        assert dict(stats.skipped) == dict(skips), fmt


def test_clean_text_api():
    assert clean_text(corpus.CONTROL) == corpus.CONTROL_CLEAN
    assert clean_text(corpus.INVALID_UTF8) == corpus.INVALID_UTF8_CLEAN
    assert len(clean_text(corpus.LONG)) == 100_000  # cleaning never truncates; the loaders skip


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_inspect_caption_sets(bad, seed_cli, fmt):
    rc, out, err = seed_cli("data", "inspect", bad.captions[fmt], "--json")
    assert rc == 0 and "Traceback" not in err
    report = json.loads(out)
    assert report["skipped"] == {"text_too_long": 1, "empty_text": 2}
    assert "\x1b" not in out and "\x00" not in out  # control characters never reach the terminal


def test_cli_inspect_text_report_is_clean(bad):
    rc, out, err = run_seed("data", "inspect", bad.captions["imagefolder"])
    assert rc == 0 and "Traceback" not in err
    assert "\x1b" not in out + err and "\x00" not in out + err
    assert max(len(line) for line in (out + err).splitlines()) < 400  # the 100k caption is not echoed


def test_eval_shapes_caption_truth_errors_are_short_single_lines(bad, seed_cli):
    """Captions as ground truth: one that names no scene is an error naming its row, quoted
    shortly and escaped (no terminal control sequences, no 100k-character line)."""
    rc, _, err = seed_cli("eval", "shapes", bad.captions["imagefolder"])
    line = assert_one_line_error(rc, err, "metadata.jsonl:1")
    assert "\x1b" not in line and "\x00" not in line
    folder = bad.captions["imagefolder"].parent / "long_truth"
    folder.mkdir(exist_ok=True)
    (folder / "img.png").write_bytes((bad.captions["imagefolder"] / "img.png").read_bytes())
    corpus.write_jsonl(folder / "metadata.jsonl", [{"file_name": "img.png", "text": corpus.LONG}])
    rc, _, err = seed_cli("eval", "shapes", folder)
    assert len(assert_one_line_error(rc, err, "metadata.jsonl:1")) < 300
