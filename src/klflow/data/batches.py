"""Training and validation batches cut from a token shard."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from klflow.errors import KLFlowError


class Batch(NamedTuple):
    ids: torch.Tensor  # long [B, L]
    cond_mask: torch.Tensor | None  # bool [B, L], True = given (clamped) position


class RandomWindows:
    """Endless, reproducible stream of batches of uniformly random `seq_len` windows."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0) -> None:
        if seq_len < 1 or batch_size < 1:
            raise KLFlowError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if len(tokens) <= seq_len:
            raise KLFlowError(f"token array has only {len(tokens)} tokens; need more than seq_len={seq_len}")
        self._tokens = tokens
        self._offsets = np.arange(seq_len)
        self._batch_size = batch_size
        self._rng = np.random.default_rng(seed)

    def __iter__(self) -> RandomWindows:
        return self

    def __next__(self) -> Batch:
        n_starts = len(self._tokens) - len(self._offsets) + 1
        starts = self._rng.integers(0, n_starts, size=self._batch_size)
        windows = self._tokens[starts[:, None] + self._offsets]
        return Batch(torch.from_numpy(windows.astype(np.int64)), None)

    def state_dict(self) -> dict:
        """The generator state (JSON-serializable), so a resumed run draws the same windows."""
        return self._rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        try:
            self._rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError):
            raise KLFlowError("saved data-stream state does not fit this data loader") from None


def validation_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> torch.Tensor:
    """Up to `max_windows` non-overlapping windows spread evenly over `tokens`, as long [N, seq_len]."""
    if seq_len < 1 or max_windows < 1:
        raise KLFlowError(f"seq_len and max_windows must be positive, got {seq_len} and {max_windows}")
    n_slots = len(tokens) // seq_len
    if n_slots == 0:
        raise KLFlowError(f"token array has only {len(tokens)} tokens; need at least seq_len={seq_len}")
    n = min(max_windows, n_slots)
    # Slots are at least one apart after rounding because n <= n_slots, so windows never overlap.
    slots = np.rint(np.linspace(0, n_slots - 1, n)).astype(np.int64)
    windows = tokens[(slots * seq_len)[:, None] + np.arange(seq_len)]
    return torch.from_numpy(windows.astype(np.int64))
