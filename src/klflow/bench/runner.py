"""`klflow bench`: train every method alike, sample each on the NFE grid and the sweeps, score, report.

Stages, each cached under the output folder and skipped when done: data (the prepared-data
cache), training (runs/), the side-by-side training speed (performance.json), the data row
(unconditional benches) or the task's prompts, then per cell its samples and its scores (cells/).
The report (results.json, RESULTS.md, plots/) is rebuilt from the cache at the end of every run.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from klflow.bench.cells import UnconditionalCells, data_row
from klflow.bench.performance import measure_training_speed
from klflow.bench.plan import BenchPlan, CellPlan, ModelPlan, make_plan
from klflow.bench.plots import write_plots
from klflow.bench.preset import BenchPreset
from klflow.bench.report import build_results, write_markdown
from klflow.bench.store import read_json, write_json
from klflow.bench.task_cells import TaskCells, task_inputs
from klflow.bench.training import run_dir, train_model
from klflow.checkpoint import Checkpoint, load_checkpoint
from klflow.config import merge_settings
from klflow.data import PreparedData, validation_batches
from klflow.distill import distill
from klflow.distributed import resolve_device
from klflow.errors import KLFlowError
from klflow.evaluation import Evaluator, load_evaluator, mauve_available
from klflow.methods import Method, build_method
from klflow.runtime import special_tokens
from klflow.train import load_data
from klflow.trained import TrainedModel


class CellRunner(Protocol):
    """Makes and scores the cells of one kind of bench: {"result": ..., and what else the report reads}."""

    def cached(self, cell: CellPlan) -> dict[str, Any] | None: ...

    def run(self, cell: CellPlan, ckpt: Checkpoint, method: Method) -> dict[str, Any]: ...


def run_bench(preset: BenchPreset, out: Path, progress: bool = True, log: Callable[[str], None] = print,
              models: list[str] | None = None) -> dict[str, Any] | None:
    """Run (or finish) the bench of `preset` in `out`; returns what results.json holds.

    With `models`, only a part: those models are trained and their cells made and scored, into the same cache,
    and None is returned (the side-by-side speed and the report need the whole bench).
    """
    started = time.perf_counter()
    out = out.expanduser().resolve()
    machine = describe_machine()
    config = preset.experiment
    data = load_data(config, progress)
    tokenizer = data.tokenizer()
    specials = special_tokens(tokenizer)
    plan = make_plan(preset, tokenizer.vocab_size, specials)
    if models is not None:
        plan = part_of_plan(plan, models)
    inputs = None if preset.task.kind == "unconditional" else task_inputs(preset, data)  # checked before training
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "preset.json", preset.to_dict())
    log(f"klflow bench {preset.name}: {len(plan.models)} models x {config.train.max_steps} steps, "
        f"{len(plan.cells)} sampling cells -> {out}")

    trained = {}
    for model in plan.models:  # a distilled student comes after its teacher (make_plan's order)
        if model.distillation is not None:
            model, distilled = distilled_student(model, out, log)
            trained[model.key] = {**train_model(model, out, progress, log), "distillation": distilled}
        else:
            trained[model.key] = train_model(model, out, progress, log)
    device = resolve_device(config.train.device)
    speed = None if models is not None else measure_training_speed(preset, data, specials, device, out, log)

    if inputs is None:
        data_record, runner = _unconditional(preset, plan, data, out, device, progress, log)
    else:
        data_record, runner = None, TaskCells(preset, inputs, out, device, progress)
        log(f"task {inputs.kind}: {inputs.info['how']}")
    cells = _run_cells(plan, out, device, runner, log)
    if models is not None:
        log(f"part {', '.join(models)} done: {len(plan.models)} models, {len(cells)} cells")
        return None

    machine["load_average_at_end"] = _load_average()
    data_info = {"dir": str(data.dir), "source": data.meta.get("source"), "vocab_size": tokenizer.vocab_size,
                 "train_tokens": data.meta.get("n_train_tokens"), "val_tokens": data.meta.get("n_val_tokens")}
    results = build_results(preset, plan, trained, speed, data_record, cells, machine, data_info,
                            time.perf_counter() - started, inputs.info if inputs else None)
    write_json(out / "results.json", results)
    write_markdown(results, out / "RESULTS.md")
    write_plots(results, out / "plots")
    log(f"wrote {out / 'results.json'}, {out / 'RESULTS.md'} and {out / 'plots'}")
    return results


def part_of_plan(plan: BenchPlan, models: list[str]) -> BenchPlan:
    """The models named in `models` and their cells (the sweeps' tables are left to the whole bench); a distilled
    student's teacher is trained too, for its samples, without its cells."""
    known = [model.key for model in plan.models]
    unknown = [key for key in models if key not in known]
    if unknown or not models:
        raise KLFlowError(f"--models names {', '.join(unknown) or 'no model'}; "
                          f"the bench's models are {', '.join(known)}")
    teachers = {model.distillation.teacher for model in plan.models
                if model.key in models and model.distillation is not None}
    return BenchPlan([model for model in plan.models if model.key in models or model.key in teachers],
                     [cell for cell in plan.cells if cell.model in models], [], [], [], [])


def distilled_student(student: ModelPlan, out: Path, log: Callable[[str], None]) -> tuple[ModelPlan, dict[str, Any]]:
    """The student to train on its teacher's samples, and the record of those samples: drawn from the trained
    teacher into out/distilled/KEY (klflow.distill.distill) unless already there, with the seconds they took."""
    spec = student.distillation
    assert spec is not None
    folder = out / "distilled" / spec.key
    record_file = folder.parent / f"{spec.key}.json"
    record = read_json(record_file)
    if record is None:
        log(f"{student.key}: drawing {spec.num_samples} sequences of {spec.teacher} -> {folder}")
        teacher = TrainedModel(out / "runs" / spec.teacher, student.config.train.device)
        started = time.perf_counter()
        data = distill(teacher, folder, spec.num_samples, steps=spec.steps, seed=spec.seed,
                       batch_size=spec.batch_size, **spec.options)
        record = {"teacher": spec.teacher, "options": spec.options, "steps": spec.steps,
                  "num_samples": spec.num_samples, "seed": spec.seed, "train_tokens": data.meta.get("n_train_tokens"),
                  "seconds": time.perf_counter() - started, "dir": str(folder)}
        write_json(record_file, record)
    config = merge_settings(student.config.to_dict(), {("data", "dir"): str(folder)})
    return replace(student, config=config), record


def _unconditional(preset: BenchPreset, plan: BenchPlan, data: PreparedData, out: Path, device: torch.device,
                   progress: bool, log: Callable[[str], None]) -> tuple[dict[str, Any], UnconditionalCells]:
    """The data row (scored once, the MAUVE reference) and the cell runner of an unconditional bench."""
    evaluation = preset.sections.evaluation
    missing = mauve_available() if evaluation.mauve else None
    if missing:
        log(f"MAUVE skipped: {missing}")
        evaluation = replace(evaluation, mauve=False)
    config = preset.experiment
    evaluator_holder: list[Evaluator] = []

    def evaluator() -> Evaluator:
        if not evaluator_holder:
            log(f"loading the evaluator {evaluation.evaluator}")
            evaluator_holder.append(load_evaluator(evaluation.evaluator, resolve_device(evaluation.device)))
        return evaluator_holder[0]

    def validation() -> list:  # what a switch_entropy=data calibration runs on
        return validation_batches(data, config.data.layout, config.train.seq_len, config.train.eval_windows,
                                  min(16, config.train.eval_windows), **config.data.layout_options())

    n_reference = max(cell.num_samples for cell in plan.cells)
    data_record, reference = data_row(data, n_reference, config.train.seq_len, out, evaluation, evaluator, progress)
    runner = UnconditionalCells(preset, out, device, evaluator, evaluation, reference if evaluation.mauve else None,
                                validation, progress)
    return data_record, runner


def _run_cells(plan: BenchPlan, out: Path, device: torch.device, runner: CellRunner,
               log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Make and score every cell not already done, one model loaded at a time."""
    done: dict[str, dict[str, Any]] = {}
    for model in plan.models:
        ckpt = method = None  # loaded when a cell of this model needs samples
        for cell in (cell for cell in plan.cells if cell.model == model.key):
            result = runner.cached(cell)
            if result is None:
                log(f"[{len(done) + 1}/{len(plan.cells)}] {cell.label}, NFE {cell.nfe}, {cell.num_samples} samples")
                if ckpt is None:
                    ckpt = load_checkpoint(run_dir(out, model), device)
                    method = build_method(model.method, model.config, ckpt.tokenizer.vocab_size,
                                          special_tokens(ckpt.tokenizer))
                    method.restore(ckpt.state.get("learned", {}))
                result = runner.run(cell, ckpt, method)
            done[cell.key] = result
    return done


def describe_machine() -> dict[str, Any]:
    """The machine the numbers come from."""
    info = {"platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load_average_at_start": _load_average()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
