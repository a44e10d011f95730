"""Constrained image spans, generation modes, classifier-free guidance on image codes, streaming."""

from __future__ import annotations

import pytest
import torch
from transformers import TextIteratorStreamer

from llm_adapters.chat_model import load_chat_model
from llm_adapters.generation import ImageCFGLogitsProcessor, ImageSpanLogitsProcessor, generate, span_state
from llm_adapters.image_vocab import ImageVocab
from seedtok.errors import ConfigError

V = ImageVocab(offset=10, codebook_size=6, num_tokens=3)  # codes 10…15, <img> 16, </img> 17
EOS = 2


def _allowed(proc, rows: list[list[int]], vocab_size: int = 20) -> list[set[int]]:
    out = []
    for row in rows:
        scores = proc(torch.tensor([row]), torch.zeros(1, vocab_size))[0]
        out.append(set(torch.isfinite(scores).nonzero().flatten().tolist()))
    return out


def test_span_state():
    ids = torch.tensor([[5, 16, 10, 11], [16, 10, 11, 12], [16, 10, 10, 10], [5, 6, 7, 8]])
    ids = torch.cat([ids, torch.tensor([[17], [17], [3], [4]])], dim=1)
    inside, count = span_state(ids, V)
    assert inside.tolist() == [False, False, True, False] and count.tolist() == [0, 0, 4, 0]
    inside, count = span_state(ids[:, :4], V)
    assert inside.tolist() == [True, True, True, False] and count.tolist() == [2, 3, 3, 0]


def test_constraint_in_every_state():
    codes, text = set(range(10, 16)), set(range(20)) - set(range(10, 18))
    auto = ImageSpanLogitsProcessor(V, mode="auto", prompt_length=1)
    assert _allowed(auto, [[5, 16], [5, 16, 10, 11], [5, 16, 10, 11, 12], [5, 16, 10, 11, 12, 17], [5, 6]]) == [
        codes, codes, {17}, text | {16}, text | {16}]
    txt = ImageSpanLogitsProcessor(V, mode="text", prompt_length=1)
    assert _allowed(txt, [[5, 6], [5, 16]]) == [text, codes]  # a span opened in the prompt still closes properly
    img = ImageSpanLogitsProcessor(V, mode="image", prompt_length=1, eos_token_id=EOS)
    assert _allowed(img, [[5], [5, 16, 10], [5, 16, 10, 11, 12], [5, 16, 10, 11, 12, 17]]) == [
        {16}, codes, {17}, {EOS}]
    # a prompt that already holds an image does not count as the reply's image
    assert _allowed(ImageSpanLogitsProcessor(V, mode="image", prompt_length=5, eos_token_id=EOS),
                    [[16, 10, 11, 12, 17]]) == [{16}]
    with pytest.raises(ConfigError, match="generation_mode"):
        ImageSpanLogitsProcessor(V, mode="video")
    with pytest.raises(ConfigError, match="eos_token_id"):
        ImageSpanLogitsProcessor(V, mode="image")


@pytest.fixture(scope="module")
def tiny(chat_dir):
    model, processor = load_chat_model(chat_dir, load_vision=False, load_image_decoder=False)
    return model, processor


def _prompt(processor, text: str, batch: int = 1):
    rendered = processor.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    enc = processor.tokenizer([rendered] * batch, add_special_tokens=False, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _check_reply(reply: list[int], vocab: ImageVocab, eos: int) -> int:
    """Every image token of ``reply`` sits in a well-formed span (or in one cut off by max_new_tokens at
    the very end); returns the number of well-formed spans."""
    reply = reply[:reply.index(eos)] if eos in reply else reply
    spans = vocab.find_spans(reply)
    covered = {i for s, e in spans for i in range(s, e)}
    tail = max((i for i, t in enumerate(reply) if t == vocab.boi_id), default=len(reply))
    if vocab.eoi_id not in reply[tail:]:  # an unfinished span: <img> + only codes up to the end
        assert len(reply) - tail < vocab.span_length
        assert all(t in vocab.code_ids for t in reply[tail + 1:])
        covered |= set(range(tail, len(reply)))
    for i, t in enumerate(reply):
        if t in vocab.code_ids or t in (vocab.boi_id, vocab.eoi_id):
            assert i in covered, (i, reply)
    return len(spans)


def test_untrained_model_emits_a_well_formed_image(tiny):
    """generation_mode="image" from a random model: exactly <img>, N codes, </img>, </s> — sampled or greedy."""
    model, processor = tiny
    v, tok = processor.vocab, processor.tokenizer
    ids, mask = _prompt(processor, "a small red circle in the top left", batch=3)
    for kwargs in ({"do_sample": True, "temperature": 1.5, "top_k": 5}, {"do_sample": False}):
        torch.manual_seed(0)
        reply = generate(model, v, ids, mask, generation_mode="image", max_new_tokens=v.span_length + 4, **kwargs)
        for row in reply.tolist():
            assert row[0] == v.boi_id and row[v.span_length - 1] == v.eoi_id and row[v.span_length] == tok.eos_token_id
            assert all(t in v.code_ids for t in row[1:v.span_length - 1])
        assert v.ids_to_codes(reply[:, :v.span_length]).codes.shape == (3, v.num_tokens)
    with pytest.raises(ConfigError, match="cannot hold an image span"):
        generate(model, v, ids, mask, generation_mode="image", max_new_tokens=v.span_length)


def test_auto_mode_spans_are_well_formed_even_when_the_model_wants_img_everywhere(tiny):
    """Bias the LM towards <img> and image codes: spans must still hold exactly N codes and close."""
    model, processor = tiny
    v, tok = processor.vocab, processor.tokenizer
    head = model.get_output_embeddings()
    saved = head.weight.detach().clone()
    try:
        with torch.no_grad():
            head.weight[v.boi_id] = saved.mean(0) + 5 * saved[:v.offset].std(0).sign()  # big logit for <img>
            head.weight[v.eoi_id] *= 3
        ids, mask = _prompt(processor, "draw", batch=4)
        torch.manual_seed(1)
        reply = generate(model, v, ids, mask, generation_mode="auto", do_sample=True, max_new_tokens=40)
        spans = [_check_reply(r, v, tok.eos_token_id) for r in reply.tolist()]
        assert sum(spans) >= 4  # the bias makes images; the processor makes them well-formed
        text = generate(model, v, ids, mask, generation_mode="text", do_sample=True, max_new_tokens=20)
        flat = text.flatten().tolist()
        assert not any(t in v.code_ids or t in (v.boi_id, v.eoi_id) for t in flat)
    finally:
        with torch.no_grad():
            head.weight.copy_(saved)


def test_cfg_guides_image_codes_only(tiny):
    """Inside a span the scores are u + s·(c − u) with u from the unconditional prompt; elsewhere untouched."""
    model, processor = tiny
    v = processor.vocab
    cond_ids, _ = _prompt(processor, "a large blue square in the center")
    uncond_ids, _ = _prompt(processor, "")
    T0 = cond_ids.shape[1]
    # a reply that has just opened a span and drawn one code
    reply = torch.tensor([[v.boi_id, v.offset + 3]])
    full = torch.cat([cond_ids, reply], 1)
    with torch.no_grad():
        cond_logits = model(full).logits[:, -1]
        uncond_logits = model(torch.cat([uncond_ids, reply], 1)).logits[:, -1]
    cfg = ImageCFGLogitsProcessor(model, v, uncond_ids, 3.0, prompt_length=T0)
    out = cfg(full, cond_logits.clone())
    c, u = torch.log_softmax(cond_logits, -1), torch.log_softmax(uncond_logits, -1)
    torch.testing.assert_close(out, u + 3.0 * (c - u), rtol=1e-4, atol=1e-4)
    # outside a span: unchanged, and no unconditional pass is run
    fresh = ImageCFGLogitsProcessor(model, v, uncond_ids, 3.0, prompt_length=T0)
    with torch.no_grad():
        text_logits = model(cond_ids).logits[:, -1]
    assert torch.equal(fresh(cond_ids, text_logits.clone()), text_logits) and fresh.past is None
    # end to end: guided sampling still yields one well-formed span, and guidance changes the codes
    ids, mask = _prompt(processor, "a large blue square in the center", batch=4)
    uids, umask = _prompt(processor, "", batch=1)
    torch.manual_seed(0)
    plain = generate(model, v, ids, mask, generation_mode="image", do_sample=False, max_new_tokens=v.span_length + 1)
    guided = generate(model, v, ids, mask, generation_mode="image", do_sample=False, max_new_tokens=v.span_length + 1,
                      guidance_scale=5.0, unconditional_ids=uids, unconditional_attention_mask=umask)
    assert v.ids_to_codes(guided[:, :v.span_length]).codes.shape == (4, v.num_tokens)
    assert not torch.equal(plain, guided)
    with pytest.raises(ConfigError, match="unconditional_ids"):
        generate(model, v, ids, mask, generation_mode="image", guidance_scale=2.0)


def test_cfg_incremental_cache_matches_full_recompute(tiny):
    """The lazy unconditional pass with its KV cache gives the same guided scores as recomputing from scratch."""
    model, processor = tiny
    v = processor.vocab
    cond_ids, _ = _prompt(processor, "a red circle")
    uncond_ids, _ = _prompt(processor, "")
    T0 = cond_ids.shape[1]
    cfg = ImageCFGLogitsProcessor(model, v, uncond_ids, 2.0, prompt_length=T0)
    reply = [5, v.boi_id, v.offset + 1, v.offset + 2]
    for k in range(1, len(reply) + 1):
        seq = torch.cat([cond_ids, torch.tensor([reply[:k]])], 1)
        with torch.no_grad():
            scores = model(seq).logits[:, -1]
            u = torch.log_softmax(model(torch.cat([uncond_ids, torch.tensor([reply[:k]])], 1)).logits[:, -1], -1)
        out = cfg(seq, scores.clone())
        if k >= 2:  # inside the span
            c = torch.log_softmax(scores, -1)
            torch.testing.assert_close(out, u + 2.0 * (c - u), rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(out, scores)


def test_streaming_yields_the_reply_text(tiny):
    import threading

    model, processor = tiny
    v, tok = processor.vocab, processor.tokenizer
    ids, mask = _prompt(processor, "hello")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    result = {}

    def run():
        torch.manual_seed(0)
        result["ids"] = generate(model, v, ids, mask, generation_mode="auto", do_sample=True, max_new_tokens=24,
                                 streamer=streamer)

    thread = threading.Thread(target=run)
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    reply = result["ids"][0].tolist()
    text_ids = [t for part in v.split(reply) if isinstance(part, list) for t in part]
    assert streamed.strip() == tok.decode(text_ids, skip_special_tokens=True).strip()
    assert streamed == tok.decode(reply, skip_special_tokens=True)
