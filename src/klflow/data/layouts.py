"""Batch layouts over a prepared shard set; each yields `Batch(ids, cond_mask)` (cond_mask True = given).

- packed: random seq_len windows of the token stream, across document boundaries; no cond_mask.
- padded: one example per row, then pad; a longer document is cut into seq_len pieces
  (long_docs="split") or a random seq_len window of it is taken (long_docs="window"); no cond_mask.
- pairs:  prompt, response, end-of-text, then pad; the prompt (at most max_prompt_len tokens, default
  seq_len // 2, cut at its end) is given; the response is cut to fit.
- infill: rows as in padded; a fraction of the content, drawn per row from mask_fraction, is masked
  (to be generated) and all else is given: random spans (unit="spans", at most max_spans) or whole
  non-empty lines (unit="lines", for code). A pair's prompt is never masked. A token that holds a
  newline ends its line, so indentation merged into it goes with the line before. With
  line_slot=N (lines only) every masked line becomes a slot of N generated positions: the line's
  tokens, then end-of-text filler (the paper's fixed-length line slots, so a model learns to end a
  line it fills without being told its length); only lines of at most N tokens are masked, and a
  row that grows past seq_len is cut there.

Batches are addressed by a global index: `stream.batch(index, size)` is a pure function of
(data, layout, options, seed, index, size). For the document layouts it holds positions
index*size ... index*size+size-1 of an endless order of the split's examples, a fresh shuffle each
epoch, so with a fixed size distinct indices never share an example within an epoch; for packed it
holds `size` random windows. Iterating, rank r of world_size draws indices r, r + world_size,
r + 2*world_size, ...: the ranks read disjoint streams, and the state (the number of batches drawn)
is the same on every rank.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from klflow.data.batches import Batch, validation_windows
from klflow.data.shards import PreparedData
from klflow.errors import KLFlowError, alternatives

_DEFAULTS: dict[str, dict[str, Any]] = {
    "packed": {},
    "padded": {"long_docs": "split"},
    "pairs": {"max_prompt_len": None},
    "infill": {"unit": "spans", "mask_fraction": (0.0, 1.0), "max_spans": 4, "line_slot": None, "long_docs": "split"},
}
LAYOUTS = tuple(_DEFAULTS)
CONDITIONAL_LAYOUTS = ("pairs", "infill")  # the layouts whose batches have given positions (a cond_mask)
INFILL_UNITS = ("spans", "lines")  # infill: what is masked, random spans or whole lines
LONG_DOCS = ("split", "window")  # padded, infill: a document longer than seq_len is cut into pieces or windowed
_VALIDATION_SEED = 1234
_PERMUTATION, _BATCH = 0, 1  # stream tags, so a batch's and an epoch's random numbers never coincide


class BatchStream:
    """An endless iterator of batches with `state_dict()`/`load_state_dict()` for exact resumption."""

    def __init__(self, layout: _Layout, key: dict[str, Any], seed: int, rank: int, world_size: int) -> None:
        self._layout = layout
        self._key = key
        self._seed = seed
        self._rank, self._world_size = rank, world_size
        self._drawn = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        batch = self.batch(self._drawn * self._world_size + self._rank, self._key["batch_size"])
        self._drawn += 1
        return batch

    def batch(self, index: int, size: int) -> Batch:
        """Batch `index` of `size` rows (see the module docstring); independent of rank and of the iterator."""
        if index < 0 or size < 1:
            raise KLFlowError(f"batch index must be >= 0 and size >= 1, got {index} and {size}")
        return self._layout.draw(self._seed, index, size)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable; the same on every rank, so rank 0's copy resumes them all."""
        return {**self._key, "seed": self._seed, "batches": self._drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            fits = {key: state[key] for key in self._key} == self._key
            seed, drawn = int(state["seed"]), int(state["batches"])
        except (TypeError, KeyError, ValueError):
            fits = False
        if not fits or drawn < 0:
            raise KLFlowError(f"saved data-stream state does not fit this data loader ({self._key})")
        self._seed, self._drawn = seed, drawn


def make_batches(data: PreparedData, split: str, layout: str, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, **layout_options: Any) -> BatchStream:
    """Endless batches of `split` in `layout` for process `rank` of `world_size` (see the module docstring)."""
    _check_sizes(seq_len, batch_size)
    if not 0 <= rank < world_size:
        raise KLFlowError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    if seed < 0:
        raise KLFlowError(f"seed must be >= 0, got {seed}")
    options = check_layout_options(layout, seq_len, layout_options)
    key = {"layout": layout, "seq_len": seq_len, "batch_size": batch_size, "options": _jsonable(options)}
    if layout == "packed":
        sampler: _Layout = _Packed(data.tokens(split), seq_len)
    else:
        sampler = _Documents(_Rows(data, split, layout, seq_len, options, validation=False))
    return BatchStream(sampler, key, seed, rank, world_size)


def validation_batches(data: PreparedData, layout: str, seq_len: int, max_examples: int, batch_size: int,
                       **layout_options: Any) -> list[Batch]:
    """Up to `max_examples` validation rows spread evenly over the val split, always the same ones with
    the same masks; long documents are always cut into pieces. Not split by rank."""
    _check_sizes(seq_len, batch_size)
    if max_examples < 1:
        raise KLFlowError(f"max_examples must be positive, got {max_examples}")
    options = check_layout_options(layout, seq_len, layout_options)
    if layout == "packed":
        windows = validation_windows(data.val_tokens(), seq_len, max_examples)
        return [Batch(part, None) for part in windows.split(batch_size)]
    rows = _Rows(data, "val", layout, seq_len, options, validation=True)
    n = min(max_examples, rows.count)
    chosen = np.unique(np.rint(np.linspace(0, rows.count - 1, n)).astype(np.int64))
    rng = np.random.default_rng(_VALIDATION_SEED)
    return [rows.build(chosen[i : i + batch_size], rng) for i in range(0, len(chosen), batch_size)]


class _Layout(Protocol):
    def draw(self, seed: int, index: int, size: int) -> Batch: ...


class _Packed:
    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        if len(tokens) < seq_len:
            raise KLFlowError(f"the split has only {len(tokens)} tokens; need at least seq_len={seq_len}")
        self._tokens, self._n_starts = tokens, len(tokens) - seq_len + 1
        self._positions = np.arange(seq_len)

    def draw(self, seed: int, index: int, size: int) -> Batch:
        starts = np.random.default_rng([seed, _BATCH, index]).integers(0, self._n_starts, size=size)
        return Batch(torch.from_numpy(self._tokens[starts[:, None] + self._positions].astype(np.int64)), None)


class _Documents:
    def __init__(self, rows: _Rows) -> None:
        self._rows = rows
        self._epoch_order: tuple[tuple[int, int], np.ndarray] | None = None  # the last (seed, epoch) and its order

    def draw(self, seed: int, index: int, size: int) -> Batch:
        n = self._rows.count
        positions = np.arange(index * size, (index + 1) * size)
        chosen = np.empty(size, dtype=np.int64)
        for epoch in np.unique(positions // n):
            here = positions // n == epoch
            chosen[here] = self._order(seed, int(epoch))[positions[here] % n]
        return self._rows.build(chosen, np.random.default_rng([seed, _BATCH, index]))

    def _order(self, seed: int, epoch: int) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != (seed, epoch):
            permutation = np.random.default_rng([seed, _PERMUTATION, epoch]).permutation(self._rows.count)
            self._epoch_order = ((seed, epoch), permutation)
        return self._epoch_order[1]


class _Rows:
    """The examples of one split for a document layout, and how a batch of them becomes rows."""

    def __init__(self, data: PreparedData, split: str, layout: str, seq_len: int, options: dict[str, Any],
                 validation: bool) -> None:
        offsets = np.asarray(data.offsets(split))
        start, length = offsets[:-1], np.diff(offsets)
        prompt = np.asarray(data.prompt_lengths(split), dtype=np.int64)
        if layout == "pairs" and not prompt.any():
            raise KLFlowError(f"{data.dir} holds no prompt/response pairs; prepare a pairs corpus (e.g. chitchat-pairs, "
                              "or --prompt-field/--response-field) for the pairs layout")
        self._window = layout != "pairs" and options["long_docs"] == "window" and not validation
        if layout != "pairs" and not self._window:
            start, length, prompt = _pieces(start, length, prompt, seq_len)
        self.count = len(start)
        if self.count == 0:
            raise KLFlowError(f"the {split} split of {data.dir} has no examples")
        self._start, self._length, self._prompt = start, length, prompt
        self._tokens = data.tokens(split)
        self._layout, self._seq_len, self._options = layout, seq_len, options
        tokenizer = data.tokenizer()
        self._eot, self._pad = tokenizer.eot_id, tokenizer.pad_id
        if layout == "infill" and options["unit"] == "lines":
            texts = tokenizer.token_texts()
            self._newline = np.array(["\n" in text for text in texts])
            self._blank = np.array([not text.strip() for text in texts])

    def build(self, chosen: np.ndarray, rng: np.random.Generator) -> Batch:
        start, length, prompt = self._start[chosen], self._length[chosen], self._prompt[chosen]
        if self._layout == "pairs":
            return self._pairs(start, length, prompt)
        if self._window:
            offset = rng.integers(0, np.maximum(length - self._seq_len, 0) + 1)
            start, length, prompt = start + offset, np.minimum(length - offset, self._seq_len), prompt - offset
        ids = self._take(start, length)
        if self._layout == "padded":
            return Batch(torch.from_numpy(ids), None)
        masked = self._infill_mask(ids, length, prompt, rng)
        if self._options["line_slot"] is not None:
            ids, masked = self._line_slots(ids, masked)
        return Batch(torch.from_numpy(ids), torch.from_numpy(~masked))

    def _pairs(self, start: np.ndarray, length: np.ndarray, prompt: np.ndarray) -> Batch:
        limit = self._options["max_prompt_len"]
        kept = np.minimum(prompt, self._seq_len // 2 if limit is None else limit)
        skip = prompt - kept  # the prompt's cut-off end: the response follows its kept part directly
        ids = self._take(start, kept + np.minimum(length - prompt, self._seq_len - kept), kept, skip)
        return Batch(torch.from_numpy(ids), torch.from_numpy(np.arange(self._seq_len) < kept[:, None]))

    def _take(self, start: np.ndarray, length: np.ndarray, kept: np.ndarray | None = None,
              skip: np.ndarray | None = None) -> np.ndarray:
        """Rows of `length` tokens from `start` (jumping `skip` tokens after the first `kept`), then pad."""
        positions = np.arange(self._seq_len)
        index = start[:, None] + positions
        if kept is not None and skip is not None:
            index += np.where(positions >= kept[:, None], skip[:, None], 0)
        valid = positions < length[:, None]
        ids = np.full((len(start), self._seq_len), self._pad, dtype=np.int64)
        ids[valid] = self._tokens[index[valid]]
        return ids

    def _infill_mask(self, ids: np.ndarray, length: np.ndarray, prompt: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
        """bool [B, L], True where the row is masked (to be generated)."""
        low, high = self._options["mask_fraction"]
        masked = np.zeros(ids.shape, dtype=bool)
        for row, (n, head) in enumerate(zip(length, prompt)):
            end = n - int(n > 0 and ids[row, n - 1] == self._eot)  # the end-of-text stays given
            begin = int(np.clip(head, 0, end))
            fraction = rng.uniform(low, high)
            if self._options["unit"] == "lines":
                masked[row, begin:end] = self._line_mask(ids[row, begin:end], fraction, rng)
            else:
                masked[row, begin:end] = _span_mask(end - begin, fraction, self._options["max_spans"], rng)
        return masked

    def _line_mask(self, tokens: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
        if len(tokens) == 0:
            return np.zeros(0, dtype=bool)
        line = np.concatenate([[0], np.cumsum(self._newline[tokens[:-1]])])
        candidates = np.unique(line[~self._blank[tokens]])  # lines with some non-blank text
        slot = self._options["line_slot"]
        if slot is not None:
            candidates = candidates[np.bincount(line)[candidates] <= slot]
        if len(candidates) == 0:
            return np.zeros(len(tokens), dtype=bool)
        count = int(np.clip(round(fraction * len(candidates)), 1, len(candidates)))
        return np.isin(line, rng.choice(candidates, size=count, replace=False))

    def _line_slots(self, ids: np.ndarray, masked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each masked line followed by end-of-text filler up to line_slot positions (all masked),
        the rows cut or padded back to seq_len."""
        slot = self._options["line_slot"]
        ends_line = self._newline[ids]
        # A masked line is a run of masked positions that a newline token or a given position ends.
        starts = masked & np.concatenate([np.ones((len(ids), 1), bool), ~masked[:, :-1] | ends_line[:, :-1]], axis=1)
        ends = masked & (np.concatenate([~masked[:, 1:], np.ones((len(ids), 1), bool)], axis=1) | ends_line)
        out_ids = np.full_like(ids, self._pad)
        out_masked = np.zeros_like(masked)
        for row in range(len(ids)):
            line = np.cumsum(starts[row])
            sizes = np.bincount(line[masked[row]], minlength=line[-1] + 1)
            fill = np.where(ends[row], slot - sizes[line], 0)
            source = np.repeat(np.arange(ids.shape[1]), 1 + fill)[: ids.shape[1]]
            first = np.concatenate([[True], source[1:] != source[:-1]])
            out_ids[row, : len(source)] = np.where(first, ids[row, source], self._eot)
            out_masked[row, : len(source)] = masked[row, source]
        return out_ids, out_masked


def _span_mask(n: int, fraction: float, max_spans: int, rng: np.random.Generator) -> np.ndarray:
    """About fraction * n (at least 1) of n positions, masked in 1..max_spans random spans."""
    masked = np.zeros(n, dtype=bool)
    if n == 0:
        return masked
    total = int(np.clip(round(fraction * n), 1, n))
    spans = min(int(rng.integers(1, max_spans + 1)), total)
    cuts = np.sort(rng.choice(np.arange(1, total), size=spans - 1, replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [total]]))
    gaps = np.diff(np.concatenate([[0], np.sort(rng.integers(0, n - total + 1, size=spans)), [n - total]]))
    cursor = 0
    for gap, size in zip(gaps, sizes):
        cursor += gap
        masked[cursor : cursor + size] = True
        cursor += size
    return masked


def _pieces(start: np.ndarray, length: np.ndarray, prompt: np.ndarray, seq_len: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each example cut into consecutive pieces of at most seq_len tokens. The end-of-text goes with the
    last piece when it fits and is dropped when it would make a piece of its own."""
    n_pieces = np.maximum(-(-(length - 1) // seq_len), 1)
    example = np.repeat(np.arange(len(length)), n_pieces)
    skipped = (np.arange(len(example)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)) * seq_len
    return start[example] + skipped, np.minimum(length[example] - skipped, seq_len), prompt[example] - skipped


def check_layout_options(layout: str, seq_len: int, given: dict[str, Any]) -> dict[str, Any]:
    """The layout's options with defaults filled in, each checked."""
    if layout not in _DEFAULTS:
        raise KLFlowError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    unknown = sorted(set(given) - set(_DEFAULTS[layout]))
    if unknown:
        takes = ", ".join(_DEFAULTS[layout]) or "no options"
        raise KLFlowError(f"layout {layout} has no option {', '.join(unknown)} (it takes {takes})")
    options = {**_DEFAULTS[layout], **given}
    if options.get("long_docs", "split") not in LONG_DOCS:
        raise KLFlowError(f"long_docs must be {alternatives(LONG_DOCS)}, got {options['long_docs']!r}")
    if options.get("unit", "spans") not in INFILL_UNITS:
        raise KLFlowError(f"unit must be {alternatives(INFILL_UNITS)}, got {options['unit']!r}")
    limit = options.get("max_prompt_len")
    if limit is not None and not (isinstance(limit, int) and 0 <= limit < seq_len):
        raise KLFlowError(f"max_prompt_len must be an integer in [0, seq_len={seq_len}), got {limit!r}")
    slot = options.get("line_slot")
    if slot is not None and not (isinstance(slot, int) and not isinstance(slot, bool) and slot >= 1):
        raise KLFlowError(f"line_slot must be a positive integer (tokens per masked line), got {slot!r}")
    if slot is not None and options["unit"] != "lines":
        raise KLFlowError("line_slot applies to whole-line masks only; set unit='lines'")
    if "max_spans" in options and not (isinstance(options["max_spans"], int) and options["max_spans"] >= 1):
        raise KLFlowError(f"max_spans must be a positive integer, got {options['max_spans']!r}")
    if "mask_fraction" in options:
        options["mask_fraction"] = _fraction_range(options["mask_fraction"])
    return options


def _fraction_range(fraction: Any) -> tuple[float, float]:
    """A fixed fraction or a (low, high) range, within [0, 1]."""
    try:
        low, high = (fraction, fraction) if isinstance(fraction, (int, float)) else fraction
        if 0 <= low <= high <= 1:
            return float(low), float(high)
    except (TypeError, ValueError):
        pass
    raise KLFlowError(f"mask_fraction must be a number or a (low, high) range within [0, 1], got {fraction!r}")


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in options.items()}


def _check_sizes(seq_len: int, batch_size: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise KLFlowError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
