"""TensorBoard scalar logs for the training recipes (torch's ``SummaryWriter``; ``tensorboard`` is a
dependency of the toolkit)."""

from __future__ import annotations

import os
from typing import Any


def scalar_writer(logdir: str | os.PathLike) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` writing event files into ``logdir``."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(logdir))
