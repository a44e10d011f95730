"""One record schema for every data source: image–text pairs, interleaved documents, conversations.

Every loader in :mod:`data_pipelines.loaders` yields :class:`Record` objects, and everything
downstream (tokenising, sequence packing, evaluation) reads only this schema::

    Record(id="000123", kind="pair", meta={...}, messages=[
        Message("user",      [ImageSegment(ImageRef(path="/data/img/000123.jpg"))]),
        Message("assistant", [TextSegment("a large red circle in the top left")]),
    ])

* ``pair`` — one image and its caption (user: the image, assistant: the caption);
* ``document`` — one ``document`` message whose segments interleave text and images in reading
  order (MMC4 / OBELICS);
* ``conversation`` — user / assistant (/ system) turns, images at the positions of their
  ``<image>`` placeholders (LLaVA).

Images are referenced, not decoded: an :class:`ImageRef` holds a path or the encoded bytes
(from a tar shard or an Arrow table) and decodes on :meth:`ImageRef.load`. Everything but those
bytes is JSON-able (:meth:`Record.to_dict` / :meth:`Record.from_dict`).

Text is cleaned on construction (:func:`clean_text`): invalid UTF-8 decoded with U+FFFD,
lone surrogates (which ``json.loads`` lets through and which cannot be re-encoded) replaced by
U+FFFD, ``\\r\\n``/``\\r`` normalised to ``\\n``, and control characters other than ``\\n`` and
``\\t`` removed. The length limit is checked separately (:func:`check_text_length`, default
20 000 characters per text segment): a longer text is a :class:`DataError` — loaders skip the
row and count it as ``text_too_long`` — rather than silently truncated, because a cut caption
or a cut document is wrong training data and a 20k-character caption is almost always junk.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from data_pipelines.images import DEFAULT_MAX_PIXELS, DecodeStats, ImageDecodeError, decode_image
from seedtok.errors import DataError

DEFAULT_MAX_TEXT_CHARS = 20_000

Role = Literal["user", "assistant", "system", "document"]
Kind = Literal["pair", "document", "conversation"]
ROLES: tuple[str, ...] = ("user", "assistant", "system", "document")
KINDS: tuple[str, ...] = ("pair", "document", "conversation")

# C0 controls except \t (09) and \n (0A), DEL, and C1 controls; \r is normalised before.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str | bytes) -> str:
    """Decode (bytes: UTF-8 with replacement) and strip control characters, keeping ``\\n``/``\\t``."""
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise DataError(f"expected text, got {type(text).__name__}")
    text = _SURROGATE.sub("\ufffd", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


def check_text_length(text: str, max_chars: int | None = DEFAULT_MAX_TEXT_CHARS) -> str:
    """Return ``text`` or raise :class:`DataError` if it is longer than ``max_chars`` (None/0: no limit)."""
    if max_chars and len(text) > max_chars:
        raise DataError(f"text of {len(text):,} characters exceeds max_text_chars={max_chars:,}")
    return text


@dataclass(frozen=True)
class ImageRef:
    """A reference to one encoded image: a file ``path`` or its ``data`` bytes (plus a ``key``)."""

    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    key: str | None = None

    def __post_init__(self) -> None:
        if self.path is None and self.data is None:
            raise DataError("ImageRef needs a path or data")
        if self.path is not None and not isinstance(self.path, str):
            object.__setattr__(self, "path", os.fspath(self.path))

    @property
    def name(self) -> str:
        """How errors name this image: the path, else the key."""
        return self.path if self.data is None and self.path else (self.key or self.path or "<bytes>")

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        return Path(self.path).read_bytes()

    def load(self, stats: DecodeStats | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Decode to RGB (see :func:`~data_pipelines.images.decode_image`); count in ``stats`` if given."""
        source = self.data if self.data is not None else self.path
        try:
            img = decode_image(source, max_pixels=max_pixels, name=self.name)
        except ImageDecodeError as err:
            if stats is not None:
                stats.add_error(err)
            raise
        if stats is not None:
            stats.add_ok()
        return img

    def sha256(self) -> str:
        """Hex SHA-256 of the encoded bytes (a content key for caches of codes or features)."""
        h = hashlib.sha256()
        if self.data is not None:
            h.update(self.data)
        else:
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.path is not None:
            out["path"] = self.path
        if self.data is not None:
            out["data"] = self.data
        if self.key is not None:
            out["key"] = self.key
        return out

    @classmethod
    def coerce(cls, image: ImageRef | str | os.PathLike | bytes) -> ImageRef:
        if isinstance(image, ImageRef):
            return image
        if isinstance(image, bytes | bytearray):
            return cls(data=bytes(image))
        if isinstance(image, str | os.PathLike):
            return cls(path=os.fspath(image))
        raise DataError(f"not an image reference: {type(image).__name__}")


@dataclass(frozen=True)
class TextSegment:
    text: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", clean_text(self.text))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "text", "text": self.text}


@dataclass(frozen=True)
class ImageSegment:
    image: ImageRef

    def to_dict(self) -> dict[str, Any]:
        return {"type": "image", "image": self.image.to_dict()}


Segment = TextSegment | ImageSegment


def _segment_from_dict(d: dict[str, Any]) -> Segment:
    if d.get("type") == "text":
        return TextSegment(d["text"])
    if d.get("type") == "image":
        return ImageSegment(ImageRef(**d["image"]))
    raise DataError(f"unknown segment type {d.get('type')!r}")


@dataclass
class Message:
    role: Role
    content: list[Segment]

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise DataError(f"unknown role {self.role!r} (expected one of {', '.join(ROLES)})")

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": [s.to_dict() for s in self.content]}


@dataclass
class Record:
    """One training example; see the module docstring for the three kinds."""

    id: str
    kind: Kind
    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"unknown record kind {self.kind!r} (expected one of {', '.join(KINDS)})")
        self.id = str(self.id)

    @classmethod
    def pair(
        cls,
        id: str,
        image: ImageRef | str | os.PathLike | bytes,
        text: str | bytes,
        meta: dict[str, Any] | None = None,
    ) -> Record:
        """An image–caption pair: ``[user: image, assistant: caption]``."""
        return cls(
            id=id,
            kind="pair",
            messages=[
                Message("user", [ImageSegment(ImageRef.coerce(image))]),
                Message("assistant", [TextSegment(text)]),
            ],
            meta=dict(meta or {}),
        )

    @classmethod
    def document(cls, id: str, segments: list[Segment], meta: dict[str, Any] | None = None) -> Record:
        """An interleaved document: one ``document`` message, segments in reading order."""
        return cls(id=id, kind="document", messages=[Message("document", list(segments))], meta=dict(meta or {}))

    # ---- views ------------------------------------------------------------------------------
    @property
    def segments(self) -> list[Segment]:
        """All segments of all messages, in order."""
        return [s for m in self.messages for s in m.content]

    @property
    def images(self) -> list[ImageRef]:
        """The image references in order of appearance."""
        return [s.image for s in self.segments if isinstance(s, ImageSegment)]

    @property
    def text(self) -> str:
        """The caption of a pair; for documents and conversations all text segments joined by ``\\n``."""
        if self.kind == "pair":
            return "\n".join(s.text for m in self.messages if m.role == "assistant"
                             for s in m.content if isinstance(s, TextSegment))
        return "\n".join(s.text for s in self.segments if isinstance(s, TextSegment))

    def iter_texts(self) -> Iterator[str]:
        return (s.text for s in self.segments if isinstance(s, TextSegment))

    def check(self, max_text_chars: int | None = DEFAULT_MAX_TEXT_CHARS) -> Record:
        """Raise :class:`DataError` if any text segment exceeds ``max_text_chars``; return self."""
        for t in self.iter_texts():
            check_text_length(t, max_text_chars)
        return self

    def load_images(
        self, stats: DecodeStats | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
    ) -> list[Image.Image]:
        """Decode every image (RGB) in order; raises ImageDecodeError on the first bad one."""
        return [ref.load(stats=stats, max_pixels=max_pixels) for ref in self.images]

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (except ``ImageRef.data`` bytes, kept as ``bytes``)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "messages": [m.to_dict() for m in self.messages],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        try:
            messages = [
                Message(m["role"], [_segment_from_dict(s) for s in m["content"]]) for m in d["messages"]
            ]
            return cls(id=d["id"], kind=d["kind"], messages=messages, meta=dict(d.get("meta") or {}))
        except (KeyError, TypeError) as e:
            raise DataError(f"not a record dict ({type(e).__name__}: {e})") from None
