"""One pass of the evaluator over a set of texts: token NLLs, scored ids and MAUVE features.

Each text is re-tokenized by the evaluator, cut after its first end-of-text (MDLM/DUO: what
follows a document's end is not part of it), truncated to `max_length` tokens, and prefixed with
the end-of-text token as context, so that every kept token x_i is scored by
-log p(x_i | context, x_<i). The same forward pass yields the MAUVE feature of the text: the
final-layer hidden state (after the final norm) at its last kept token, as in the MAUVE paper.

A row longer than the evaluator's window (`Evaluator.max_positions`, W) is scored in windows of
W positions advancing by W // 2, the last one ending at the row's end; each window scores only
the tokens no earlier window scored, so every token is scored once, with at least W - W // 2
tokens of context (sliding-window perplexity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from klflow.evaluation.evaluator import Evaluator
from klflow.progress import progress_bar


@dataclass
class TextScores:
    """Per-text results of `score_texts`, in input order."""

    nll: np.ndarray  # float64 [N]: summed NLL of the scored tokens, nats
    n_tokens: np.ndarray  # int64 [N]: scored tokens (0 for a text with no evaluator token)
    ids: list[list[int]]  # the scored evaluator ids, unpadded, without the context token
    features: np.ndarray  # float32 [N, hidden]: final hidden state at the last kept position
    n_truncated: int  # texts longer than max_length evaluator tokens
    n_cut_at_eos: int  # texts that contained an end-of-text with more text after it
    n_windowed: int = 0  # texts longer than the evaluator's window, scored in several windows


@dataclass(frozen=True)
class Window:
    """Positions [start, end) of one text's row, run in one forward pass; targets from `first` on are scored."""

    text: int
    start: int
    end: int
    first: int
    last: bool  # the window holding the text's last token, whose hidden state is the text's feature


def evaluator_ids(evaluator: Evaluator, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int, int]:
    """The kept evaluator ids of each text, plus how many texts were truncated and cut at end-of-text."""
    kept, n_truncated, n_cut = [], 0, 0
    for ids in evaluator.encode(texts):
        if evaluator.eos_id is not None and evaluator.eos_id in ids:
            end = ids.index(evaluator.eos_id) + 1  # the first end-of-text is scored; what follows is not
            n_cut += end < len(ids)
            ids = ids[:end]
        if len(ids) > max_length:
            ids = ids[:max_length]
            n_truncated += 1
        kept.append(list(ids))
    return kept, n_truncated, n_cut


def row_windows(text: int, length: int, width: int | None) -> list[Window]:
    """The windows covering a row of `length` positions: one if it fits in `width` (None: no limit),
    else windows of `width` advancing by width // 2, the last ending at `length`."""
    if width is None or length <= width:
        return [Window(text, 0, length, 1, True)]
    if width < 2:
        raise ValueError(f"a window of {width} position scores nothing")
    windows, start, first = [], 0, 1
    while True:
        end = start + width
        windows.append(Window(text, start, end, first, end == length))
        if end == length:
            return windows
        start, first = min(start + width // 2, length - width), end


@torch.inference_mode()
def score_texts(
    evaluator: Evaluator,
    texts: Sequence[str],
    max_length: int = 1024,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "scoring",
) -> TextScores:
    """Run the evaluator over `texts` in padded batches of windows (longest first)."""
    ids, n_truncated, n_cut = evaluator_ids(evaluator, texts, max_length)
    context = [] if evaluator.eos_id is None else [evaluator.eos_id]
    rows = [context + row for row in ids]
    windows = [w for i, row in enumerate(rows) for w in row_windows(i, len(row), evaluator.max_positions)]
    nll = np.zeros(len(ids), dtype=np.float64)
    features = np.zeros((len(ids), evaluator.hidden_size), dtype=np.float32)
    # Sorting by length keeps padding, hence wasted compute, small.
    windows.sort(key=lambda w: w.start - w.end)
    bar = progress_bar(len(ids), desc, "text", not progress)
    with bar:
        for begin in range(0, len(windows), batch_size):
            batch = windows[begin : begin + batch_size]
            nll_rows, feature_rows = _forward(evaluator, [rows[w.text][w.start : w.end] for w in batch],
                                              [w.first - w.start for w in batch])
            np.add.at(nll, [w.text for w in batch], nll_rows)
            last = [r for r, w in enumerate(batch) if w.last]
            features[[batch[r].text for r in last]] = feature_rows[last]
            bar.update(len(last))
    n_tokens = np.array([len(row) for row in ids], dtype=np.int64)
    if not context:  # without a context token the first token of each text is not scored
        n_tokens = np.maximum(n_tokens - 1, 0)
    n_windowed = sum(1 for w in windows if w.start == 0 and not w.last)
    return TextScores(nll, n_tokens, ids, features, n_truncated, n_cut, n_windowed)


def _forward(evaluator: Evaluator, rows: list[list[int]], firsts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL of each row's targets from firsts[r] on, and the hidden state at each row's last position."""
    lengths = torch.tensor([len(row) for row in rows])
    width = max(1, int(lengths.max()))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
    device = evaluator.device
    logits, hidden = evaluator.forward(input_ids.to(device), lengths)
    nll = np.zeros(len(rows), dtype=np.float64)
    for r, (length, first) in enumerate(zip(lengths.tolist(), firsts, strict=True)):
        if length > first:
            # Row by row, so the float32 log-softmax copy is one sequence's, not the whole batch's.
            scored_logits = logits[r, first - 1 : length - 1].float()
            targets = input_ids[r, first:length].to(device)
            nll[r] = torch.nn.functional.cross_entropy(scored_logits, targets, reduction="sum").double().item()
    last = (lengths - 1).clamp(min=0).to(device)
    features = hidden[torch.arange(len(rows), device=device), last].float().cpu().numpy()
    return nll, features
