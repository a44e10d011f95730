"""A deterministic, resumable stream of packed rows over a sample source.

Epoch ``e`` visits the source in the order of a permutation seeded by ``(seed, e)``; item ``i``'s
random choices (text variant, direction) come from a generator seeded by ``(seed, e, i)``. Items
are taken ``window`` at a time, built into samples and packed by first-fit decreasing
(:func:`~data_pipelines.packing.pack`); the rows of a window are shuffled by ``(seed, e, w)``.
So the row sequence is a pure function of the seed, and the stream's position is three integers
``(epoch, window, row)`` — what a checkpoint stores as the data position. Restoring it rebuilds
only the current window.

Every process of a data-parallel run reads the same stream and keeps its own share of each
step's rows (:meth:`PackedStream.next_batch`), so the global batch does not depend on how many
processes share it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipelines.packing import PackedBatch, TokenizedSample, collate_packed, pack
from data_pipelines.sequences import SampleSource
from seedtok.errors import DataError


class PackedStream:
    """Rows of ``seq_len`` tokens packed from ``source`` (see the module docstring)."""

    def __init__(self, source: SampleSource, seq_len: int, pad_id: int, *, seed: int = 0, window: int = 512):
        if len(source) == 0:
            raise DataError("the training source is empty")
        self.source, self.seq_len, self.pad_id = source, seq_len, pad_id
        self.seed, self.window = seed, window
        self.epoch = self.win = self.row = 0
        self._rows: list[list[TokenizedSample]] | None = None
        self._rows_key: tuple[int, int] | None = None
        self.windows_per_epoch = -(-len(source) // window)

    # ---- position -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "window": self.win, "row": self.row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.win, self.row = int(state["epoch"]), int(state["window"]), int(state["row"])

    # ---- rows -----------------------------------------------------------------------------------
    def _window_rows(self) -> list[list[TokenizedSample]]:
        key = (self.epoch, self.win)
        if self._rows_key != key:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.source))
            idx = order[self.win * self.window:(self.win + 1) * self.window]
            samples = []
            for i in idx:
                s = self.source.sample(int(i), np.random.default_rng([self.seed, self.epoch, int(i)]))
                if s is not None:
                    samples.append(s)
            rows = pack(samples, self.seq_len) if samples else []
            perm = np.random.default_rng([self.seed, self.epoch, self.win, 1]).permutation(len(rows))
            self._rows, self._rows_key = [rows[j] for j in perm], key
        return self._rows

    def next_row(self) -> list[TokenizedSample]:
        for _ in range(self.windows_per_epoch + 1):  # at most one pass of empty windows
            rows = self._window_rows()
            if self.row < len(rows):
                row = rows[self.row]
                self.row += 1
                return row
            self.row, self.win = 0, self.win + 1
            if self.win >= self.windows_per_epoch:
                self.win, self.epoch = 0, self.epoch + 1
        raise DataError("the training source yields no samples (all skipped: too long for seq_len?)")

    def next_batch(self, rows: int, rank: int = 0, world_size: int = 1) -> PackedBatch:
        """The next ``rows × world_size`` rows of the stream; this process's ``rows`` of them."""
        take = [self.next_row() for _ in range(rows * world_size)]
        return collate_packed(take[rank * rows:(rank + 1) * rows], self.seq_len, self.pad_id)


__all__ = ["PackedStream"]
