"""Fixtures: small real data sets in every supported format, and a folder of broken images.

Everything is written into ``tmp_path`` with PIL, tarfile, json and datasets; no binary file is
committed. Images are tiny (≤ 64 px) so the whole data_pipelines test tier stays fast.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

RED, GREEN, BLUE = (220, 38, 38), (40, 160, 70), (40, 90, 220)


# ---- small writers ---------------------------------------------------------------------------------


def solid(color=RED, size=(16, 12), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def noise(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width × height`` grey pixels, a few IDAT bytes and
    IEND: tiny on disk, a decompression bomb for anything that trusts the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def add_tar_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


# ---- broken / unusual images ----------------------------------------------------------------------


def _exif_rotated_jpeg() -> bytes:
    # Stored 40 wide × 20 high, left half red; orientation 6 = "rotate 90° clockwise to display".
    img = solid(BLUE, (40, 20))
    img.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif, quality=95)


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    img.paste(1, (0, 0, 4, 8))  # left half palette index 1 (red), right half index 0 (transparent)
    return encode(img, "PNG", transparency=0)


def _rgba() -> bytes:
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 255  # red everywhere
    a[:, :4, 3] = 255  # left half opaque
    a[:, 4:, 3] = 0  # right half fully transparent
    return encode(Image.fromarray(a), "PNG")


def _la() -> bytes:
    a = np.zeros((8, 8, 2), np.uint8)
    a[..., 0] = 0  # black
    a[..., 1] = 128  # half transparent
    return encode(Image.fromarray(a), "PNG")


def _gray16() -> bytes:
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16)
    return encode(Image.fromarray(np.tile(ramp, (16, 1))), "PNG")


def _animated_gif() -> bytes:
    frames = [solid(c, (10, 10)) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


#: file name → (bytes factory, expected reason or "ok").
BROKEN = {
    "truncated.png": (lambda: encode(noise())[: len(encode(noise())) // 2], "truncated"),
    "truncated.jpg": (lambda: encode(noise(), "JPEG")[: len(encode(noise(), "JPEG")) // 2], "truncated"),
    "empty.jpg": (lambda: b"", "empty"),
    "page.jpg": (lambda: b"<!DOCTYPE html><html><body>404 not found</body></html>\n", "not_an_image"),
    "bomb.png": (lambda: png_header_only(100_000, 100_000), "too_large"),
    "big_header.png": (lambda: png_header_only(9000, 9000), "too_large"),
    "cmyk.jpg": (lambda: encode(solid((0, 255, 255, 0), (16, 16), "CMYK"), "JPEG"), "ok"),
    "gray16.png": (_gray16, "ok"),
    "bilevel.png": (lambda: encode(Image.new("1", (9, 7), 1)), "ok"),
    "palette_transparent.png": (_palette_with_transparency, "ok"),
    "rgba.png": (_rgba, "ok"),
    "la.png": (_la, "ok"),
    "exif_rotated.jpg": (_exif_rotated_jpeg, "ok"),
    "animated.gif": (_animated_gif, "ok"),
    "one_pixel.png": (lambda: encode(solid(GREEN, (1, 1))), "ok"),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``broken_case``: one test per file of :data:`BROKEN`, as (file name, expected reason)."""
    if "broken_case" in metafunc.fixturenames:
        names = sorted(BROKEN)
        metafunc.parametrize("broken_case", [(n, BROKEN[n][1]) for n in names], ids=names)


@pytest.fixture
def mk() -> SimpleNamespace:
    """The builders above, for tests (test modules do not import conftest)."""
    return SimpleNamespace(
        solid=solid, noise=noise, encode=encode, write_jsonl=write_jsonl, png_header_only=png_header_only,
        add_tar_member=add_tar_member, RED=RED, GREEN=GREEN, BLUE=BLUE,
        broken={n: reason for n, (_, reason) in BROKEN.items()},
    )


@pytest.fixture
def broken_dir(tmp_path: Path) -> Path:
    """An imagefolder (metadata.jsonl) of every file in :data:`BROKEN`, one caption each."""
    d = tmp_path / "broken"
    d.mkdir()
    rows = []
    for name, (make, _) in BROKEN.items():
        (d / name).write_bytes(make())
        rows.append({"file_name": name, "text": f"caption of {name}"})
    write_jsonl(d / "metadata.jsonl", rows)
    return d


# ---- one small data set per format --------------------------------------------------------------


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    """3 good rows (Shapes-like columns) + a missing file, a bad JSON line, a row without text
    and a path escaping the folder."""
    d = tmp_path / "imagefolder"
    (d / "img").mkdir(parents=True)
    solid(RED).save(d / "img" / "a.png")
    solid(GREEN).save(d / "img" / "b.jpg", quality=95)
    solid(BLUE).save(d / "c.png")
    (tmp_path / "outside.png").write_bytes(encode(solid()))
    attrs = {"objects": [{"colour": "red", "shape": "circle", "size": "large"}], "position": "top left"}
    write_jsonl(d / "metadata.jsonl", [
        {"file_name": "img/a.png", "text": "a large red circle in the top left",
         "paraphrases": ["a big red circle at the top left"], "attributes": attrs},
        {"file_name": "img/b.jpg", "caption": "a green square", "source": "test"},
        {"file_name": "c.png", "text": "a blue\x00 triangle\x07\r\nsecond line\tTab"},
        {"file_name": "img/missing.png", "text": "gone"},
        '{"file_name": "img/a.png", "text": ',
        {"file_name": "img/a.png"},
        {"file_name": "../outside.png", "text": "escapes"},
    ])
    return d


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    d = tmp_path / "coco"
    (d / "train").mkdir(parents=True)
    for i, c in enumerate((RED, GREEN, BLUE), 1):
        solid(c).save(d / "train" / f"{i:012d}.jpg")
    data = {
        "info": {"description": "tiny"},
        "images": [{"id": i, "file_name": f"train/{i:012d}.jpg", "width": 16, "height": 12} for i in (1, 2, 3)]
        + [{"id": 4, "file_name": "train/missing.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "a red picture"},
            {"id": 11, "image_id": 2, "caption": "a green picture"},
            {"id": 12, "image_id": 1, "caption": "red, all red"},
            {"id": 13, "image_id": 3, "caption": "a blue picture"},
            {"id": 14, "image_id": 99, "caption": "no such image"},
            {"id": 15, "image_id": 4, "caption": "file missing"},
        ],
    }
    path = d / "captions_train.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def wds_dir(tmp_path: Path) -> Path:
    """Two shards: 4 good samples, then a shard with unsafe members and one good sample."""
    d = tmp_path / "wds"
    d.mkdir()
    with tarfile.open(d / "shard-000000.tar", "w") as tf:
        for i, c in enumerate((RED, GREEN, BLUE)):
            add_tar_member(tf, f"{i:06d}.jpg", encode(solid(c), "JPEG"))
            add_tar_member(tf, f"{i:06d}.txt", f"caption {i}".encode())
        add_tar_member(tf, "sub/000003.png", encode(solid(RED)))
        add_tar_member(tf, "sub/000003.json", json.dumps({"caption": "from json", "width": 16}).encode())
    with tarfile.open(d / "shard-000001.tar", "w") as tf:
        add_tar_member(tf, "../evil.txt", b"written outside?")
        add_tar_member(tf, "/abs.jpg", encode(solid(RED), "JPEG"))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        add_tar_member(tf, "000004.webp", encode(solid(GREEN), "WEBP"))
        add_tar_member(tf, "000004.txt", b"a webp sample")
        add_tar_member(tf, "000005.txt", b"caption without image")
    return d


@pytest.fixture
def truncated_shard(tmp_path: Path) -> Path:
    """Five samples with noisy (incompressible) images, cut inside the fourth sample's image."""
    path = tmp_path / "cut.tar"
    full = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=full, mode="w") as tf:
        for i in range(5):
            offsets.append(full.tell())
            add_tar_member(tf, f"{i:06d}.png", encode(noise(seed=i)))
            add_tar_member(tf, f"{i:06d}.txt", f"noise {i}".encode())
    data = full.getvalue()
    cut = offsets[3] + 512 + 3000  # past the 4th sample's header, inside its PNG bytes
    path.write_bytes(data[:cut])
    return path


def _hf_dataset():
    import datasets

    images = [solid(c) for c in (RED, GREEN, BLUE)]
    return datasets.Dataset.from_dict(
        {"image": images, "caption": ["red", "green", "blue"], "score": [0.1, 0.2, 0.3]},
        features=datasets.Features(
            {"image": datasets.Image(), "caption": datasets.Value("string"), "score": datasets.Value("float32")}
        ),
    )


@pytest.fixture
def hf_disk(tmp_path: Path) -> Path:
    import datasets

    ds = _hf_dataset()
    path = tmp_path / "hf_dict"
    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(path))
    return path


@pytest.fixture
def parquet_file(tmp_path: Path) -> Path:
    path = tmp_path / "pq" / "train-00000.parquet"
    path.parent.mkdir()
    _hf_dataset().to_parquet(str(path))
    return path


@pytest.fixture
def obelics(tmp_path: Path) -> Path:
    d = tmp_path / "obelics"
    d.mkdir()
    solid(RED).save(d / "r.png")
    solid(BLUE).save(d / "b.png")
    return write_jsonl(d / "docs.jsonl", [
        {"id": "doc1", "texts": ["Intro.", None, "Middle.", None, "End."], "images": [None, "r.png", None, "b.png", None],
         "metadata": "{}"},
        {"texts": ["t", None], "images": [None, "https://example.com/x.jpg"]},
        {"texts": ["a", "b"], "images": [None]},
    ])


@pytest.fixture
def mmc4(tmp_path: Path) -> Path:
    d = tmp_path / "mmc4"
    (d / "images").mkdir(parents=True)
    solid(RED).save(d / "images" / "r.jpg")
    solid(GREEN).save(d / "images" / "g.jpg")
    return write_jsonl(d / "docs.jsonl", [
        {"url": "http://x/1", "text_list": ["First.", "Second.", "Third."],
         "image_info": [{"image_name": "images/g.jpg", "matched_text_index": 2, "matched_sim": 0.3},
                        {"image_name": "images/r.jpg", "matched_text_index": 0, "matched_sim": 0.25}]},
        {"url": "http://x/2", "text_list": ["Only."], "image_info": [{"image_name": "images/r.jpg", "matched_text_index": 5}]},
    ])


@pytest.fixture
def llava(tmp_path: Path) -> Path:
    d = tmp_path / "llava"
    (d / "coco").mkdir(parents=True)
    solid(RED).save(d / "coco" / "1.jpg")
    solid(BLUE).save(d / "coco" / "2.jpg")
    rows = [
        {"id": "q1", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."}]},
        {"id": "q2", "image": ["coco/1.jpg", "coco/2.jpg"], "conversations": [
            {"from": "human", "value": "Compare <image> and <image>."},
            {"from": "gpt", "value": "Red vs blue."}]},
        {"id": "text_only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "mismatch", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image> <image> two?"}, {"from": "gpt", "value": "no"}]},
        {"id": "escape", "image": "../../etc/passwd", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        {"id": "badrole", "conversations": [{"from": "narrator", "value": "x"}]},
    ]
    path = d / "llava_instruct.json"
    path.write_text(json.dumps(rows))
    return path
