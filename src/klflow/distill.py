"""Sequence-level distillation (Kim & Rush 2016): a teacher's samples as a student's training data.

A non-autoregressive student draws every position at once from per-position marginals, so data with
many modes per context costs it more than a left-to-right model; an autoregressive teacher's samples
keep fewer of them. `distill` writes a prepared data folder (klflow.data.shards.write_derived) whose
train split is `num_samples` of the teacher's sequences and whose tokenizer and validation split are
the teacher's data's, so that the student's validation loss and `klflow eval --reference val` still
measure against the real text:

    klflow distill runs/ar --out data/ar-distilled -n 32768 --temperature 0.8
    klflow train --data data/ar-distilled --steps 1000

A teacher's sequence is a window that starts where a document starts (ar draws after its
end-of-text marker); it is split at the end-of-text tokens it drew, and its last piece, cut by the
window, is closed with one. Batch b of the sampling draws with the seed SeedSequence([seed, b]), so a
folder is a pure function of (teacher, options, num_samples, batch_size, seed).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from klflow.data import PreparedData, check_compatible
from klflow.data.shards import write_derived
from klflow.errors import KLFlowError
from klflow.filling import calls_made
from klflow.trained import TrainedModel


def split_documents(ids: torch.Tensor, eot_id: int) -> list[list[int]]:
    """The documents of sequences ids [B, L]: each row cut after every end-of-text, its last piece closed
    with one; empty pieces (an end-of-text right after another, or opening the row) are dropped."""
    documents = []
    for row in ids.tolist():
        piece: list[int] = []
        for token in row:
            if token == eot_id:
                if piece:
                    documents.append([*piece, eot_id])
                piece = []
            else:
                piece.append(token)
        if piece:
            documents.append([*piece, eot_id])
    return documents


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch `batch` of a distillation seeded with `seed`: distinct for distinct pairs."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def teacher_data(teacher: TrainedModel, data: str | Path | None = None) -> PreparedData:
    """The prepared data whose validation split the distilled folder keeps: `data`, else the folder the
    teacher was trained on (its checkpoint's data_dir); it must share the teacher's tokenizer."""
    where = data if data is not None else teacher.checkpoint.config.get("data_dir")
    if where is None:
        raise KLFlowError(f"{teacher.checkpoint.dir} records no training data; pass --data PREPARED_DIR")
    try:
        prepared = PreparedData.load(where)
    except KLFlowError as err:
        raise KLFlowError(f"{err}; pass --data PREPARED_DIR, the teacher's prepared data") from None
    check_compatible(prepared, teacher.tokenizer)
    return prepared


def distill(teacher: TrainedModel, out_dir: str | Path, num_samples: int, *, steps: int = 64, seed: int = 0,
            seq_len: int | None = None, batch_size: int = 128, data: str | Path | None = None,
            progress: Callable[[int], None] | None = None, **options: Any) -> PreparedData:
    """Write `num_samples` of the teacher's sequences as a prepared data folder at `out_dir`.

    Args:
        teacher: any trained model; options are its sampler options (e.g. temperature=0.8), steps its
            sampler steps (ignored by ar).
        seq_len: the teacher's sequence length (default its training length).
        batch_size: sequences per generate() call.
        data: the prepared data whose tokenizer and validation split are kept (default: the teacher's).
        progress: called with the number of sequences after each batch.

    Returns the folder; meta.json's "derived_from" records the teacher, its sampler settings and these
    arguments.
    """
    if num_samples < 1 or batch_size < 1:
        raise KLFlowError(f"distill needs at least 1 sample and a batch size >= 1 (-n, --batch-size), "
                          f"got {num_samples} and {batch_size}")
    like = teacher_data(teacher, data)
    sampler = teacher.sampler(steps, seed, seq_len, **options)
    eot = teacher.tokenizer.eot_id

    def documents() -> Iterator[list[int]]:
        for batch, start in enumerate(range(0, num_samples, batch_size)):
            size = min(batch_size, num_samples - start)
            yield from split_documents(sampler.generate(size, steps, batch_seed(seed, batch)), eot)
            if progress is not None:
                progress(start + size)

    derivation = {
        "source": f"distilled from {teacher.checkpoint.dir.resolve()}",
        "teacher": str(teacher.checkpoint.dir.resolve()), "teacher_step": teacher.checkpoint.state.get("step"),
        "sampler": {k: v for k, v in sampler.info.items() if k not in ("checkpoint", "seed")},
        "nfe_per_sequence": calls_made(sampler.method, steps, sampler.seq_len),
        "num_samples": num_samples, "batch_size": batch_size, "seed": seed, "validation_from": str(like.dir.resolve()),
    }
    return write_derived(Path(out_dir), like, documents(), derivation)
