"""Fixtures of the robustness suite: the bad-input corpus (built once per session) and CLI runners."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import corpus
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def bad(tmp_path_factory) -> SimpleNamespace:
    """Every file of the corpus that needs no model: images, shards, captions, weight files."""
    root = tmp_path_factory.mktemp("corpus")
    return SimpleNamespace(
        root=root,
        images=corpus.write_images(root / "images"),
        shards=corpus.write_shards(root / "shards"),
        captions=corpus.write_caption_sets(root / "captions"),
        weights=corpus.weight_files(root / "weights"),
        train_ckpts=corpus.write_training_checkpoints(root / "train_ckpts"),
    )


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> SimpleNamespace:
    """A tiny CLIP directory, a tiny SEED tokenizer around it, and broken copies of each."""
    root = tmp_path_factory.mktemp("models")
    clip = corpus.tiny_clip_dir(root / "clip")
    tok = corpus.tiny_tokenizer_dir(root / "tokenizer", clip)
    return SimpleNamespace(
        root=root, clip=clip, tokenizer=tok,
        broken_tokenizers=corpus.broken_tokenizer_dirs(tok, root / "broken_tokenizers"),
        broken_clips=corpus.broken_clip_dirs(clip, tok, root / "broken_clips"),
    )


# ---- running the `seed` CLI --------------------------------------------------------------------


def stderr_lines(err: str) -> list[str]:
    """Lines of stderr with progress-bar redraws (``\\r``) split off and blank ones dropped."""
    return [s.strip() for s in re.split(r"[\r\n]", err) if s.strip()]


def assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    """Exit status 2, no traceback, exactly one ``error: …`` line, naming every needle; returns it."""
    assert "Traceback" not in err, err[-3000:]
    errors = [s for s in stderr_lines(err) if s.startswith("error:") or " error: " in s]
    assert rc == 2, f"exit status {rc}, stderr: {err[-2000:]}"
    assert len(errors) == 1, err[-2000:]
    line = errors[0]
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert len(line) < 1200
    return line


@pytest.fixture
def seed_cli(capsys):
    """Run ``seed ARGS`` in this process (fast: no interpreter start-up); returns (rc, out, err).

    An exception escaping ``main`` fails the test — that is the traceback a user would see.
    """
    from train_scripts.cli import main

    def run(*args: str | os.PathLike) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            rc = e.code if isinstance(e.code, int) else 2
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def run_seed(*args: str | os.PathLike, timeout: float = 120) -> tuple[int, str, str]:
    """Run the real ``seed`` command in a subprocess (hang-proof: a timeout fails the test)."""
    exe = Path(sys.executable).with_name("seed")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "train_scripts.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    p = subprocess.run([*cmd, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout, errors="replace")
    return p.returncode, p.stdout, p.stderr


def tiny_stage2(models, out, *extra: str) -> list[str]:
    """``seed tokenizer train --stage 2`` at a size that runs in half a second."""
    return ["tokenizer", "train", "--stage", "2", "--init-from", str(models.tokenizer), "--vision-path",
            str(models.clip), "--out", str(out), "--n-train", "32", "--n-val", "16", "--steps", "6",
            "--batch-size", "16", "--ckpt-every", "2", "--precision", "fp32", "--no-progress",
            "--shapes.image-size", "32", "--cache-dir", str(models.root / "cache"),
            "--tokenizer.quantizer.codebook-size", "64", "--tokenizer.quantizer.dim", "8",
            "--tokenizer.decoder.num-layers", "1", "--tokenizer.decoder.num-heads", "2",
            "--tokenizer.decoder.down-dims", "[16, 8]", *extra]
