"""One pass of the evaluator over a set of texts: token NLLs, scored ids and MAUVE features.

Each text is re-tokenized by the evaluator, cut after its first end-of-text (MDLM/DUO: what
follows a document's end is not part of it), truncated to `max_length` tokens, and prefixed with
the end-of-text token as context, so that every kept token x_i is scored by
-log p(x_i | context, x_<i). The same forward pass yields the MAUVE feature of the text: the
final-layer hidden state (after the final norm) at its last kept token, as in the MAUVE paper.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from klflow.evaluation.evaluator import Evaluator


@dataclass
class TextScores:
    """Per-text results of `score_texts`, in input order."""

    nll: np.ndarray  # float64 [N]: summed NLL of the scored tokens, nats
    n_tokens: np.ndarray  # int64 [N]: scored tokens (0 for a text with no evaluator token)
    ids: list[list[int]]  # the scored evaluator ids, unpadded, without the context token
    features: np.ndarray  # float32 [N, hidden]: final hidden state at the last kept position
    n_truncated: int  # texts longer than max_length evaluator tokens
    n_cut_at_eos: int  # texts that contained an end-of-text with more text after it


def evaluator_ids(evaluator: Evaluator, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int, int]:
    """The kept evaluator ids of each text, plus how many texts were truncated and cut at end-of-text."""
    encoded = evaluator.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    kept, n_truncated, n_cut = [], 0, 0
    for ids in encoded:
        if evaluator.eos_id is not None and evaluator.eos_id in ids:
            end = ids.index(evaluator.eos_id) + 1  # the first end-of-text is scored; what follows is not
            n_cut += end < len(ids)
            ids = ids[:end]
        if len(ids) > max_length:
            ids = ids[:max_length]
            n_truncated += 1
        kept.append(list(ids))
    return kept, n_truncated, n_cut


@torch.inference_mode()
def score_texts(
    evaluator: Evaluator,
    texts: Sequence[str],
    max_length: int = 1024,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "scoring",
) -> TextScores:
    """Run the evaluator over `texts` in padded batches (attention-masked, longest first)."""
    ids, n_truncated, n_cut = evaluator_ids(evaluator, texts, max_length)
    context = [] if evaluator.eos_id is None else [evaluator.eos_id]
    hidden_size = evaluator.model.get_output_embeddings().weight.shape[1]
    nll = np.zeros(len(ids), dtype=np.float64)
    features = np.zeros((len(ids), hidden_size), dtype=np.float32)
    # Sorting by length keeps padding, hence wasted compute, small.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    bar = tqdm(total=len(ids), desc=desc, unit="text", disable=not progress, file=sys.stderr)
    with bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            rows = [context + ids[i] for i in batch]
            nll_rows, feature_rows = _forward(evaluator, rows)
            nll[batch] = nll_rows
            features[batch] = feature_rows
            bar.update(len(batch))
    n_tokens = np.array([len(row) for row in ids], dtype=np.int64)
    if not context:  # without a context token the first token of each text is not scored
        n_tokens = np.maximum(n_tokens - 1, 0)
    return TextScores(nll, n_tokens, ids, features, n_truncated, n_cut)


def _forward(evaluator: Evaluator, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = torch.tensor([len(row) for row in rows])
    width = max(1, int(lengths.max()))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    device = evaluator.device
    out = evaluator.model(input_ids=input_ids.to(device), attention_mask=mask.long().to(device), output_hidden_states=True)
    nll = np.zeros(len(rows), dtype=np.float64)
    for r, length in enumerate(lengths.tolist()):
        if length > 1:
            # Row by row, so the float32 log-softmax copy is one sequence's, not the whole batch's.
            logits = out.logits[r, : length - 1].float()
            targets = input_ids[r, 1:length].to(device)
            nll[r] = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double().item()
    last = (lengths - 1).clamp(min=0).to(device)
    features = out.hidden_states[-1][torch.arange(len(rows), device=device), last].float().cpu().numpy()
    return nll, features
