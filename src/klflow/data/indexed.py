"""Training windows addressed by a global micro-batch index.

Micro-batch i is a pure function of (seed, i), so a resumed run needs only its step count, and
the global batch of a step is the same whether it is computed by one process with gradient
accumulation or by N processes (each rank takes a disjoint set of indices).
"""

from __future__ import annotations

import numpy as np
import torch

from klflow.data.batches import Batch
from klflow.errors import KLFlowError


def index_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for micro-batch `index` of a run seeded `seed`."""
    high, low = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return (int(high) << 31) ^ int(low)


class IndexedWindows:
    """Uniformly random `seq_len` windows of a token array; batch(i, size) depends only on (seed, i)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0) -> None:
        if len(tokens) <= seq_len:
            raise KLFlowError(f"the training split has only {len(tokens)} tokens; need more than seq_len={seq_len}")
        self._tokens = tokens
        self._offsets = np.arange(seq_len)
        self._seed = seed

    def batch(self, index: int, size: int) -> Batch:
        rng = np.random.default_rng([self._seed, index])
        starts = rng.integers(0, len(self._tokens) - len(self._offsets) + 1, size=size)
        windows = self._tokens[starts[:, None] + self._offsets]
        return Batch(torch.from_numpy(windows.astype(np.int64)), None)
