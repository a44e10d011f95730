"""Image tokens in a LLaMA vocabulary: ids, round trips, tokenisation in context, embeddings, persistence."""

from __future__ import annotations

import json
import random

import pytest
import sentencepiece as spm
import torch
from llm_tiny import corpus

from llm_adapters.builders import build_llama, codebook_vectors
from llm_adapters.image_vocab import (
    BOI,
    EOI,
    IMAGE_TOKEN,
    ImageVocab,
    add_image_tokens,
    init_image_embeddings,
)
from llm_adapters.sp_tokenizer import train_sentencepiece
from seedtok.errors import CheckpointError, ConfigError, DataError
from seedtok.types import ImageCodes


def test_seed_layout_ids():
    """SEED-LLaMA's layout: codes at 32000 … 40191, then <img>, </img>; vocab 40194."""
    v = ImageVocab(offset=32000, codebook_size=8192, num_tokens=32)
    assert (v.code_ids.start, v.code_ids.stop - 1, v.boi_id, v.eoi_id, v.vocab_size) == (32000, 40191, 40192, 40193, 40194)
    ids = v.codes_to_ids(torch.tensor([[0, 8191] * 16]))
    assert ids.shape == (1, 34) and ids[0, 0] == 40192 and ids[0, 1] == 32000 and ids[0, 2] == 40191 and ids[0, -1] == 40193


def test_sentencepiece_ids_match_the_llama_tokenizer(sp_tokenizer_dir, sp_tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(sp_tokenizer_dir / "tokenizer.model"))
    rng = random.Random(0)
    lines = [c for c in corpus() if ":" not in c][::7] + ["Zebra 123 émoji ☃ x", "two  spaces"]
    lines += ["".join(rng.choice("abc xyzRE!\t") for _ in range(30)) for _ in range(20)]
    for line in lines:
        assert sp_tokenizer(line, add_special_tokens=False).input_ids == sp.encode(line), line
    assert (sp_tokenizer.unk_token_id, sp_tokenizer.bos_token_id, sp_tokenizer.eos_token_id) == (0, 1, 2)
    assert sp_tokenizer("a red").input_ids[0] == 1 and sp_tokenizer.pad_token == "<unk>"  # <s> first, as LLaMA
    # The chat symbols are one id each, in any context. (transformers splits them off as added tokens
    # before the sentencepiece model runs, so it writes no "▁" piece in front of them as sentencepiece does.)
    user, assistant = sp.piece_to_id("USER:"), sp.piece_to_id("ASSISTANT:")
    ids = sp_tokenizer("<s>USER: hi\nASSISTANT:\nok", add_special_tokens=False).input_ids
    assert ids[:2] == [1, user] and assistant in ids


def test_sentencepiece_vocab_too_small_is_one_line_error():
    with pytest.raises(ConfigError, match="too small"):
        train_sentencepiece(["a b c"], vocab_size=200)


def test_image_tokens_are_single_contiguous_ids(sp_tokenizer):
    base = len(sp_tokenizer)
    vocab = add_image_tokens(sp_tokenizer, codebook_size=64, num_tokens=8)
    assert vocab.offset == base and len(sp_tokenizer) == base + 66
    ids = sp_tokenizer("<img_00042>", add_special_tokens=False).input_ids
    assert ids == [base + 42]
    assert sp_tokenizer.convert_ids_to_tokens(list(range(base, base + 66))) == vocab.tokens()
    assert sp_tokenizer.convert_tokens_to_ids([BOI, EOI]) == [vocab.boi_id, vocab.eoi_id]
    with pytest.raises(ConfigError, match="already has"):
        add_image_tokens(sp_tokenizer, codebook_size=64, num_tokens=8)


def test_seed_sized_vocabulary_adds_fast(sp_tokenizer):
    vocab = add_image_tokens(sp_tokenizer, codebook_size=8192, num_tokens=32)
    assert sp_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN.format(8191)) == vocab.offset + 8191
    assert sp_tokenizer.convert_tokens_to_ids(EOI) == vocab.offset + 8193


def test_codes_text_ids_codes_round_trip(sp_tokenizer):
    vocab = add_image_tokens(sp_tokenizer, codebook_size=64, num_tokens=8)
    codes = ImageCodes(torch.randint(0, 64, (5, 8), generator=torch.Generator().manual_seed(0)), 64)
    texts = vocab.span_text(codes)
    assert texts[0].startswith("<img><img_") and texts[0].endswith("</img>") and " " not in texts[0]
    ids = torch.tensor([sp_tokenizer(t, add_special_tokens=False).input_ids for t in texts])
    assert torch.equal(ids, vocab.codes_to_ids(codes))
    back = vocab.ids_to_codes(ids)
    assert torch.equal(back.codes, codes.codes) and back.codebook_size == 64
    assert torch.equal(vocab.ids_to_codes(vocab.codes_to_ids(codes, markers=False)).codes, codes.codes)
    assert sp_tokenizer.decode(ids[0]) == texts[0]
    assert vocab.span_text(codes.codes[0]) == texts[0]  # one image (N,) → one string


def test_a_span_never_tokenises_differently_in_context(sp_tokenizer):
    """The span's ids are the same whatever text surrounds it (spaces, punctuation, digits, other spans)."""
    vocab = add_image_tokens(sp_tokenizer, codebook_size=64, num_tokens=8)
    rng = random.Random(1)
    alphabet = "ab cd.,!?0123456789\n\t<>/_imgIMG"
    for trial in range(200):
        codes = torch.tensor([rng.randrange(64) for _ in range(8)])
        span = vocab.span_text(codes)
        left = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        right = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        if trial % 5 == 0:
            left = vocab.span_text(torch.zeros(8, dtype=torch.long)) + left  # another image before it
        text = left + span + right
        ids = sp_tokenizer(text, add_special_tokens=False).input_ids
        spans = [s for s in vocab.find_spans(ids) if ids[s[0] + 1:s[1] - 1] == (codes + vocab.offset).tolist()]
        assert spans, (left, right)
        start, end = spans[-1]
        assert ids[start:end] == vocab.codes_to_ids(codes)[0].tolist()
        # and the whole string comes back (LLaMA's decoder drops one leading space: its dummy prefix)
        assert sp_tokenizer.decode(ids) == (text[1:] if text.startswith(" ") else text)


def test_ids_to_codes_rejects_bad_spans():
    v = ImageVocab(offset=100, codebook_size=16, num_tokens=4)
    with pytest.raises(DataError, match="must start with"):
        v.ids_to_codes([101, 102, 103, 104, 105, 117])
    with pytest.raises(DataError, match="not an image code id"):
        v.ids_to_codes([100, 101, 5, 102])
    with pytest.raises(DataError, match="expected 4 image ids"):
        v.ids_to_codes([100, 101, 102])
    with pytest.raises(DataError, match="codebook of 32"):
        v.codes_to_ids(ImageCodes(torch.zeros(1, 4, dtype=torch.long), 32))
    with pytest.raises(DataError, match="outside"):
        v.codes_to_ids(torch.tensor([[0, 1, 2, 16]]))


def test_split_keeps_text_and_well_formed_images_only():
    v = ImageVocab(offset=100, codebook_size=16, num_tokens=2)
    b, e = v.boi_id, v.eoi_id
    ids = [5, 6, b, 103, 104, e, 7, b, 105, e, 8, 101, 9, b, 110, 111, e, e, b, 112]
    parts = v.split(ids)
    assert parts[0] == [5, 6] and parts[2] == [7, 8, 9] and parts[4:] == []
    assert torch.equal(parts[1].codes, torch.tensor([[3, 4]])) and torch.equal(parts[3].codes, torch.tensor([[10, 11]]))
    assert len(parts) == 4  # the malformed span (one code), the stray code, the extra </img> and the cut span vanish
    assert v.find_spans(ids) == [(2, 6), (13, 17)]


def test_vocab_save_load_and_check(tmp_path, sp_tokenizer):
    vocab = add_image_tokens(sp_tokenizer, codebook_size=16, num_tokens=4)
    vocab.save_pretrained(tmp_path)
    assert ImageVocab.from_pretrained(tmp_path) == vocab
    data = json.loads((tmp_path / "image_vocab.json").read_text())
    assert data["code_format"] == "<img_{:05d}>" and data["offset"] == vocab.offset
    with pytest.raises(CheckpointError, match="expects"):
        ImageVocab(offset=vocab.offset + 1, codebook_size=16, num_tokens=4).check_tokenizer(sp_tokenizer)
    (tmp_path / "image_vocab.json").write_text(json.dumps({**data, "extra": 1}))
    with pytest.raises(CheckpointError, match="unknown key 'extra'"):
        ImageVocab.from_pretrained(tmp_path)
    (tmp_path / "image_vocab.json").write_text(json.dumps({"offset": 3, "num_tokens": 4}))
    with pytest.raises(CheckpointError, match="missing key 'codebook_size'"):
        ImageVocab.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no image_vocab.json"):
        ImageVocab.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("method", ["mean", "codebook"])
def test_new_rows_are_initialised(method, sp_tokenizer):
    import llm_tiny

    base = build_llama(len(sp_tokenizer), llm_tiny.tiny_preset(), seed=0)
    old_in = base.get_input_embeddings().weight.detach().clone()
    old_out = base.get_output_embeddings().weight.detach().clone()
    vocab = add_image_tokens(sp_tokenizer, codebook_size=16, num_tokens=4)
    codebook = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    init_image_embeddings(base, vocab, method=method, codebook=codebook)
    for old, new in ((old_in, base.get_input_embeddings().weight), (old_out, base.get_output_embeddings().weight)):
        assert new.shape == (vocab.vocab_size, old.shape[1])
        assert torch.equal(new[:vocab.offset], old)  # old rows untouched
        mean = old.mean(0)
        torch.testing.assert_close(new[vocab.boi_id], mean)
        torch.testing.assert_close(new[vocab.eoi_id], mean)
        codes = new[vocab.offset:vocab.offset + 16]
        if method == "mean":
            torch.testing.assert_close(codes, mean.expand(16, -1))
        else:
            # distinct rows whose geometry follows the codebook's: the projection preserves inner products
            dev = codes - mean
            cb = codebook - codebook.mean(0)
            corr = torch.corrcoef(torch.stack([torch.pdist(dev), torch.pdist(cb)]))[0, 1]
            assert corr > 0.8
            torch.testing.assert_close(dev.std(0), old.std(0), rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="already has"):
        init_image_embeddings(base, vocab)


def test_codebook_vectors_of_a_seed_tokenizer(seed_tok_dir):
    from seedtok.tokenizer import SeedTokenizer

    tok = SeedTokenizer.from_pretrained(seed_tok_dir, load_vision=False, load_image_decoder=False)
    cb = codebook_vectors(tok)
    assert cb.shape == (16, 4)
    torch.testing.assert_close(cb[[3, 7]], tok.quantizer.indices_to_codes(torch.tensor([[3, 7]]))[0])


def test_package_exports_resolve_lazily():
    import subprocess
    import sys

    import llm_adapters

    for name in llm_adapters.__all__:
        assert getattr(llm_adapters, name) is not None
    # `import llm_adapters` alone (as `seed --help` does) does not pull in transformers
    code = "import sys, llm_adapters, llm_adapters.cli; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_fresh_model_codebook_init_follows_the_codebook(seed_tok_dir, sp_tokenizer_dir, tmp_path):
    """A model built from nothing with init='codebook': its code rows follow the codebook's geometry;
    with 'mean' every row stays random (as before)."""
    from llm_tiny import tiny_preset

    from llm_adapters.builders import build_chat_model
    from llm_adapters.sp_tokenizer import llama_tokenizer_from_sentencepiece
    from seedtok.tokenizer import SeedTokenizer

    def sp_tokenizer(name):
        return llama_tokenizer_from_sentencepiece(sp_tokenizer_dir / "tokenizer.model", tmp_path / name)

    tok = SeedTokenizer.from_pretrained(seed_tok_dir, load_vision=False, load_image_decoder=False)
    model, proc = build_chat_model(sp_tokenizer("a"), tok, preset=tiny_preset(), init="codebook")
    v = proc.vocab
    w = model.get_input_embeddings().weight.detach()
    assert w.shape[0] == v.vocab_size and model.get_output_embeddings().weight.shape[0] == v.vocab_size
    dev = w[v.offset:v.offset + v.codebook_size] - w[:v.offset].mean(0)
    cb = codebook_vectors(tok)
    corr = torch.corrcoef(torch.stack([torch.pdist(dev), torch.pdist(cb - cb.mean(0))]))[0, 1]
    assert corr > 0.8
    torch.testing.assert_close(w[v.boi_id], w[:v.offset].mean(0))
    rand, _ = build_chat_model(sp_tokenizer("b"), tok, preset=tiny_preset(), init="mean")
    r = rand.get_input_embeddings().weight.detach()[v.offset:v.offset + v.codebook_size]
    assert torch.pdist(r).min() > 0  # random, distinct rows
    with pytest.raises(ConfigError, match="codebook"):
        build_chat_model(sp_tokenizer("c"), None, codebook_size=16, num_tokens=4, preset=tiny_preset(), init="codebook")
