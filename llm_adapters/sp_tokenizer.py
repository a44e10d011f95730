"""The embedded default's text tokenizer: a sentencepiece model trained on the corpus, wrapped as a LLaMA tokenizer.

LLaMA's tokenizer is a sentencepiece BPE model with byte fallback and the ids ``<unk>`` 0, ``<s>`` 1,
``</s>`` 2 (Touvron et al., arXiv:2302.13971). The embedded default trains the same kind of model on
its own text (Shapes captions, paraphrases, chat instructions) so that everything downstream — the
image tokens at ``len(tokenizer)``, the chat template, ``AutoTokenizer`` — is exercised exactly as
with a real LLaMA directory.

transformers 5's ``LlamaTokenizer`` is the fast (``tokenizers``) class; it converts
``DIR/tokenizer.model`` when loaded with ``from_pretrained(DIR)`` (passing ``vocab_file=`` is
silently ignored), and its BPE conversion reproduces sentencepiece's ids for a BPE model (tested).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from seedtok.errors import ConfigError, DataError

SP_MODEL_NAME = "tokenizer.model"
# Chat-role markers of llm_adapters.chat_template: single pieces, whatever the corpus.
CHAT_SYMBOLS: tuple[str, ...] = ("USER:", "ASSISTANT:")
# Pieces every LLaMA-style sentencepiece model reserves before the learned ones: 3 specials + 256 bytes.
_RESERVED = 3 + 256


def train_sentencepiece(texts: Iterable[str], *, vocab_size: int = 1000, model_type: str = "bpe",
                        user_defined_symbols: Sequence[str] = CHAT_SYMBOLS, seed_sentences: int = 200_000) -> bytes:
    """Train a LLaMA-style sentencepiece model on ``texts`` and return its serialised proto.

    ``vocab_size`` is an upper bound (``hard_vocab_limit=False``): a small corpus may yield fewer
    pieces. It must exceed the 259 reserved pieces plus the user symbols.
    """
    import sentencepiece as spm

    floor = _RESERVED + len(user_defined_symbols)
    if vocab_size <= floor:
        raise ConfigError(f"vocab_size {vocab_size} is too small: a LLaMA-style sentencepiece model reserves "
                          f"{floor} pieces (specials, 256 bytes, chat symbols)")
    lines = [t for t in (str(x).replace("\n", " ").strip() for x in texts) if t]
    if not lines:
        raise DataError("no text to train the sentencepiece model on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            # LLaMA's settings: byte fallback, digits split, no normalisation, ids unk 0 / bos 1 / eos 2.
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            user_defined_symbols=list(user_defined_symbols), hard_vocab_limit=False,
            input_sentence_size=seed_sentences, shuffle_input_sentence=True, num_threads=1, minloglevel=2,
        )
    except RuntimeError as e:  # sentencepiece's messages are multi-line C++ traces
        raise ConfigError(f"sentencepiece training failed: {str(e).splitlines()[-1]}") from None
    return model.getvalue()


def llama_tokenizer_from_sentencepiece(sp_model: bytes | str | os.PathLike, out_dir: str | os.PathLike) -> Any:
    """Write ``out_dir/tokenizer.model`` and return ``LlamaTokenizer.from_pretrained(out_dir)``.

    Like LLaMA's, it prepends ``<s>`` to every encoded text; the pad token is set to ``<unk>``
    (LLaMA has none; batching needs one).
    """
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = sp_model if isinstance(sp_model, bytes) else Path(sp_model).read_bytes()
    (out_dir / SP_MODEL_NAME).write_bytes(data)
    # LLaMA prepends <s> (its tokenizer_config says so; a bare tokenizer.model does not)
    tokenizer = LlamaTokenizer.from_pretrained(out_dir, add_bos_token=True, add_eos_token=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def train_llama_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 1000,
                          model_type: str = "bpe", user_defined_symbols: Sequence[str] = CHAT_SYMBOLS) -> Any:
    """Train a sentencepiece model on ``texts`` and wrap it as a transformers ``LlamaTokenizer``.

    Writes ``out_dir/tokenizer.model`` (the sentencepiece proto; call ``tokenizer.save_pretrained``
    for the transformers files) and returns the tokenizer.
    """
    proto = train_sentencepiece(texts, vocab_size=vocab_size, model_type=model_type,
                                user_defined_symbols=user_defined_symbols)
    return llama_tokenizer_from_sentencepiece(proto, out_dir)
