"""Real-task evaluation of a checkpoint: chit-chat reply generation and HumanEval line infilling.

reply:  held-out prompt -> reply pairs (default chitchat-pairs: a turn -> the next turn). Each
        prompt, clamped as the pairs layout clamps it (at most max_prompt_len tokens, default
        seq_len // 2), gets k replies: the generated text up to its first end-of-text. Each reply
        is scored by BLEU (the paper's, unsmoothed; smoothed beside it) and ROUGE-L F1 against the real reply; Top-k (best of k) and
        Avg (mean of k), averaged over prompts (klflow.evaluation.conditional).
infill: HumanEval problems (prompt = signature + docstring, then the canonical solution) with a
        fraction of the solution's non-blank lines replaced by line holes `<|hole-line:S|>`, the
        indentation kept (klflow.infill). S is the line slot the model was trained with
        (data.line_slot) unless given; S = 0 gives each hole its line's own token count (which
        tells the model the length). Only lines that fit a slot are removed, at least one per
        problem. The filled text is the program; it runs in the sandbox with the problem's tests:
        pass@k and compiled@k (klflow.evaluation.code_metrics). Problems whose text does not fit
        the window, or with no line that fits a slot, are skipped and counted. The canonical
        programs of the problems used are run too: their pass rate checks the harness (1.0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from klflow.checkpoint import load_checkpoint
from klflow.data import PreparedData, check_compatible, humaneval_tasks
from klflow.distributed import resolve_device
from klflow.errors import KLFlowError
from klflow.evaluation.code_metrics import CodeProblem, code_metrics
from klflow.evaluation.conditional import conditional_scores
from klflow.evaluation.reference import open_or_prepare
from klflow.filling import CheckpointSampler, Filled
from klflow.infill import Template, Tokenizer, continuation, parse
from klflow.progress import progress_bar

TASKS = ("reply", "infill")
REPLY_DATA = "chitchat-pairs"
_EXAMPLES = 3  # prompts/problems shown in a report


def reply_examples(data: PreparedData, n: int, max_prompt_len: int) -> list[tuple[list[int], str]]:
    """Up to n validation (prompt ids, reference reply) pairs, spread evenly over the pairs whose
    prompt has 1..max_prompt_len tokens and whose reply is not empty."""
    tokens, offsets, prompts = data.tokens("val"), data.offsets("val"), data.prompt_lengths("val")
    tokenizer = data.tokenizer()
    usable = []
    for start, end, prompt in zip(offsets[:-1], offsets[1:], prompts):
        end -= int(tokens[end - 1] == tokenizer.eot_id)
        if 1 <= prompt <= max_prompt_len and end > start + prompt:
            usable.append((int(start), int(end), int(prompt)))
    if not usable:
        raise KLFlowError(f"{data.dir} has no validation prompt/reply pairs with a prompt of at most {max_prompt_len} tokens")
    chosen = np.unique(np.rint(np.linspace(0, len(usable) - 1, min(n, len(usable)))).astype(np.int64))
    return [(tokens[s : s + p].tolist(), tokenizer.decode(tokens[s + p : e].tolist()).strip())
            for s, e, p in (usable[i] for i in chosen)]


def evaluate_reply(checkpoint: str | Path, n_prompts: int = 50, num_samples: int = 5, steps: int = 64,
                   options: dict[str, Any] | None = None, data: str | None = None, seed: int = 0,
                   device: str = "auto", max_rows: int = 64, progress: bool = True,
                   seq_len: int | None = None) -> dict[str, Any]:
    """Reply generation scored by BLEU / ROUGE-L Top-k and Avg (see the module docstring).

    data: a prepared folder or a corpus source with prompt/reply pairs; default the checkpoint's
    training data when it has pairs, else chitchat-pairs (prepared with the checkpoint's tokenizer).
    options: generate() keywords of the checkpoint's method (sampler, t_star, select, ...);
    seq_len: the window (default the training length).
    """
    _check_counts(n_prompts, num_samples, steps)
    started = time.perf_counter()
    where = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, where)
    sampler = CheckpointSampler.load(ckpt, dict(options or {}), where, seq_len)
    prepared = _reply_data(ckpt, data)
    config = ckpt.experiment()
    limit = config.data.max_prompt_len if config.data.max_prompt_len is not None else sampler.seq_len // 2
    examples = reply_examples(prepared, n_prompts, limit)
    scores = score_reply(sampler, examples, num_samples, steps, seed, max_rows, progress)
    return {"task": "reply", "data_dir": str(prepared.dir), "source": prepared.meta.get("source"),
            "max_prompt_len": limit, **scores, "seconds": round(time.perf_counter() - started, 1)}


def score_reply(sampler: CheckpointSampler, examples: Sequence[tuple[list[int], str]], num_samples: int, steps: int,
                seed: int = 0, max_rows: int = 64, progress: bool = True, keep_samples: bool = False) -> dict[str, Any]:
    """num_samples replies to each (prompt ids, reference) example, scored by BLEU / ROUGE-L Top-k and Avg.

    keep_samples: also return every prompt with its reference and replies under "samples".
    """
    templates = [continuation(prompt, sampler.tokenizer, sampler.seq_len) for prompt, _ in examples]
    results = _fill(sampler, templates, num_samples, steps, seed, max_rows, progress, "reply")
    replies = [[sample.fills[0].strip() for sample in samples] for samples in results]
    scores = conditional_scores([reference for _, reference in examples], replies)
    records = [{"prompt": template.pieces[0].text, "reference": reference, "replies": group}
               for template, (_, reference), group in zip(templates, examples, replies)]
    return {**scores, "generation": _generation(sampler, results, steps, seed), "examples": records[:_EXAMPLES],
            **({"samples": records} if keep_samples else {})}


@dataclass(frozen=True)
class InfillProblem:
    """A code problem with holes: the text with markers, its template, what was removed, its tests."""

    task_id: str
    text: str
    template: Template
    removed: tuple[str, ...]
    tests: str
    reference: str  # the complete program


def infill_problems(tasks: Sequence[dict[str, Any]], fraction: float, line_slot: int, tokenizer: Tokenizer,
                    seq_len: int, seed: int = 0) -> tuple[list[InfillProblem], dict[str, int]]:
    """HumanEval-format tasks (prompt, canonical_solution, test, entry_point) with lines removed.

    Returns the problems that fit the window and the counts of those skipped. Which lines are
    removed depends only on (seed, the task's index).
    """
    _check_infill_settings(fraction, line_slot)
    problems, skipped = [], {"too_long": 0, "no_line_fits": 0}
    for index, task in enumerate(tasks):
        rng = np.random.default_rng([seed, index])
        holed = _remove_lines(task["canonical_solution"], fraction, line_slot, tokenizer, rng)
        if holed is None:
            skipped["no_line_fits"] += 1
            continue
        solution, removed = holed
        template = parse(task["prompt"] + solution, tokenizer)
        if template.length > seq_len:
            skipped["too_long"] += 1
            continue
        tests = f"{task['test']}\n\ncheck({task['entry_point']})\n"
        problems.append(InfillProblem(task["task_id"], task["prompt"] + solution, template, tuple(removed), tests,
                                      task["prompt"] + task["canonical_solution"]))
    return problems, skipped


def score_infill(sampler: CheckpointSampler, problems: Sequence[InfillProblem], num_samples: int, ks: Sequence[int],
                 steps: int, seed: int = 0, max_rows: int = 64, progress: bool = True,
                 keep_samples: bool = False) -> dict[str, Any]:
    """Fill every problem num_samples times, run the programs with their tests: pass@k, compiled@k.

    keep_samples: also return every problem's fillings and their statuses under "samples".
    """
    if not problems:
        raise KLFlowError("no infilling problem fits the model's window; use a longer seq_len")
    results = _fill(sampler, [p.template for p in problems], num_samples, steps, seed, max_rows, progress, "infill")
    programs = [[sample.text for sample in samples] for samples in results]
    metrics = code_metrics([CodeProblem(group, p.tests) for group, p in zip(programs, problems)], ks)
    canonical = code_metrics([CodeProblem([p.reference], p.tests) for p in problems], (1,))
    shown = [{"task_id": p.task_id, "holed": p.text, "removed": list(p.removed), "filled": [s.fills for s in samples[:2]],
              "status": [r.status for r in statuses[:num_samples]]}
             for p, samples, statuses in zip(problems[:_EXAMPLES], results, metrics.results)]
    scored = {"n_problems": len(problems), "n_holes": sum(len(p.template.holes) for p in problems), "k": num_samples,
              "scores": metrics.scores, "canonical_pass_rate": canonical.scores["pass@1"],
              "generation": _generation(sampler, results, steps, seed), "examples": shown}
    if keep_samples:
        scored["samples"] = [{"task_id": p.task_id, "removed": list(p.removed), "fills": [list(s.fills) for s in samples],
                              "status": [r.status for r in statuses[:num_samples]]}
                             for p, samples, statuses in zip(problems, results, metrics.results)]
    return scored


def evaluate_infill(checkpoint: str | Path, n_problems: int | None = None, fraction: float = 0.1,
                    num_samples: int = 10, ks: Sequence[int] = (1, 10), steps: int = 64,
                    options: dict[str, Any] | None = None, line_slot: int | None = None, seed: int = 0,
                    device: str = "auto", max_rows: int = 64, progress: bool = True,
                    tasks: Sequence[dict[str, Any]] | None = None, seq_len: int | None = None) -> dict[str, Any]:
    """HumanEval line infilling scored by pass@k in the sandbox (see the module docstring).

    n_problems: the first n problems that fit (default all); line_slot: default the checkpoint's
    data.line_slot, else 0 (each line's own length); tasks: HumanEval by default; seq_len: the
    window (default the training length).
    """
    _check_counts(n_problems or 1, num_samples, steps)
    _check_infill_settings(fraction, 0 if line_slot is None else line_slot)
    started = time.perf_counter()
    where = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, where)
    sampler = CheckpointSampler.load(ckpt, dict(options or {}), where, seq_len)
    trained_slot = ckpt.experiment().data.line_slot
    slot = line_slot if line_slot is not None else (trained_slot or 0)
    tasks = humaneval_tasks() if tasks is None else tasks
    problems, skipped = infill_problems(tasks, fraction, slot, sampler.tokenizer, sampler.seq_len, seed)
    fitting = len(problems)
    problems = problems[:n_problems] if n_problems is not None else problems
    scores = score_infill(sampler, problems, num_samples, ks, steps, seed, max_rows, progress)
    return {"task": "infill", "fraction": fraction, "line_slot": slot, "trained_line_slot": trained_slot,
            "n_tasks": len(tasks), "n_fitting": fitting, "skipped": skipped, **scores,
            "seconds": round(time.perf_counter() - started, 1)}


def _remove_lines(solution: str, fraction: float, line_slot: int, tokenizer: Tokenizer,
                  rng: np.random.Generator) -> tuple[str, list[str]] | None:
    """The solution with a fraction of its fitting non-blank lines turned into line holes, and those lines."""
    lines = solution.splitlines(keepends=True)
    sizes = [len(tokenizer.encode(line.strip() + "\n")) for line in lines]
    candidates = [i for i, line in enumerate(lines) if line.strip() and (line_slot == 0 or sizes[i] <= line_slot)]
    if not candidates:
        return None
    count = min(len(candidates), max(1, round(fraction * len(candidates))))
    chosen = set(rng.choice(candidates, size=count, replace=False).tolist())
    out = []
    for i, line in enumerate(lines):
        if i in chosen:
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}<|hole-line:{line_slot or sizes[i]}|>\n")
        else:
            out.append(line)
    return "".join(out), [lines[i] for i in sorted(chosen)]


def _fill(sampler: CheckpointSampler, templates: list[Template], num_samples: int, steps: int, seed: int,
          max_rows: int, progress: bool, name: str) -> list[list[Filled]]:
    with progress_bar(len(templates), name, "prompt", not progress) as bar:
        return sampler.fill(templates, num_samples, steps, seed, max_rows, progress=bar.update)


def _generation(sampler: CheckpointSampler, results: list[list[Filled]], steps: int, seed: int) -> dict[str, Any]:
    nfe = [sample.nfe for samples in results for sample in samples]
    return {**sampler.info, "steps": steps, "seed": seed, "nfe_mean": float(np.mean(nfe)) if nfe else 0.0}


def _reply_data(ckpt: Any, data: str | None) -> PreparedData:
    tokenizer_file = ckpt.dir / "tokenizer.json"
    recorded = ckpt.config.get("data_dir")
    if data is None and recorded and (Path(recorded) / "meta.json").is_file():
        trained_on = PreparedData.load(recorded)
        if trained_on.prompt_lengths("val").any():
            return trained_on
    prepared = open_or_prepare(data or REPLY_DATA, ckpt.config.get("experiment", {}).get("data", {}), tokenizer_file)
    check_compatible(prepared, ckpt.tokenizer)
    return prepared


def _check_infill_settings(fraction: float, line_slot: int) -> None:
    if not 0.0 < fraction <= 1.0:
        raise KLFlowError(f"the fraction of lines removed must lie in (0, 1], got {fraction}")
    if line_slot < 0:
        raise KLFlowError(f"line_slot must be >= 0 (0: each line's own length), got {line_slot}")


def _check_counts(n: int, num_samples: int, steps: int) -> None:
    if n < 1 or num_samples < 1 or steps < 1:
        raise KLFlowError(f"the number of prompts/problems, samples and steps must be >= 1, got {n}, {num_samples}, {steps}")
