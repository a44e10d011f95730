"""Constrained generation of image spans, classifier-free guidance on them, and a ``generate`` wrapper.

SEED-LLaMA samples freely and then looks for the first ``<img> … </img>`` span, checking that it
holds 32 image ids; an unlucky sample yields no image. Here a transformers ``LogitsProcessor``
makes every span well-formed by construction:

* inside a span (after ``<img>`` with ``k < N`` codes so far): only the K code ids are allowed;
* after ``N`` codes: only ``</img>``;
* outside a span: code ids and ``</img>`` are banned; ``<img>`` is banned in ``"text"`` mode,
  forced as the first reply token in ``"image"`` mode (whose reply is exactly one span, then
  ``</s>``), and left to the model in ``"auto"`` mode.

The state is read from ``input_ids`` at every step (no hidden counters), so the processor works
with any batch size, sampling or beam search. In transformers 5 custom logits processors run
before the sampling warpers (temperature, top-k/p), so a warper never sees a row whose allowed
tokens were all cut.

Classifier-free guidance (Ho & Salimans, arXiv:2207.12598) for image tokens: the logits of the
codes are ``u + s · (c − u)`` where ``c`` are the conditional and ``u`` the unconditional log-probs —
the latter from the same model on an unconditional prompt (e.g. the chat with an empty user
message) followed by the reply so far. transformers' own ``UnbatchedClassifierFreeGuidanceLogitsProcessor``
guides every token; we guide only the image codes (text stays conditional) and run the
unconditional pass lazily, only at steps that choose a code.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from llm_adapters.image_vocab import ImageVocab
from seedtok.errors import ConfigError

GenerationMode = Literal["text", "image", "auto"]
MODES = ("text", "image", "auto")


def span_state(input_ids: torch.Tensor, vocab: ImageVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row stands with respect to image spans.

    Args:
        input_ids: ``(B, T)``.

    Returns:
        inside: ``(B,)`` bool — the last ``<img>`` comes after the last ``</img>``.
        count: ``(B,)`` long — tokens since that ``<img>`` (codes so far when inside; 0 outside).
    """
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device).expand(B, T)
    neg = torch.full_like(pos, -1)
    last_boi = torch.where(input_ids == vocab.boi_id, pos, neg).amax(1)  # (B,)
    last_eoi = torch.where(input_ids == vocab.eoi_id, pos, neg).amax(1)
    inside = last_boi > last_eoi
    count = torch.where(inside, T - 1 - last_boi, torch.zeros_like(last_boi))
    return inside, count


class ImageSpanLogitsProcessor(LogitsProcessor):
    """Guarantees well-formed image spans: ``<img>`` + exactly N code ids + ``</img>``, and no code id outside.

    Args:
        vocab: the image vocabulary.
        mode: ``"text"`` (no images), ``"image"`` (the reply is one image span then EOS), ``"auto"``.
        prompt_length: length ``T0`` of the (padded) prompt; needed by ``"image"`` mode to tell the
            reply from the prompt.
        eos_token_id: forced after the span in ``"image"`` mode.
    """

    def __init__(self, vocab: ImageVocab, *, mode: GenerationMode = "auto", prompt_length: int = 0,
                 eos_token_id: int | None = None):
        if mode not in MODES:
            raise ConfigError(f"generation_mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "image" and eos_token_id is None:
            raise ConfigError("generation_mode='image' needs an eos_token_id to end the reply after the image")
        self.vocab = vocab
        self.mode = mode
        self.prompt_length = prompt_length
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        v = self.vocab
        V = scores.shape[-1]
        if V < v.vocab_size:
            raise ConfigError(f"the model scores {V} tokens but the image vocabulary needs {v.vocab_size}")
        inside, count = span_state(input_ids, v)
        ids = torch.arange(V, device=scores.device)
        is_code = (ids >= v.offset) & (ids < v.offset + v.codebook_size)  # (V,)
        allowed = torch.ones_like(scores, dtype=torch.bool)  # (B, V)

        # outside a span: no code ids, no </img>
        outside_allowed = ~is_code & (ids != v.eoi_id)
        if self.mode == "text":
            outside_allowed &= ids != v.boi_id
        allowed[~inside] = outside_allowed

        if self.mode == "image":
            reply = input_ids[:, self.prompt_length:]
            started = (reply == v.boi_id).any(1)  # (B,)
            force_boi = ~inside & ~started
            force_eos = ~inside & started
            allowed[force_boi] = ids == v.boi_id
            allowed[force_eos] = ids == self.eos_token_id

        # inside: N codes, then </img>
        need_code = inside & (count < v.num_tokens)
        allowed[need_code] = is_code
        allowed[inside & (count >= v.num_tokens)] = ids == v.eoi_id
        return scores.masked_fill(~allowed, float("-inf"))


class ImageCFGLogitsProcessor(LogitsProcessor):
    """Classifier-free guidance on image codes only (see the module docstring).

    Args:
        model: the model being generated from (its forward gives the unconditional logits).
        vocab: the image vocabulary.
        unconditional_ids: ``(B, Tu)`` or ``(1, Tu)`` unconditional prompt (left-padded).
        guidance_scale: ``s``; 1 leaves the scores unchanged.
        prompt_length: length ``T0`` of the conditional (padded) prompt; the reply starts there.
        unconditional_attention_mask: ``(B, Tu)``; default all ones.
    """

    def __init__(self, model: Any, vocab: ImageVocab, unconditional_ids: torch.Tensor, guidance_scale: float, *,
                 prompt_length: int, unconditional_attention_mask: torch.Tensor | None = None):
        self.model = model
        self.vocab = vocab
        self.scale = float(guidance_scale)
        self.prompt_length = prompt_length
        self.uncond_ids = unconditional_ids
        self.uncond_mask = (unconditional_attention_mask if unconditional_attention_mask is not None
                            else torch.ones_like(unconditional_ids))
        self.past: Any = None
        self.consumed = 0  # reply tokens already fed to the unconditional pass
        self.last_logits: torch.Tensor | None = None

    def _unconditional(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Log-probs ``(B, V)`` of the next token given the unconditional prompt + the reply so far."""
        B = input_ids.shape[0]
        reply = input_ids[:, self.prompt_length:]
        new = reply[:, self.consumed:]
        if self.past is None:
            ids, mask = self.uncond_ids.to(input_ids.device), self.uncond_mask.to(input_ids.device)
            if ids.shape[0] != B:
                # generate(num_return_sequences=n) repeats each prompt n times in place: do the same
                if B % ids.shape[0]:
                    raise ConfigError(f"unconditional_ids has {ids.shape[0]} rows, the batch has {B}")
                r = B // ids.shape[0]
                ids, mask = ids.repeat_interleave(r, 0), mask.repeat_interleave(r, 0)
            self.uncond_mask = mask
            ids = torch.cat([ids, new], dim=1)
        else:
            ids = new
        if ids.shape[1] == 0:  # nothing new since the last pass (cannot happen inside generate)
            return self.last_logits
        self.uncond_mask = torch.cat([self.uncond_mask, torch.ones_like(new)], dim=1)
        out = self.model(input_ids=ids, attention_mask=self.uncond_mask, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        self.consumed = reply.shape[1]
        self.last_logits = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        return self.last_logits

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.scale == 1.0:
            return scores
        inside, count = span_state(input_ids, self.vocab)
        need = inside & (count < self.vocab.num_tokens)  # rows choosing a code now
        if not bool(need.any()):
            return scores
        uncond = self._unconditional(input_ids)
        cond = torch.log_softmax(scores.float(), dim=-1)
        guided = uncond + self.scale * (cond - uncond)
        return torch.where(need[:, None], guided.to(scores.dtype), scores)


def image_logits_processors(model: Any, vocab: ImageVocab, *, prompt_length: int, mode: GenerationMode = "auto",
                            eos_token_id: int | None = None, guidance_scale: float = 1.0,
                            unconditional_ids: torch.Tensor | None = None,
                            unconditional_attention_mask: torch.Tensor | None = None) -> LogitsProcessorList:
    """The processors for ``model.generate(logits_processor=…)``: CFG (if ``guidance_scale != 1``), then the span constraint."""
    procs = LogitsProcessorList()
    if guidance_scale != 1.0:
        if unconditional_ids is None:
            raise ConfigError("guidance_scale != 1 needs unconditional_ids (e.g. the chat with an empty user message)")
        procs.append(ImageCFGLogitsProcessor(model, vocab, unconditional_ids, guidance_scale,
                                             prompt_length=prompt_length,
                                             unconditional_attention_mask=unconditional_attention_mask))
    procs.append(ImageSpanLogitsProcessor(vocab, mode=mode, prompt_length=prompt_length, eos_token_id=eos_token_id))
    return procs


@torch.no_grad()
def generate(model: Any, vocab: ImageVocab, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             generation_mode: GenerationMode = "auto", guidance_scale: float = 1.0,
             unconditional_ids: torch.Tensor | None = None, unconditional_attention_mask: torch.Tensor | None = None,
             eos_token_id: int | None = None, pad_token_id: int | None = None, max_new_tokens: int = 128,
             streamer: Any = None, **generate_kwargs: Any) -> torch.Tensor:
    """``model.generate`` with well-formed image spans; returns only the reply ids ``(B, T_new)``.

    Args:
        input_ids / attention_mask: ``(B, T0)`` left-padded prompts.
        generation_mode: ``"text"``, ``"image"`` or ``"auto"`` (see :class:`ImageSpanLogitsProcessor`).
        guidance_scale / unconditional_ids: classifier-free guidance on image codes.
        **generate_kwargs: anything ``generate`` takes (``do_sample``, ``temperature``, ``top_k``, …).
    """
    gen_config = model.generation_config
    eos = eos_token_id if eos_token_id is not None else gen_config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    pad = pad_token_id if pad_token_id is not None else (gen_config.pad_token_id if gen_config.pad_token_id
                                                          is not None else eos)
    if generation_mode == "image" and max_new_tokens < vocab.span_length + 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} cannot hold an image span ({vocab.span_length} tokens) "
                          "and the end of the reply")
    T0 = input_ids.shape[1]
    procs = image_logits_processors(model, vocab, prompt_length=T0, mode=generation_mode, eos_token_id=eos,
                                    guidance_scale=guidance_scale, unconditional_ids=unconditional_ids,
                                    unconditional_attention_mask=unconditional_attention_mask)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=procs,
                         eos_token_id=eos, pad_token_id=pad, max_new_tokens=max_new_tokens, streamer=streamer,
                         **generate_kwargs)
    return out[:, T0:]
