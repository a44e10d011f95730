"""Fixtures of the seedtok tests (tiny models built in temporary directories)."""

from __future__ import annotations

from pathlib import Path

import pytest
from seedtok_tiny import build_vision_dir


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny full CLIP directory (vision + text towers, projection 24)."""
    return build_vision_dir("clip", tmp_path_factory.mktemp("clip"))[0]
