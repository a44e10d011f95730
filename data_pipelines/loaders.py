"""Loaders for real image–text data, all yielding :class:`~data_pipelines.records.Record`.

One entry point, :func:`load_records`, detects the format (:func:`detect_format`) and streams
records lazily. Formats:

==============  ==============================================================================
format          input
==============  ==============================================================================
imagefolder     a directory with ``metadata.jsonl`` (``file_name`` + ``text``/``caption``; other
                columns, e.g. Shapes' ``paraphrases``/``attributes``, go to ``meta``), or
                split sub-directories each with one (``meta["split"]``), or the jsonl itself
coco            a COCO captions JSON (``images``: ``id``/``file_name``; ``annotations``:
                ``image_id``/``caption``) — one record per caption, or per image with
                ``group_captions`` (first caption as text, all in ``meta["captions"]``)
webdataset      ``.tar``/``.tar.gz`` shards (a file, directory, glob, ``{000..009}`` range or list):
                ``KEY.jpg|png|webp|…`` + ``KEY.txt`` or ``KEY.json`` (caption key)
hf_disk         a directory written by ``datasets`` ``save_to_disk`` (Dataset or DatasetDict)
parquet         parquet files (file, directory, glob or list), e.g. from ``Dataset.to_parquet``
obelics         JSONL rows ``{"texts": [...], "images": [...]}``, one non-null per position
mmc4            JSONL rows ``{"text_list": [...], "image_info": [{"image_name",
                "matched_text_index"}]}``; each image goes before its matched sentence
llava           JSON list or JSONL of ``{"id", "image", "conversations": [{"from", "value"}]}``;
                ``<image>`` placeholders become image segments at their position
==============  ==============================================================================

Bad rows never stop a pass: they are skipped and counted by reason in a :class:`LoadStats`
(``on_error="raise"`` turns the first one into a :class:`DataError`). Whole-file problems (a
truncated tar shard, an unreadable parquet file) are recorded in ``LoadStats.errors`` and the
records read before them are kept.

Image paths are resolved against ``image_root`` (default: the directory of the data file). A
path that leaves that root — absolute, or climbing out with ``..`` — is refused and counted as
``path_outside_root`` unless ``allow_outside_root`` is set, so a downloaded annotation file can
never make the loader read arbitrary files (the check is lexical: symlinks placed inside the
root by the user are followed). URLs are counted as ``remote_image``: nothing is downloaded.
Tar members are never extracted to disk; members with absolute or ``..`` names and non-regular
members (links, devices) are skipped as ``unsafe_member``.

Streaming: JSONL, tar shards, parquet and saved HF datasets (memory-mapped Arrow) are read row
by row; a COCO JSON or a LLaVA JSON *list* is parsed whole (it is one JSON document), then its
records are built lazily.
"""

from __future__ import annotations

import glob as globlib
import json
import logging
import os
import re
import sys
import tarfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from data_pipelines.images import DEFAULT_MAX_PIXELS, DecodeStats, ImageDecodePolicy, iter_decoded
from data_pipelines.records import (
    DEFAULT_MAX_TEXT_CHARS,
    ImageRef,
    ImageSegment,
    Message,
    Record,
    Segment,
    TextSegment,
)
from seedtok.errors import DataError
from seedtok.schema import ConfigBase, option

logger = logging.getLogger(__name__)

FORMATS = ("imagefolder", "coco", "webdataset", "hf_disk", "parquet", "obelics", "mmc4", "llava")
Format = Literal["auto", "imagefolder", "coco", "webdataset", "hf_disk", "parquet", "obelics", "mmc4", "llava"]

#: Column names tried, in order, when no ``text_column`` / ``image_column`` is given.
TEXT_COLUMNS = ("text", "caption", "captions", "sentence", "sentences", "txt", "alt_text", "prompt", "description")
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "image_path", "file_name", "path")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")

#: A tar member larger than this is skipped rather than read into memory.
MAX_MEMBER_BYTES = 256 << 20
_ARROW_BATCH = 256


@dataclass
class LoadOptions(ConfigBase):
    """How :func:`load_records` reads a data set."""

    format: Format = option("auto", help="data format; auto detects it from the path")
    image_root: str | None = option(None, help="resolve relative image paths here; unset: the data file's directory")
    allow_outside_root: bool = option(False, help="accept image paths that are absolute or leave image_root")
    text_column: str | None = option(None, help=f"caption column; unset: the first of {', '.join(TEXT_COLUMNS[:4])}, … present")
    image_column: str | None = option(None, help="image column of a HF dataset / parquet file; unset: detected")
    split: str | None = option(None, help="only this split (DatasetDict split or imagefolder sub-directory)")
    group_captions: bool = option(False, help="COCO: one record per image (all captions in meta) instead of per caption")
    max_text_chars: int = option(DEFAULT_MAX_TEXT_CHARS, help="skip rows with a text segment longer than this (0: no limit)")
    on_error: Literal["skip", "raise"] = option("skip", help="skip and count bad rows/images, or raise at the first")
    check_images: bool = option(False, help="decode every image and skip records whose images are bad")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, help="with check_images: refuse images with more pixels than this")


@dataclass
class LoadStats:
    """What a pass over a data set saw: records by kind, skipped rows by reason, file errors."""

    format: str = ""
    records: Counter = field(default_factory=Counter)
    images: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    decode: DecodeStats = field(default_factory=DecodeStats)
    on_error: str = "skip"
    max_examples: int = 3
    max_warnings: int = 10
    _warned: int = field(default=0, repr=False)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Count a skipped row (or raise a DataError when ``on_error == "raise"``)."""
        msg = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.on_error == "raise":
            raise DataError(msg)
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(msg)
        self._warn(f"skipping {msg}")

    def error(self, msg: str) -> None:
        """A whole-file problem (the rows read before it are kept)."""
        if self.on_error == "raise":
            raise DataError(msg)
        self.errors.append(msg)
        self._warn(msg)

    def _warn(self, msg: str) -> None:
        if self._warned < self.max_warnings:
            self._warned += 1
            logger.warning("%s", msg)
            if self._warned == self.max_warnings:
                logger.warning("further skipped rows are counted without a warning each")

    @property
    def n_records(self) -> int:
        return sum(self.records.values())

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.records.items()))
        line = f"{self.n_records} records ({kinds or 'none'}), {self.images} images, {self.n_skipped} rows skipped"
        if self.skipped:
            line += " (" + ", ".join(f"{r} {n}" for r, n in self.skipped.most_common()) + ")"
        if self.errors:
            line += f", {len(self.errors)} file errors"
        if self.decode.ok or self.decode.n_bad:
            line += "; " + self.decode.summary()
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "records": dict(self.records),
            "n_records": self.n_records,
            "images": self.images,
            "skipped": dict(self.skipped),
            "skipped_examples": self.examples,
            "errors": list(self.errors),
            "image_check": self.decode.to_dict(),
        }


class _Skip(Exception):
    """Raised by a row builder: skip this row, count it under ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---- entry points ------------------------------------------------------------------------------

PathSpec = str | os.PathLike | Sequence[str | os.PathLike]


def load_records(
    path: PathSpec,
    format: str = "auto",
    *,
    stats: LoadStats | None = None,
    options: LoadOptions | None = None,
    **opts: Any,
) -> Iterator[Record]:
    """Stream the records of a data set.

    Args:
        path: a file, directory, glob (``shards/*.tar``), brace range (``s-{000..009}.tar``) or
            list of files.
        format: one of :data:`FORMATS`, or ``"auto"`` (see :func:`detect_format`).
        stats: filled while iterating (records by kind, images, skipped rows by reason, errors).
        options / **opts: :class:`LoadOptions` (keyword options override ``options``).

    Returns:
        A lazy iterator of :class:`Record`. Format detection and a missing path raise
        :class:`DataError` at once, not at the first ``next()``.
    """
    base = options.to_dict() if options is not None else {}
    if format != "auto" or "format" not in base:
        base["format"] = format
    cfg = LoadOptions.from_dict({**base, **opts})
    if isinstance(path, str | os.PathLike) and not _is_pattern(str(path)) and not Path(path).exists():
        raise DataError(f"no such file or directory: {path}")
    fmt = detect_format(path) if cfg.format == "auto" else cfg.format
    stats = stats if stats is not None else LoadStats()
    stats.format, stats.on_error = fmt, cfg.on_error
    records = _LOADERS[fmt](path, cfg, stats)
    if cfg.check_images:
        policy = ImageDecodePolicy(on_error=cfg.on_error, max_pixels=cfg.max_pixels)
        records = (rec for rec, _ in iter_decoded(records, policy=policy, stats=stats.decode, log_summary=False))
    return _counted(records, stats)


def _counted(records: Iterable[Record], stats: LoadStats) -> Iterator[Record]:
    for rec in records:
        stats.records[rec.kind] += 1
        stats.images += len(rec.images)
        yield rec


def detect_format(path: PathSpec) -> str:
    """Guess the format from the path and, for JSON/JSONL, the keys of the first row."""
    if not isinstance(path, str | os.PathLike):
        files = [Path(p) for p in path]
        if not files:
            raise DataError("empty list of data files")
        return _format_of_files(files, str(files[0]))
    s = str(path)
    if _is_pattern(s):
        files = _expand_pattern(s)
        if not files:
            raise DataError(f"no files match {s}")
        return _format_of_files(files, s)
    p = Path(s)
    if not p.exists():
        raise DataError(f"no such file or directory: {p}")
    if p.is_dir():
        if (p / "metadata.jsonl").is_file():
            return "imagefolder"
        if (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()):
            return "hf_disk"
        if _files_in(p, TAR_SUFFIXES):
            return "webdataset"
        if _files_in(p, (".parquet",)):
            return "parquet"
        if any(p.glob("*/metadata.jsonl")):
            return "imagefolder"
        jsonl = _files_in(p, (".jsonl",))
        if jsonl:
            return _sniff_jsonl(jsonl[0])
        raise DataError(
            f"cannot detect the format of directory {p} (no metadata.jsonl, saved HF dataset, "
            f".tar shards, .parquet or .jsonl files); pass --format"
        )
    return _format_of_files([p], s)


def _format_of_files(files: list[Path], what: str) -> str:
    name = files[0].name.lower()
    if name.endswith(TAR_SUFFIXES):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".jsonl"):
        return _sniff_jsonl(files[0])
    if name.endswith(".json"):
        return _sniff_json(files[0])
    raise DataError(f"cannot detect the format of {what} from its extension; pass --format")


def _sniff_jsonl(path: Path) -> str:
    with open(path, "rb") as f:
        for _, line in zip(range(50), f):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                fmt = _format_of_keys(row)
                if fmt:
                    return fmt
                raise DataError(f"{path}: cannot tell the format from the keys {sorted(row)[:8]}; pass --format")
    raise DataError(f"{path}: no JSON object in its first lines")


def _format_of_keys(row: dict[str, Any]) -> str | None:
    if "conversations" in row:
        return "llava"
    if "text_list" in row:
        return "mmc4"
    if "texts" in row and "images" in row:
        return "obelics"
    if "file_name" in row:
        return "imagefolder"
    return None


def _sniff_json(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(1 << 20).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if head.startswith("[") and '"conversations"' in head:
        return "llava"
    if head.startswith("{") and ('"annotations"' in head or '"images"' in head):
        return "coco"
    raise DataError(f"{path}: neither a COCO captions file nor a LLaVA conversation list; pass --format")


# ---- file lists --------------------------------------------------------------------------------

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _is_pattern(s: str) -> bool:
    return any(c in s for c in "*?[") or bool(_BRACE.search(s))


def _expand_pattern(s: str) -> list[Path]:
    """Expand webdataset-style ``{000..009}`` ranges, then shell globs; sorted, de-duplicated."""
    patterns = [s]
    while any(_BRACE.search(p) for p in patterns):
        out = []
        for p in patterns:
            m = _BRACE.search(p)
            if not m:
                out.append(p)
                continue
            lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
            out += [p[: m.start()] + str(i).zfill(width) + p[m.end():] for i in range(lo, hi + 1)]
        patterns = out
    files: list[Path] = []
    for p in patterns:
        files += [Path(x) for x in sorted(globlib.glob(p))] if any(c in p for c in "*?[") else [Path(p)]
    return list(dict.fromkeys(files))


def _files_in(d: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))


def _expand(path: PathSpec, suffixes: tuple[str, ...]) -> list[Path]:
    """A data path as a list of files: a list, a pattern, a directory (its matching files) or a file."""
    if not isinstance(path, str | os.PathLike):
        return [Path(p) for p in path]
    s = str(path)
    if _is_pattern(s):
        return _expand_pattern(s)
    p = Path(s)
    if p.is_dir():
        files = _files_in(p, suffixes)
        if not files:
            raise DataError(f"no {'/'.join(suffixes)} files in {p}")
        return files
    return [p]


def _root_for(files: Sequence[Path] | Path, cfg: LoadOptions) -> Path:
    if cfg.image_root:
        return Path(cfg.image_root)
    f = files if isinstance(files, Path) else files[0]
    return f if f.is_dir() else f.parent


# ---- shared row helpers ------------------------------------------------------------------------


class _Resolver:
    """Resolve image paths inside a root directory (see the module docstring for the rules)."""

    def __init__(self, root: Path, allow_outside: bool):
        self.root = Path(os.path.normpath(os.path.abspath(root)))
        self.allow_outside = allow_outside

    def ref(self, value: Any, key: str | None = None) -> ImageRef:
        if isinstance(value, dict):  # a datasets Image feature: {"bytes": …, "path": …}
            if value.get("bytes"):
                return ImageRef(data=bytes(value["bytes"]), key=value.get("path") or key)
            value = value.get("path")
        if isinstance(value, bytes | bytearray):
            return ImageRef(data=bytes(value), key=key)
        if not isinstance(value, str) or not value.strip():
            raise _Skip("missing_image", f"no image path ({value!r})")
        if "://" in value:
            raise _Skip("remote_image", f"{value[:80]} is a URL (download images first)")
        p = Path(value)
        full = Path(os.path.normpath(p if p.is_absolute() else self.root / p))
        if not self.allow_outside and not full.is_relative_to(self.root):
            raise _Skip("path_outside_root", f"{value} is outside {self.root} (set image_root or allow_outside_root)")
        if not full.is_file():
            raise _Skip("missing_image", f"no such file: {value}")
        return ImageRef(path=str(full), key=key)


def _pick_text(row: dict[str, Any], column: str | None) -> tuple[str, str, list[str] | None]:
    """(caption, its column, all captions if the column holds a list)."""
    names = [column] if column else [c for c in TEXT_COLUMNS if c in row]
    if not names or names[0] not in row or row[names[0]] is None:
        raise _Skip("missing_text", f"no {column or ' / '.join(TEXT_COLUMNS[:2])} field")
    col = names[0]
    value = row[col]
    if isinstance(value, list):
        texts = [t for t in value if isinstance(t, str | bytes) and t]
        if not texts:
            raise _Skip("missing_text", f"{col} is an empty list")
        return _as_text(texts[0]), col, [_as_text(t) for t in texts]
    if not isinstance(value, str | bytes):
        raise _Skip("bad_row", f"{col} is a {type(value).__name__}, not text")
    return _as_text(value), col, None


def _as_text(value: str | bytes) -> str:
    return value if isinstance(value, str) else bytes(value).decode("utf-8", errors="replace")


def _iter_jsonl(path: Path, stats: LoadStats) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            where = f"{path.name}:{lineno}"
            try:
                row = json.loads(line)
            except ValueError as e:
                stats.skip("bad_json", where, str(e).splitlines()[0])
                continue
            if not isinstance(row, dict):
                stats.skip("bad_row", where, f"a JSON {type(row).__name__}, not an object")
                continue
            yield where, row


def _iter_json_rows(path: Path, stats: LoadStats) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a ``.jsonl`` file, or of a ``.json`` file holding one list of objects."""
    if path.name.lower().endswith(".jsonl"):
        yield from _iter_jsonl(path, stats)
        return
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got a {type(data).__name__}")
    for i, row in enumerate(data):
        where = f"{path.name}[{i}]"
        if not isinstance(row, dict):
            stats.skip("bad_row", where, f"a JSON {type(row).__name__}, not an object")
            continue
        yield where, row


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8", errors="replace"))
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None


def _drive(
    items: Iterable[tuple[str, Any]],
    build: Callable[[str, Any], Iterable[Record]],
    cfg: LoadOptions,
    stats: LoadStats,
) -> Iterator[Record]:
    """Build records from rows; a row that fails is skipped and counted, never fatal."""
    for where, item in items:
        try:
            records = list(build(where, item))
            for rec in records:
                _check_length(rec, cfg.max_text_chars)
        except _Skip as s:
            stats.skip(s.reason, where, s.detail)
            continue
        except DataError as e:  # a bad role, kind or text from the records module
            stats.skip("bad_row", where, str(e))
            continue
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            # Rows of real data come in every shape; a malformed one is data, not a bug of ours.
            stats.skip("bad_row", where, f"{type(e).__name__}: {e}")
            continue
        yield from records


def _check_length(rec: Record, max_chars: int) -> None:
    try:
        rec.check(max_chars)
    except DataError as e:
        raise _Skip("text_too_long", str(e)) from None
    if rec.kind == "pair" and not rec.text.strip():
        # An image with an empty (or all-whitespace / all-control-character) caption teaches
        # nothing in either direction, and as a generation prompt it is an empty prompt.
        raise _Skip("empty_text", "the caption is empty after cleaning")


def _extra(row: dict[str, Any], used: Iterable[str]) -> dict[str, Any]:
    used = set(used)
    return {k: v for k, v in row.items() if k not in used}


# ---- imagefolder -------------------------------------------------------------------------------


def _load_imagefolder(path: PathSpec, cfg: LoadOptions, stats: LoadStats) -> Iterator[Record]:
    p = Path(path)  # a directory or its metadata.jsonl
    if p.is_file():
        metas = [p]
    elif (p / "metadata.jsonl").is_file():
        metas = [p / "metadata.jsonl"]
    else:
        metas = sorted(p.glob("*/metadata.jsonl"))
        if cfg.split:
            metas = [m for m in metas if m.parent.name == cfg.split]
        if not metas:
            raise DataError(f"no metadata.jsonl in {p}" + (f" for split {cfg.split!r}" if cfg.split else ""))
    for meta_path in metas:
        split = meta_path.parent.name if meta_path.parent != p and p.is_dir() else None
        resolver = _Resolver(Path(cfg.image_root) if cfg.image_root else meta_path.parent, cfg.allow_outside_root)

        def build(where: str, row: dict[str, Any], split=split, resolver=resolver) -> list[Record]:
            fname = row.get("file_name")
            if not isinstance(fname, str) or not fname:
                raise _Skip("bad_row", "no file_name")
            text, col, all_texts = _pick_text(row, cfg.text_column)
            meta = _extra(row, ("file_name", col, "id"))
            if all_texts is not None:
                meta["captions"] = all_texts
            if split is not None:
                meta["split"] = split
            rid = str(row.get("id", fname))
            rid = f"{split}/{rid}" if split is not None else rid
            return [Record.pair(rid, resolver.ref(fname, key=fname), text, meta)]

        yield from _drive(_iter_jsonl(meta_path, stats), build, cfg, stats)


# ---- COCO captions -----------------------------------------------------------------------------


def _load_coco(path: PathSpec, cfg: LoadOptions, stats: LoadStats) -> Iterator[Record]:
    p = Path(path)
    data = _read_json(p)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) or not isinstance(data.get("images"), list):
        raise DataError(f"{p}: not a COCO captions file (needs 'images' and 'annotations' lists)")
    images = {img.get("id"): img for img in data["images"] if isinstance(img, dict)}
    resolver = _Resolver(_root_for(p, cfg), cfg.allow_outside_root)
    name = p.name

    def image_of(ann: dict[str, Any]) -> tuple[Any, dict[str, Any], ImageRef]:
        image_id = ann.get("image_id")
        img = images.get(image_id)
        if img is None:
            raise _Skip("unknown_image_id", f"image_id {image_id!r} not in 'images'")
        return image_id, img, resolver.ref(img.get("file_name"), key=img.get("file_name"))

    def image_meta(image_id: Any, img: dict[str, Any]) -> dict[str, Any]:
        return {"image_id": image_id, **_extra(img, ("id", "file_name"))}

    anns = data["annotations"]
    if not cfg.group_captions:

        def build(where: str, ann: Any) -> list[Record]:
            if not isinstance(ann, dict):
                raise _Skip("bad_row", "annotation is not an object")
            image_id, img, ref = image_of(ann)
            text, _, _ = _pick_text(ann, cfg.text_column or "caption")
            meta = {**image_meta(image_id, img), "annotation_id": ann.get("id")}
            return [Record.pair(f"{image_id}-{ann.get('id')}", ref, text, meta)]

        yield from _drive(((f"{name}:annotations[{i}]", a) for i, a in enumerate(anns)), build, cfg, stats)
        return

    grouped: dict[Any, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict):
            stats.skip("bad_row", f"{name}:annotations[{i}]", "annotation is not an object")
            continue
        grouped[ann.get("image_id")].append((i, ann))

    def build_group(where: str, group: list[tuple[int, dict[str, Any]]]) -> list[Record]:
        image_id, img, ref = image_of(group[0][1])
        captions = [_pick_text(a, cfg.text_column or "caption")[0] for _, a in group]
        meta = {**image_meta(image_id, img), "captions": captions, "annotation_ids": [a.get("id") for _, a in group]}
        return [Record.pair(str(image_id), ref, captions[0], meta)]

    items = ((f"{name}:image_id={k}", g) for k, g in grouped.items())
    yield from _drive(items, build_group, cfg, stats)


# ---- webdataset tar shards ---------------------------------------------------------------------


def _unsafe_member_name(name: str) -> bool:
    norm = name.replace("\\", "/")
    parts = PurePosixPath(norm).parts
    return norm.startswith("/") or ".." in parts or bool(re.match(r"^[A-Za-z]:", norm))


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    name = name[2:] if name.startswith("./") else name
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def _load_webdataset(path: PathSpec, cfg: LoadOptions, stats: LoadStats) -> Iterator[Record]:
    for shard in _expand(path, TAR_SUFFIXES):
        yield from _drive(_iter_tar_samples(shard, stats), lambda where, s: [_sample_record(s, cfg)], cfg, stats)


def _iter_tar_samples(shard: Path, stats: LoadStats) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, {"__key__", "__shard__", ext: bytes, …}) per sample, streaming the tar once."""
    try:
        tf = tarfile.open(shard, mode="r|*")  # stream mode: one forward pass, gz/bz2/xz too
    except (tarfile.TarError, OSError) as e:
        stats.error(f"{shard}: cannot open as a tar shard ({e})")
        return
    key: str | None = None
    sample: dict[str, Any] = {}
    n = 0
    with tf:
        try:
            for member in tf:
                where = f"{shard.name}:{member.name}"
                if _unsafe_member_name(member.name):
                    stats.skip("unsafe_member", where, "absolute or '..' member name")
                    continue
                if member.isdir():
                    continue
                if not member.isfile():
                    stats.skip("unsafe_member", where, "not a regular file (link or device)")
                    continue
                k, ext = _split_key(member.name)
                if k != key:
                    if sample:
                        n += 1
                        yield f"{shard.name}:{key}", sample
                    key, sample = k, {"__key__": k, "__shard__": shard.name}
                if not ext:
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    stats.skip("member_too_large", where, f"{member.size:,} bytes")
                    continue
                fh = tf.extractfile(member)
                sample[ext] = fh.read() if fh is not None else b""
            truncated = _tar_lacks_end(tf, shard)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            truncated = f"{type(e).__name__}: {e}"
            sample = {}  # the sample being read when the data ended is incomplete
    if sample:
        n += 1
        yield f"{shard.name}:{key}", sample
    if truncated:
        stats.error(f"{shard}: truncated or corrupt tar after {n} samples ({truncated})")


def _tar_lacks_end(tf: tarfile.TarFile, shard: Path) -> str | None:
    """tarfile stops quietly when an uncompressed shard ends at a member boundary or inside a
    header; a complete archive has two zero blocks after the last member, so check for them."""
    if getattr(tf.fileobj, "comptype", "tar") != "tar":
        return None  # compressed streams detect truncation themselves (EOFError)
    try:
        if shard.stat().st_size < tf.offset + 2 * tarfile.BLOCKSIZE:
            return "the end-of-archive blocks are missing"
    except OSError:
        return None
    return None


def _sample_record(sample: dict[str, Any], cfg: LoadOptions) -> Record:
    key = sample["__key__"]
    img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if img_ext is None:
        raise _Skip("missing_image", f"no {'/'.join(IMAGE_EXTS[:4])} member for key {key}")
    meta: dict[str, Any] = {"shard": sample["__shard__"]}
    text = None
    if "json" in sample:
        try:
            info = json.loads(sample["json"].decode("utf-8", errors="replace"))
        except ValueError:
            raise _Skip("bad_json", f"{key}.json is not valid JSON") from None
        if isinstance(info, dict):
            try:
                text, col, all_texts = _pick_text(info, cfg.text_column)
                meta.update(_extra(info, (col,)))
                if all_texts is not None:
                    meta["captions"] = all_texts
            except _Skip:
                meta.update(info)
    for ext in (cfg.text_column, "txt", "text", "caption"):
        if ext and ext in sample and isinstance(sample[ext], bytes):
            text = sample[ext].decode("utf-8", errors="replace")
            break
    if text is None:
        raise _Skip("missing_text", f"no .txt member or caption in .json for key {key}")
    ref = ImageRef(data=sample[img_ext], key=f"{sample['__shard__']}/{key}.{img_ext}")
    return Record.pair(key, ref, text, meta)


# ---- HF datasets on disk and parquet -----------------------------------------------------------


def _load_hf_disk(path: PathSpec, cfg: LoadOptions, stats: LoadStats) -> Iterator[Record]:
    import datasets  # lazy: ~1 s import

    p = Path(path)
    try:
        obj = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{p}: not a dataset saved with save_to_disk ({str(e).splitlines()[0]})") from None
    splits = list(obj.items()) if isinstance(obj, datasets.DatasetDict) else [(None, obj)]
    if cfg.split:
        splits = [(n, d) for n, d in splits if n == cfg.split]
        if not splits:
            raise DataError(f"{p}: no split {cfg.split!r}")
    resolver = _Resolver(_root_for(p, cfg), cfg.allow_outside_root)
    for split, ds in splits:
        image_features = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
        img_col, txt_col = _choose_columns(list(ds.features), image_features, cfg, str(p))
        batches = (b.to_pylist() for b in ds.with_format("arrow").iter(batch_size=_ARROW_BATCH))
        label = split or "data"
        rows = ((f"{label}[{i}]", (i, row)) for i, row in enumerate(r for batch in batches for r in batch))
        yield from _drive(rows, _table_builder(img_col, txt_col, resolver, label, split), cfg, stats)


def _load_parquet(path: PathSpec, cfg: LoadOptions, stats: LoadStats) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _expand(path, (".parquet",))
    resolver = _Resolver(_root_for(files, cfg), cfg.allow_outside_root)
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except (OSError, pa.ArrowException) as e:
            stats.error(f"{f}: cannot read as parquet ({str(e).splitlines()[0]})")
            continue
        schema = pf.schema_arrow
        image_features = []
        for fld in schema:
            t = fld.type
            if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
                image_features.append(fld.name)
        img_col, txt_col = _choose_columns(schema.names, image_features, cfg, str(f))

        def rows(pf=pf, f=f) -> Iterator[tuple[str, tuple[int, dict[str, Any]]]]:
            i = 0
            try:
                for batch in pf.iter_batches(batch_size=_ARROW_BATCH):
                    for row in batch.to_pylist():
                        yield f"{f.name}[{i}]", (i, row)
                        i += 1
            except (OSError, pa.ArrowException) as e:
                stats.error(f"{f}: unreadable after {i} rows ({str(e).splitlines()[0]})")

        yield from _drive(rows(), _table_builder(img_col, txt_col, resolver, f.stem, None), cfg, stats)


def _choose_columns(names: list[str], image_features: list[str], cfg: LoadOptions, what: str) -> tuple[str, str]:
    img_col = cfg.image_column or (image_features[0] if image_features else None)
    img_col = img_col or next((c for c in IMAGE_COLUMNS if c in names), None)
    txt_col = cfg.text_column or next((c for c in TEXT_COLUMNS if c in names), None)
    for col, kind, flag in ((img_col, "image", "image_column"), (txt_col, "text", "text_column")):
        if col is None or col not in names:
            raise DataError(f"{what}: no {kind} column {col or ''} found (columns: {', '.join(names)}); pass {flag}")
    return img_col, txt_col


def _table_builder(img_col: str, txt_col: str, resolver: _Resolver, prefix: str, split: str | None):
    def build(where: str, item: tuple[int, dict[str, Any]]) -> list[Record]:
        i, row = item
        rid = row.get("id", row.get("key"))
        rid = str(rid) if rid is not None else f"{prefix}/{i}"
        value = row.get(img_col)
        if value is None:
            raise _Skip("missing_image", f"{img_col} is empty")
        if isinstance(value, list):
            raise _Skip("bad_row", f"{img_col} holds {len(value)} images; only one per pair is supported")
        ref = resolver.ref(value, key=rid)
        text, col, all_texts = _pick_text(row, txt_col)
        meta = _extra(row, (img_col, col, "id"))
        if all_texts is not None:
            meta["captions"] = all_texts
        if split is not None:
            meta["split"] = split
        return [Record.pair(rid, ref, text, meta)]

    return build


# ---- interleaved documents ---------------------------------------------------------------------


def _load_jsonl_rows(build_for: Callable[[_Resolver], Callable[[str, Any], list[Record]]]):
    def load(path: PathSpec, cfg: LoadOptions, stats: LoadStats) -> Iterator[Record]:
        files = _expand(path, (".jsonl", ".json"))
        resolver = _Resolver(_root_for(files, cfg), cfg.allow_outside_root)
        build = build_for(resolver)
        for f in files:
            yield from _drive(_iter_json_rows(f, stats), build, cfg, stats)

    return load


def _doc_id(row: dict[str, Any], where: str) -> str:
    for k in ("id", "document_id", "doc_id", "url"):
        if row.get(k) not in (None, ""):
            return str(row[k])
    return where


def _obelics_builder(resolver: _Resolver):
    def build(where: str, row: dict[str, Any]) -> list[Record]:
        texts, images = row.get("texts"), row.get("images")
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            raise _Skip("bad_row", "'texts' and 'images' must be lists of equal length")
        segments: list[Segment] = []
        for i, (t, im) in enumerate(zip(texts, images)):
            if im is not None:
                segments.append(ImageSegment(resolver.ref(im, key=f"{where}#{i}")))
            if isinstance(t, str | bytes) and t:
                segments.append(TextSegment(t))
        if not segments:
            raise _Skip("empty_document", "no text and no image")
        return [Record.document(_doc_id(row, where), segments, _extra(row, ("texts", "images", "id")))]

    return build


def _mmc4_builder(resolver: _Resolver):
    def build(where: str, row: dict[str, Any]) -> list[Record]:
        texts = row.get("text_list")
        infos = row.get("image_info") or []
        if not isinstance(texts, list) or not isinstance(infos, list):
            raise _Skip("bad_row", "'text_list' and 'image_info' must be lists")
        before: dict[int, list[ImageRef]] = defaultdict(list)
        for info in infos:
            idx = info.get("matched_text_index") if isinstance(info, dict) else None
            if not isinstance(idx, int) or not 0 <= idx < len(texts):
                raise _Skip("bad_row", f"matched_text_index {idx!r} outside text_list of {len(texts)}")
            name = info.get("image_name") or info.get("image_path")
            before[idx].append(resolver.ref(name, key=name))
        segments: list[Segment] = []
        for i, t in enumerate(texts):
            segments += [ImageSegment(ref) for ref in before.get(i, [])]
            if isinstance(t, str | bytes) and t:
                segments.append(TextSegment(t))
        if not segments:
            raise _Skip("empty_document", "no text and no image")
        return [Record.document(_doc_id(row, where), segments, _extra(row, ("text_list", "id")))]

    return build


# ---- LLaVA-style conversations -----------------------------------------------------------------

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system", "bot": "assistant", "model": "assistant"}
PLACEHOLDER = "<image>"


def _llava_builder(resolver: _Resolver):
    def build(where: str, row: dict[str, Any]) -> list[Record]:
        conv = row.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise _Skip("bad_row", "'conversations' must be a non-empty list")
        images = row.get("image")
        images = [] if images is None else images if isinstance(images, list) else [images]
        turns: list[tuple[str, str]] = []
        for t in conv:
            if not isinstance(t, dict) or not isinstance(t.get("value"), str):
                raise _Skip("bad_row", "each turn needs 'from' and a string 'value'")
            role = _ROLES.get(str(t.get("from", "")).lower())
            if role is None:
                raise _Skip("bad_role", f"unknown speaker {t.get('from')!r}")
            turns.append((role, t["value"]))
        n_placeholders = sum(v.count(PLACEHOLDER) for _, v in turns)
        if n_placeholders != len(images):
            raise _Skip("placeholder_mismatch", f"{n_placeholders} {PLACEHOLDER} placeholders for {len(images)} images")
        refs = iter([resolver.ref(im, key=im if isinstance(im, str) else None) for im in images])
        messages = []
        for role, value in turns:
            pieces = value.split(PLACEHOLDER)
            content: list[Segment] = []
            for j, piece in enumerate(pieces):
                if j > 0:
                    content.append(ImageSegment(next(refs)))
                    piece = piece.lstrip()  # "<image>\nWhat is …": the newline only marks the slot
                if j < len(pieces) - 1:
                    piece = piece.rstrip()
                if piece:
                    content.append(TextSegment(piece))
            messages.append(Message(role, content))
        rid = str(row["id"]) if row.get("id") is not None else where
        return [Record(rid, "conversation", messages, _extra(row, ("id", "image", "conversations")))]

    return build


_LOADERS: dict[str, Callable[[PathSpec, LoadOptions, LoadStats], Iterator[Record]]] = {
    "imagefolder": _load_imagefolder,
    "coco": _load_coco,
    "webdataset": _load_webdataset,
    "hf_disk": _load_hf_disk,
    "parquet": _load_parquet,
    "obelics": _load_jsonl_rows(_obelics_builder),
    "mmc4": _load_jsonl_rows(_mmc4_builder),
    "llava": _load_jsonl_rows(_llava_builder),
}


# ---- inspection (``seed data inspect``) --------------------------------------------------------


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def describe(rec: Record, text_chars: int = 160) -> dict[str, Any]:
    """A small JSON-able summary of one record (text shortened), for inspection and logs."""
    return {
        "id": rec.id,
        "kind": rec.kind,
        "n_segments": len(rec.segments),
        "images": [ref.name for ref in rec.images[:5]] + ([f"… {len(rec.images) - 5} more"] if len(rec.images) > 5 else []),
        "text": _short(rec.text, text_chars),
        "meta_keys": sorted(rec.meta)[:12],
    }


def inspect_dataset(
    path: PathSpec,
    options: LoadOptions | None = None,
    *,
    n_examples: int = 3,
    limit: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Read a data set once and report its format, counts, skipped rows, errors and examples."""
    from tqdm import tqdm

    options = options or LoadOptions()
    stats = LoadStats()
    records = load_records(path, options=options, stats=stats)
    examples = []
    bar = tqdm(records, desc="reading", unit=" rec", file=sys.stderr, disable=None if progress else True)
    for rec in bar:
        if len(examples) < n_examples:
            examples.append(describe(rec))
        if limit and stats.n_records >= limit:
            break
    bar.close()
    out = {"path": str(path) if isinstance(path, str | os.PathLike) else [str(p) for p in path]}
    out.update(stats.to_dict())
    out["checked_images"] = options.check_images
    out["limited"] = bool(limit) and stats.n_records >= limit
    out["examples"] = examples
    return out
