"""Prompted generation against references: sentence BLEU and ROUGE-L F1, Top-k and Avg.

Each prompt has one reference and k generated candidates. Per candidate: sentence-level BLEU
(sacrebleu defaults: 13a tokenization, exponential smoothing; 0-100) and ROUGE-L F-measure
(rouge-score, no stemming; 0-1). Then per prompt, as in the KL-Flow paper:

- Top-k = max over its k candidates (what an oracle picking the best of k would score);
- Avg   = mean over its k candidates;

and both are averaged over prompts. Top-k >= Avg always.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from klflow.errors import KLFlowError
from klflow.evaluation.evaluator import INSTALL_HINT


def sentence_bleu(candidate: str, reference: str) -> float:
    """sacrebleu sentence BLEU of one candidate against one reference, 0-100."""
    try:
        import sacrebleu
    except ImportError:
        raise KLFlowError(f"BLEU needs the sacrebleu package: {INSTALL_HINT}") from None
    return float(sacrebleu.sentence_bleu(candidate, [reference]).score)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), 0-1."""
    return float(_rouge_scorer().score(reference, candidate)["rougeL"].fmeasure)


def conditional_scores(references: Sequence[str], candidates: Sequence[Sequence[str]]) -> dict:
    """BLEU and ROUGE-L, Top-k and Avg, for `candidates[i]` (k texts) generated for prompt i."""
    if len(references) != len(candidates) or not references:
        raise KLFlowError(f"need one candidate list per reference; got {len(references)} references "
                          f"and {len(candidates)} candidate lists")
    sizes = {len(group) for group in candidates}
    if len(sizes) != 1 or 0 in sizes:
        raise KLFlowError(f"every prompt needs the same number k >= 1 of candidates; got sizes {sorted(sizes)}")
    result: dict = {"n_prompts": len(references), "k": sizes.pop()}
    for name, metric in (("bleu", sentence_bleu), ("rouge_l", rouge_l)):
        table = np.array([[metric(c, ref) for c in group] for ref, group in zip(references, candidates, strict=True)])
        result[name] = {"top_k": float(table.max(axis=1).mean()), "avg": float(table.mean(axis=1).mean())}
    return result


@functools.cache
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise KLFlowError(f"ROUGE needs the rouge-score package: {INSTALL_HINT}") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
