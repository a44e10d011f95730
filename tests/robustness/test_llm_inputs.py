"""The LLM-stage items of the corpus: an empty prompt, codes out of range, a codebook / vocabulary
mismatch, bad images and a broken chat-model directory — through llm_adapters' Python API and the
``seed generate`` / ``seed caption`` commands.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import corpus
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from seedtok.errors import CheckpointError, ConfigError, DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "llm_adapters"))

@pytest.fixture(scope="module")
def chat(models):
    """A tiny random chat-model directory over the corpus tokenizer (K=64, N=8), and broken copies."""
    import llm_tiny

    root = models.root / "llm"
    if not (root / "chat").exists():
        llm_tiny.build_chat_dir(root, models.tokenizer)
        k32 = corpus.tiny_tokenizer_dir(root / "tok_k32", models.clip, codebook_size=32)
        for name in ("k_mismatch", "vocab_edited", "no_weights"):
            shutil.copytree(root / "chat", root / name)
        shutil.rmtree(root / "k_mismatch" / "seed_tokenizer")
        shutil.copytree(k32, root / "k_mismatch" / "seed_tokenizer")
        vocab = json.loads((root / "chat" / "image_vocab.json").read_text())
        (root / "vocab_edited" / "image_vocab.json").write_text(json.dumps({**vocab, "codebook_size": 32}))
        (root / "no_weights" / "model.safetensors").unlink()
    return root


@pytest.fixture(scope="module")
def seed_chat(chat):
    from llm_adapters.chat import SeedChat

    return SeedChat.from_pretrained(chat / "chat")


# ---- empty prompt ------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "  \n\t"], ids=["empty", "whitespace"])
def test_empty_prompt_python_api(seed_chat, prompt):
    with pytest.raises(DataError, match="empty"):
        seed_chat.generate_codes([prompt], batch_size=1)
    with pytest.raises(DataError, match="empty"):
        seed_chat.send(prompt, max_new_tokens=2)


def test_empty_prompt_cli(chat, seed_cli, tmp_path):
    rc, _, err = seed_cli("generate", "--model", chat / "chat", "--prompt", " ", "--out", tmp_path / "x.png")
    assert_one_line_error(rc, err, "prompt")


def test_prompts_file_of_blank_lines_cli(chat, seed_cli, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n   \n\t\n")
    rc, _, err = seed_cli("generate", "--model", chat / "chat", "--prompts", tmp_path / "prompts.txt",
                          "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "no prompts")


# ---- codes out of range --------------------------------------------------------------------------


@pytest.mark.parametrize("bad_code", [64, 1000, -1])
def test_codes_out_of_range_processor(seed_chat, bad_code):
    p = seed_chat.processor
    codes = [[0] * (p.vocab.num_tokens - 1) + [bad_code]]
    with pytest.raises(DataError, match=f"image code {bad_code} at"):
        p(text="<image>", codes=codes)


def test_ids_outside_the_image_vocabulary(seed_chat):
    vocab = seed_chat.processor.vocab
    ids = torch.tensor([[vocab.offset + vocab.codebook_size + 5] * vocab.num_tokens])
    with pytest.raises(DataError, match="not an image code id"):
        vocab.ids_to_codes(ids)


def test_codes_file_with_ids_out_of_range(tmp_path):
    """The code cache's parquet shards are the codes files of the LLM stage."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipelines.code_cache import CodeCache

    CodeCache(tmp_path, "fp", num_tokens=4, codebook_size=16)
    table = pa.table({"key": ["a", "b"], "codes": pa.array([[0, 1, 2, 3], [4, 5, 16, 7]], pa.list_(pa.int32()))})
    pq.write_table(table, tmp_path / "fp" / "codes-bad.parquet")
    with pytest.raises(DataError, match=r"codes-bad.parquet: codes outside \[0, 16\)"):
        CodeCache(tmp_path, "fp", num_tokens=4, codebook_size=16)
    with pytest.raises(DataError, match="outside"):
        CodeCache(tmp_path / "other", "fp", 4, 16).add(["x"], np.array([[0, 1, 2, 99]]))


# ---- codebook size vs the LLM's image tokens ----------------------------------------------------


@pytest.mark.parametrize("name, error, needle", [
    ("k_mismatch", ConfigError, "codes of 32 per image, the LLM vocabulary expects 8 of 64"),
    ("vocab_edited", CheckpointError, "image_vocab.json expects"),
])
def test_codebook_vocab_mismatch_load(chat, name, error, needle):
    from llm_adapters.chat_model import load_chat_model

    with pytest.raises(error, match=needle):
        load_chat_model(chat / name)


def test_codebook_vocab_mismatch_cli(chat, bad, seed_cli):
    rc, _, err = seed_cli("caption", "--model", chat / "k_mismatch", bad.images / "good.png")
    assert_one_line_error(rc, err, "the LLM vocabulary expects")


def test_code_cache_of_another_codebook(tmp_path):
    from data_pipelines.code_cache import CodeCache

    CodeCache(tmp_path, "fp", num_tokens=4, codebook_size=16)
    with pytest.raises(DataError, match="K=16 per image, expected 4 of K=32"):
        CodeCache(tmp_path, "fp", num_tokens=4, codebook_size=32)


# ---- bad images and a broken chat directory ----------------------------------------------------


@pytest.mark.parametrize("name", ["truncated.png", "zero_bytes.jpg", "text_named.jpg", "truncated.jpg"])
def test_caption_cli_names_a_bad_image(chat, bad, seed_cli, name):
    rc, _, err = seed_cli("caption", "--model", chat / "chat", bad.images / name)
    assert_one_line_error(rc, err, name)


def test_caption_cli_refuses_a_bomb(chat, bad, seed_cli):
    rc, _, err = seed_cli("caption", "--model", chat / "chat", bad.images / "bomb.png")
    assert_one_line_error(rc, err, "bomb.png")


def test_chat_dir_without_weights_cli(chat, bad, seed_cli):
    rc, _, err = seed_cli("caption", "--model", chat / "no_weights", bad.images / "good.png")
    assert_one_line_error(rc, err, "model.safetensors")
    rc, _, err = seed_cli("generate", "--model", chat / "no_weights", "--prompt", "a red circle", "--out", "x.png")
    assert_one_line_error(rc, err, "model.safetensors")


def test_chat_dir_without_weights_python_api(chat):
    from llm_adapters.chat_model import load_chat_model

    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_chat_model(chat / "no_weights")
