"""SeedProcessor: text + images → LLM token ids, and generated ids → text + images.

The processor pairs the LLM's tokenizer with the SEED tokenizer, as a transformers processor pairs
a tokenizer with an image processor::

    images ──SeedTokenizer.encode──► ImageCodes (M, N) ──ImageVocab.span_text──► "<img><img_00042>…</img>"
    text with "<image>" placeholders ──each placeholder → the next span──► tokenizer ──► input_ids (B, T)
    generated ids (T,) ──ImageVocab.split──► text runs + ImageCodes ──► str / codes / PIL images

Chat messages go through :meth:`SeedProcessor.apply_chat_template`: every ``{"type": "image"}``
item gets its span (from its own ``image``/``path``/``codes`` key, or the next of ``images=`` /
``codes=``) and the tokenizer's saved chat template does the rest (see ``chat_template.py``).
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llm_adapters.chat_template import IMAGE_PLACEHOLDER
from llm_adapters.image_vocab import ImageVocab
from seedtok.errors import CheckpointError, ConfigError, DataError
from seedtok.types import ImageCodes

SEED_TOKENIZER_DIR = "seed_tokenizer"


#: Images with more pixels than this are refused (64 megapixels, an 8000 × 8000 photo).
MAX_IMAGE_PIXELS = 64_000_000


def _open_image(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise DataError(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                # Checked on the header, before any pixel is decoded (the same limit as the data
                # pipelines' decoder; that module sits downstream of this package).
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise DataError(f"{path}: {im.width}×{im.height} pixels is over the {MAX_IMAGE_PIXELS:,}-pixel "
                                    "limit (a decompression bomb?)")
                return im.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise DataError(f"{path}: not a readable image") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    raise DataError(f"expected a PIL image or a path, got {type(image).__name__}")


class SeedProcessor:
    """The LLM tokenizer + the image vocabulary + (optionally) the SEED tokenizer.

    Args:
        tokenizer: a transformers tokenizer that already has the image tokens (``add_image_tokens``)
            and the chat template (``set_chat_template``).
        vocab: where the image tokens sit.
        seed_tokenizer: encodes images (needs its vision tower) and decodes codes to images (needs an
            ``image_decoder``); ``None`` if only pre-computed codes are used.
        seed_tokenizer_dir: the directory ``seed_tokenizer`` was loaded from (copied verbatim on save).
    """

    image_token = IMAGE_PLACEHOLDER

    def __init__(self, tokenizer: Any, vocab: ImageVocab, seed_tokenizer: Any = None,
                 seed_tokenizer_dir: str | os.PathLike | None = None):
        vocab.check_tokenizer(tokenizer)
        if seed_tokenizer is not None and (seed_tokenizer.codebook_size, seed_tokenizer.num_tokens) != (
                vocab.codebook_size, vocab.num_tokens):
            raise ConfigError(f"the SEED tokenizer makes {seed_tokenizer.num_tokens} codes of {seed_tokenizer.codebook_size}"
                              f" per image, the LLM vocabulary expects {vocab.num_tokens} of {vocab.codebook_size}")
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.seed_tokenizer = seed_tokenizer
        self.seed_tokenizer_dir = Path(seed_tokenizer_dir) if seed_tokenizer_dir is not None else None

    # ---- images → codes -------------------------------------------------------------------------

    def encode_images(self, images: Sequence[Any]) -> ImageCodes:
        """PIL images or paths → :class:`ImageCodes` ``(M, N)`` with the SEED tokenizer."""
        if self.seed_tokenizer is None:
            raise ConfigError("this processor has no SEED tokenizer: pass pre-computed codes instead of images")
        if getattr(self.seed_tokenizer, "vision_tower", None) is None:
            raise ConfigError("the SEED tokenizer was loaded without its vision tower, so it cannot encode images")
        return self.seed_tokenizer.encode([_open_image(im) for im in images])

    def _code_rows(self, images: Sequence[Any] | None, codes: Any) -> list[torch.Tensor]:
        """``images`` and/or ``codes`` → a list of ``(N,)`` code tensors, images first."""
        rows: list[torch.Tensor] = []
        if images is not None:
            images = list(images) if isinstance(images, list | tuple) else [images]
            if images:
                rows.extend(self.encode_images(images).codes)
        if codes is not None:
            rows.extend(self._as_codes(codes))
        return rows

    def _as_codes(self, codes: Any) -> torch.Tensor:
        """ImageCodes, a ``(N,)``/``(M, N)`` tensor or list, or a list of those → checked ``(M, N)`` long codes."""
        if isinstance(codes, list | tuple) and codes and isinstance(codes[0], ImageCodes | torch.Tensor | list | tuple):
            return torch.cat([self.vocab.as_codes(c) for c in codes])
        return self.vocab.as_codes(codes)  # checks the codebook size, range and N

    def span_text(self, codes: torch.Tensor | Sequence[int]) -> str:
        """One image's codes ``(N,)`` → ``"<img><img_…>…</img>"``."""
        return self.vocab.span_text(torch.as_tensor(codes).reshape(-1))

    # ---- text + images → ids --------------------------------------------------------------------

    def expand_images(self, text: str | Sequence[str], images: Sequence[Any] | None = None, *,
                      codes: Any = None) -> str | list[str]:
        """Replace each ``<image>`` placeholder, in order, by the span of the next image (or row of ``codes``)."""
        texts = [text] if isinstance(text, str) else list(text)
        rows = self._code_rows(images, codes)
        wanted = sum(t.count(self.image_token) for t in texts)
        if wanted != len(rows):
            raise DataError(f"the text has {wanted} {self.image_token} placeholder(s) but {len(rows)} image(s) were given")
        it = iter(rows)
        out = []
        for t in texts:
            parts = t.split(self.image_token)
            out.append(parts[0] + "".join(self.span_text(next(it)) + p for p in parts[1:]))
        return out[0] if isinstance(text, str) else out

    def __call__(self, text: str | Sequence[str] | None = None, images: Sequence[Any] | None = None, *,
                 codes: Any = None, return_tensors: str | None = "pt", padding: bool | str = True,
                 add_special_tokens: bool = True, **tokenizer_kwargs: Any) -> Any:
        """Tokenize text with images: ``<image>`` placeholders become code spans.

        Without ``text``, each image becomes a sequence of its own span. Returns the tokenizer's
        ``BatchEncoding`` (``input_ids``, ``attention_mask``; ``(B, T)`` tensors with ``return_tensors="pt"``).
        """
        if text is None:
            rows = self._code_rows(images, codes)
            if not rows:
                raise DataError("nothing to process: give text, images or codes")
            text = [self.span_text(r) for r in rows]
        elif images is not None or codes is not None or any(
                self.image_token in t for t in ([text] if isinstance(text, str) else text)):
            text = self.expand_images(text, images, codes=codes)
        return self.tokenizer(text, return_tensors=return_tensors, padding=padding,
                              add_special_tokens=add_special_tokens, **tokenizer_kwargs)

    def fill_image_spans(self, messages: list[dict[str, Any]], images: Sequence[Any] | None = None, *,
                         codes: Any = None) -> list[dict[str, Any]]:
        """A copy of ``messages`` where every image item has its ``span`` text.

        An item's own ``codes`` (``(N,)``), ``image`` (PIL or path), ``path`` or ``url`` (local path)
        is used; otherwise it takes the next of ``images`` then ``codes``.
        """
        messages = copy.deepcopy(list(messages))
        items = [item for m in messages if isinstance(m.get("content"), list)
                 for item in m["content"] if isinstance(item, dict) and item.get("type") == "image"]
        pending = [it for it in items if not it.get("span") and not any(k in it for k in ("codes", "image", "path", "url"))]
        own_images = [it for it in items if not it.get("span") and "codes" not in it
                      and any(k in it for k in ("image", "path", "url"))]
        if own_images:
            encoded = self._code_rows([it.get("image", it.get("path", it.get("url"))) for it in own_images], None)
            for it, row in zip(own_images, encoded):
                it["span"] = self.span_text(row)
        for it in items:
            if not it.get("span") and "codes" in it:
                it["span"] = self.span_text(self._as_codes(it["codes"])[0])
        rows = self._code_rows(images, codes) if (images is not None or codes is not None) else []
        if len(rows) != len(pending):
            raise DataError(f"the messages have {len(pending)} image item(s) without an image, "
                            f"but {len(rows)} image(s) were given")
        for it, row in zip(pending, rows):
            it["span"] = self.span_text(row)
        for it in items:  # the raw image objects are not template material
            for key in ("image", "path", "url", "codes"):
                it.pop(key, None)
        return messages

    def apply_chat_template(self, conversation: list[dict[str, Any]] | list[list[dict[str, Any]]], *,
                            images: Sequence[Any] | None = None, codes: Any = None, tokenize: bool = False,
                            return_dict: bool = False, **kwargs: Any) -> Any:
        """Render a conversation (or a batch of them) with the tokenizer's chat template.

        Image items get their spans first (:meth:`fill_image_spans`). As with a transformers
        processor, the default is the rendered string (``tokenize=False``); ``tokenize=True,
        return_dict=True, return_assistant_tokens_mask=True`` gives ``input_ids`` and
        ``assistant_masks``. Every other keyword (``add_generation_prompt``, ``return_tensors``, …)
        goes to ``tokenizer.apply_chat_template``.
        """
        if conversation and isinstance(conversation[0], list | tuple):
            if images is not None or codes is not None:
                raise ConfigError("with a batch of conversations, put the images in the image items")
            filled: Any = [self.fill_image_spans(c) for c in conversation]
        else:
            filled = self.fill_image_spans(conversation, images, codes=codes)
        return self.tokenizer.apply_chat_template(filled, tokenize=tokenize, return_dict=return_dict, **kwargs)

    # ---- ids → text + images --------------------------------------------------------------------

    def decode(self, ids: torch.Tensor | Sequence[int], *, decode_images: bool = False, seed: int = 0,
               skip_special_tokens: bool = True) -> list[str | ImageCodes | Any]:
        """Split one id sequence into text segments (``str``) and images, in order.

        Images are :class:`ImageCodes` ``(1, N)``, or PIL images with ``decode_images=True`` (image
        ``i`` painted with seed ``seed + i``). Malformed spans are dropped (see ``ImageVocab.split``).
        """
        parts = self.vocab.split(ids)
        codes = [p for p in parts if isinstance(p, ImageCodes)]
        pictures = iter(self.decode_codes(codes, seed=seed) if decode_images and codes else codes)
        out: list[Any] = []
        for p in parts:
            if isinstance(p, ImageCodes):
                out.append(next(pictures))
            else:
                text = self.tokenizer.decode(p, skip_special_tokens=skip_special_tokens)
                if text:
                    out.append(text)
        return out

    def batch_decode(self, ids: torch.Tensor | Sequence[Sequence[int]], **kwargs: Any) -> list[list[Any]]:
        return [self.decode(row, **kwargs) for row in ids]

    def decode_text(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The text of an id sequence with every image span left out (e.g. a caption)."""
        return "".join(p for p in self.decode(ids) if isinstance(p, str))

    def decode_codes(self, codes: Sequence[ImageCodes] | ImageCodes, *, seed: int = 0, **kwargs: Any) -> list[Any]:
        """Codes → PIL images with the SEED tokenizer's image decoder (image ``i`` uses seed ``seed + i``)."""
        if self.seed_tokenizer is None or getattr(self.seed_tokenizer, "image_decoder", None) is None:
            raise ConfigError("no image decoder: the chat model needs seed_tokenizer/ with image_decoder/ to paint images")
        if not isinstance(codes, ImageCodes):
            codes = ImageCodes(torch.cat([c.codes for c in codes]), self.vocab.codebook_size)
        return self.seed_tokenizer.decode_image(codes, seed=seed, **kwargs)

    # ---- save / load ----------------------------------------------------------------------------

    def save_pretrained(self, save_dir: str | os.PathLike, *, seed_tokenizer: bool = True) -> Path:
        """Tokenizer files (with the chat template), ``image_vocab.json`` and ``seed_tokenizer/``."""
        save_dir = Path(save_dir)
        self.tokenizer.save_pretrained(save_dir)
        self.vocab.save_pretrained(save_dir)
        if seed_tokenizer:
            target = save_dir / SEED_TOKENIZER_DIR
            if self.seed_tokenizer_dir is not None and self.seed_tokenizer_dir.is_dir():
                if target.resolve() != self.seed_tokenizer_dir.resolve():
                    shutil.copytree(self.seed_tokenizer_dir, target, dirs_exist_ok=True)
            elif self.seed_tokenizer is not None:
                self.seed_tokenizer.save_pretrained(target)
        return save_dir

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *, load_seed_tokenizer: bool = True,
                        load_vision: bool = True, load_image_decoder: bool = True,
                        seed_tokenizer_dir: str | os.PathLike | None = None,
                        device: str | torch.device = "cpu") -> SeedProcessor:
        """Load the tokenizer and ``image_vocab.json`` of a chat-model directory, and its ``seed_tokenizer/``
        (or ``seed_tokenizer_dir``) if present and wanted."""
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise CheckpointError(f"chat-model directory not found: {model_dir}")
        vocab = ImageVocab.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        source = Path(seed_tokenizer_dir) if seed_tokenizer_dir is not None else model_dir / SEED_TOKENIZER_DIR
        seed_tok = None
        if load_seed_tokenizer and source.is_dir():
            from seedtok.tokenizer import SeedTokenizer

            seed_tok = SeedTokenizer.from_pretrained(source, load_vision=load_vision, device=device,
                                                     load_image_decoder=load_image_decoder)
        elif seed_tokenizer_dir is not None:
            raise CheckpointError(f"SEED tokenizer directory not found: {source}")
        return cls(tokenizer, vocab, seed_tok, seed_tokenizer_dir=source if source.is_dir() else None)
