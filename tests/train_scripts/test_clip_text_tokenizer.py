"""The stage-0 CLIP's BPE vocabulary ids depend only on the learned merges, not on the process."""

from __future__ import annotations

import json
import random

from train_scripts.train_clip import _renumber_bpe_vocab, train_text_tokenizer

SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def _corpus() -> list[str]:
    return [f"a {s} {c} {h} in the {p}" for s in ("small", "large") for c in ("red", "blue", "green", "purple")
            for h in ("circle", "square", "triangle") for p in ("top left", "center", "bottom right", "left")] * 3


def test_vocabulary_ids_follow_the_merges_whatever_the_hash_order(tmp_path):
    """``tokenizers`` numbers the alphabet and the ``</w>`` tokens in hash-map order (a per-process
    random seed; seen: 3 processes, 3 vocabularies). Shuffled ids must come out the same."""
    tok = train_text_tokenizer(_corpus(), tmp_path / "t", vocab_size=120)
    vocab_path, merges = tmp_path / "t/bpe/vocab.json", tmp_path / "t/bpe/merges.txt"
    canonical = vocab_path.read_bytes()
    ids = tok("a large purple triangle in the top left")["input_ids"]
    vocab = json.loads(canonical)
    assert [vocab[t] for t in SPECIALS] == [0, 1] and sorted(vocab.values()) == list(range(len(vocab)))
    assert 1 not in ids[1:-1]  # every word tokenised, none unknown
    rng = random.Random(0)
    for _ in range(3):
        tokens = list(vocab)
        rng.shuffle(tokens)
        vocab_path.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        _renumber_bpe_vocab(vocab_path, merges, SPECIALS)
        assert vocab_path.read_bytes() == canonical
