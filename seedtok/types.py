"""The typed object that crosses the tokenizer's boundary: a batch of discrete image codes.

``seedtok`` produces :class:`ImageCodes` (``SeedTokenizer.encode``) and consumes them
(``decode_embedding`` / ``decode_queries``); ``llm_adapters`` turns them into LLM token ids and back.
Carrying the codebook size with the codes lets every consumer check the range once, here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seedtok.errors import DataError


@dataclass(frozen=True)
class ImageCodes:
    """A batch of causal image codes.

    Attributes:
        codes: ``(B, N)`` integer tensor, every value in ``[0, codebook_size)``; stored as ``torch.long``.
        codebook_size: number of codes ``K`` of the quantizer that produced them.
    """

    codes: torch.Tensor
    codebook_size: int

    def __post_init__(self) -> None:
        codes = self.codes
        if not isinstance(codes, torch.Tensor):
            raise DataError(f"image codes must be a tensor, got {type(codes).__name__}")
        if isinstance(self.codebook_size, bool) or not isinstance(self.codebook_size, int) or self.codebook_size < 1:
            raise DataError(f"codebook_size must be a positive integer, got {self.codebook_size!r}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise DataError(f"image codes must be integers, got dtype {codes.dtype}")
        if codes.ndim != 2:
            raise DataError(f"image codes must have shape (batch, num_tokens), got {tuple(codes.shape)}")
        if codes.numel():
            bad = (codes < 0) | (codes >= self.codebook_size)
            if bool(bad.any()):
                b, n = (int(i) for i in bad.nonzero()[0])
                raise DataError(
                    f"image code {int(codes[b, n])} at (image {b}, position {n}) is outside "
                    f"[0, {self.codebook_size})"
                )
        if codes.dtype != torch.long:
            object.__setattr__(self, "codes", codes.long())

    @property
    def batch_size(self) -> int:
        return self.codes.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[1]

    def to(self, device: torch.device | str) -> ImageCodes:
        return ImageCodes(self.codes.to(device), self.codebook_size)

    def __len__(self) -> int:
        return self.batch_size
