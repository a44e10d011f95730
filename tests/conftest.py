"""Test-wide settings: offline, deterministic, CPU."""

from __future__ import annotations

import os

# Nothing may reach a hub at test time: every checkpoint the tests use is built by the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
