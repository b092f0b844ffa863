"""Seeds addressed by a global micro-batch index.

Micro-batch i (its rows and its path noise) is a pure function of (seed, i), so a resumed run
needs only its step count, and the global batch of a step is the same whether it is computed by
one process with gradient accumulation or by N processes (each rank takes disjoint indices).
"""

from __future__ import annotations

import numpy as np


def index_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for micro-batch `index` of a run seeded `seed`."""
    high, low = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return (int(high) << 31) ^ int(low)
