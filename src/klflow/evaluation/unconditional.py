"""All unconditional metrics of one set of texts (a "row"): n-gram statistics of the text itself,
and from one pass of each evaluator its gen-PPL and the entropy of its tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from klflow.errors import KLFlowError
from klflow.evaluation.entropy import mean_unigram_entropy
from klflow.evaluation.evaluator import Evaluator
from klflow.evaluation.ngrams import DISTINCT_NS, REPETITION_NS, distinct_n, repetition_n
from klflow.evaluation.perplexity import PPL_MODES, generative_perplexity
from klflow.evaluation.scoring import TextScores, score_texts


@dataclass
class JudgedTexts:
    """What one evaluator measured on a set of texts."""

    evaluator: str  # the evaluator's name, as given to load_evaluator
    gen_ppl: dict[str, float]  # by aggregation mode
    entropy: float  # nats, of the evaluator's token ids
    scores: TextScores  # per-text NLLs, ids and MAUVE features

    def to_dict(self) -> dict:
        n = self.scores.n_tokens
        return {
            "evaluator": self.evaluator,
            "gen_ppl": self.gen_ppl,
            "entropy_nats": self.entropy,
            "evaluator_tokens": {"total_scored": int(n.sum()), "mean_per_text": float(n.mean()),
                                 "min": int(n.min()), "max": int(n.max()), "texts_without_tokens": int((n == 0).sum()),
                                 "truncated_texts": self.scores.n_truncated,
                                 "texts_cut_at_end_of_text": self.scores.n_cut_at_eos,
                                 "texts_scored_in_windows": self.scores.n_windowed},
        }


@dataclass
class UnconditionalRow:
    name: str
    n_texts: int
    distinct: dict[int, float | None]  # None: no text has n words
    repetition: dict[int, float | None]
    mean_words: float  # whitespace words per text
    judged: list[JudgedTexts]  # one per evaluator, in the order given

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "n_texts": self.n_texts,
            "mean_words_per_text": self.mean_words,
            "distinct": {f"distinct-{k}": v for k, v in self.distinct.items()},
            "repetition": {f"rep-{k}": v for k, v in self.repetition.items()},
            "judged": [judged.to_dict() for judged in self.judged],
        }


def judge_texts(
    name: str,
    texts: Sequence[str],
    evaluator: Evaluator,
    max_length: int = 1024,
    batch_size: int = 16,
    progress: bool = True,
) -> JudgedTexts:
    """Gen-PPL (every mode) and unigram entropy of `texts` under `evaluator`."""
    scores = score_texts(evaluator, texts, max_length, batch_size, progress, desc=f"{name} / {evaluator.name}")
    return JudgedTexts(evaluator.name, {mode: generative_perplexity(scores, mode) for mode in PPL_MODES},
                       mean_unigram_entropy(scores.ids), scores)


def evaluate_unconditional(
    name: str,
    texts: Sequence[str],
    evaluators: Sequence[Evaluator],
    max_length: int = 1024,
    batch_size: int = 16,
    progress: bool = True,
) -> UnconditionalRow:
    """Distinct-n and rep-n of `texts`, and gen-PPL (every mode) with unigram entropy under each evaluator."""
    if not texts:
        raise KLFlowError(f"{name}: no texts to evaluate")
    return UnconditionalRow(
        name=name,
        n_texts=len(texts),
        distinct={n: distinct_n(texts, n) for n in DISTINCT_NS},
        repetition={n: repetition_n(texts, n) for n in REPETITION_NS},
        mean_words=float(np.mean([len(text.split()) for text in texts])),
        judged=[judge_texts(name, texts, evaluator, max_length, batch_size, progress) for evaluator in evaluators],
    )
