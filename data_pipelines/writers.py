"""Write a split of the Shapes world to disk as an image folder, a saved ``datasets.Dataset`` or webdataset shards.

Every format is readable by Hugging Face ``datasets`` without custom code:

* ``imagefolder``: ``<id>.png`` files and ``metadata.jsonl`` rows ``{file_name, text, paraphrases,
  attributes}`` → ``datasets.load_dataset("imagefolder", data_dir=out_dir)``;
* ``hf``: ``Dataset.save_to_disk`` with an ``Image()`` column → ``datasets.load_from_disk(out_dir)``;
* ``wds``: tar shards of ``{key}.png``, ``{key}.txt`` (canonical caption) and ``{key}.json`` (id,
  text, paraphrases, attributes) → ``datasets.load_dataset("webdataset", data_files=…)``.

Each output also holds ``shapes_config.yaml`` (the resolved :class:`ShapesConfig`) and
``shapes_manifest.json`` (split, format, range). The output is built in a hidden sibling directory
and renamed into place only when complete, so a killed run never leaves a directory that looks
finished (only a ``.<name>.partial-<pid>`` directory, safe to delete).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_pipelines.shapes import SPLITS, ShapesConfig, ShapesRecord, ShapesWorld
from seedtok.errors import ConfigError, DataError

FORMATS = ("imagefolder", "hf", "wds")
MANIFEST = "shapes_manifest.json"
CONFIG_FILE = "shapes_config.yaml"
METADATA = "metadata.jsonl"


def _png(record: ShapesRecord) -> bytes:
    buf = io.BytesIO()
    record.image.save(buf, format="PNG")
    return buf.getvalue()


def _meta(record: ShapesRecord) -> dict[str, Any]:
    return {"id": record.id, "text": record.text, "paraphrases": record.paraphrases,
            "attributes": record.attributes}


def _check_target(out_dir: Path, split: str, overwrite: bool) -> None:
    """Refuse a non-empty directory unless it is an earlier output of the same split (or ``overwrite``)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a directory")
    # The output replaces the directory as a whole: never the working directory, its parents or home.
    cwd = Path.cwd().resolve()
    if out_dir.resolve() in (cwd, *cwd.parents, Path.home().resolve()):
        raise DataError(f"refusing to write into {out_dir}: it is the working or home directory (or holds it)")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if overwrite:
        return
    try:
        previous = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict) or previous.get("split") != split:
        what = f"a Shapes {previous.get('split')} split" if isinstance(previous, dict) else "not a Shapes output"
        raise DataError(f"{out_dir} is not empty ({what}); choose another directory or pass overwrite=True / --overwrite")


def _write_imagefolder(tmp: Path, records: Iterator[ShapesRecord]) -> int:
    rows = []
    for rec in records:
        # Not "<id>.png": datasets would infer the split from a "test-…" file name (and put
        # "compositional-…" under "train"); numbered names always load as one "train" split.
        name = f"{rec.id.rsplit('-', 1)[1]}.png"
        (tmp / name).write_bytes(_png(rec))
        rows.append({"file_name": name, **_meta(rec)})
    with open(tmp / METADATA, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return len(rows)


def _hf_features():
    from datasets import Features, Image, List, Value

    obj = {"colour": Value("string"), "shape": Value("string"), "size": Value("string"),
           "box": List(Value("int32")), "position": Value("string")}
    return Features({
        "id": Value("string"), "image": Image(), "text": Value("string"),
        "paraphrases": List(Value("string")),
        "attributes": {"kind": Value("string"), "objects": List(obj), "relation": Value("string")},
    })


def _write_hf(tmp: Path, records: Iterator[ShapesRecord], chunk: int = 2000) -> int:
    # Built chunk by chunk from in-memory tables (not Dataset.from_generator, which would cache into
    # ~/.cache and may reuse a stale cache keyed on the generator's hash).
    from datasets import Dataset, concatenate_datasets

    features = _hf_features()
    parts, rows = [], []

    def flush() -> None:
        if rows:
            cols = {k: [r[k] for r in rows] for k in features}
            parts.append(Dataset.from_dict(cols, features=features))
            rows.clear()

    for rec in records:
        rows.append({**_meta(rec), "image": {"bytes": _png(rec), "path": f"{rec.id}.png"}})
        if len(rows) >= chunk:
            flush()
    flush()
    ds = concatenate_datasets(parts) if parts else Dataset.from_dict({k: [] for k in features}, features=features)
    ds.save_to_disk(str(tmp))
    return len(ds)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: byte-identical shards per seed
    tar.addfile(info, io.BytesIO(data))


def _write_wds(tmp: Path, records: Iterator[ShapesRecord], split: str, shard_size: int) -> int:
    n, tar = 0, None
    try:
        for rec in records:
            if n % shard_size == 0:
                if tar is not None:
                    tar.close()
                tar = tarfile.open(tmp / f"{split}-{n // shard_size:06d}.tar", "w", format=tarfile.USTAR_FORMAT)
            _tar_add(tar, f"{rec.id}.png", _png(rec))
            _tar_add(tar, f"{rec.id}.txt", rec.text.encode())
            _tar_add(tar, f"{rec.id}.json", json.dumps(_meta(rec)).encode())
            n += 1
    finally:
        if tar is not None:
            tar.close()
    return n


def write_shapes(
    out_dir: str | os.PathLike,
    split: str,
    n: int,
    fmt: str = "imagefolder",
    config: ShapesConfig | None = None,
    start: int = 0,
    *,
    overwrite: bool = False,
    shard_size: int = 1000,
    progress: bool = True,
) -> Path:
    """Write records ``start … start + n - 1`` of ``split`` to ``out_dir`` in format ``fmt``; return ``out_dir``.

    ``out_dir`` must be absent, empty, or an earlier output of the same split (which is replaced);
    anything else needs ``overwrite=True`` and is then replaced as a whole.
    """
    config = config or ShapesConfig()
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if n < 1 or start < 0 or shard_size < 1:
        raise ConfigError(f"need n ≥ 1, start ≥ 0 and shard_size ≥ 1, got n={n}, start={start}, shard_size={shard_size}")
    world = ShapesWorld(config)
    world.record(split, start)  # fail on a bad split/config before touching the disk
    out_dir = Path(out_dir).absolute()
    _check_target(out_dir, split, overwrite)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        bar = tqdm(world.generate(split, n, start), total=n, desc=f"shapes {split} → {fmt}", unit="img",
                   file=sys.stderr, disable=not progress)
        if fmt == "imagefolder":
            written = _write_imagefolder(tmp, bar)
        elif fmt == "hf":
            written = _write_hf(tmp, bar)
        else:
            written = _write_wds(tmp, bar, split, shard_size)
        config.to_yaml(tmp / CONFIG_FILE)
        manifest = {"format": fmt, "split": split, "start": start, "n": written, "config": config.to_dict()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        # Swap into place: the finished directory appears under its name in one rename.
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
