"""Robust image decoding: any file, bytes or stream → an RGB PIL image, or one clear DataError.

Real data sets contain truncated downloads, HTML pages saved as ``.jpg``, CMYK JPEGs, 16-bit
PNGs, palette images with transparency, EXIF-rotated phone photos, animated GIFs and the odd
decompression bomb. :func:`decode_image` turns every one of them into either an ``RGB`` image
the vision tower can take, or an :class:`ImageDecodeError` (a :class:`~seedtok.errors.DataError`)
whose one-line message names the file and the problem, with a short machine-readable ``reason``:

========================  =====================================================================
reason                    meaning
========================  =====================================================================
``missing``               the path does not exist
``unreadable``            the path exists but cannot be read (a directory, no permission)
``empty``                 zero bytes
``not_an_image``          PIL cannot identify the format (text, HTML, …)
``too_large``             width × height exceeds ``max_pixels`` (checked on the header)
``truncated``             the pixel data ends early
``corrupt``               any other decoder failure
========================  =====================================================================

:class:`DecodeStats` counts successes and failures by reason; :func:`iter_decoded` wraps an
iterator of records so that one bad file never ends an epoch (``on_error="skip"``), or fails
fast (``on_error="raise"``). :func:`resize_for_processor` / :func:`prepare_for_processor` bring
an image to the geometry a vision tower's image processor expects.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from PIL import Image, ImageOps, UnidentifiedImageError

from seedtok.errors import DataError
from seedtok.schema import ConfigBase, option

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Default decompression-bomb limit: 64 megapixels (an 8000 × 8000 photo). Decoding that as RGB
#: already takes 192 MB; anything larger in an image–text corpus is almost always an error.
DEFAULT_MAX_PIXELS = 64_000_000

#: Everything :func:`decode_image` accepts.
ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | Image.Image

REASONS = ("missing", "unreadable", "empty", "not_an_image", "too_large", "truncated", "corrupt")

WHITE = (255, 255, 255)


class ImageDecodeError(DataError):
    """An image could not be decoded; ``reason`` is one of :data:`REASONS`, ``name`` the source."""

    def __init__(self, name: str, reason: str, detail: str):
        self.name = name
        self.reason = reason
        self.detail = detail
        super().__init__(f"{name}: {detail}")


# ---- decoding ---------------------------------------------------------------------------------


def decode_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode ``source`` fully into an ``RGB`` image.

    Args:
        source: a path, raw encoded bytes, a binary file object, or an already opened PIL image.
        max_pixels: refuse images with more than this many pixels (``None`` or 0: no limit of ours;
            PIL's own hard limit of 2 × ``Image.MAX_IMAGE_PIXELS`` still applies). Checked on
            the header, before any pixel is decoded, so a bomb never allocates its canvas.
        name: what to call the source in error messages (default: the path, or ``<bytes>``).

    Returns:
        A loaded ``RGB`` image of shape (H, W, 3) with EXIF orientation applied, transparency
        composited over white, high-bit-depth data scaled to 8 bits and only the first frame of
        an animation.

    Raises:
        ImageDecodeError: a one-line :class:`DataError` naming the source and the problem.
    """
    if isinstance(source, Image.Image):
        label = name or getattr(source, "filename", None) or "<image>"
        return _finish(source, str(label), max_pixels)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        label = name or str(path)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise ImageDecodeError(label, "missing", "no such file") from None
        except (IsADirectoryError, PermissionError, OSError) as e:
            raise ImageDecodeError(label, "unreadable", f"cannot read ({e.strerror or e})") from None
        with fh:
            return _decode_stream(fh, label, max_pixels)
    if isinstance(source, bytes | bytearray | memoryview):
        return _decode_stream(io.BytesIO(bytes(source)), name or "<bytes>", max_pixels)
    if hasattr(source, "read"):
        label = name or str(getattr(source, "name", "<stream>"))
        stream = source
        if not (getattr(source, "seekable", lambda: False)()):
            # PIL needs to seek (format sniffing, multi-frame files): buffer a pipe or socket.
            stream = io.BytesIO(source.read())
        return _decode_stream(stream, label, max_pixels)
    raise TypeError(f"decode_image: unsupported source type {type(source).__name__}")


def _decode_stream(stream: IO[bytes], label: str, max_pixels: int | None) -> Image.Image:
    start = stream.tell()
    stream.seek(0, os.SEEK_END)
    size = stream.tell() - start
    stream.seek(start)
    if size == 0:
        raise ImageDecodeError(label, "empty", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # We enforce our own max_pixels below; PIL's softer warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(stream)
    except UnidentifiedImageError:
        raise ImageDecodeError(label, "not_an_image", "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(label, "too_large", f"too large ({_first_line(e)})") from None
    except Exception as e:  # PIL plugins raise SyntaxError, ValueError, struct.error, … on bad headers
        raise ImageDecodeError(label, "corrupt", f"bad image header ({_first_line(e)})") from None
    return _finish(img, label, max_pixels)


def _finish(img: Image.Image, label: str, max_pixels: int | None) -> Image.Image:
    """Check the header size, decode every pixel, and normalise to RGB."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(label, "corrupt", f"invalid size {w}x{h}")
    if max_pixels and w * h > max_pixels:
        raise ImageDecodeError(
            label, "too_large", f"{w}x{h} = {w * h:,} pixels exceeds max_pixels={max_pixels:,}"
        )
    try:
        # First frame of animations; load() forces the full decode so truncation surfaces here,
        # inside the try, and not later in a collate function.
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(label, "too_large", f"too large ({_first_line(e)})") from None
    except OSError as e:
        msg = _first_line(e)
        reason = "truncated" if "truncat" in msg.lower() or "end of" in msg.lower() else "corrupt"
        raise ImageDecodeError(label, reason, f"{reason} image data ({msg})") from None
    except Exception as e:
        raise ImageDecodeError(label, "corrupt", f"cannot decode ({_first_line(e)})") from None
    try:
        img = _exif_transpose(img)
        return to_rgb(img)
    except Exception as e:
        raise ImageDecodeError(label, "corrupt", f"cannot convert to RGB ({_first_line(e)})") from None


def _exif_transpose(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        # A mangled EXIF block must not cost us an otherwise good photo: keep the stored
        # orientation (what most viewers fall back to as well).
        return img


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert any PIL mode to ``RGB``.

    * transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, a palette or
      grey/RGB image with a ``transparency`` entry) is alpha-composited over ``background``;
    * 16/32-bit integer (``I;16*``, ``I``) and float (``F``) grey images are scaled to 0…255
      (see :func:`_scale_to_uint8`) instead of being clipped, which turns them white;
    * everything else (``P``, ``L``, ``1``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) via PIL.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        import numpy as np  # lazy: only high-bit-depth images need it, and it keeps `seed --help` fast

        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode)).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def _scale_to_uint8(a: Any, mode: str) -> Any:
    """Map high-bit-depth grey values to uint8 (H, W).

    ``I;16`` data spans 0…65535, so it is divided by 257 (65535 → 255, exact for 8-bit data
    stored in 16 bits). ``I`` (int32) is treated the same when it fits in 16 bits, and as 8-bit
    when it fits in 0…255; ``F`` in 0…1 is multiplied by 255. Anything else is min–max scaled.
    """
    import numpy as np

    a = a.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        out = a / 257.0
    elif mode == "I" and lo >= 0 and hi <= 255:
        out = a
    elif mode == "I" and lo >= 0 and hi <= 65535:
        out = a / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        out = a * 255.0
    elif hi > lo:
        out = (a - lo) * (255.0 / (hi - lo))
    else:
        out = np.full_like(a, min(max(lo, 0.0), 255.0))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---- policy, statistics and the skipping iterator ---------------------------------------------


@dataclass
class ImageDecodePolicy(ConfigBase):
    """What to do with images that cannot be decoded."""

    on_error: Literal["skip", "raise"] = option(
        "skip", help="skip a record whose image cannot be decoded (counted) or raise at once"
    )
    max_pixels: int = option(DEFAULT_MAX_PIXELS, help="refuse images with more pixels than this (0: no limit)")
    max_warnings: int = option(10, help="log at most this many individual bad files, then count silently")


@dataclass
class DecodeStats:
    """Counts of decoded and refused images, by reason, with a few example sources per reason."""

    ok: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add_ok(self, n: int = 1) -> None:
        self.ok += n

    def add_error(self, err: ImageDecodeError) -> None:
        self.skipped[err.reason] += 1
        ex = self.examples.setdefault(err.reason, [])
        if len(ex) < self.max_examples:
            ex.append(err.name)

    @property
    def n_bad(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line, e.g. ``images: 10 ok, 3 skipped (truncated 2, empty 1) e.g. a.jpg``."""
        line = f"images: {self.ok} ok, {self.n_bad} skipped"
        if self.skipped:
            parts = ", ".join(f"{r} {n}" for r, n in self.skipped.most_common())
            first = next(iter(self.examples.values()), [])
            line += f" ({parts})" + (f", e.g. {first[0]}" if first else "")
        return line

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "skipped": dict(self.skipped), "examples": self.examples}


def iter_decoded(
    items: Iterable[T],
    *,
    policy: ImageDecodePolicy | None = None,
    stats: DecodeStats | None = None,
    load_images: Callable[[T, int | None], Sequence[Image.Image]] | None = None,
    log_summary: bool = True,
) -> Iterator[tuple[T, list[Image.Image]]]:
    """Yield ``(item, images)`` for every item whose images all decode.

    With ``policy.on_error == "skip"`` an item with a bad image is dropped, counted in ``stats``
    by reason, and a warning naming the file is logged (once per file, at most
    ``policy.max_warnings`` times, then silently counted); at the end (or when the consumer
    stops early) the :meth:`DecodeStats.summary` line is logged. With ``"raise"`` the first
    :class:`ImageDecodeError` propagates.

    Args:
        items: e.g. :class:`~data_pipelines.records.Record` objects.
        load_images: ``(item, max_pixels) -> list of RGB images``; by default
            ``item.load_images(max_pixels=max_pixels)``.
    """
    policy = policy or ImageDecodePolicy()
    stats = stats if stats is not None else DecodeStats()
    load = load_images or (lambda item, mp: item.load_images(max_pixels=mp))
    warned: set[str] = set()
    try:
        for item in items:
            try:
                images = list(load(item, policy.max_pixels))
            except ImageDecodeError as err:
                if policy.on_error == "raise":
                    raise
                stats.add_error(err)
                if err.name not in warned and len(warned) < policy.max_warnings:
                    warned.add(err.name)
                    logger.warning("skipping record with a bad image: %s", err)
                    if len(warned) == policy.max_warnings:
                        logger.warning("further bad images are counted without a warning each")
                continue
            stats.add_ok(len(images))
            yield item, images
    finally:
        if log_summary:
            (logger.warning if stats.n_bad else logger.info)("%s", stats.summary())


# ---- geometry for vision towers ----------------------------------------------------------------


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_for_processor(
    img: Image.Image,
    size: int | tuple[int, int],
    mode: Literal["center_crop", "pad", "resize"] = "center_crop",
    *,
    resample: int = Image.Resampling.BICUBIC,
    fill: tuple[int, int, int] = WHITE,
) -> Image.Image:
    """Bring ``img`` to exactly ``size`` ((height, width), or one int for a square).

    * ``center_crop``: scale so the image covers the target, then crop the centre (CLIP style);
    * ``pad``: scale so the image fits inside the target, then pad with ``fill`` (keeps the
      whole picture, LLaVA's "pad" aspect mode);
    * ``resize``: scale each axis independently (distorts the aspect ratio).
    """
    th, tw = _hw(size)
    img = to_rgb(img)
    w, h = img.size
    if mode == "resize":
        return img.resize((tw, th), resample)
    if mode == "center_crop":
        scale = max(tw / w, th / h)
        nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
        img = img.resize((nw, nh), resample)
        left, top = (nw - tw) // 2, (nh - th) // 2
        return img.crop((left, top, left + tw, top + th))
    if mode == "pad":
        scale = min(tw / w, th / h)
        nw, nh = max(1, min(tw, round(w * scale))), max(1, min(th, round(h * scale)))
        out = Image.new("RGB", (tw, th), fill)
        out.paste(img.resize((nw, nh), resample), ((tw - nw) // 2, (th - nh) // 2))
        return out
    raise ValueError(f"resize_for_processor: unknown mode {mode!r}")


def _size_get(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


def prepare_for_processor(img: Image.Image, processor: Any) -> Image.Image:
    """Resize and centre-crop ``img`` the way a transformers image processor would.

    Reads ``processor.size`` (``shortest_edge``, or ``height``/``width``), ``crop_size``,
    ``do_resize``, ``do_center_crop`` and ``resample`` — the attributes of e.g.
    ``CLIPImageProcessor`` — and returns an RGB PIL image of the processor's output size, so that
    images can be cached or inspected at model resolution. The shortest-edge resize truncates the
    long side like transformers does (``int(short * long / short_side)``); the crop offsets are
    ``(H - h) // 2``, ``(W - w) // 2``.
    """
    img = to_rgb(img)
    resample = getattr(processor, "resample", None)
    resample = Image.Resampling.BICUBIC if resample is None else int(resample)
    if getattr(processor, "do_resize", True):
        size = getattr(processor, "size", None)
        short = _size_get(size, "shortest_edge")
        height, width = _size_get(size, "height"), _size_get(size, "width")
        w, h = img.size
        if short is not None:
            if w <= h:
                new = (short, int(short * h / w))
            else:
                new = (int(short * w / h), short)
            img = img.resize(new, resample)
        elif height is not None and width is not None:
            img = img.resize((width, height), resample)
        else:
            raise ValueError(f"prepare_for_processor: unsupported processor size {size!r}")
    if getattr(processor, "do_center_crop", False):
        crop = getattr(processor, "crop_size", None)
        ch, cw = _size_get(crop, "height"), _size_get(crop, "width")
        if ch is None or cw is None:
            raise ValueError(f"prepare_for_processor: unsupported crop_size {crop!r}")
        w, h = img.size
        if w < cw or h < ch:  # transformers pads a too-small image with zeros before cropping
            canvas = Image.new("RGB", (max(w, cw), max(h, ch)), (0, 0, 0))
            canvas.paste(img, (-(-(max(w, cw) - w) // 2), -(-(max(h, ch) - h) // 2)))  # ceil, as theirs
            img, (w, h) = canvas, canvas.size
        top, left = (h - ch) // 2, (w - cw) // 2
        img = img.crop((left, top, left + cw, top + ch))
    return img
