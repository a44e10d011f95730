"""A cache of SEED image codes: every image is encoded once, by content, and reused across runs.

The LLM stage never runs the vision tower: before training, each distinct image is encoded by the
SEED tokenizer into ``N`` codes and stored here; the training loop only reads integers. This is
what SEED-LLaMA's pipeline does offline (images are tokenised into a dataset of ids before
training), and on a CPU it is most of the speed of the LLM stage (see ``bench/train_llm.py``).

Layout (one directory per tokenizer, so codes of different tokenizers never mix)::

    ROOT/<fingerprint>/meta.json              num_tokens, codebook_size, tokenizer description
    ROOT/<fingerprint>/codes-<hash>.parquet   shards: key (string), codes (list<int32>, length N)

``fingerprint`` hashes the tokenizer's config and weights (:func:`tokenizer_fingerprint`); a
retrained tokenizer gets a new directory. ``key`` is a content hash of the image
(:func:`image_key`): the SHA-256 of the encoded file bytes for an
:class:`~data_pipelines.records.ImageRef`, of the decoded pixels (with shape and mode) for a PIL
image or a uint8 array. Shards are written under a temporary name and renamed into place, so a
killed run leaves no partial shard; duplicate keys across shards (two runs encoding the same
image at once) are harmless — the first one read wins, and both hold the same codes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from data_pipelines.records import ImageRef
from seedtok.errors import DataError
from seedtok.types import ImageCodes

ImageLike = ImageRef | Image.Image | np.ndarray


def image_key(image: ImageLike) -> str:
    """A content key: hex SHA-256 of the encoded bytes (ImageRef) or of the pixels (PIL / uint8 array)."""
    if isinstance(image, ImageRef):
        return image.sha256()
    h = hashlib.sha256()
    if isinstance(image, Image.Image):
        h.update(f"pil:{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
    elif isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image)
        h.update(f"np:{arr.dtype}:{arr.shape}".encode())
        h.update(arr.tobytes())
    else:
        raise DataError(f"cannot key an image of type {type(image).__name__}")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """16 hex digits identifying a SEED tokenizer by its config and its own weights."""
    h = hashlib.sha256(json.dumps(tokenizer.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(tokenizer.own_state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, ImageRef):
        return image.load()
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    return image.convert("RGB") if image.mode != "RGB" else image


class CodeCache:
    """Codes of images keyed by content, for one tokenizer (see the module docstring).

    Args:
        root: cache root shared by all tokenizers.
        fingerprint: the tokenizer's :func:`tokenizer_fingerprint`.
        num_tokens: codes per image ``N``.
        codebook_size: ``K``; every stored code is checked against it.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str, num_tokens: int, codebook_size: int,
                 description: str = ""):
        self.dir = Path(root) / fingerprint
        self.fingerprint = fingerprint
        self.num_tokens = num_tokens
        self.codebook_size = codebook_size
        meta = {"fingerprint": fingerprint, "num_tokens": num_tokens, "codebook_size": codebook_size,
                "tokenizer": description}
        meta_path = self.dir / "meta.json"
        if meta_path.is_file():
            try:
                old = json.loads(meta_path.read_text())
                old_shape = (int(old["num_tokens"]), int(old["codebook_size"]))
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{meta_path}: damaged code-cache metadata; delete {self.dir} to rebuild "
                                "the cache") from None
            if old_shape != (num_tokens, codebook_size):
                raise DataError(f"code cache {self.dir} holds {old['num_tokens']} codes of K={old['codebook_size']} "
                                f"per image, expected {num_tokens} of K={codebook_size}")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".meta.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, meta_path)
        self._index: dict[str, int] = {}
        self._codes = np.zeros((0, num_tokens), dtype=np.int32)
        self._shards: set[str] = set()
        self.reload()

    @classmethod
    def for_tokenizer(cls, root: str | os.PathLike, tokenizer: Any, description: str = "") -> CodeCache:
        """The cache of ``tokenizer`` (a :class:`seedtok.SeedTokenizer`) under ``root``."""
        return cls(root, tokenizer_fingerprint(tokenizer), tokenizer.num_tokens, tokenizer.codebook_size,
                   description=description)

    # ---- reading --------------------------------------------------------------------------------

    def reload(self) -> None:
        """Read shards written since the last (re)load (e.g. by another process)."""
        new = sorted(p for p in self.dir.glob("codes-*.parquet") if p.name not in self._shards)
        blocks = [self._codes]
        n = len(self._codes)
        for path in new:
            try:
                table = pq.read_table(path)
                keys = table.column("key").to_pylist()
                flat = table.column("codes").combine_chunks()
            except (OSError, KeyError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                raise DataError(f"{path}: damaged code-cache shard ({str(e).splitlines()[0][:200]}); delete it "
                                "to re-encode its images") from None
            codes = flat.values.to_numpy(zero_copy_only=False).astype(np.int32).reshape(len(keys), -1)
            if codes.shape[1] != self.num_tokens and len(keys):
                raise DataError(f"{path}: {codes.shape[1]} codes per image, expected {self.num_tokens}")
            if len(keys) and (codes.min() < 0 or codes.max() >= self.codebook_size):
                raise DataError(f"{path}: codes outside [0, {self.codebook_size})")
            blocks.append(codes)
            for i, k in enumerate(keys):
                self._index.setdefault(k, n + i)
            n += len(keys)
            self._shards.add(path.name)
        if len(blocks) > 1:
            self._codes = np.concatenate(blocks)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys (distinct, in order of first appearance) not in the cache."""
        return [k for k in dict.fromkeys(keys) if k not in self._index]

    def get(self, keys: Sequence[str]) -> ImageCodes:
        """Codes ``(len(keys), N)`` for cached keys; a missing key is a DataError."""
        try:
            rows = [self._index[k] for k in keys]
        except KeyError as e:
            raise DataError(f"image {e.args[0][:12]}… is not in the code cache {self.dir} (encode it first)") from None
        return ImageCodes(torch.from_numpy(self._codes[rows].astype(np.int64)), self.codebook_size)

    def as_array(self, keys: Sequence[str]) -> np.ndarray:
        """Like :meth:`get` but an int32 array ``(len(keys), N)`` (cheap for data loaders)."""
        return self.get(keys).codes.numpy().astype(np.int32)

    # ---- writing --------------------------------------------------------------------------------

    def add(self, keys: Sequence[str], codes: ImageCodes | torch.Tensor | np.ndarray) -> Path | None:
        """Store ``codes (len(keys), N)`` as one new shard (atomic); keys already cached are skipped."""
        arr = codes.codes if isinstance(codes, ImageCodes) else codes
        arr = np.asarray(arr.cpu() if isinstance(arr, torch.Tensor) else arr).astype(np.int32)
        if arr.shape != (len(keys), self.num_tokens):
            raise DataError(f"expected codes of shape ({len(keys)}, {self.num_tokens}), got {arr.shape}")
        if len(keys) and (arr.min() < 0 or arr.max() >= self.codebook_size):
            raise DataError(f"codes outside [0, {self.codebook_size})")
        fresh = [i for i, k in enumerate(keys) if k not in self._index]
        fresh = list({keys[i]: i for i in fresh}.values())  # one row per distinct key
        if not fresh:
            return None
        keys_new = [keys[i] for i in fresh]
        arr = arr[fresh]
        table = pa.table({
            "key": pa.array(keys_new, pa.string()),
            "codes": pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1), pa.int32()), self.num_tokens),
        })
        name = "codes-" + hashlib.sha256("".join(keys_new).encode()).hexdigest()[:16] + ".parquet"
        path = self.dir / name
        tmp = self.dir / f".{name}.{os.getpid()}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        self.reload()
        return path

    def encode(self, tokenizer: Any, images: Sequence[ImageLike], keys: Sequence[str] | None = None, *,
               batch_size: int = 256, shard_size: int = 8192, progress: bool = True) -> ImageCodes:
        """Codes of ``images``: encode (with ``tokenizer.encode``) only those not cached yet, store them,
        and return codes for all ``(len(images), N)`` in order.

        ``keys`` defaults to :func:`image_key` of each image. New codes are written in shards of
        ``shard_size`` images, so an interrupted encode keeps what it finished.
        """
        if keys is None:
            keys = [image_key(im) for im in images]
        if len(keys) != len(images):
            raise DataError(f"{len(images)} images but {len(keys)} keys")
        if tokenizer.num_tokens != self.num_tokens or tokenizer.codebook_size != self.codebook_size:
            raise DataError(f"the tokenizer makes {tokenizer.num_tokens} codes of K={tokenizer.codebook_size}, "
                            f"this cache holds {self.num_tokens} of K={self.codebook_size}")
        first = {}
        for i, k in enumerate(keys):
            if k not in self._index and k not in first:
                first[k] = i
        todo = list(first.items())
        bar = tqdm(total=len(todo), desc="encode images", unit="img", disable=not progress or not todo, leave=False)
        for s in range(0, len(todo), shard_size):
            chunk = todo[s:s + shard_size]
            out = []
            for b in range(0, len(chunk), batch_size):
                part = chunk[b:b + batch_size]
                out.append(tokenizer.encode([_to_pil(images[i]) for _, i in part]).codes.cpu())
                bar.update(len(part))
            self.add([k for k, _ in chunk], torch.cat(out))
        bar.close()
        return self.get(keys)


__all__ = ["CodeCache", "image_key", "tokenizer_fingerprint"]
