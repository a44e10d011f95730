"""Code cache: every image is encoded once by content, stored as parquet, reused by a later run,
kept apart per tokenizer."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data_pipelines.code_cache import CodeCache, image_key, tokenizer_fingerprint
from data_pipelines.records import ImageRef
from seedtok.errors import DataError
from seedtok.types import ImageCodes


class CountingTokenizer:
    """Stands in for SeedTokenizer: codes are a function of the pixels; counts the images it encodes."""

    num_tokens, codebook_size = 4, 50

    def __init__(self, scale: float = 1.0):
        self.encoded = 0
        self.weight = torch.tensor([scale])

    class config:  # noqa: N801 — mimics SeedTokenizer.config
        @staticmethod
        def to_dict():
            return {"kind": "counting"}

    def own_state_dict(self):
        return {"w": self.weight}

    def encode(self, images):
        self.encoded += len(images)
        arr = np.stack([np.asarray(im, dtype=np.int64) for im in images])  # (B, S, S, 3)
        sums = arr.reshape(len(images), 4, -1).sum(-1)
        return ImageCodes(torch.from_numpy(sums % self.codebook_size), self.codebook_size)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]


def test_encode_once_and_reuse_across_runs(tmp_path):
    tok = CountingTokenizer()
    images = _images(10)
    images.append(images[3].copy())  # same content → same key → encoded once
    cache = CodeCache.for_tokenizer(tmp_path, tok)
    codes = cache.encode(tok, images, batch_size=4, progress=False)
    assert codes.codes.shape == (11, 4) and tok.encoded == 10
    assert torch.equal(codes.codes[3], codes.codes[10])
    expected = tok.encode(images).codes
    assert torch.equal(codes.codes, expected)
    # A new run (new object, same directory) reads the shards and encodes nothing.
    tok2 = CountingTokenizer()
    again = CodeCache.for_tokenizer(tmp_path, tok2).encode(tok2, images, progress=False)
    assert tok2.encoded == 0 and torch.equal(again.codes, codes.codes)
    # Only new images are encoded; shards are parquet with key + codes columns.
    more = _images(3, seed=1)
    CodeCache.for_tokenizer(tmp_path, tok2).encode(tok2, images + more, progress=False)
    assert tok2.encoded == 3
    shard = next(cache.dir.glob("codes-*.parquet"))
    assert pq.read_table(shard).column_names == ["key", "codes"]


def test_keys_are_content_hashes_and_tokenizers_are_kept_apart(tmp_path):
    a = _images(1)[0]
    assert image_key(a) == image_key(a.copy())
    b = a.copy()
    b[0, 0, 0] ^= 1
    assert image_key(a) != image_key(b)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    assert image_key(ImageRef(data=buf.getvalue())) == ImageRef(data=buf.getvalue()).sha256()
    t1, t2 = CountingTokenizer(1.0), CountingTokenizer(2.0)
    assert tokenizer_fingerprint(t1) != tokenizer_fingerprint(t2)
    assert CodeCache.for_tokenizer(tmp_path, t1).dir != CodeCache.for_tokenizer(tmp_path, t2).dir


def test_missing_keys_and_bad_codes_are_errors(tmp_path):
    tok = CountingTokenizer()
    cache = CodeCache.for_tokenizer(tmp_path, tok)
    with pytest.raises(DataError, match="not in the code cache"):
        cache.get(["nope"])
    with pytest.raises(DataError, match="outside"):
        cache.add(["k"], np.array([[0, 1, 2, 99]]))
    with pytest.raises(DataError, match="shape"):
        cache.add(["k"], np.array([[0, 1, 2]]))
    assert cache.missing(["a", "b", "a"]) == ["a", "b"]
    cache.add(["a"], np.array([[1, 2, 3, 4]]))
    assert cache.missing(["a", "b"]) == ["b"]
    assert cache.as_array(["a"]).tolist() == [[1, 2, 3, 4]]


def test_image_refs_are_decoded_for_encoding(tmp_path):
    tok = CountingTokenizer()
    arrays = _images(2)
    paths = []
    for i, a in enumerate(arrays):
        p = tmp_path / f"{i}.png"
        Image.fromarray(a).save(p)
        paths.append(ImageRef(path=str(p)))
    codes = CodeCache.for_tokenizer(tmp_path / "cache", tok).encode(tok, paths, progress=False)
    assert torch.equal(codes.codes, tok.encode(arrays).codes)


def test_damaged_cache_files_are_one_line_errors(tmp_path):
    cache = CodeCache(tmp_path, "fp", num_tokens=4, codebook_size=16)
    cache.add(["a", "b"], np.array([[1, 2, 3, 4], [5, 6, 7, 8]]))
    shard = next((tmp_path / "fp").glob("codes-*.parquet"))
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])  # truncated
    with pytest.raises(DataError, match="damaged code-cache shard") as e:
        CodeCache(tmp_path, "fp", num_tokens=4, codebook_size=16)
    assert "\n" not in str(e.value)
    (tmp_path / "fp" / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="damaged code-cache metadata"):
        CodeCache(tmp_path, "fp", num_tokens=4, codebook_size=16)
