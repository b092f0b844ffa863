"""Unigram entropy of a text's tokens, the standard guard against collapsed, repetitive samples.

H(x) = -sum_v p_v log p_v with p_v = count(v in x) / |x|, in nats, computed per text on its
evaluator token ids (unpadded: padding would add a fake frequent token) and averaged over texts.
Real English text of ~100 tokens scores around 4; "the the the ..." scores 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy in nats of the token frequencies of one sequence (0 for an empty one)."""
    if not ids:
        return 0.0
    counts = np.array(list(Counter(ids).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mean_unigram_entropy(sequences: Sequence[Sequence[int]]) -> float:
    """Mean over the non-empty sequences of their unigram entropy, nats."""
    values = [unigram_entropy(ids) for ids in sequences if len(ids) > 0]
    return float(np.mean(values)) if values else 0.0
