"""SeedProcessor and the chat template: images → spans, chat rendering, assistant loss masks, decoding, save/load."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llm_adapters.builders import build_processor
from llm_adapters.chat_template import CHAT_TEMPLATE, IGNORE_INDEX, chat_labels
from llm_adapters.processor import SeedProcessor
from seedtok.errors import ConfigError, DataError
from seedtok.tokenizer import SeedTokenizer
from seedtok.types import ImageCodes


@pytest.fixture(scope="module")
def seed_tok(seed_tok_dir) -> SeedTokenizer:
    return SeedTokenizer.from_pretrained(seed_tok_dir)


@pytest.fixture
def processor(sp_tokenizer, seed_tok, seed_tok_dir) -> SeedProcessor:
    return build_processor(sp_tokenizer, seed_tok, seed_tokenizer_dir=seed_tok_dir)


def _images():
    return [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]


def test_images_become_their_code_spans(processor, seed_tok):
    images = _images()
    codes = seed_tok.encode(images)
    enc = processor(text=["look <image> and <image>", "just <image>"], images=images)
    assert enc["input_ids"].shape[0] == 2
    v = processor.vocab
    for row, idx in ((0, [0, 1]), (1, [2])):
        ids = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
        spans = v.find_spans(ids)
        assert [ids[s:e] for s, e in spans] == [v.codes_to_ids(codes.codes[i])[0].tolist() for i in idx]
    # pre-computed codes give the same ids as the images they came from
    same = processor(text=["look <image> and <image>", "just <image>"], codes=codes)
    assert torch.equal(same["input_ids"], enc["input_ids"])
    only = processor(images=images[:2])
    assert torch.equal(only["input_ids"][:, -v.span_length:], v.codes_to_ids(codes.codes[:2]))
    with pytest.raises(DataError, match="2 <image> placeholder"):
        processor(text="a <image> b <image>", images=images[:1])


def test_chat_template_renders_images_and_roles(processor, seed_tok):
    assert processor.tokenizer.chat_template == CHAT_TEMPLATE
    image = _images()[0]
    span = processor.vocab.span_text(seed_tok.encode([image]).codes[0])
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": "a red square"},
    ]
    text = processor.apply_chat_template(messages, images=[image], add_generation_prompt=False)
    assert text == f"<s>be brief\nUSER: {span}Describe the image.\nASSISTANT:\na red square</s>\n"
    # the same from an item carrying its image, or its codes
    by_item = [messages[0], {"role": "user", "content": [{"type": "image", "image": image},
                                                         {"type": "text", "text": "Describe the image."}]},
               messages[2]]
    assert processor.apply_chat_template(by_item) == text
    codes = seed_tok.encode([image]).codes[0]
    by_codes = [messages[0], {"role": "user", "content": [{"type": "image", "codes": codes.tolist()},
                                                          {"type": "text", "text": "Describe the image."}]}, messages[2]]
    assert processor.apply_chat_template(by_codes) == text
    prompt = processor.apply_chat_template(messages[:2], images=[image], add_generation_prompt=True)
    assert prompt.endswith("Describe the image.\nASSISTANT:\n")
    # plain tokenizer (no processor): the image item is the placeholder the processor expands
    raw = processor.tokenizer.apply_chat_template(messages, tokenize=False)
    assert "USER: <image>Describe" in raw and processor.expand_images(raw, [image]) == text
    with pytest.raises(DataError, match="1 image item"):
        processor.apply_chat_template(messages)


def test_assistant_mask_marks_exactly_the_answers(processor, seed_tok):
    """return_assistant_tokens_mask: 1 on every assistant token and its </s>, 0 elsewhere (two turns, an image answer)."""
    codes = seed_tok.encode(_images()[:2]).codes
    messages = [
        {"role": "user", "content": [{"type": "image", "codes": codes[0]}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": "a large red circle"},
        {"role": "user", "content": "draw a small blue square"},
        {"role": "assistant", "content": [{"type": "image", "codes": codes[1]}]},
    ]
    enc = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    tok, v = processor.tokenizer, processor.vocab
    assert len(ids) == len(mask) and ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    labels = chat_labels(ids, mask)
    assert all(lab == IGNORE_INDEX or lab == t for lab, t in zip(labels, ids))
    runs, i = [], 0  # maximal runs of assistant tokens
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    assert len(runs) == 2
    (a0, a1), (b0, b1) = runs
    assert tok.decode(ids[a0:a1]) == "a large red circle</s>"
    assert ids[b0:b1] == v.codes_to_ids(codes[1])[0].tolist() + [tok.eos_token_id]
    for start in (a0, b0):  # each run starts right after "ASSISTANT:\n"
        assert tok.decode(ids[start - 2:start]) == "ASSISTANT:\n"
    assert sum(mask) == (a1 - a0) + (b1 - b0)
    # tensor form
    t = chat_labels(torch.tensor([ids]), torch.tensor([mask]))
    assert t.tolist()[0] == labels


def test_decode_splits_text_and_images(processor, seed_tok):
    codes = seed_tok.encode(_images()[:2])
    v, tok = processor.vocab, processor.tokenizer
    ids = (tok("a red", add_special_tokens=False).input_ids + v.codes_to_ids(codes.codes[0])[0].tolist()
           + tok("then", add_special_tokens=False).input_ids + v.codes_to_ids(codes.codes[1])[0].tolist()[:-1]
           + [tok.eos_token_id])
    parts = processor.decode(ids)
    assert parts[0] == "a red" and isinstance(parts[1], ImageCodes) and parts[2] == "then"
    assert torch.equal(parts[1].codes, codes.codes[:1])
    assert len(parts) == 3  # the unfinished second span is dropped, </s> is not text
    assert processor.decode_text(ids) == "a redthen"
    pictures = processor.decode(ids, decode_images=True, seed=0)
    assert isinstance(pictures[1], Image.Image)
    assert processor.batch_decode([ids, ids[:3]])[1] == ["a red"]


def test_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "image_vocab.json",
            "seed_tokenizer"} <= names
    loaded = SeedProcessor.from_pretrained(tmp_path, load_vision=False, load_image_decoder=False)
    assert loaded.vocab == processor.vocab and loaded.tokenizer.chat_template == CHAT_TEMPLATE
    text = "x" + processor.vocab.span_text(torch.arange(4)) + " y"
    assert loaded.tokenizer(text).input_ids == processor.tokenizer(text).input_ids
    with pytest.raises(ConfigError, match="without its vision tower"):
        loaded.encode_images(_images()[:1])
    with pytest.raises(ConfigError, match="no image decoder"):
        loaded.decode_codes([ImageCodes(torch.zeros(1, 4, dtype=torch.long), 16)])


def test_mismatched_seed_tokenizer_is_rejected(sp_tokenizer, seed_tok):
    with pytest.raises(ConfigError, match="expects 8 of 16"):
        proc = build_processor(sp_tokenizer, None, codebook_size=16, num_tokens=8)
        SeedProcessor(proc.tokenizer, proc.vocab, seed_tok)
