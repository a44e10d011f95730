"""Fixtures of the seedtok tests (tiny models built in temporary directories)."""

from __future__ import annotations

from pathlib import Path

import pytest
from seedtok_tiny import build_vision_dir


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny full CLIP directory (vision + text towers, projection 24)."""
    return build_vision_dir("clip", tmp_path_factory.mktemp("clip"))[0]


@pytest.fixture(autouse=True)
def _one_thread():
    """Run each seedtok test on one intra-op thread.

    The models here are tiny: splitting each small op over two OpenMP threads gains nothing, and
    on a shared 2-core machine a descheduled partner thread turns every op's barrier into a wait
    (one test measured 43 s instead of 1 s). Restored afterwards for other packages' tests.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
