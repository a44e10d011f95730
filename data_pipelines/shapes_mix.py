"""SEED-LLaMA's three kinds of training sequence, made from Shapes scenes.

SEED-LLaMA trains on image–caption pairs, interleaved image–text documents (MMC4) and multi-turn
instruction conversations. The Shapes world has only scenes and captions, so this module composes
the other two from them:

* **pair** — one scene, image → caption or caption → image (:meth:`SequenceBuilder.pair`);
* **conversation** — 2–3 turns, each either "describe this image" (answer: a caption) or
  "draw …" (answer: an image) about a random scene: multi-turn chats with loss on the answers;
* **document** — 2–4 scenes in reading order, each a caption followed by its image (or the image
  followed by its caption): interleaved next-token prediction.

:func:`shapes_plan` draws a sample's structure with scene indices in place of images; the same
plan can be filled with cached codes (:class:`ShapesMixSource`, the training path) or with images
encoded on the fly (``bench/train_llm.py``'s baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from data_pipelines.packing import TokenizedSample
from data_pipelines.sequences import SequenceBuilder
from seedtok.errors import DataError

DRAW_PROMPTS = ("Draw {}.", "Show me {}.", "Make a picture of {}.")
ASK_PROMPTS = ("Describe the image.", "What is in this picture?", "What do you see?")


@dataclass
class Plan:
    """A sample's structure; ``scenes`` lists the scene index of every image, in order.

    kind ``pair``: ``direction`` (``caption``/``generation``) and ``text``; ``chat``: ``messages``
    whose image items are ``{"type": "image", "scene": j}``; ``document``: ``parts`` (str or
    ``("scene", j)``).
    """

    kind: Literal["pair", "chat", "document"]
    scenes: list[int]
    text: str = ""
    direction: str = ""
    messages: list[dict[str, Any]] | None = None
    parts: list[Any] | None = None


def _text(texts: Sequence[Sequence[str]], j: int, rng: np.random.Generator) -> str:
    options = texts[j]
    return options[int(rng.integers(len(options)))]


def shapes_plan(i: int, texts: Sequence[Sequence[str]], rng: np.random.Generator, *, caption_fraction: float = 0.5,
                uncond_fraction: float = 0.1, conversation_fraction: float = 0.0,
                document_fraction: float = 0.0, answers: Sequence[str] | None = None) -> Plan:
    """Draw item ``i``'s sample: a pair of scene ``i``, or a conversation / document led by scene ``i``
    (further scenes drawn uniformly).

    ``answers`` (one text per scene), when given, is what the model is trained to *say* about an
    image (image → text pairs, "describe" answers); prompts, generation texts and documents still
    draw from ``texts``.
    """
    n = len(texts)

    def answer(j: int) -> str:
        return answers[j] if answers is not None else _text(texts, j, rng)

    u = rng.random()
    if u < conversation_fraction:
        messages, scenes = [], []
        for turn in range(int(rng.integers(2, 4))):
            j = i if turn == 0 else int(rng.integers(n))
            scenes.append(j)
            if rng.random() < 0.5:  # describe an image
                ask = ASK_PROMPTS[int(rng.integers(len(ASK_PROMPTS)))]
                messages += [{"role": "user", "content": [{"type": "image", "scene": j}, {"type": "text", "text": ask}]},
                             {"role": "assistant", "content": answer(j)}]
            else:  # draw one
                prompt = DRAW_PROMPTS[int(rng.integers(len(DRAW_PROMPTS)))].format(_text(texts, j, rng))
                messages += [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": [{"type": "image", "scene": j}]}]
        return Plan("chat", scenes, messages=messages)
    if u < conversation_fraction + document_fraction:
        scenes = [i] + [int(k) for k in rng.integers(n, size=int(rng.integers(1, 4)))]
        parts: list[Any] = []
        for k, j in enumerate(scenes):
            sep = "" if k == 0 else " "
            if rng.random() < 0.5:
                parts += [sep + _text(texts, j, rng) + ":", ("scene", j)]
            else:
                parts += [("scene", j), sep + _text(texts, j, rng) + "."]
        return Plan("document", scenes, parts=parts)
    if rng.random() < caption_fraction:
        return Plan("pair", [i], text=answer(i), direction="caption")
    uncond = uncond_fraction > 0 and rng.random() < uncond_fraction
    return Plan("pair", [i], text="" if uncond else _text(texts, i, rng), direction="generation")


def build_plan(builder: SequenceBuilder, plan: Plan, codes_of: Any) -> TokenizedSample | None:
    """Fill a plan's scenes with codes (``codes_of(j) -> (N,)``) and tokenise it."""
    if plan.kind == "pair":
        make = builder.caption if plan.direction == "caption" else builder.generation
        builder.stats.add(plan.direction if plan.text or plan.direction == "caption" else "generation_uncond")
        return make(codes_of(plan.scenes[0]), plan.text)
    if plan.kind == "chat":
        messages = []
        for m in plan.messages or []:
            content = m["content"]
            if not isinstance(content, str):
                content = [{"type": "image", "codes": codes_of(it["scene"])} if it["type"] == "image" else it
                           for it in content]
            messages.append({"role": m["role"], "content": content})
        builder.stats.add("conversation")
        return builder.chat(messages)
    builder.stats.add("document")
    return builder.interleaved([codes_of(p[1]) if isinstance(p, tuple) else p for p in plan.parts or []])


class ShapesMixSource:
    """Pairs, conversations and documents over Shapes scenes with cached codes ``(n, N)``."""

    def __init__(self, builder: SequenceBuilder, codes: np.ndarray, texts: Sequence[Sequence[str]], *,
                 caption_fraction: float = 0.5, uncond_fraction: float = 0.1, conversation_fraction: float = 0.0,
                 document_fraction: float = 0.0, answers: Sequence[str] | None = None):
        if answers is not None and len(answers) != len(texts):
            raise DataError(f"{len(answers)} answer texts for {len(texts)} scenes")
        self.builder, self.codes, self.texts, self.answers = builder, np.asarray(codes), texts, answers
        self.fractions = dict(caption_fraction=caption_fraction, uncond_fraction=uncond_fraction,
                              conversation_fraction=conversation_fraction, document_fraction=document_fraction)

    def __len__(self) -> int:
        return len(self.codes)

    def sample(self, i: int, rng: np.random.Generator) -> TokenizedSample | None:
        plan = shapes_plan(i, self.texts, rng, answers=self.answers, **self.fractions)
        return build_plan(self.builder, plan, lambda j: self.codes[j])


__all__ = ["Plan", "ShapesMixSource", "build_plan", "shapes_plan"]
