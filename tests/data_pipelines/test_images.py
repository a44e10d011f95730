"""decode_image on broken and unusual files, the skipping iterator, and processor geometry."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from data_pipelines.images import (
    DecodeStats,
    ImageDecodeError,
    ImageDecodePolicy,
    decode_image,
    iter_decoded,
    prepare_for_processor,
    resize_for_processor,
    to_rgb,
)
from seedtok.errors import DataError

RED, BLUE = (220, 38, 38), (40, 90, 220)


def test_every_file_decodes_to_rgb_or_fails_with_its_reason(broken_dir, broken_case):
    name, expected = broken_case
    path = broken_dir / name
    if expected == "ok":
        img = decode_image(path)
        assert img.mode == "RGB" and img.size[0] >= 1 and img.size[1] >= 1
        return
    with pytest.raises(ImageDecodeError) as info:
        decode_image(path)
    err = info.value
    assert isinstance(err, DataError)
    assert err.reason == expected
    msg = str(err)
    assert str(path) in msg and "\n" not in msg and "Traceback" not in msg


def test_sixteen_bit_grey_is_scaled_not_clipped(broken_dir):
    a = np.asarray(decode_image(broken_dir / "gray16.png"))  # (16, 64, 3), ramp 0 … 65535
    assert a[0, 0].tolist() == [0, 0, 0] and a[0, -1].tolist() == [255, 255, 255]
    assert 110 < a.mean() < 145  # a ramp, not all white (clipped) or all black
    assert (np.diff(a[0, :, 0].astype(int)) >= 0).all()


def test_transparency_is_composited_over_white(broken_dir):
    rgba = np.asarray(decode_image(broken_dir / "rgba.png"))
    assert rgba[0, 0].tolist() == [255, 0, 0] and rgba[0, -1].tolist() == [255, 255, 255]
    pal = np.asarray(decode_image(broken_dir / "palette_transparent.png"))
    assert pal[0, 0].tolist() == [255, 0, 0] and pal[0, -1].tolist() == [255, 255, 255]
    la = np.asarray(decode_image(broken_dir / "la.png"))  # black at alpha 128 over white
    assert np.abs(la.astype(int) - 127).max() <= 1


def test_modes_exif_animation_and_cmyk(broken_dir):
    rot = decode_image(broken_dir / "exif_rotated.jpg")
    assert rot.size == (20, 40)  # stored 40 × 20, orientation 6 applied
    top, bottom = np.asarray(rot)[2, 10], np.asarray(rot)[-3, 10]
    assert top[0] > 180 and top[2] < 80  # the stored left (red) half is now on top
    assert bottom[2] > 180 and bottom[0] < 80
    assert decode_image(broken_dir / "animated.gif").getpixel((5, 5)) == (255, 0, 0)  # first frame
    r, g, b = decode_image(broken_dir / "cmyk.jpg").getpixel((8, 8))
    assert r > 230 and g < 25 and b < 25
    assert set(np.asarray(decode_image(broken_dir / "bilevel.png")).ravel().tolist()) == {255}
    assert decode_image(broken_dir / "one_pixel.png").size == (1, 1)


def test_sources_bytes_stream_and_pil(mk):
    data = mk.encode(mk.solid(RED), "PNG")
    assert decode_image(data).getpixel((0, 0)) == RED
    assert decode_image(io.BytesIO(data)).getpixel((0, 0)) == RED

    class Pipe(io.RawIOBase):  # a non-seekable stream
        def __init__(self):
            self.buf = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            chunk = self.buf.read(len(b))
            b[: len(chunk)] = chunk
            return len(chunk)

    assert decode_image(Pipe()).getpixel((0, 0)) == RED
    assert decode_image(mk.solid(RED, mode="RGBA")).mode == "RGB"
    with pytest.raises(ImageDecodeError, match="clip.jpg: empty") as info:
        decode_image(b"", name="clip.jpg")
    assert info.value.reason == "empty"


def test_missing_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(tmp_path / "nope.png")
    assert info.value.reason == "missing"
    with pytest.raises(ImageDecodeError) as info:
        decode_image(tmp_path)
    assert info.value.reason == "unreadable"


def test_max_pixels_is_checked_on_the_header_before_decoding(mk):
    # 300 × 300 real image with a 10k-pixel budget: refused as too large, not decoded.
    with pytest.raises(ImageDecodeError, match="90,000 pixels exceeds max_pixels=10,000"):
        decode_image(mk.encode(mk.noise((300, 300))), max_pixels=10_000)
    # A 9000 × 9000 header with almost no data: if pixels were decoded first this would be
    # "truncated" (after allocating 81 MB); the header check refuses it first.
    with pytest.raises(ImageDecodeError) as info:
        decode_image(mk.png_header_only(9000, 9000))
    assert info.value.reason == "too_large"
    # Within the budget, the same header is decoded and then found truncated.
    with pytest.raises(ImageDecodeError) as info:
        decode_image(mk.png_header_only(200, 200), max_pixels=None)
    assert info.value.reason == "truncated"


def test_to_rgb_float_and_int_modes():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128, 255]
    i = Image.fromarray(np.array([[0, 100, 200]], np.int32))  # mode "I" with 8-bit values
    assert np.asarray(to_rgb(i))[0, :, 0].tolist() == [0, 100, 200]
    i16 = Image.fromarray(np.array([[0, 1000, 70000]], np.int32))  # beyond 16 bits: min-max
    assert np.asarray(to_rgb(i16))[0, :, 0].tolist() == [0, 4, 255]


class _Item:
    def __init__(self, name, data):
        self.name, self.data = name, data

    def load_images(self, max_pixels=None):
        return [decode_image(self.data, max_pixels=max_pixels, name=self.name)]


def test_iter_decoded_skips_counts_warns_once_and_summarises(caplog, mk):
    good = mk.encode(mk.solid(RED))
    items = [_Item("a.png", good), _Item("bad.jpg", b"junk"), _Item("b.png", good),
             _Item("bad.jpg", b"junk"), _Item("empty.png", b"")]
    stats = DecodeStats()
    with caplog.at_level(logging.INFO, logger="data_pipelines.images"):
        out = list(iter_decoded(items, stats=stats))
    assert [it.name for it, _ in out] == ["a.png", "b.png"]
    assert out[0][1][0].getpixel((0, 0)) == RED
    assert stats.ok == 2 and stats.skipped == {"not_an_image": 2, "empty": 1}
    assert stats.examples["not_an_image"] == ["bad.jpg", "bad.jpg"]
    per_file = [r for r in caplog.records if "skipping record" in r.getMessage()]
    assert len(per_file) == 2  # bad.jpg once, empty.png once
    assert caplog.records[-1].getMessage() == stats.summary()
    assert stats.summary().startswith("images: 2 ok, 3 skipped (not_an_image 2, empty 1)")


def test_iter_decoded_raise_fails_fast(mk):
    items = [_Item("a.png", mk.encode(mk.solid(RED))), _Item("bad.jpg", b"junk"), _Item("never.png", b"")]
    seen = []
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        for it, _ in iter_decoded(items, policy=ImageDecodePolicy(on_error="raise")):
            seen.append(it.name)
    assert seen == ["a.png"]


def test_resize_for_processor_modes(mk):
    img = mk.solid(BLUE, (40, 20))
    img.paste(RED, (0, 0, 10, 20))  # red left quarter
    crop = resize_for_processor(img, 16, "center_crop")
    assert crop.size == (16, 16)
    assert np.asarray(crop)[8, 0, 2] > 150  # the red quarter is cropped away
    pad = resize_for_processor(img, 16, "pad")
    assert pad.size == (16, 16)
    assert np.asarray(pad)[0, 8].tolist() == [255, 255, 255] and np.asarray(pad)[8, 0, 0] > 150
    assert resize_for_processor(img, (10, 30), "resize").size == (30, 10)
    with pytest.raises(ValueError):
        resize_for_processor(img, 16, "squash")


def test_prepare_for_processor_matches_clip_image_processor(mk):
    transformers = pytest.importorskip("transformers")
    try:
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:  # older transformers: the PIL processor is the default class
        Proc = transformers.CLIPImageProcessor
    proc = Proc(size={"shortest_edge": 32}, crop_size={"height": 24, "width": 24})
    # Our geometry + the processor's rescale/normalise == the processor end to end.
    for img in (mk.noise((57, 41), seed=3), mk.noise((30, 70), seed=4), mk.noise((20, 9), seed=5)):
        prepared = prepare_for_processor(img, proc)
        assert prepared.size == (24, 24)
        ours = proc(images=prepared, do_resize=False, do_center_crop=False, return_tensors="np")["pixel_values"]
        theirs = proc(images=img, return_tensors="np")["pixel_values"]
        assert ours.shape == theirs.shape == (1, 3, 24, 24)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # Crop only, from an image smaller than the crop on one side: both zero-pad the same way.
    crop_only = Proc(do_resize=False, crop_size={"height": 24, "width": 24})
    for img in (mk.noise((20, 9), seed=6), mk.noise((30, 70), seed=7)):
        prepared = prepare_for_processor(img, crop_only)
        ours = crop_only(images=prepared, do_center_crop=False, return_tensors="np")["pixel_values"]
        theirs = crop_only(images=img, return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
