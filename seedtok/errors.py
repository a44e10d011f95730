"""Errors the toolkit raises for bad input.

Every error a user can cause (a missing file, a malformed config, an image that cannot be
decoded, a checkpoint that does not match its config) is a :class:`SeedError` with a one-line
message naming the problem. The ``seed`` CLI prints it as ``error: <message>`` and exits with
status 2 instead of showing a traceback from deep inside a library.
"""

from __future__ import annotations


class SeedError(Exception):
    """Base class of all user-facing errors: the message is one line and names the problem."""

    exit_code: int = 2


class ConfigError(SeedError, ValueError):
    """A config file, dict or command-line value does not fit the schema."""


class DataError(SeedError, ValueError):
    """Input data (an image, a caption, a shard, a JSONL row) is unusable."""


class CheckpointError(SeedError, ValueError):
    """A saved model or checkpoint is missing, incomplete or does not match its config."""
