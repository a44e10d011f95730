"""Every loader on a small real fixture, the record schema, and ``seed data inspect``."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from data_pipelines.images import DecodeStats, ImageDecodeError, iter_decoded
from data_pipelines.loaders import LoadOptions, LoadStats, detect_format, load_records
from data_pipelines.records import ImageRef, ImageSegment, Message, Record, TextSegment, clean_text
from seedtok.errors import DataError
from train_scripts.cli import main as seed

RED, GREEN, BLUE = (220, 38, 38), (40, 160, 70), (40, 90, 220)


def _load(path, **opts):
    stats = LoadStats()
    return list(load_records(path, stats=stats, **opts)), stats


def _close(pixel, colour, tol=12):
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour))


# ---- records -----------------------------------------------------------------------------------


def test_text_cleaning():
    assert clean_text("a\x00b\x07c\r\nd\re\tf\x7f\x85g") == "abc\nd\ne\tfg"
    assert clean_text(b"caf\xc3\xa9 \xff!") == "café \ufffd!"
    assert clean_text("lone \ud800 surrogate") == "lone \ufffd surrogate"
    assert TextSegment("x\x01y").text == "xy"


def test_record_pair_views_and_round_trip(tmp_path, mk):
    path = tmp_path / "a.png"
    mk.solid(RED).save(path)
    rec = Record.pair("r1", str(path), "a red thing", {"k": [1, 2]})
    assert rec.kind == "pair" and rec.text == "a red thing"
    assert [m.role for m in rec.messages] == ["user", "assistant"]
    assert rec.images == [ImageRef(path=str(path))]
    assert [type(s) for s in rec.segments] == [ImageSegment, TextSegment]
    back = Record.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert back == rec
    assert rec.load_images()[0].getpixel((0, 0)) == RED
    # The content hash is of the encoded bytes, whether they come from the file or memory.
    assert ImageRef(data=path.read_bytes(), key="k").sha256() == rec.images[0].sha256()
    with pytest.raises(DataError):
        Message("narrator", [])
    with pytest.raises(DataError):
        Record("x", "essay", [])
    with pytest.raises(DataError):
        ImageRef()


# ---- imagefolder -------------------------------------------------------------------------------


def test_imagefolder(imagefolder):
    assert detect_format(imagefolder) == "imagefolder"
    assert detect_format(imagefolder / "metadata.jsonl") == "imagefolder"
    recs, stats = _load(imagefolder)
    assert [r.id for r in recs] == ["img/a.png", "img/b.jpg", "c.png"]
    a, b, c = recs
    assert a.text == "a large red circle in the top left"
    assert a.meta["paraphrases"] == ["a big red circle at the top left"]
    assert a.meta["attributes"]["position"] == "top left"
    assert b.text == "a green square" and b.meta == {"source": "test"}
    assert c.text == "a blue triangle\nsecond line\tTab"
    assert a.images[0].load().getpixel((0, 0)) == RED
    assert stats.skipped == {"missing_image": 1, "bad_json": 1, "missing_text": 1, "path_outside_root": 1}
    assert stats.records == {"pair": 3} and stats.images == 3
    # image_root + allow_outside_root make the escaping row legal.
    recs, stats = _load(imagefolder, allow_outside_root=True)
    assert len(recs) == 4 and stats.skipped["path_outside_root"] == 0


def test_imagefolder_is_lazy(imagefolder):
    it = load_records(imagefolder / "metadata.jsonl")
    assert next(it).id == "img/a.png"  # nothing beyond the first row needed


def test_imagefolder_with_split_subdirectories(tmp_path, mk):
    for split, colour in (("train", RED), ("test", BLUE)):
        (tmp_path / split).mkdir()
        mk.solid(colour).save(tmp_path / split / "0.png")
        mk.write_jsonl(tmp_path / split / "metadata.jsonl", [{"file_name": "0.png", "text": split}])
    recs, _ = _load(tmp_path)
    assert sorted((r.id, r.meta["split"], r.text) for r in recs) == [("test/0.png", "test", "test"),
                                                                    ("train/0.png", "train", "train")]
    recs, _ = _load(tmp_path, split="test")
    assert [r.text for r in recs] == ["test"]


def test_text_too_long_is_skipped(tmp_path, mk):
    mk.solid(RED).save(tmp_path / "a.png")
    mk.write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": "x" * 101},
                                                  {"file_name": "a.png", "text": "ok"}])
    recs, stats = _load(tmp_path, max_text_chars=100)
    assert [r.text for r in recs] == ["ok"] and stats.skipped == {"text_too_long": 1}
    assert len(_load(tmp_path, max_text_chars=0)[0]) == 2


# ---- broken images through a loader --------------------------------------------------------------


def test_imagefolder_of_broken_images_yields_only_good_ones(broken_dir, mk):
    recs, stats = _load(broken_dir, check_images=True)
    good = sorted(n for n, r in mk.broken.items() if r == "ok")
    assert sorted(r.id for r in recs) == good
    expected_bad: dict[str, int] = {}
    for reason in mk.broken.values():
        if reason != "ok":
            expected_bad[reason] = expected_bad.get(reason, 0) + 1
    assert dict(stats.decode.skipped) == expected_bad
    assert stats.decode.ok == len(good) and stats.records == {"pair": len(good)}
    # Without checking, every row refers to an existing file and is yielded.
    assert len(_load(broken_dir)[0]) == len(mk.broken)


def test_on_error_raise_fails_fast(broken_dir, imagefolder):
    with pytest.raises(ImageDecodeError):
        list(load_records(broken_dir, check_images=True, on_error="raise"))
    with pytest.raises(DataError, match="missing_image"):
        list(load_records(imagefolder, on_error="raise"))


def test_iter_decoded_over_records(broken_dir):
    stats = DecodeStats()
    pairs = list(iter_decoded(load_records(broken_dir), stats=stats))
    assert all(img.mode == "RGB" for _, imgs in pairs for img in imgs)
    assert stats.ok == len(pairs) and stats.n_bad == 6


# ---- COCO --------------------------------------------------------------------------------------


def test_coco_per_caption_and_grouped(coco):
    assert detect_format(coco) == "coco"
    recs, stats = _load(coco)
    assert [(r.id, r.text) for r in recs] == [("1-10", "a red picture"), ("2-11", "a green picture"),
                                             ("1-12", "red, all red"), ("3-13", "a blue picture")]
    assert recs[0].meta["width"] == 16 and recs[0].meta["annotation_id"] == 10
    assert stats.skipped == {"unknown_image_id": 1, "missing_image": 1}
    recs, _ = _load(coco, group_captions=True)
    assert [r.id for r in recs] == ["1", "2", "3"]
    assert recs[0].meta["captions"] == ["a red picture", "red, all red"] and recs[0].text == "a red picture"


# ---- webdataset --------------------------------------------------------------------------------


def test_webdataset_dir_glob_and_list(wds_dir):
    assert detect_format(wds_dir) == "webdataset"
    recs, stats = _load(wds_dir)
    assert [(r.id, r.text) for r in recs] == [("000000", "caption 0"), ("000001", "caption 1"),
                                             ("000002", "caption 2"), ("sub/000003", "from json"),
                                             ("000004", "a webp sample")]
    assert recs[3].meta == {"shard": "shard-000000.tar", "width": 16}
    assert _close(recs[1].images[0].load().getpixel((3, 3)), GREEN)
    assert recs[4].images[0].key == "shard-000001.tar/000004.webp"
    assert stats.skipped == {"unsafe_member": 3, "missing_image": 1}
    assert not stats.errors
    glob_recs, _ = _load(str(wds_dir / "shard-*.tar"))
    range_recs, _ = _load(str(wds_dir / "shard-{000000..000001}.tar"))
    list_recs, _ = _load([wds_dir / "shard-000001.tar"])
    assert len(glob_recs) == len(range_recs) == 5 and [r.id for r in list_recs] == ["000004"]


def test_webdataset_traversal_members_are_refused(wds_dir, tmp_path):
    _, stats = _load(wds_dir / "shard-000001.tar")
    examples = " ".join(stats.examples["unsafe_member"])
    assert "../evil.txt" in examples and "/abs.jpg" in examples and "link.jpg" in examples
    assert not list(tmp_path.rglob("evil.txt")) and not (tmp_path.parent / "evil.txt").exists()


def test_truncated_shard_keeps_earlier_records(truncated_shard):
    recs, stats = _load(truncated_shard)
    assert [r.id for r in recs] == ["000000", "000001", "000002"]
    assert len(stats.errors) == 1 and "truncated" in stats.errors[0]
    assert all(r.images[0].load().size == (64, 64) for r in recs)
    with pytest.raises(DataError, match="truncated"):
        list(load_records(truncated_shard, on_error="raise"))


def test_shard_cut_at_a_member_boundary_is_reported(tmp_path, mk):
    full = tmp_path / "full.tar"
    with tarfile.open(full, "w") as tf:
        for i in range(2):
            mk.add_tar_member(tf, f"{i}.png", mk.encode(mk.solid(RED)))
            mk.add_tar_member(tf, f"{i}.txt", b"t")
    with tarfile.open(full) as tf:
        end_of_last_member = max(m.offset_data + -(-m.size // 512) * 512 for m in tf.getmembers())
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[:end_of_last_member])
    recs, stats = _load(cut)
    assert len(recs) == 2 and len(stats.errors) == 1
    assert len(_load(full)[1].errors) == 0


# ---- HF datasets and parquet ---------------------------------------------------------------------


def test_hf_dataset_dict_on_disk(hf_disk):
    assert detect_format(hf_disk) == "hf_disk"
    recs, stats = _load(hf_disk)
    assert [(r.meta["split"], r.text) for r in recs] == [("train", "red"), ("train", "green"), ("train", "blue"),
                                                         ("validation", "red")]
    assert recs[0].images[0].data is not None and recs[0].images[0].load().getpixel((0, 0)) == RED
    assert recs[1].meta["score"] == pytest.approx(0.2)
    assert [r.text for r in _load(hf_disk, split="validation")[0]] == ["red"]
    with pytest.raises(DataError, match="no split"):
        list(load_records(hf_disk, split="nope"))


def test_parquet(parquet_file):
    assert detect_format(parquet_file) == "parquet" == detect_format(parquet_file.parent)
    recs, stats = _load(parquet_file)
    assert [r.text for r in recs] == ["red", "green", "blue"]
    assert recs[2].images[0].load().getpixel((0, 0)) == BLUE
    assert stats.records == {"pair": 3}
    with pytest.raises(DataError, match="no text column nope"):
        load_records(parquet_file, text_column="nope").__next__()


def test_parquet_with_path_column(tmp_path, mk):
    import pyarrow as pa
    import pyarrow.parquet as pq

    mk.solid(GREEN).save(tmp_path / "g.png")
    pq.write_table(pa.table({"image_path": ["g.png", "missing.png"], "alt_text": ["green", "x"]}), tmp_path / "t.parquet")
    recs, stats = _load(tmp_path / "t.parquet")
    assert [r.text for r in recs] == ["green"] and stats.skipped == {"missing_image": 1}


# ---- interleaved documents and conversations --------------------------------------------------------


def _shape(rec):
    return [("img", s.image.path.rsplit("/", 1)[-1]) if isinstance(s, ImageSegment) else ("txt", s.text)
            for s in rec.segments]


def test_obelics(obelics):
    assert detect_format(obelics) == "obelics"
    recs, stats = _load(obelics)
    assert len(recs) == 1 and recs[0].kind == "document" and recs[0].id == "doc1"
    assert _shape(recs[0]) == [("txt", "Intro."), ("img", "r.png"), ("txt", "Middle."), ("img", "b.png"), ("txt", "End.")]
    assert recs[0].messages[0].role == "document" and recs[0].meta == {"metadata": "{}"}
    assert stats.skipped == {"remote_image": 1, "bad_row": 1}


def test_mmc4(mmc4):
    assert detect_format(mmc4) == "mmc4"
    recs, stats = _load(mmc4)
    assert len(recs) == 1 and recs[0].id == "http://x/1"
    assert _shape(recs[0]) == [("img", "r.jpg"), ("txt", "First."), ("txt", "Second."), ("img", "g.jpg"), ("txt", "Third.")]
    assert stats.skipped == {"bad_row": 1}


def test_llava_json_and_jsonl(llava):
    assert detect_format(llava) == "llava"
    recs, stats = _load(llava)
    assert [r.id for r in recs] == ["q1", "q2", "text_only"]
    q1, q2, text_only = recs
    assert [m.role for m in q1.messages] == ["user", "assistant", "user", "assistant"]
    assert _shape(q1)[:3] == [("img", "1.jpg"), ("txt", "What colour is it?"), ("txt", "Red.")]
    assert _shape(q2)[:4] == [("txt", "Compare"), ("img", "1.jpg"), ("txt", "and"), ("img", "2.jpg")]
    assert text_only.images == [] and text_only.kind == "conversation"
    assert stats.skipped == {"placeholder_mismatch": 1, "path_outside_root": 1, "bad_role": 1}
    rows = json.loads(llava.read_text())
    jsonl = llava.with_suffix(".jsonl")
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert detect_format(jsonl) == "llava"
    assert [r.id for r in _load(jsonl)[0]] == ["q1", "q2", "text_only"]


def test_format_detection_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_records(tmp_path / "nope")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="cannot detect"):
        detect_format(tmp_path / "x.csv")
    with pytest.raises(DataError, match="cannot detect"):
        detect_format(tmp_path)
    with pytest.raises(Exception, match="unknown LoadOptions key"):
        load_records(tmp_path, bogus=1)


def test_options_object_and_cli_flags_agree():
    import argparse

    parser = argparse.ArgumentParser()
    LoadOptions.add_arguments(parser, config_flag=False)
    args = parser.parse_args(["--format", "coco", "--group-captions", "--max-text-chars", "50"])
    assert LoadOptions.from_cli(args) == LoadOptions(format="coco", group_captions=True, max_text_chars=50)


# ---- seed data inspect -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture, fmt, n",
    [("imagefolder", "imagefolder", 3), ("coco", "coco", 4), ("wds_dir", "webdataset", 5), ("hf_disk", "hf_disk", 4),
     ("parquet_file", "parquet", 3), ("obelics", "obelics", 1), ("mmc4", "mmc4", 1), ("llava", "llava", 3),
     ("truncated_shard", "webdataset", 3), ("broken_dir", "imagefolder", 15)],
)
def test_inspect_each_fixture(request, capsys, fixture, fmt, n):
    path = request.getfixturevalue(fixture)
    assert seed(["data", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"format:   {fmt}" in out and f"records:  {n}" in out and "example 1:" in out
    assert seed(["data", "inspect", str(path), "--json", "--n-examples", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == fmt and report["n_records"] == n and len(report["examples"]) == 1


def test_inspect_check_images_counts_bad_ones(broken_dir, capsys):
    assert seed(["data", "inspect", str(broken_dir), "--check-images", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_records"] == 9 and report["image_check"]["skipped"]["too_large"] == 2
    assert seed(["data", "inspect", str(broken_dir), "--check-images", "--max-pixels", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in report["examples"]] == ["one_pixel.png"]


def test_inspect_without_usable_records_exits_2(tmp_path, mk, capsys):
    mk.write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "gone.png", "text": "x"}, "{broken"])
    assert seed(["data", "inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: no usable records" in err and "missing_image 1" in err


def test_inspect_text_shows_skips_and_errors(imagefolder, truncated_shard, capsys):
    assert seed(["data", "inspect", str(imagefolder), "--n-examples", "0"]) == 0
    out = capsys.readouterr().out
    assert "skipped:  4 rows" in out and "metadata.jsonl:4: missing_image" in out and "example" not in out
    assert seed(["data", "inspect", str(truncated_shard)]) == 0
    assert "errors:   1" in capsys.readouterr().out


def test_inspect_missing_path_exits_2_with_one_line(tmp_path, capsys):
    assert seed(["data", "inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no such file or directory") and "\n" not in err


def test_inspect_limit(wds_dir, capsys):
    assert seed(["data", "inspect", str(wds_dir), "--limit", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_records"] == 2 and report["limited"]


def test_decoded_pixels_survive_the_round_trip(hf_disk):
    # The bytes of an Arrow Image column decode to exactly the pixels that were stored.
    rec = next(load_records(hf_disk))
    assert np.asarray(rec.load_images()[0]).reshape(-1, 3).tolist()[0] == list(RED)
