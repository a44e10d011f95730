"""Test-wide settings: offline, deterministic, CPU."""

from __future__ import annotations

import os

# Nothing may reach a hub at test time: every checkpoint the tests use is built by the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Every model in the tests is tiny: splitting its small ops over two OpenMP threads gains
# nothing, and on a shared 2-core machine a descheduled partner thread turns every op's barrier
# into a wait (one test measured 43 s instead of 1 s). Subprocesses inherit OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)
