"""Training sequences for the multimodal LLM: records + image codes → token ids and loss labels.

Three kinds of sequence, as in SEED-LLaMA (arXiv:2310.01218):

* **pairs, both directions** — captioning (``USER: <img>…</img>Describe the image.`` →
  ``ASSISTANT: caption``) and generation (``USER: caption`` → ``ASSISTANT: <img>…</img>``), drawn
  50/50 by default. A fraction of generation turns get an empty user message, which trains the
  unconditional branch of classifier-free guidance (``USER: \\nASSISTANT:\\n`` at sampling time);
* **conversations** (LLaVA-style instruction data) — loss on the assistant turns only;
* **interleaved documents** (MMC4 / OBELICS) — plain next-token prediction over text and image
  spans, loss on every token after ``<s>``.

Pairs and conversations go through the chat template of the model's processor
(:mod:`llm_adapters.chat_template`); the loss mask comes from the template's ``{% generation %}``
block via ``return_assistant_tokens_mask=True`` — token positions the tokenizer reports, never a
split of the rendered string. Images are referenced by their codes (from the
:class:`~data_pipelines.code_cache.CodeCache`), so building a sequence never touches pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from data_pipelines.packing import IGNORE_INDEX, TokenizedSample
from data_pipelines.records import Record, TextSegment
from seedtok.errors import DataError


@dataclass
class BuildStats:
    """Counts of what the builders produced and skipped."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n


class SequenceBuilder:
    """Turns pairs, conversations and documents (with image codes) into :class:`TokenizedSample`.

    Args:
        processor: a :class:`llm_adapters.processor.SeedProcessor` (tokenizer with the image
            vocabulary and the chat template).
        max_len: longest sample kept (tokens); longer ones are skipped and counted as ``too_long``
            — a cut image span or a cut answer is wrong training data.
        caption_instruction: the user text after the image in captioning turns (what
            ``SeedChat.caption`` sends).
    """

    def __init__(self, processor: Any, max_len: int, caption_instruction: str | None = None):
        from llm_adapters.chat_template import CAPTION_INSTRUCTION

        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.vocab = processor.vocab
        self.max_len = max_len
        self.caption_instruction = CAPTION_INSTRUCTION if caption_instruction is None else caption_instruction
        self.stats = BuildStats()

    # ---- chat sequences ---------------------------------------------------------------------------
    def chat(self, messages: list[dict[str, Any]]) -> TokenizedSample | None:
        """Chat messages (content: str or items; image items carry ``codes``) → ids, labels on assistant tokens."""
        from llm_adapters.chat_template import chat_labels

        enc = self.processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])
        labels = chat_labels(ids, list(enc["assistant_masks"]))
        return self._keep(ids, labels)

    def caption(self, codes: torch.Tensor | np.ndarray, text: str) -> TokenizedSample | None:
        """Image → text: ``USER: <img>…</img>{instruction}`` / ``ASSISTANT: {text}</s>``."""
        return self.chat([
            {"role": "user", "content": [{"type": "image", "codes": _codes(codes)},
                                         {"type": "text", "text": self.caption_instruction}]},
            {"role": "assistant", "content": text},
        ])

    def generation(self, codes: torch.Tensor | np.ndarray, text: str) -> TokenizedSample | None:
        """Text → image: ``USER: {text}`` / ``ASSISTANT: <img>…</img></s>`` (``text=""``: unconditional)."""
        return self.chat([
            {"role": "user", "content": text},
            {"role": "assistant", "content": [{"type": "image", "codes": _codes(codes)}]},
        ])

    def conversation(self, record: Record, codes: Sequence[torch.Tensor | np.ndarray]) -> TokenizedSample | None:
        """A ``conversation`` (or ``pair``) record's turns as they are; loss on assistant turns."""
        it = iter(codes)
        messages = []
        for m in record.messages:
            if m.role == "document":
                raise DataError(f"record {record.id}: a document message inside a conversation")
            items = []
            for seg in m.content:
                if isinstance(seg, TextSegment):
                    items.append({"type": "text", "text": seg.text})
                else:
                    items.append({"type": "image", "codes": _codes(_next(it, record))})
            messages.append({"role": m.role, "content": items})
        if not any(m["role"] == "assistant" for m in messages):
            self.stats.add("no_assistant_turn")
            return None
        return self.chat(messages)

    # ---- plain sequences --------------------------------------------------------------------------
    def document(self, record: Record, codes: Sequence[torch.Tensor | np.ndarray]) -> TokenizedSample | None:
        """An interleaved document record (see :meth:`interleaved`); ``codes`` of its images in order."""
        it = iter(codes)
        return self.interleaved([seg.text if isinstance(seg, TextSegment) else _next(it, record)
                                 for seg in record.segments])

    def interleaved(self, parts: Sequence[str | torch.Tensor | np.ndarray]) -> TokenizedSample | None:
        """``<s>`` texts and ``<img>…</img>`` spans (``parts``: strings and ``(N,)`` codes) in reading order
        ``</s>``; loss on every token after ``<s>``.

        The whole document is tokenised as one string with its spans written in place (no spaces
        around them), exactly as the processor writes prompts, so a text's tokens do not depend on
        whether an image precedes it.
        """
        text = "".join(p if isinstance(p, str) else self.vocab.span_text(_codes(p)) for p in parts)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [self.tokenizer.bos_token_id, *ids, self.tokenizer.eos_token_id]
        return self._keep(ids, [IGNORE_INDEX, *ids[1:]])

    def record(self, record: Record, codes: Sequence[torch.Tensor | np.ndarray], rng: np.random.Generator,
               caption_fraction: float = 0.5, uncond_fraction: float = 0.0) -> TokenizedSample | None:
        """Any record: pairs in a random direction, conversations and documents as they are."""
        if record.kind == "pair":
            if len(codes) != 1:
                raise DataError(f"record {record.id}: a pair has one image, got {len(codes)} codes")
            return self.pair(codes[0], record.text, rng, caption_fraction, uncond_fraction)
        if record.kind == "conversation":
            return self.conversation(record, codes)
        return self.document(record, codes)

    def pair(self, codes: torch.Tensor | np.ndarray, text: str, rng: np.random.Generator,
             caption_fraction: float = 0.5, uncond_fraction: float = 0.0) -> TokenizedSample | None:
        """One pair in a random direction (``caption_fraction`` of the time image → text)."""
        if rng.random() < caption_fraction:
            self.stats.add("caption")
            return self.caption(codes, text)
        uncond = uncond_fraction > 0 and rng.random() < uncond_fraction
        self.stats.add("generation_uncond" if uncond else "generation")
        return self.generation(codes, "" if uncond else text)

    def _keep(self, ids: list[int], labels: list[int]) -> TokenizedSample | None:
        if len(ids) > self.max_len:
            self.stats.add("too_long")
            return None
        return TokenizedSample(np.asarray(ids), np.asarray(labels))


def _codes(codes: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes).long().reshape(-1)


def _next(it, record: Record):
    try:
        return next(it)
    except StopIteration:
        raise DataError(f"record {record.id}: fewer codes than images") from None


# ---------------------------------------------------------------------------------------------
# Sources: what a training run samples from
# ---------------------------------------------------------------------------------------------
class SampleSource(Protocol):
    """Indexable training items; ``sample(i, rng)`` builds item ``i``'s sequence (None = skip)."""

    def __len__(self) -> int: ...

    def sample(self, i: int, rng: np.random.Generator) -> TokenizedSample | None: ...


class PairSource:
    """Image–text pairs held as arrays: ``codes (n, N)`` and, per item, its texts (canonical caption
    first, then paraphrases). Each draw picks a text uniformly and a direction (caption /
    generation) with ``caption_fraction``."""

    def __init__(self, builder: SequenceBuilder, codes: np.ndarray, texts: Sequence[Sequence[str]], *,
                 caption_fraction: float = 0.5, uncond_fraction: float = 0.1):
        if len(codes) != len(texts):
            raise DataError(f"{len(codes)} code rows but {len(texts)} text lists")
        self.builder, self.codes, self.texts = builder, np.asarray(codes), texts
        self.caption_fraction, self.uncond_fraction = caption_fraction, uncond_fraction

    def __len__(self) -> int:
        return len(self.codes)

    def sample(self, i: int, rng: np.random.Generator) -> TokenizedSample | None:
        texts = self.texts[i]
        text = texts[int(rng.integers(len(texts)))]
        return self.builder.pair(self.codes[i], text, rng, self.caption_fraction, self.uncond_fraction)


class RecordSource:
    """Records (pairs, conversations, documents) with the codes of their images, in order.

    ``codes[i]`` is the list of ``(N,)`` code arrays of ``records[i]``'s images (e.g. from
    :meth:`~data_pipelines.code_cache.CodeCache.as_array`)."""

    def __init__(self, builder: SequenceBuilder, records: Sequence[Record], codes: Sequence[Sequence[np.ndarray]],
                 *, caption_fraction: float = 0.5, uncond_fraction: float = 0.1):
        if len(records) != len(codes):
            raise DataError(f"{len(records)} records but {len(codes)} code lists")
        self.builder, self.records, self.codes = builder, records, codes
        self.caption_fraction, self.uncond_fraction = caption_fraction, uncond_fraction

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, i: int, rng: np.random.Generator) -> TokenizedSample | None:
        return self.builder.record(self.records[i], self.codes[i], rng, self.caption_fraction, self.uncond_fraction)


class ConcatSource:
    """Several sources as one index space (item ``i`` of the concatenation)."""

    def __init__(self, sources: Sequence[SampleSource]):
        self.sources = list(sources)
        self.offsets = np.cumsum([0, *[len(s) for s in self.sources]])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def sample(self, i: int, rng: np.random.Generator) -> TokenizedSample | None:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.sources[k].sample(i - int(self.offsets[k]), rng)


__all__ = ["BuildStats", "ConcatSource", "PairSource", "RecordSource", "SampleSource", "SequenceBuilder"]
