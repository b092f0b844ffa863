"""Prompted generation against references: sentence BLEU and ROUGE-L F1, Top-k and Avg.

Each prompt has one reference and k generated candidates. Per candidate: BLEU as the KL-Flow
paper's evaluation computes it (Hugging Face evaluate's "bleu": 13a tokenization, n-grams up to 4,
no smoothing, so a candidate without a matching 4-gram scores 0; see unsmoothed_bleu), sacrebleu's
smoothed sentence BLEU beside it ("bleu_smoothed": exponential smoothing, effective order), both
0-100, and ROUGE-L F-measure (rouge-score, no stemming; 0-1). Then per prompt, as in the paper:

- Top-k = max over its k candidates (what an oracle picking the best of k would score);
- Avg   = mean over its k candidates;

and both are averaged over prompts. Top-k >= Avg always.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from klflow.errors import KLFlowError
from klflow.evaluation.evaluator import INSTALL_HINT


MAX_ORDER = 4


def sentence_bleu(candidate: str, reference: str) -> float:
    """sacrebleu's smoothed sentence BLEU of one candidate against one reference, 0-100."""
    return float(_sacrebleu().sentence_bleu(candidate, [reference]).score)


def unsmoothed_bleu(candidate: str, reference: str) -> float:
    """BLEU of one candidate against one reference as Hugging Face evaluate's "bleu" computes it, 0-100.

    With 13a tokens, p_n = (clipped n-gram matches) / max(0, len(candidate) - n + 1) for n = 1..4
    (0 where the candidate has no n-gram), BLEU = BP exp(sum_n log(p_n) / 4), 0 if any p_n is 0, and the
    brevity penalty BP = exp(1 - len(reference) / len(candidate)) for a shorter candidate, else 1.
    """
    tokenize = _tokenizer_13a()
    cand, ref = tokenize(candidate).split(), tokenize(reference).split()
    if not cand or not ref:
        return 0.0
    log_precision = 0.0
    for n in range(1, MAX_ORDER + 1):
        possible = len(cand) - n + 1
        matches = sum((_ngrams(cand, n) & _ngrams(ref, n)).values())
        if possible <= 0 or matches == 0:
            return 0.0
        log_precision += math.log(matches / possible) / MAX_ORDER
    ratio = len(cand) / len(ref)
    brevity = 1.0 if ratio > 1.0 else math.exp(1.0 - 1.0 / ratio)
    return 100.0 * brevity * math.exp(log_precision)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError:
        raise KLFlowError(f"BLEU needs the sacrebleu package: {INSTALL_HINT}") from None
    return sacrebleu


@functools.cache
def _tokenizer_13a():
    _sacrebleu()
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), 0-1."""
    return float(_rouge_scorer().score(reference, candidate)["rougeL"].fmeasure)


def conditional_scores(references: Sequence[str], candidates: Sequence[Sequence[str]]) -> dict:
    """BLEU (unsmoothed, the paper's), smoothed BLEU and ROUGE-L, Top-k and Avg, for `candidates[i]` (k texts)
    generated for prompt i."""
    if len(references) != len(candidates) or not references:
        raise KLFlowError(f"need one candidate list per reference; got {len(references)} references "
                          f"and {len(candidates)} candidate lists")
    sizes = {len(group) for group in candidates}
    if len(sizes) != 1 or 0 in sizes:
        raise KLFlowError(f"every prompt needs the same number k >= 1 of candidates; got sizes {sorted(sizes)}")
    result: dict = {"n_prompts": len(references), "k": sizes.pop()}
    for name, metric in (("bleu", unsmoothed_bleu), ("bleu_smoothed", sentence_bleu), ("rouge_l", rouge_l)):
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
