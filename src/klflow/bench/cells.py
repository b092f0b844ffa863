"""One cell of the bench: samples from a trained model (timed, with peak memory), then their scores.

cells/KEY/samples.jsonl holds the samples in `klflow sample --output` format (so `klflow eval`
reads them too) and cells/KEY/sampling.json how they were made; cells/KEY/result.json is written
once they are scored. The data row (held-out text through the same evaluator) is scored once
and its MAUVE features kept beside it, as the reference of every cell's MAUVE. A cell whose
switch_entropy names a calibration source (ode, data) is calibrated before its samples are made.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from klflow.bench.memory import peak_memory
from klflow.bench.plan import CellPlan
from klflow.bench.preset import BenchPreset, EvaluationSettings
from klflow.bench.store import read_json, write_json, write_jsonl
from klflow.checkpoint import Checkpoint
from klflow.data import Batch, PreparedData
from klflow.evaluation import Evaluator, evaluate_unconditional, mauve, read_samples, validation_texts
from klflow.filling import calls_made
from klflow.methods import Method
from klflow.progress import progress_bar
from klflow.flow import SWITCH_CALIBRATIONS, SamplerOptions, calibrate_switch
from klflow.runtime import autocast_dtype, network_forward


def cell_dir(out: Path, cell: CellPlan) -> Path:
    return out / "cells" / cell.key


def generate_cell(cell: CellPlan, ckpt: Checkpoint, method: Method, out: Path, batch_size: int, seed: int,
                  dtype: torch.dtype | None, device: torch.device, progress: bool,
                  validation: Callable[[], list[Batch]] | None = None) -> dict[str, Any]:
    """Make the cell's samples (or read them when made), returning how they were made.

    validation gives the batches a switch_entropy=data calibration runs on.
    """
    folder = cell_dir(out, cell)
    made = read_json(folder / "sampling.json")
    if made is not None and (folder / "samples.jsonl").is_file():
        return made
    seq_len = cell.spec["seq_len"]
    forward = network_forward(ckpt.model, dtype, device)
    options, calibration = dict(cell.options), None
    if options.get("switch_entropy") in SWITCH_CALIBRATIONS:
        started = time.perf_counter()
        calibrated, how = calibrate_switch(SamplerOptions(**options), forward, method.path, seq_len, cell.steps,
                                           method.banned_ids, device, seed, validation, method.learned_warp)
        options = calibrated.keywords()
        calibration = {"switch_entropy": options["switch_entropy"], "how": how,
                       "seconds": time.perf_counter() - started}
    generator = torch.Generator(device=device).manual_seed(seed)
    batches = range(0, cell.num_samples, batch_size)
    chunks, calls = [], []
    bar = progress_bar(len(batches) * cell.nfe, f"sample {cell.label} NFE {cell.nfe}", "call", not progress,
                       leave=False, dynamic_ncols=True)
    with bar, peak_memory(device) as memory:
        started = time.perf_counter()
        for start in batches:
            size = min(batch_size, cell.num_samples - start)
            ids = method.generate(forward, size, seq_len, cell.steps, generator=generator, device=device,
                                  progress=lambda _: bar.update(), **options)
            chunks.append(ids.cpu())  # .cpu() waits for the GPU, so the clock below includes the work
            calls.append(calls_made(method, cell.steps, seq_len))
        seconds = time.perf_counter() - started
    ids = torch.cat(chunks)
    info = {**method.describe(), **cell.settings, **options, "steps": cell.steps, "nfe": cell.nfe, "seed": seed,
            "seq_len": seq_len, "checkpoint": str(ckpt.dir)}
    texts = [ckpt.tokenizer.decode(row) for row in ids.tolist()]
    write_jsonl(folder / "samples.jsonl", [{"text": t, "ids": row, **info} for t, row in zip(texts, ids.tolist())])
    made = {"spec": cell.spec, "checkpoint": str(ckpt.dir), "seconds": seconds,
            "seconds_per_sample": seconds / cell.num_samples, "batch_size": batch_size, "batches": len(chunks),
            "network_calls_per_batch": calls, "precision": str(dtype or torch.float32).replace("torch.", ""),
            "device": str(device), "peak_memory": memory, "switch_calibration": calibration,
            "how": "wall time of all generate() calls of the cell, batches run one after another (a switch "
                   "calibration before them excluded); network_calls_per_batch counts the calls each batch made"}
    write_json(folder / "sampling.json", made)
    return made


def score_row(name: str, texts: list[str], evaluator: Evaluator, settings: EvaluationSettings,
              progress: bool) -> tuple[dict[str, Any], np.ndarray]:
    """Every unconditional metric of texts under the bench's one judge, flat, and the judge's MAUVE features."""
    row = evaluate_unconditional(name, texts, [evaluator], settings.max_length, settings.batch_size, progress)
    scores = row.to_dict()
    (judged,) = scores.pop("judged")
    return scores | judged, row.judged[0].scores.features


def scoring_key(settings: EvaluationSettings) -> dict[str, Any]:
    """The evaluation settings that change a score (the headline mode only picks one of the stored modes)."""
    return featurization_key(settings) | {"mauve_seeds": settings.mauve_seeds if settings.mauve else None}


def featurization_key(settings: EvaluationSettings) -> dict[str, Any]:
    """The evaluation settings that change the data row's scores and MAUVE features."""
    return {"evaluator": settings.evaluator, "max_length": settings.max_length, "mauve": settings.mauve}


def cached_result(cell: CellPlan, out: Path, settings: EvaluationSettings) -> dict[str, Any] | None:
    result = read_json(cell_dir(out, cell) / "result.json")
    if result is not None and result["spec"] == cell.spec and result["evaluation"] == scoring_key(settings):
        return result
    return None


def evaluate_cell(cell: CellPlan, out: Path, evaluator: Evaluator, settings: EvaluationSettings,
                  reference: np.ndarray | None, progress: bool) -> dict[str, Any]:
    """Score the cell's samples: every unconditional metric, and MAUVE against as many reference texts."""
    folder = cell_dir(out, cell)
    started = time.perf_counter()
    texts = read_samples(folder / "samples.jsonl").texts
    scores, features = score_row(cell.label, texts, evaluator, settings, progress)
    scores["mauve"] = None
    if reference is not None:
        # An evenly spread subset of the reference, as many texts as samples (MAUVE depends on the counts).
        subset = np.unique(np.rint(np.linspace(0, len(reference) - 1, min(len(texts), len(reference)))).astype(int))
        scores["mauve"] = mauve(features, reference[subset], settings.mauve_seeds).to_dict()
    result = {"spec": cell.spec, "evaluation": scoring_key(settings), "scores": scores,
              "seconds": time.perf_counter() - started}
    write_json(folder / "result.json", result)
    return result


def data_row(data: PreparedData, n: int, seq_len: int, out: Path, settings: EvaluationSettings,
             load_evaluator: Callable[[], Evaluator], progress: bool) -> tuple[dict[str, Any], np.ndarray]:
    """The scores of n held-out windows of seq_len tokens and their MAUVE features (cached)."""
    stem = out / f"data-row-n{n}-len{seq_len}"
    cached = read_json(stem.with_suffix(".json"))
    features_file = stem.with_suffix(".npy")
    spec = {"data_dir": str(data.dir), "n": n, "seq_len": seq_len, **featurization_key(settings)}
    if cached is not None and cached["spec"] == spec and features_file.is_file():
        return cached, np.load(features_file)
    texts = validation_texts(data, n, seq_len)
    evaluator = load_evaluator()
    scores, features = score_row("data", texts, evaluator, settings, progress)
    record = {"spec": spec, "scores": scores, "evaluator": evaluator.description,
              "how": f"{len(texts)} non-overlapping windows of {seq_len} tokens spread evenly over the validation "
                     f"split of {data.dir}, decoded like the samples"}
    features_file.parent.mkdir(parents=True, exist_ok=True)
    np.save(features_file, features)
    write_json(stem.with_suffix(".json"), record)
    return record, features


class UnconditionalCells:
    """How the runner makes and scores a cell of an unconditional bench (see the module docstring)."""

    def __init__(self, preset: BenchPreset, out: Path, device: torch.device, evaluator: Callable[[], Evaluator],
                 evaluation: EvaluationSettings, reference: np.ndarray | None, validation: Callable[[], list[Batch]],
                 progress: bool) -> None:
        self.preset = preset
        self.evaluation = evaluation
        self.out = out
        self.device = device
        self.evaluator = evaluator
        self.reference = reference
        self.validation = validation
        self.progress = progress
        self.dtype = autocast_dtype(preset.bench.sample_precision, device)

    def cached(self, cell: CellPlan) -> dict[str, Any] | None:
        result = cached_result(cell, self.out, self.evaluation)
        return None if result is None else self._done(cell, result)

    def run(self, cell: CellPlan, ckpt: Checkpoint, method: Method) -> dict[str, Any]:
        bench = self.preset.bench
        generate_cell(cell, ckpt, method, self.out, bench.sample_batch_size, bench.seed, self.dtype, self.device,
                      self.progress, self.validation)
        result = evaluate_cell(cell, self.out, self.evaluator(), self.evaluation, self.reference, self.progress)
        return self._done(cell, result)

    def _done(self, cell: CellPlan, result: dict[str, Any]) -> dict[str, Any]:
        return {"result": result, "sampling": read_json(cell_dir(self.out, cell) / "sampling.json")}
