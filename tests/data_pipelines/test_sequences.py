"""Training sequences: which tokens carry the loss in each kind of sample (from the chat template's
assistant mask), and the packed stream's determinism, resumption and sharding."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.packed_stream import PackedStream
from data_pipelines.packing import IGNORE_INDEX
from data_pipelines.records import ImageRef, ImageSegment, Message, Record, TextSegment
from data_pipelines.sequences import ConcatSource, PairSource, RecordSource, SequenceBuilder
from seedtok.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "llm_adapters"))
import llm_tiny  # noqa: E402 — the llm_adapters tests' tiny builders


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from llm_adapters.builders import build_chat_model

    tok = llm_tiny.build_sp_tokenizer(tmp_path_factory.mktemp("sp"))
    _, proc = build_chat_model(tok, codebook_size=llm_tiny.K, num_tokens=llm_tiny.N, preset=llm_tiny.tiny_preset())
    return proc


def _loss_ids(s):
    return [int(t) for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE_INDEX]


def test_caption_and_generation_put_the_loss_on_the_answer(processor):
    b = SequenceBuilder(processor, max_len=128)
    tok, vocab = processor.tokenizer, processor.vocab
    codes = np.array([3, 0, 15, 7])
    span = vocab.codes_to_ids(codes[None])[0].tolist()
    cap = b.caption(codes, "a small red circle in the top left")
    assert tok.decode(_loss_ids(cap)) == "a small red circle in the top left</s>"
    ids = cap.input_ids.tolist()
    assert ids[0] == tok.bos_token_id and ids[ids.index(vocab.boi_id):ids.index(vocab.boi_id) + 6] == span
    gen = b.generation(codes, "a small red circle in the top left")
    assert _loss_ids(gen) == [*span, tok.eos_token_id]
    assert "a small red circle" in tok.decode(gen.input_ids[gen.labels == IGNORE_INDEX])
    uncond = b.generation(codes, "")
    assert _loss_ids(uncond) == [*span, tok.eos_token_id] and len(uncond) < len(gen)


def test_conversation_loss_only_on_assistant_turns(processor):
    b = SequenceBuilder(processor, max_len=256)
    img = ImageRef(path="x.png")
    rec = Record("c1", "conversation", [
        Message("user", [ImageSegment(img), TextSegment("What is this?")]),
        Message("assistant", [TextSegment("a blue square")]),
        Message("user", [TextSegment("Draw it bigger.")]),
        Message("assistant", [ImageSegment(img)]),
    ])
    codes = [np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8])]
    s = b.conversation(rec, codes)
    span2 = processor.vocab.codes_to_ids(codes[1][None])[0].tolist()
    eos = processor.tokenizer.eos_token_id
    got = _loss_ids(s)
    assert got[-6 - 1:] == [*span2, eos]  # the second answer: the image span and </s>
    assert processor.tokenizer.decode(got[:-7]) == "a blue square</s>"  # the first answer
    assert "What is this?" in processor.tokenizer.decode(s.input_ids[s.labels == IGNORE_INDEX])
    # No assistant turn → nothing to learn.
    assert b.conversation(Record("c2", "conversation", [Message("user", [TextSegment("hi")])]), []) is None


def test_document_loss_everywhere_after_bos_and_too_long_is_skipped(processor):
    b = SequenceBuilder(processor, max_len=40)
    rec = Record.document("d", [TextSegment("a red circle"), ImageSegment(ImageRef(path="a.png")),
                                TextSegment("then a blue square")])
    s = b.document(rec, [np.array([0, 1, 2, 3])])
    assert s.labels[0] == IGNORE_INDEX and (s.labels[1:] == s.input_ids[1:]).all()
    assert s.input_ids[-1] == processor.tokenizer.eos_token_id
    assert processor.vocab.find_spans(s.input_ids.tolist()) != []
    short = SequenceBuilder(processor, max_len=8)
    assert short.document(rec, [np.array([0, 1, 2, 3])]) is None and short.stats.counts["too_long"] == 1


def _source(processor, n=60):
    b = SequenceBuilder(processor, max_len=128)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, llm_tiny.K, (n, llm_tiny.N))
    texts = [[f"a small red circle number {i}", f"circle {i}"] for i in range(n)]
    return PairSource(b, codes, texts, caption_fraction=0.5, uncond_fraction=0.2)


def _ids(batch):
    return batch.input_ids.tolist()


def test_stream_is_deterministic_resumable_and_sharded(processor):
    src = _source(processor)
    a = PackedStream(src, 96, 0, seed=1, window=16)
    first = [_ids(a.next_batch(2)) for _ in range(5)]
    state = a.state_dict()
    rest = [_ids(a.next_batch(2)) for _ in range(8)]  # crosses windows and an epoch
    assert a.state_dict()["epoch"] >= 1
    b = PackedStream(src, 96, 0, seed=1, window=16)
    assert [_ids(b.next_batch(2)) for _ in range(5)] == first
    c = PackedStream(src, 96, 0, seed=1, window=16)
    c.load_state_dict(state)
    assert [_ids(c.next_batch(2)) for _ in range(8)] == rest
    # Two processes with 1 row each see exactly the rows one process takes 2 at a time.
    r0, r1 = PackedStream(src, 96, 0, seed=1, window=16), PackedStream(src, 96, 0, seed=1, window=16)
    for want in first:
        assert _ids(r0.next_batch(1, 0, 2)) + _ids(r1.next_batch(1, 1, 2)) == want
    # Another seed, another order.
    assert [_ids(PackedStream(src, 96, 0, seed=2, window=16).next_batch(2)) for _ in range(5)] != first


def test_stream_visits_every_item_each_epoch_in_both_directions(processor):
    src = _source(processor, n=40)
    stats = src.builder.stats
    s = PackedStream(src, 128, 0, seed=0, window=8)
    before = dict(stats.counts)
    n = 0
    while True:
        row = s.next_row()
        if s.state_dict()["epoch"] > 0:  # that row opened epoch 1
            break
        n += len(row)
    assert n == 40
    made = {k: stats.counts.get(k, 0) - before.get(k, 0) for k in ("caption", "generation", "generation_uncond")}
    assert sum(made.values()) >= 40 and made["caption"] > 5 and made["generation"] > 5


def test_record_and_concat_sources(processor):
    b = SequenceBuilder(processor, max_len=128)
    recs = [Record.pair(str(i), ImageRef(path=f"{i}.png"), f"caption {i}") for i in range(4)]
    codes = [[np.full(llm_tiny.N, i)] for i in range(4)]
    src = ConcatSource([RecordSource(b, recs, codes, caption_fraction=1.0), _source(processor, n=5)])
    assert len(src) == 9
    s = src.sample(2, np.random.default_rng(0))
    assert processor.tokenizer.decode(_loss_ids(s)) == "caption 2</s>"


def test_shapes_mix_builds_all_three_kinds_from_one_plan(processor):
    from data_pipelines.shapes_mix import ShapesMixSource, build_plan, shapes_plan

    b = SequenceBuilder(processor, max_len=400)
    texts = [[f"a small red circle number {i}"] for i in range(30)]
    codes = np.random.default_rng(1).integers(0, llm_tiny.K, (30, llm_tiny.N))
    kinds = {}
    for i in range(30):
        plan = shapes_plan(i, texts, np.random.default_rng([0, i]), conversation_fraction=0.4, document_fraction=0.3)
        kinds[plan.kind] = plan
        assert plan.scenes[0] == i
    assert set(kinds) == {"pair", "chat", "document"}
    chat = build_plan(b, kinds["chat"], lambda j: codes[j])
    n_answers = sum(m["role"] == "assistant" for m in kinds["chat"].messages)
    assert chat.input_ids.tolist().count(processor.tokenizer.eos_token_id) == n_answers
    assert (chat.labels == processor.tokenizer.eos_token_id).sum() == n_answers  # every answer ends with </s>
    doc = build_plan(b, kinds["document"], lambda j: codes[j])
    assert len(processor.vocab.find_spans(doc.input_ids.tolist())) == len(kinds["document"].scenes)
    # The training source fills the same plan with the same codes.
    src = ShapesMixSource(b, codes, texts, conversation_fraction=0.4, document_fraction=0.3)
    i = kinds["chat"].scenes[0]
    assert src.sample(i, np.random.default_rng([0, i])).input_ids.tolist() == chat.input_ids.tolist()


def test_shapes_mix_answers_replace_only_what_the_model_says(processor):
    from data_pipelines.shapes_mix import ShapesMixSource, shapes_plan

    texts = [[f"prompt {i} a", f"prompt {i} b"] for i in range(40)]
    answers = [f"answer {i}" for i in range(40)]
    said, asked = set(), set()
    for i in range(40):
        plan = shapes_plan(i, texts, np.random.default_rng([1, i]), conversation_fraction=0.5, answers=answers)
        if plan.kind == "pair":
            (said if plan.direction == "caption" else asked).add(plan.text)
            if plan.direction == "caption":
                assert plan.text == answers[i]
        else:
            for m in plan.messages:
                if m["role"] == "assistant" and isinstance(m["content"], str):
                    said.add(m["content"])
                elif m["role"] == "user" and isinstance(m["content"], str):
                    asked.add(m["content"])
    assert said and said <= set(answers)
    assert asked and not any(a in t for t in asked for a in answers)  # prompts still use the texts
    with pytest.raises(DataError, match="answer texts"):
        ShapesMixSource(SequenceBuilder(processor, max_len=400), np.zeros((40, llm_tiny.N), int), texts,
                        answers=answers[:3])
