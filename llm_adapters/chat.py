"""SeedChat: images in, text and images out — multi-turn chat, captioning and text-to-image from Python.

    message (+ images) ──processor: spans + chat template──► prompt ids (1, T)
        ──LLaMA.generate + ImageSpanLogitsProcessor (+ image CFG)──► reply ids
        ──ImageVocab.split──► text + ImageCodes ──SeedTokenizer.decode_image──► PIL images

Images the user sends and images the model draws stay in the history as their code spans, so
later turns can refer to them without re-encoding.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_adapters.chat_template import CAPTION_INSTRUCTION
from llm_adapters.generation import GenerationMode, generate
from llm_adapters.processor import SeedProcessor
from seedtok.errors import ConfigError, DataError
from seedtok.types import ImageCodes


@dataclass
class ChatReply:
    """One assistant turn.

    Attributes:
        text: the reply's text, with ``<image>`` where each image was.
        codes: the well-formed images of the reply, each :class:`ImageCodes` ``(1, N)``.
        images: the same images painted (PIL), when an image decoder is available and wanted.
        ids: the raw reply ids (EOS and padding removed).
    """

    text: str
    codes: list[ImageCodes] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


class SeedChat:
    """A chat session over a chat-model directory (see ``chat_model.py`` for the layout).

    Args:
        model: the LLM (``LlamaForCausalLM`` or a ``PeftModel``), in eval mode.
        processor: its :class:`SeedProcessor`.
        system: optional system message put in front of every conversation.
    """

    def __init__(self, model: Any, processor: SeedProcessor, *, system: str | None = None):
        self.model = model.eval()
        self.processor = processor
        self.vocab = processor.vocab
        self.tokenizer = processor.tokenizer
        self.system = system
        self.history: list[dict[str, Any]] = []
        self.last_reply: ChatReply | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, merge_adapter: bool = True, quantize: str | None = None,
                        load_image_decoder: bool = True, system: str | None = None) -> SeedChat:
        """Load a chat-model directory (adapter merged for speed unless ``merge_adapter=False``)."""
        from llm_adapters.chat_model import load_chat_model

        model, processor = load_chat_model(model_dir, device=device, dtype=dtype,
                                           merge=merge_adapter and quantize is None, quantize=quantize,
                                           load_image_decoder=load_image_decoder)
        return cls(model, processor, system=system)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def can_draw(self) -> bool:
        """Whether generated codes can be painted (the SEED tokenizer has an image decoder)."""
        st = self.processor.seed_tokenizer
        return st is not None and getattr(st, "image_decoder", None) is not None

    def reset(self) -> None:
        """Forget the conversation."""
        self.history = []
        self.last_reply = None

    # ---- prompts --------------------------------------------------------------------------------

    def _head(self) -> list[dict[str, Any]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def _encode(self, conversations: list[list[dict[str, Any]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Conversations (image spans filled) → left-padded ``(B, T)`` ids and attention mask with the reply prompt."""
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        # the template writes <s> itself
        enc = self.tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _unconditional(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The CFG context: the same chat frame with an empty user message (what training drops the prompt to)."""
        ids, mask = self._encode([self._head() + [{"role": "user", "content": ""}]])
        return ids.expand(batch, -1), mask.expand(batch, -1)

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mode: GenerationMode,
                  max_new_tokens: int, do_sample: bool, temperature: float, top_k: int, top_p: float,
                  guidance_scale: float, streamer: Any = None, num_beams: int = 1) -> torch.Tensor:
        kwargs: dict[str, Any] = {"do_sample": do_sample}
        if num_beams > 1:
            kwargs["num_beams"] = num_beams
        if do_sample:
            kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        else:  # greedy: silence generation_config's sampling defaults
            kwargs.update(temperature=None, top_k=None, top_p=None)
        uncond_ids = uncond_mask = None
        if guidance_scale != 1.0:
            uncond_ids, uncond_mask = self._unconditional(input_ids.shape[0])
        return generate(self.model, self.vocab, input_ids, attention_mask, generation_mode=mode,
                        guidance_scale=guidance_scale, unconditional_ids=uncond_ids,
                        unconditional_attention_mask=uncond_mask, eos_token_id=self.tokenizer.eos_token_id,
                        pad_token_id=self.tokenizer.pad_token_id, max_new_tokens=max_new_tokens,
                        streamer=streamer, **kwargs)

    def _strip(self, ids: torch.Tensor) -> list[int]:
        """Reply ids up to (not including) the first EOS."""
        out = []
        for t in ids.tolist():
            if t == self.tokenizer.eos_token_id:
                break
            out.append(t)
        return out

    # ---- multi-turn chat ------------------------------------------------------------------------

    def _user_message(self, message: str | list[dict[str, Any]], images: Sequence[Any] | None) -> dict[str, Any]:
        if isinstance(message, str):
            content: list[dict[str, Any]] = [{"type": "text", "text": message}] if message else []
        else:
            content = list(message)
        if images:
            content = [{"type": "image", "image": im} for im in images] + content
        return {"role": "user", "content": content}

    def send(self, message: str | list[dict[str, Any]], *, images: Sequence[Any] | None = None,
             generation_mode: GenerationMode = "auto", max_new_tokens: int = 128, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, guidance_scale: float = 1.0,
             seed: int | None = None, decode_images: bool = True, streamer: Any = None) -> ChatReply:
        """One user turn → the assistant's reply (appended to :attr:`history`).

        ``images`` (PIL or paths) go in front of the text; ``message`` may also be a list of content
        items (``{"type": "text"|"image", …}``). Images in the reply are painted when
        ``decode_images`` and an image decoder is available (image ``i`` with seed ``seed + i``).
        """
        if not images and (not message or (isinstance(message, str) and not message.strip())):
            raise DataError("the message is empty (no text and no image)")
        user = self.processor.fill_image_spans([self._user_message(message, images)])[0]
        conversation = self._head() + self.history + [user]
        input_ids, attention_mask = self._encode([conversation])
        if seed is not None:
            torch.manual_seed(seed)
        reply = self._generate(input_ids, attention_mask, mode=generation_mode, max_new_tokens=max_new_tokens,
                               do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                               guidance_scale=guidance_scale, streamer=streamer)[0]
        ids = self._strip(reply)
        parts = self.vocab.split(ids)
        codes = [p for p in parts if isinstance(p, ImageCodes)]
        text_parts, items = [], []
        for p in parts:
            if isinstance(p, ImageCodes):
                text_parts.append(self.processor.image_token)
                items.append({"type": "image", "span": self.vocab.span_text(p.codes[0])})
            else:
                text = self.tokenizer.decode(p, skip_special_tokens=True)
                text_parts.append(text)
                if text:
                    items.append({"type": "text", "text": text})
        images_out = (self.processor.decode_codes(codes, seed=seed or 0)
                      if codes and decode_images and self.can_draw else [])
        self.history += [user, {"role": "assistant", "content": items}]
        self.last_reply = ChatReply(text="".join(text_parts), codes=codes, images=images_out, ids=ids)
        return self.last_reply

    def stream(self, message: str | list[dict[str, Any]], **kwargs: Any) -> Iterator[str]:
        """Like :meth:`send`, yielding the reply's text as it is generated (image spans are not text).

        The full reply (with images) is in :attr:`last_reply` once the iterator is exhausted.
        """
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.send(message, streamer=streamer, **kwargs)
            except BaseException as e:  # re-raised in the caller's thread
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]

    # ---- captioning -----------------------------------------------------------------------------

    def caption(self, images: Sequence[Any], *, instruction: str = CAPTION_INSTRUCTION, max_new_tokens: int = 64,
                batch_size: int = 16, num_beams: int = 1) -> list[str]:
        """One caption per image (PIL or path), text only, independent of :attr:`history`: greedy, or beam
        search with ``num_beams`` > 1 (BLIP-2 captions with 5 beams)."""
        if num_beams < 1:
            raise ConfigError(f"num_beams must be ≥ 1, got {num_beams}")
        out: list[str] = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start:start + batch_size])
            codes = self.processor.encode_images(chunk).codes  # (b, N)
            conversations = [self._head() + [{"role": "user", "content": [
                {"type": "image", "span": self.vocab.span_text(c)}, {"type": "text", "text": instruction}]}]
                for c in codes]
            input_ids, mask = self._encode(conversations)
            replies = self._generate(input_ids, mask, mode="text", max_new_tokens=max_new_tokens, do_sample=False,
                                     temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0, num_beams=num_beams)
            out += [self.processor.decode_text(self._strip(r)).strip() for r in replies]
        return out

    # ---- text → image ---------------------------------------------------------------------------

    def generate_codes(self, prompts: Sequence[str], *, n: int = 1, seed: int = 0, do_sample: bool = True,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, guidance_scale: float = 1.0,
                       batch_size: int = 16) -> ImageCodes:
        """``n`` images per prompt as codes ``(len(prompts) · n, N)``, prompt-major (rows ``i·n … i·n+n-1``).

        Every reply is exactly one well-formed span (``generation_mode="image"``). Sampling is seeded
        with ``seed`` once; the same seed and batch size give the same codes.
        """
        if n < 1:
            raise ConfigError(f"n must be ≥ 1, got {n}")
        if not prompts:
            raise DataError("no prompts to generate from")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise DataError(f"prompt {i} is empty: nothing to generate an image from")
        torch.manual_seed(seed)
        rows = [p for p in prompts for _ in range(n)]
        codes = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            input_ids, mask = self._encode([self._head() + [{"role": "user", "content": p}] for p in chunk])
            replies = self._generate(input_ids, mask, mode="image", max_new_tokens=self.vocab.span_length + 1,
                                     do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                     guidance_scale=guidance_scale)
            codes.append(self.vocab.ids_to_codes(replies[:, :self.vocab.span_length].cpu()).codes)
        return ImageCodes(torch.cat(codes), self.vocab.codebook_size)

    def generate_images(self, prompts: Sequence[str], *, n: int = 1, seed: int = 0, **kwargs: Any) -> list[list[Any]]:
        """``n`` PIL images per prompt (``generate_codes`` then the SEED tokenizer's image decoder)."""
        if not self.can_draw:
            raise ConfigError("this chat model cannot paint images: its seed_tokenizer/ has no image_decoder/")
        codes = self.generate_codes(prompts, n=n, seed=seed, **kwargs)
        pictures = self.processor.decode_codes(codes, seed=seed)
        return [pictures[i * n:(i + 1) * n] for i in range(len(prompts))]


def save_png(image: Any, path: str | os.PathLike) -> Path:
    """Save a PIL image as PNG (creating the directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
