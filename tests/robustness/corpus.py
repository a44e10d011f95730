"""The bad-input corpus: every awkward file the toolkit must survive, built in a temporary directory.

Nothing here is committed as a binary: each item is written by PIL, tarfile, json, torch or the
toolkit's own savers when a fixture asks for it (tests/robustness/conftest.py builds them once per
session). Each group is a named table — :data:`IMAGES`, :data:`SHARDS`, :data:`CAPTIONS`,
:data:`TOKENIZER_DIRS`, :data:`CLIP_DIRS`, the weight files and training checkpoints,
:data:`LLM_ITEMS` — and the test modules parametrise over (item, entry point) with the outcome the
design asks for: accepted, skipped and counted under a reason, or a one-line
:class:`~seedtok.errors.SeedError` (``error: …``, exit status 2 from the ``seed`` CLI).
docs/robustness.md is the same table for users (test_docs_table.py keeps them in step).
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE = (220, 38, 38), (40, 160, 70), (40, 90, 220)


# ---- image bytes -------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    """Incompressible pixels, so that cutting the encoded file in half really cuts pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width × height`` pixels, with a few bytes of data: tiny on disk, a
    decompression bomb for anything that trusts the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def _gray16() -> bytes:
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16)
    return encode(Image.fromarray(np.tile(ramp, (16, 1))))


def _palette() -> bytes:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    img.paste(1, (0, 0, 4, 8))
    return encode(img, transparency=0)


def _rgba() -> bytes:
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0], a[:, :4, 3] = 255, 255  # red, left half opaque, right half transparent
    return encode(Image.fromarray(a))


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (10, 10), c) for c in (RED, GREEN, BLUE)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


#: file name → (bytes factory, what ``decode_image`` makes of it: ``ok`` or the error reason).
IMAGES: dict[str, tuple[Callable[[], bytes], str]] = {
    "good.png": (lambda: encode(Image.new("RGB", (16, 12), RED)), "ok"),
    "truncated.png": (lambda: _half(encode(noise())), "truncated"),
    "truncated.jpg": (lambda: _half(encode(noise(), "JPEG")), "truncated"),
    "zero_bytes.png": (lambda: b"", "empty"),
    "zero_bytes.jpg": (lambda: b"", "empty"),
    "text_named.jpg": (lambda: b"this is a text file, not a JPEG\n", "not_an_image"),
    "cmyk.jpg": (lambda: encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), "ok"),
    "gray16.png": (_gray16, "ok"),
    "bilevel.png": (lambda: encode(Image.new("1", (9, 7), 1)), "ok"),
    "palette.png": (_palette, "ok"),
    "rgba.png": (_rgba, "ok"),
    "animated.gif": (_animated_gif, "ok"),
    "one_pixel.png": (lambda: encode(Image.new("RGB", (1, 1), GREEN)), "ok"),
    "bomb.png": (lambda: png_header_only(100_000, 100_000), "too_large"),
}
BAD_IMAGES = sorted(n for n, (_, r) in IMAGES.items() if r != "ok")
ODD_IMAGES = sorted(n for n, (_, r) in IMAGES.items() if r == "ok")


def write_images(d: Path) -> Path:
    """Every :data:`IMAGES` file in ``d`` plus an imagefolder ``metadata.jsonl`` (one caption each)."""
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (make, _) in IMAGES.items():
        (d / name).write_bytes(make())
        rows.append({"file_name": name, "text": f"a large red circle in the centre ({name})"})
    write_jsonl(d / "metadata.jsonl", rows)
    return d


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as JSON lines; ``bytes`` rows are written verbatim (for invalid UTF-8)."""
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode())
            f.write(b"\n")
    return path


# ---- tar shards --------------------------------------------------------------------------------


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _shard_bytes(n: int, start: int = 0) -> tuple[bytes, list[int]]:
    buf, offsets = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(start, start + n):
            offsets.append(buf.tell())
            _member(tf, f"{i:06d}.png", encode(noise(seed=i)))
            _member(tf, f"{i:06d}.txt", f"noise {i}".encode())
    return buf.getvalue(), offsets


def _cut_shard(n: int, inside_sample: int) -> bytes:
    """``n`` samples, cut 3000 bytes into the image of sample ``inside_sample`` (past its header)."""
    data, offsets = _shard_bytes(n)
    return data[: offsets[inside_sample] + tarfile.BLOCKSIZE + 3000]


def _traversal_shard() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        _member(tf, "../../escaped.txt", b"written outside the target?")
        _member(tf, "/etc/absolute.jpg", encode(Image.new("RGB", (4, 4), RED), "JPEG"))
        _member(tf, "a/../../up.png", encode(Image.new("RGB", (4, 4), RED)))
        link = tarfile.TarInfo("000001.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        hard = tarfile.TarInfo("000001.txt")
        hard.type, hard.linkname = tarfile.LNKTYPE, "../../etc/passwd"
        tf.addfile(hard)
        _member(tf, "000002.png", encode(Image.new("RGB", (4, 4), GREEN)))
        _member(tf, "000002.txt", b"the one safe sample")
    return buf.getvalue()


#: shard file name → (bytes factory, records ``load_records`` yields, skipped counts, file errors).
SHARDS: dict[str, tuple[Callable[[], bytes], int, dict[str, int], int]] = {
    # Cut inside the 4th sample's image: the first 3 samples are kept, the file error is recorded.
    "truncated.tar": (lambda: _cut_shard(5, inside_sample=3), 3, {}, 1),
    # A gzip stream cut short: tarfile sees EOFError / zlib.error mid-stream.
    "truncated.tar.gz": (lambda: _half(_gzip(_shard_bytes(4, 10)[0])), -1, {}, 1),
    "zero_bytes.tar": (lambda: b"", 0, {}, 1),
    # Five members with absolute, '..' or link names are refused; the safe sample survives.
    "traversal.tar": (_traversal_shard, 1, {"unsafe_member": 5}, 0),
}


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, mtime=0)


def write_shards(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, (make, *_rest) in SHARDS.items():
        (d / name).write_bytes(make())
    return d


# ---- captions ----------------------------------------------------------------------------------

CONTROL = "a red\x00 circle\x07 in the\x1b[31m centre\r\nsecond\x7f line\x9b"
CONTROL_CLEAN = "a red circle in the[31m centre\nsecond line"
LONG = "red " * 25_000  # 100 000 characters
INVALID_UTF8 = b"a caf\xe9 \xff\xfe red circle"
INVALID_UTF8_CLEAN = "a caf\ufffd \ufffd\ufffd red circle"


#: caption name → (the text row as written, what the loaders make of it: cleaned text or ``skip:<reason>``).
CAPTIONS: dict[str, tuple[str | bytes, str]] = {
    "control_chars": (CONTROL, CONTROL_CLEAN),
    "invalid_utf8": (INVALID_UTF8, INVALID_UTF8_CLEAN),
    "lone_surrogate": ("a \ud800 circle", "a \ufffd circle"),
    "chars_100k": (LONG, "skip:text_too_long"),
    "empty": ("", "skip:empty_text"),
    "whitespace_only": (" \t\n ", "skip:empty_text"),
}


def write_caption_sets(d: Path) -> dict[str, Path]:
    """The :data:`CAPTIONS` in three formats that carry captions differently: an imagefolder
    ``metadata.jsonl`` (JSON strings; invalid UTF-8 as raw bytes in the line), a webdataset shard
    (raw ``.txt`` bytes) and a COCO captions JSON (raw bytes in the file)."""
    d.mkdir(parents=True, exist_ok=True)
    img = encode(Image.new("RGB", (8, 8), RED))
    (d / "img.png").write_bytes(img)

    def json_str(v: str | bytes) -> bytes:
        if isinstance(v, bytes):  # splice raw bytes into the JSON line: the file is not valid UTF-8
            return b'"' + v + b'"'
        return json.dumps(v).encode()  # \ud800 is written as the escape json.loads turns back into a surrogate

    folder = d / "imagefolder"
    folder.mkdir()
    (folder / "img.png").write_bytes(img)
    write_jsonl(folder / "metadata.jsonl", [
        b'{"file_name": "img.png", "id": "' + k.encode() + b'", "text": ' + json_str(v) + b"}"
        for k, (v, _) in CAPTIONS.items()
    ])
    with tarfile.open(d / "captions.tar", "w") as tf:
        for k, (v, _) in CAPTIONS.items():
            _member(tf, f"{k}.png", img)
            _member(tf, f"{k}.txt", v if isinstance(v, bytes) else v.encode("utf-8", "surrogatepass"))
    coco = b'{"images": [{"id": 1, "file_name": "img.png"}], "annotations": [' + b", ".join(
        b'{"id": "' + k.encode() + b'", "image_id": 1, "caption": ' + json_str(v) + b"}" for k, (v, _) in CAPTIONS.items()
    ) + b"]}"
    (d / "captions_coco.json").write_bytes(coco)
    return {"imagefolder": folder, "webdataset": d / "captions.tar", "coco": d / "captions_coco.json"}


# ---- checkpoints -------------------------------------------------------------------------------


def tiny_clip_dir(path: Path) -> Path:
    """An ordinary (untrained) CLIP directory as stage 0 writes it: tiny towers, BPE tokenizer, processor."""
    import torch

    from data_pipelines.shapes import ShapesConfig
    from data_pipelines.shapes_arrays import load_shapes_arrays
    from train_scripts.train_clip import ClipTrainConfig, build_clip, save_clip_dir, train_text_tokenizer

    cfg = ClipTrainConfig(out=str(path.parent), shapes=ShapesConfig(image_size=32), patch_size=8, vision_width=32,
                          vision_layers=2, text_width=32, text_layers=1, heads=2, projection_dim=16)
    data = load_shapes_arrays(cfg.shapes, "train", 200, progress=False)  # the words of Shapes captions
    tok = train_text_tokenizer([t for i in range(len(data)) for t in data.texts(i)], path.parent / f".{path.name}_bpe")
    torch.manual_seed(0)
    return save_clip_dir(build_clip(cfg, vocab_size=len(tok)).eval(), tok, path, cfg)


def tiny_tokenizer_dir(path: Path, clip_dir: Path, codebook_size: int = 64) -> Path:
    """A saved SEED tokenizer (untrained, tiny: K codes, N = 8 per image) around ``clip_dir``'s vision tower."""
    import torch

    from data_pipelines.shapes import ShapesConfig
    from seedtok.quantizers import QuantizerConfig
    from seedtok.tokenizer import (
        DecoderConfig,
        QFormerConfig,
        SeedTokenizer,
        SeedTokenizerConfig,
        VisionTowerConfig,
    )
    from train_scripts.train_tokenizer import TokenizerTrainConfig

    cfg = SeedTokenizerConfig(
        vision=VisionTowerConfig(path=str(clip_dir)),
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, dropout=0.0),
        num_queries=8,
        quantizer=QuantizerConfig(type="vq", codebook_size=codebook_size, dim=8),
        decoder=DecoderConfig(num_layers=1, num_heads=2, down_dims=[16, 8]),
        embed_dim=16,
    )
    torch.manual_seed(0)
    SeedTokenizer.from_config(cfg).save_pretrained(path)
    # What the recipe records beside every tokenizer: the CLIP dir and the Shapes world (32 px here).
    TokenizerTrainConfig(stage=2, vision_path=str(clip_dir), shapes=ShapesConfig(image_size=32)).to_yaml(
        path / "seed_stage2.yaml")
    return path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def _edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


#: broken tokenizer directory → (how to break a good copy, the error ``SeedTokenizer.from_pretrained`` raises).
TOKENIZER_DIRS: dict[str, tuple[Callable[[Path], None], str]] = {
    "no_config": (lambda d: (d / "config.json").unlink(), "CheckpointError"),
    "config_not_json": (lambda d: (d / "config.json").write_text("{not json"), "CheckpointError"),
    "config_unknown_field": (lambda d: _edit_json(d / "config.json", lambda c: c.update(n_queries=3)), "ConfigError"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), "CheckpointError"),
    "truncated_weights": (lambda d: _truncate(d / "model.safetensors"), "CheckpointError"),
    "weights_wrong_shape": (lambda d: _edit_json(d / "config.json", lambda c: c["quantizer"].update(codebook_size=65)),
                            "CheckpointError"),
    "no_vision_tower": (lambda d: shutil.rmtree(d / "vision_tower"), "CheckpointError"),
    "no_vision_weights": (lambda d: (d / "vision_tower" / "model.safetensors").unlink(), "CheckpointError"),
    "no_vision_processor": (lambda d: (d / "vision_tower" / "preprocessor_config.json").unlink(), "CheckpointError"),
    "not_a_directory": (lambda d: (shutil.rmtree(d), d.write_text("a file where a directory belongs")),
                        "CheckpointError"),
}


def broken_tokenizer_dirs(good: Path, root: Path) -> dict[str, Path]:
    """One broken copy of the tokenizer directory ``good`` per :data:`TOKENIZER_DIRS` entry."""
    out = {}
    for name, (breaker, _) in TOKENIZER_DIRS.items():
        d = root / name
        shutil.copytree(good, d)
        breaker(d)
        out[name] = d
    return out


#: broken CLIP directory → how to make it from a good CLIP dir (and the tokenizer's vision-only tower).
CLIP_DIRS: dict[str, Callable[[Path, Path], None]] = {
    "no_config": lambda d, tok: (d / "config.json").unlink(),
    "no_weights": lambda d, tok: (d / "model.safetensors").unlink(),
    "no_text_tokenizer": lambda d, tok: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
    "no_processor": lambda d, tok: (d / "preprocessor_config.json").unlink(),
    "vision_only": lambda d, tok: (shutil.rmtree(d), shutil.copytree(tok / "vision_tower", d)),
}


def broken_clip_dirs(good: Path, tokenizer: Path, root: Path) -> dict[str, Path]:
    out = {}
    for name, breaker in CLIP_DIRS.items():
        d = root / name
        shutil.copytree(good, d)
        breaker(d, tokenizer)
        out[name] = d
    return out


class Evil:
    """Unpickling this runs a shell command (it creates ``marker``): what ``weights_only=True`` refuses."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch '{self.marker}'",))


def pwned_marker(root: Path) -> Path:
    """The file an :class:`Evil` pickle under ``root`` creates if anything ever unpickles it."""
    return root / "PWNED"


def weight_files(d: Path) -> dict[str, Path]:
    """Single weight files a user might hand to ``--checkpoint``: all unusable."""
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "text.pt").write_text("not a checkpoint\n")
    (d / "empty.safetensors").write_bytes(b"")
    save_file({"w": torch.zeros(64, 64)}, str(d / "truncated.safetensors"))
    _truncate(d / "truncated.safetensors")
    torch.save({"model": {"w": torch.zeros(2)}, "hook": Evil(pwned_marker(d))}, d / "pickled_code.pt")
    torch.save({"w": torch.zeros(2)}, d / "truncated.pt")
    _truncate(d / "truncated.pt")
    return {p.name: p for p in sorted(d.iterdir())}


def write_training_checkpoints(root: Path) -> dict[str, Path]:
    """``CheckpointManager`` roots whose latest checkpoint is broken one way each (a good step 1
    below it in every root)."""
    import torch

    from train_scripts.runtime import CheckpointManager

    def breakers() -> dict[str, Callable[[Path], None]]:
        return {
            "no_state": lambda p: (p / "state.pt").unlink(),
            "no_weights": lambda p: (p / "model.safetensors").unlink(),
            "truncated_weights": lambda p: _truncate(p / "model.safetensors"),
            "truncated_state": lambda p: _truncate(p / "state.pt"),
            "pickled_code_state": lambda p: torch.save({"step": 2, "x": Evil(pwned_marker(root))}, p / "state.pt"),
            "meta_not_json": lambda p: (p / "meta.json").write_text("{"),
        }

    out = {}
    model = torch.nn.Linear(3, 2)
    for name, breaker in breakers().items():
        mgr = CheckpointManager(root / name, keep=3)
        mgr.save(1, model.state_dict())
        breaker(mgr.save(2, model.state_dict()))
        out[name] = root / name
    return out


# ---- items of the LLM stage (built in test_llm_inputs.py from llm_adapters' pieces) -------------

#: LLM-stage corpus items → where they are exercised.
LLM_ITEMS = {
    "empty_prompt": "SeedChat.generate_codes / send, seed generate --prompt / --prompts",
    "codes_out_of_range": "SeedProcessor(codes=…), ImageVocab.ids_to_codes, CodeCache shards",
    "codebook_vocab_mismatch": "load_chat_model / seed caption with a SEED tokenizer of another K",
}
