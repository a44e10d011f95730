"""Image tokens in a LLaMA vocabulary: ``<img_00000>`` … ``<img_{K-1}>``, ``<img>`` and ``</img>``.

SEED-LLaMA (arXiv:2310.01218) appends the K codes of its tokenizer right after the base
vocabulary, so an image code ``c`` is the token id ``offset + c`` (LLaMA: 32000 … 40191 for
K = 8192); the two span markers follow (``<img>`` = 40192, ``</img>`` = 40193, vocab 40194). An
image in a token stream is always the span ``<img> id_0 … id_{N-1} </img>``::

    codes (B, N) ──+offset──► (B, N) ids ──wrap──► (B, N+2)   <img> … </img>
    (B, N+2) ids ──strip markers, −offset──► ImageCodes (B, N)

:class:`ImageVocab` is the one place where that mapping lives; it is saved next to the model as
``image_vocab.json``. The tokens are added as ``AddedToken(special=True, normalized=False)``: each
is one id wherever it appears, and ``decode(skip_special_tokens=True)`` hides them (so a text
streamer shows only the text of a reply).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from seedtok.errors import CheckpointError, ConfigError, DataError
from seedtok.io import save_json
from seedtok.types import ImageCodes

BOI = "<img>"
EOI = "</img>"
IMAGE_TOKEN = "<img_{:05d}>"
VOCAB_NAME = "image_vocab.json"


@dataclass(frozen=True)
class ImageVocab:
    """Where the image tokens sit in the LLM vocabulary.

    Attributes:
        offset: id of ``<img_00000>``; code ``c`` ↔ id ``offset + c``.
        codebook_size: number of codes ``K``.
        num_tokens: codes per image ``N``.
    """

    offset: int
    codebook_size: int
    num_tokens: int

    def __post_init__(self) -> None:
        for name in ("offset", "codebook_size", "num_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "offset" else 1):
                raise ConfigError(f"ImageVocab.{name} must be a {'non-negative' if name == 'offset' else 'positive'} "
                                  f"integer, got {value!r}")

    # ---- ids ------------------------------------------------------------------------------------

    @property
    def boi_id(self) -> int:
        """Id of ``<img>``."""
        return self.offset + self.codebook_size

    @property
    def eoi_id(self) -> int:
        """Id of ``</img>``."""
        return self.offset + self.codebook_size + 1

    @property
    def code_ids(self) -> range:
        """The ids of ``<img_00000>`` … ``<img_{K-1}>``."""
        return range(self.offset, self.offset + self.codebook_size)

    @property
    def vocab_size(self) -> int:
        """Size of the whole vocabulary once the image tokens are added (``offset + K + 2``)."""
        return self.offset + self.codebook_size + 2

    @property
    def span_length(self) -> int:
        """Tokens of one image span, markers included (``N + 2``)."""
        return self.num_tokens + 2

    def tokens(self) -> list[str]:
        """Token strings in id order: the K code tokens, then ``<img>``, ``</img>``."""
        return [IMAGE_TOKEN.format(i) for i in range(self.codebook_size)] + [BOI, EOI]

    def is_image_id(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of the code ids (markers excluded), same shape as ``ids``."""
        return (ids >= self.offset) & (ids < self.offset + self.codebook_size)

    # ---- codes ↔ ids ----------------------------------------------------------------------------

    def as_codes(self, codes: ImageCodes | torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Codes ``(N,)`` or ``(B, N)`` (tensor, list or :class:`ImageCodes`) → checked ``(B, N)`` long tensor."""
        if isinstance(codes, ImageCodes):
            if codes.codebook_size != self.codebook_size:
                raise DataError(f"codes are for a codebook of {codes.codebook_size}, the LLM vocabulary has "
                                f"{self.codebook_size} image tokens")
            tensor = codes.codes
        else:
            tensor = torch.as_tensor(codes)
            if tensor.ndim == 1:
                tensor = tensor[None]
            tensor = ImageCodes(tensor, self.codebook_size).codes  # checks dtype, shape and range
        if tensor.shape[1] != self.num_tokens:
            raise DataError(f"expected {self.num_tokens} codes per image, got {tensor.shape[1]}")
        return tensor

    def codes_to_ids(self, codes: ImageCodes | torch.Tensor | Sequence[int], *, markers: bool = True) -> torch.Tensor:
        """Codes ``(B, N)`` (or one image ``(N,)``) → token ids ``(B, N + 2)`` with ``<img>``/``</img>``
        (``(B, N)`` with ``markers=False``)."""
        codes = self.as_codes(codes)
        ids = codes + self.offset
        if not markers:
            return ids
        B = ids.shape[0]
        boi = torch.full((B, 1), self.boi_id, dtype=ids.dtype, device=ids.device)
        eoi = torch.full((B, 1), self.eoi_id, dtype=ids.dtype, device=ids.device)
        return torch.cat([boi, ids, eoi], dim=1)

    def ids_to_codes(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> ImageCodes:
        """Ids ``(B, N)`` or whole spans ``(B, N + 2)`` (or one image, 1-D) → :class:`ImageCodes` ``(B, N)``.

        Raises DataError if the markers are misplaced or any id is not an image code.
        """
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise DataError(f"image ids must have shape (batch, tokens), got {tuple(ids.shape)}")
        if ids.shape[1] == self.span_length:
            if not (bool((ids[:, 0] == self.boi_id).all()) and bool((ids[:, -1] == self.eoi_id).all())):
                raise DataError(f"an image span of {self.span_length} ids must start with {BOI} and end with {EOI}")
            ids = ids[:, 1:-1]
        elif ids.shape[1] != self.num_tokens:
            raise DataError(f"expected {self.num_tokens} image ids (or {self.span_length} with markers), "
                            f"got {ids.shape[1]}")
        bad = ~self.is_image_id(ids)
        if bool(bad.any()):
            b, n = (int(i) for i in bad.nonzero()[0])
            raise DataError(f"token id {int(ids[b, n])} at (image {b}, position {n}) is not an image code id "
                            f"(expected {self.offset}…{self.offset + self.codebook_size - 1})")
        return ImageCodes(ids - self.offset, self.codebook_size)

    # ---- codes ↔ text ---------------------------------------------------------------------------

    def span_text(self, codes: ImageCodes | torch.Tensor | Sequence[int]) -> str | list[str]:
        """Codes → ``"<img><img_00042>…</img>"`` (no spaces): a string for one image given as ``(N,)``,
        a list of strings for ``(B, N)``."""
        single = not isinstance(codes, ImageCodes) and torch.as_tensor(codes).ndim == 1
        rows = self.as_codes(codes).tolist()
        texts = [BOI + "".join(IMAGE_TOKEN.format(c) for c in row) + EOI for row in rows]
        return texts[0] if single else texts

    # ---- spans in a token stream ----------------------------------------------------------------

    def split(self, ids: torch.Tensor | Sequence[int]) -> list[list[int] | ImageCodes]:
        """Split a 1-D id sequence into text runs (lists of ids) and well-formed images (:class:`ImageCodes` (1, N)).

        A span that is not exactly ``<img>`` + N code ids + ``</img>`` (e.g. cut off by ``max_new_tokens``)
        is dropped, as are stray code ids and markers: none of them is text.
        """
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        out: list[list[int] | ImageCodes] = []
        text: list[int] = []
        i, n = 0, len(ids)
        lo, hi = self.offset, self.offset + self.codebook_size
        while i < n:
            t = ids[i]
            if t == self.boi_id:
                span = ids[i + 1:i + 1 + self.num_tokens]
                j = i + 1 + self.num_tokens
                if (len(span) == self.num_tokens and all(lo <= s < hi for s in span)
                        and j < n and ids[j] == self.eoi_id):
                    if text:
                        out.append(text)
                        text = []
                    out.append(ImageCodes(torch.tensor([span]) - self.offset, self.codebook_size))
                    i = j + 1
                    continue
                # malformed span: skip the marker and any code ids that follow it
                i += 1
                while i < n and (lo <= ids[i] < hi or ids[i] == self.eoi_id):
                    i += 1
                continue
            if lo <= t < hi or t == self.eoi_id:
                i += 1
                continue
            text.append(t)
            i += 1
        if text:
            out.append(text)
        return out

    def find_spans(self, ids: torch.Tensor | Sequence[int]) -> list[tuple[int, int]]:
        """``(start, end)`` of each well-formed span in a 1-D id sequence (``ids[start] == <img>``, ``end`` exclusive)."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        spans, L = [], self.span_length
        for i, t in enumerate(ids):
            if t == self.boi_id and i + L <= len(ids) and ids[i + L - 1] == self.eoi_id and all(
                    self.offset <= s < self.offset + self.codebook_size for s in ids[i + 1:i + L - 1]):
                spans.append((i, i + L))
        return spans

    # ---- tokenizer checks -----------------------------------------------------------------------

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise CheckpointError unless ``tokenizer`` maps every image token to the id this vocab expects."""
        probe = {BOI: self.boi_id, EOI: self.eoi_id, IMAGE_TOKEN.format(0): self.offset,
                 IMAGE_TOKEN.format(self.codebook_size - 1): self.offset + self.codebook_size - 1}
        for token, expected in probe.items():
            got = tokenizer.convert_tokens_to_ids(token)
            if got != expected:
                raise CheckpointError(f"the tokenizer maps {token} to id {got}, image_vocab.json expects {expected}")
        if len(tokenizer) < self.vocab_size:
            raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens, image_vocab.json needs {self.vocab_size}")

    # ---- persistence ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "boi": BOI, "eoi": EOI, "code_format": IMAGE_TOKEN}

    def save_pretrained(self, save_dir: str | os.PathLike) -> Path:
        """Write ``save_dir/image_vocab.json``."""
        return save_json(self.to_dict(), Path(save_dir) / VOCAB_NAME)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> ImageVocab:
        path = Path(model_dir) / VOCAB_NAME
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: no {VOCAB_NAME} (not a chat-model directory?)")
        try:
            data = json.loads(path.read_text())
        except ValueError:
            raise CheckpointError(f"{path}: not valid JSON") from None
        fixed = {"boi": BOI, "eoi": EOI, "code_format": IMAGE_TOKEN}
        for key, value in fixed.items():
            if data.pop(key, value) != value:
                raise CheckpointError(f"{path}: {key} must be {value!r}")
        names = ("offset", "codebook_size", "num_tokens")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise CheckpointError(f"{path}: unknown key {unknown[0]!r}")
        missing = [k for k in names if k not in data]
        if missing:
            raise CheckpointError(f"{path}: missing key {missing[0]!r}")
        try:
            return cls(**data)
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from None


def add_image_tokens(tokenizer: Any, codebook_size: int, num_tokens: int) -> ImageVocab:
    """Append ``<img_00000>`` … ``<img_{K-1}>``, ``<img>``, ``</img>`` to ``tokenizer`` as contiguous ids.

    The codes start at ``len(tokenizer)`` (the base vocabulary plus any tokens already added).
    Raises ConfigError if the tokenizer already has image tokens.
    """
    from transformers import AddedToken

    vocab = ImageVocab(offset=len(tokenizer), codebook_size=codebook_size, num_tokens=num_tokens)
    existing = tokenizer.get_vocab()
    for token in (BOI, EOI, IMAGE_TOKEN.format(0)):
        if token in existing:
            raise ConfigError(f"the tokenizer already has {token} (id {existing[token]}): load its image_vocab.json "
                              "instead of adding the image tokens again")
    tokens = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in vocab.tokens()]
    added = tokenizer.add_tokens(tokens, special_tokens=True)
    if added != len(tokens):
        raise ConfigError(f"the tokenizer added {added} of {len(tokens)} image tokens")
    vocab.check_tokenizer(tokenizer)
    return vocab


@torch.no_grad()
def init_image_embeddings(model: Any, vocab: ImageVocab, *, method: str = "mean",
                          codebook: torch.Tensor | None = None, seed: int = 0) -> None:
    """Resize ``model``'s embeddings to ``vocab.vocab_size`` and initialise the image rows.

    ``method="mean"``: every new row (input and output embeddings) is the mean of the existing rows
    (so the new tokens start with the average logit and do not disturb the LM).
    ``method="codebook"``: the code rows are the mean row plus a fixed orthogonal projection of the
    centred codebook vectors ``(K, D)``, scaled to the existing rows' per-dimension spread, so codes
    that are close in the quantizer start close in the LLM; the two markers get the mean row.
    """
    if method not in ("mean", "codebook"):
        raise ConfigError(f"unknown embedding init {method!r} (expected 'mean' or 'codebook')")
    old = model.get_input_embeddings().weight.shape[0]
    if old > vocab.offset:
        raise ConfigError(f"the model already has {old} embedding rows; image tokens start at {vocab.offset}")
    # transformers' mean_resizing samples from N(mean, cov) of the old rows; we want the exact
    # mean (deterministic, and the same for input and output rows), so we overwrite the rows.
    model.resize_token_embeddings(vocab.vocab_size, mean_resizing=False)
    tables = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not tables[0]:
        tables.append(out.weight)
    for weight in tables:
        base = weight[:old].float()
        mean = base.mean(0)
        weight[old:] = mean.to(weight.dtype)
        if method == "codebook":
            if codebook is None or codebook.ndim != 2 or codebook.shape[0] != vocab.codebook_size:
                raise ConfigError(f"method='codebook' needs a ({vocab.codebook_size}, D) codebook tensor")
            H = weight.shape[1]
            cb = codebook.float().to(weight.device)
            cb = cb - cb.mean(0)
            D = cb.shape[1]
            gen = torch.Generator().manual_seed(seed)
            # (D, H) with orthonormal rows (or columns when D > H): preserves the codes' geometry
            q, _ = torch.linalg.qr(torch.randn(max(D, H), min(D, H), generator=gen))
            proj = (q if D >= H else q.T).to(weight.device)  # (D, H)
            rows = cb @ proj  # (K, H)
            rows = rows / rows.std(0).clamp_min(1e-8) * base.std(0)
            lo = vocab.offset
            weight[lo:lo + vocab.codebook_size] = (mean + rows).to(weight.dtype)
