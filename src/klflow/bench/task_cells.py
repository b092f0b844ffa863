"""Cells of a task bench: a model's replies to held-out prompts or fillings of code problems, scored.

The prompts (or problems) are chosen once, from the bench's data and window, and every cell gets
the same ones. A cell generates k samples of each (klflow.filling) and scores them at once
(klflow.evaluation.tasks: BLEU / ROUGE-L Top-k and Avg; pass@k and compiled@k in the sandbox),
timed together. cells/KEY/samples.jsonl holds every prompt or problem with its k generations
(and, for code, each program's sandbox status); cells/KEY/result.json the scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from klflow.bench.cells import cell_dir
from klflow.bench.plan import CellPlan
from klflow.bench.preset import HUMANEVAL, BenchPreset
from klflow.bench.store import read_json, write_json, write_jsonl
from klflow.checkpoint import Checkpoint
from klflow.data import PreparedData, humaneval_tasks
from klflow.errors import KLFlowError
from klflow.evaluation.tasks import infill_problems, reply_examples, score_infill, score_reply
from klflow.filling import CheckpointSampler
from klflow.jsonl import json_lines
from klflow.methods import Method

PROBLEM_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


@dataclass(frozen=True)
class TaskInputs:
    """The prompts (reply: (prompt ids, reference reply)) or problems (infill: InfillProblem) of every
    cell, and how they were chosen."""

    kind: str
    items: list[Any]
    info: dict[str, Any]


def task_inputs(preset: BenchPreset, data: PreparedData) -> TaskInputs:
    """The task's prompts or problems for the bench's data and window."""
    task, config = preset.task, preset.experiment
    seq_len = config.train.seq_len
    if task.kind == "reply":
        limit = config.data.max_prompt_len if config.data.max_prompt_len is not None else seq_len // 2
        examples = reply_examples(data, task.prompts, limit)
        info = {"data_dir": str(data.dir), "source": data.meta.get("source"), "max_prompt_len": limit,
                "n_prompts": len(examples),
                "how": f"{len(examples)} validation pairs with a prompt of 1..{limit} tokens, spread evenly over the "
                       "split; each reply is the generated text up to its first end-of-text"}
        return TaskInputs(task.kind, examples, info)
    tasks = load_problems(task.problems)
    slot = config.data.line_slot or 0
    problems, skipped = infill_problems(tasks, task.fraction, slot, data.tokenizer(), seq_len, preset.bench.seed)
    if not problems:
        raise KLFlowError(f"no problem of {task.problems} fits the window of {seq_len} tokens; raise train.seq_len")
    chosen = problems[: task.prompts]
    info = {"problems": task.problems, "n_tasks": len(tasks), "n_fitting": len(problems), "skipped": skipped,
            "n_problems": len(chosen), "n_holes": sum(len(p.template.holes) for p in chosen), "line_slot": slot,
            "fraction": task.fraction,
            "how": f"the first {len(chosen)} of the {len(problems)} problems that fit {seq_len} tokens once "
                   f"{task.fraction:g} of their solution lines (at least one) became line holes of "
                   f"{slot or 'their own'} positions; programs run in the sandbox with the problems' tests"}
    return TaskInputs(task.kind, chosen, info)


def load_problems(source: str) -> list[dict[str, Any]]:
    """HumanEval, or a JSONL file of problems in its format (task_id, prompt, canonical_solution, test, entry_point)."""
    if source == HUMANEVAL:
        return humaneval_tasks()
    try:
        lines = Path(source).expanduser().read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise KLFlowError(f"task.problems: cannot read {source} ({err.strerror})") from None
    problems = []
    for number, problem in json_lines(lines, f"task.problems: {source}"):
        missing = [name for name in PROBLEM_FIELDS if not isinstance(problem, dict) or name not in problem]
        if missing:
            raise KLFlowError(f"task.problems: {source} line {number} lacks {', '.join(missing)}")
        problems.append(problem)
    if not problems:
        raise KLFlowError(f"task.problems: {source} holds no problems")
    return problems


class TaskCells:
    """How the runner makes and scores a cell of a task bench (see the module docstring)."""

    def __init__(self, preset: BenchPreset, inputs: TaskInputs, out: Path, device: torch.device, progress: bool) -> None:
        self.preset = preset
        self.inputs = inputs
        self.out = out
        self.device = device
        self.progress = progress

    def cached(self, cell: CellPlan) -> dict[str, Any] | None:
        result = read_json(cell_dir(self.out, cell) / "result.json")
        return {"result": result} if result is not None and result["spec"] == cell.spec else None

    def run(self, cell: CellPlan, ckpt: Checkpoint, method: Method) -> dict[str, Any]:
        """Generate and score; method is the checkpoint's (the sampler is rebuilt with the cell's options)."""
        bench, task = self.preset.bench, self.preset.task
        sampler = CheckpointSampler.load(ckpt, dict(cell.options), self.device, cell.spec["seq_len"],
                                         bench.sample_precision)
        started = time.perf_counter()
        common = dict(steps=cell.steps, seed=bench.seed, max_rows=bench.sample_batch_size, progress=self.progress,
                      keep_samples=True)
        if self.inputs.kind == "reply":
            scores = score_reply(sampler, self.inputs.items, cell.num_samples, **common)
        else:
            scores = score_infill(sampler, self.inputs.items, cell.num_samples, task.pass_k, **common)
        seconds = time.perf_counter() - started
        folder = cell_dir(self.out, cell)
        write_jsonl(folder / "samples.jsonl", scores.pop("samples"))
        result = {"spec": cell.spec, "task": self.inputs.info, "scores": scores, "seconds": seconds,
                  "seconds_per_prompt": seconds / len(self.inputs.items), "device": str(self.device),
                  "precision": bench.sample_precision,
                  "how": "seconds: wall time of generating every prompt's k samples (rows of several prompts batched "
                         "up to bench.sample_batch_size) and scoring them"}
        write_json(folder / "result.json", result)
        return {"result": result}
