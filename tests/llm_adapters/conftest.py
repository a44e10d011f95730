"""Fixtures of the llm_adapters tests: tiny random models built once per session in temporary directories."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llm_tiny  # noqa: E402


@pytest.fixture(scope="session")
def seed_tok_dir(tmp_path_factory) -> Path:
    """A tiny SEED tokenizer (K=16, N=4) with a tiny unCLIP image decoder."""
    return llm_tiny.build_seed_tokenizer_dir(tmp_path_factory.mktemp("seedtok"))


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory holding the tiny sentencepiece model (``tokenizer.model``)."""
    path = tmp_path_factory.mktemp("sp")
    llm_tiny.build_sp_tokenizer(path)
    return path


@pytest.fixture
def sp_tokenizer(sp_tokenizer_dir, tmp_path):
    """A fresh LlamaTokenizer (no image tokens) — tests may modify it."""
    from llm_adapters.sp_tokenizer import llama_tokenizer_from_sentencepiece

    return llama_tokenizer_from_sentencepiece(sp_tokenizer_dir / "tokenizer.model", tmp_path / "sp")


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory, seed_tok_dir) -> Path:
    """A tiny random chat-model directory (no adapter). Do not modify: copy it first."""
    return llm_tiny.build_chat_dir(tmp_path_factory.mktemp("chat"), seed_tok_dir)
