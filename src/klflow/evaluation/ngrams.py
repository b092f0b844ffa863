"""Word n-gram diversity: distinct-n across a set of texts, repetition-n within each text.

Words are whitespace-separated tokens, so the numbers do not depend on any tokenizer.

- distinct-n = |unique n-grams in all texts| / |n-grams in all texts| (Li et al. 2016).
- rep-n = mean over texts of 1 - |unique n-grams in the text| / |n-grams in the text|, the
  fraction of a text's n-grams that repeat an earlier one (seq-rep-n, Welleck et al. 2020).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DISTINCT_NS = (1, 2, 3)
# Unigram repeats are normal in fluent text (function words); degeneration shows in longer n-grams.
REPETITION_NS = (2, 3, 4)


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The n-grams of whitespace words of `text`, in order."""
    words = text.split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique over total word n-grams of the whole set (None when no text has n words)."""
    grams = [gram for text in texts for gram in word_ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else None


def repetition_n(texts: Sequence[str], n: int) -> float | None:
    """Mean over texts with at least n words of the fraction of their n-grams that are repeats
    (None when no text has n words: a one-"word" text of 32 dots is not thereby repetition-free)."""
    values = []
    for text in texts:
        grams = word_ngrams(text, n)
        if grams:
            values.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(values)) if values else None
