"""ImageCodes: the (B, N) codes + codebook size boundary object validates once, loudly."""

from __future__ import annotations

import pytest
import torch

from seedtok.errors import DataError
from seedtok.types import ImageCodes


def test_valid_codes_keep_values_and_become_long():
    codes = ImageCodes(torch.tensor([[0, 5, 7], [1, 2, 3]], dtype=torch.int32), codebook_size=8)
    assert codes.codes.dtype == torch.long
    assert codes.codes.tolist() == [[0, 5, 7], [1, 2, 3]]
    assert (codes.batch_size, codes.num_tokens, len(codes)) == (2, 3, 2)


def test_out_of_range_code_names_value_and_position():
    with pytest.raises(DataError, match=r"image code 8 at \(image 1, position 2\) is outside \[0, 8\)"):
        ImageCodes(torch.tensor([[0, 1, 2], [3, 4, 8]]), codebook_size=8)
    with pytest.raises(DataError, match="image code -1"):
        ImageCodes(torch.tensor([[-1, 0]]), codebook_size=8)


@pytest.mark.parametrize(
    "codes, size, needle",
    [
        (torch.zeros(2, 3), 8, "integers"),
        (torch.zeros(6, dtype=torch.long), 8, "shape"),
        ([[0, 1]], 8, "tensor"),
        (torch.zeros(1, 2, dtype=torch.long), 0, "codebook_size"),
    ],
)
def test_malformed_codes_are_rejected(codes, size, needle):
    with pytest.raises(DataError, match=needle):
        ImageCodes(codes, codebook_size=size)
