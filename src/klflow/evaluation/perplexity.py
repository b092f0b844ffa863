"""Generative perplexity of texts under the evaluator, from their token NLLs.

With NLL_i the summed NLL (nats) of text i's n_i scored tokens:

- "mdlm" (MDLM/DUO/ReMDM, the default): corpus-level PPL = exp(sum_i NLL_i / sum_i n_i).
- "per-sample" (KL-Flow paper, no trimming): PPL = mean_i exp(NLL_i / n_i). By Jensen's
  inequality it is >= the corpus-level value, and it weighs every text equally, so one broken
  short text can dominate it.
"""

from __future__ import annotations

import math

import numpy as np

from klflow.errors import KLFlowError
from klflow.evaluation.scoring import TextScores

PPL_MODES = ("mdlm", "per-sample")
PPL_DEFINITIONS = {
    "mdlm": "exp(sum of token NLLs / number of scored tokens), over all texts together",
    "per-sample": "mean over texts of exp(mean token NLL of the text)",
}


def generative_perplexity(scores: TextScores, mode: str = "mdlm") -> float:
    """The generative perplexity of the scored texts; texts with no scored token are left out."""
    if mode not in PPL_MODES:
        raise KLFlowError(f"unknown perplexity mode {mode!r}; choose one of {', '.join(PPL_MODES)}")
    scored = scores.n_tokens > 0
    if not scored.any():
        raise KLFlowError("no text has a token the evaluator can score (all texts are empty)")
    if mode == "mdlm":
        return math.exp(scores.nll[scored].sum() / scores.n_tokens[scored].sum())
    return float(np.mean(np.exp(scores.nll[scored] / scores.n_tokens[scored])))
