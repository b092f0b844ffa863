"""results.json (every figure with how it was made) and RESULTS.md (the same as tables)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from statistics import mean
from typing import Any, Callable

import klflow
from klflow.bench.ablation_report import ablation_markdown, ablation_results
from klflow.bench.formatting import fmt, fmt_mauve, fmt_ranked_mauve, mauve_ranking
from klflow.bench.memory import describe as describe_memory
from klflow.bench.plan import BenchPlan, CellPlan
from klflow.bench.preset import BenchPreset
from klflow.bench.store import write_text_atomic
from klflow.bench.task_report import task_markdown, task_row
from klflow.evaluation.perplexity import PPL_DEFINITIONS
from klflow.evaluation.report import PROTOCOL


def build_results(preset: BenchPreset, plan: BenchPlan, trained: dict[str, dict[str, Any]], speed: dict[str, Any],
                  data_record: dict[str, Any] | None, cells: dict[str, dict[str, Any]], machine: dict[str, Any],
                  data: dict[str, Any], seconds: float, task: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the bench measured, each figure next to the settings that made it.

    data_record: the data row of an unconditional bench; task: how a task bench chose its prompts.
    """
    evaluation = preset.sections.evaluation
    mode = evaluation.ppl_mode
    if task is not None:
        rows = [task_row(cell, cells[cell.key]["result"], preset.bench.seed, trained[cell.model]["steps"])
                for cell in plan.cells]
    else:
        rows = [_unconditional_row(cell, cells[cell.key], mode, preset.bench.seed, trained[cell.model]["steps"])
                for cell in plan.cells]
    by_key = {row["key"]: row for row in rows}
    results = {
        "klflow_version": klflow.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": preset.to_dict(),
        "machine": machine,
        "wall_seconds_of_this_run": seconds,
        "task": None if task is None else {"kind": preset.task.kind, **task},
        "evaluator": None,
        "data": data,
        "data_row": None,
        "models": trained,
        "performance": {"training_step": speed, "sampling": [] if task is not None else _sampling_costs(rows)},
        "cells": rows,
        "sweeps": {
            "t_star": [{**point, **_headline(by_key[point["cell"]])} for point in plan.t_star],
            "beta": [{**point, "t_max": trained[point["model"]]["config"]["path"]["t_max"],
                      "val_loss": trained[point["model"]]["val_loss"], **_headline(by_key[point["cell"]])}
                     for point in plan.beta],
            "frontier": [{**point, **_headline(by_key[point["cell"]])} for point in plan.frontier],
        },
        "ablation": ablation_results(plan, trained, by_key) if plan.ablation else None,
    }
    if data_record is not None:
        data_scores = data_record["scores"]
        results["evaluator"] = {"name": evaluation.evaluator, "model": data_record.get("evaluator"), "dtype": "float32",
                                "max_length_tokens": evaluation.max_length, "gen_ppl_mode": mode,
                                "gen_ppl_definition": PPL_DEFINITIONS[mode], "protocol": PROTOCOL}
        results["data_row"] = {"gen_ppl": data_scores["gen_ppl"][mode], "entropy": data_scores["entropy_nats"],
                               "distinct_2": data_scores["distinct"]["distinct-2"], "n_texts": data_scores["n_texts"],
                               "how": data_record["how"], "scores": data_scores}
    return results


def _unconditional_row(cell: CellPlan, done: dict[str, Any], mode: str, seed: int, training_steps: int) -> dict[str, Any]:
    scores, sampling = done["result"]["scores"], done["sampling"]
    return {
        "key": cell.key, "label": cell.label, "model": cell.model, "method": cell.method, "series": cell.series,
        "groups": cell.groups, "settings": cell.settings, "nfe": cell.nfe, "steps": cell.steps,
        "network_calls_mean": mean(sampling["network_calls_per_batch"]), "num_samples": cell.num_samples,
        "seed": seed, "training_steps": training_steps,
        "gen_ppl": scores["gen_ppl"][mode], "entropy": scores["entropy_nats"],
        "mauve": scores["mauve"]["score"] if scores["mauve"] else None,
        "mauve_range": [scores["mauve"]["min"], scores["mauve"]["max"]] if scores["mauve"] else None,
        "distinct_2": scores["distinct"]["distinct-2"],
        "seconds_per_sample": sampling["seconds_per_sample"],
        "sampling": {k: v for k, v in sampling.items() if k != "spec"},
        "scores": scores, "evaluation_seconds": done["result"].get("seconds"),
        "samples_file": f"cells/{cell.key}/samples.jsonl",
    }


def _headline(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("label", "nfe", "num_samples", "gen_ppl", "entropy", "mauve", "mauve_range", "distinct_2")}


def _sampling_costs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seconds per sample and peak memory of the grid's cells, per method and sampler."""
    return [{"series": row["series"], "nfe": row["nfe"], "network_calls_mean": row["network_calls_mean"],
             "seconds_per_sample": row["seconds_per_sample"], "batch_size": row["sampling"]["batch_size"],
             "peak_memory": row["sampling"]["peak_memory"]} for row in rows if "grid" in row["groups"]]


def write_markdown(results: dict[str, Any], file: Path) -> None:
    write_text_atomic(file, markdown(results))


def markdown(results: dict[str, Any]) -> str:
    """RESULTS.md: the settings, then one table per experiment, then the costs."""
    preset = results["preset"]
    bench, experiment = preset["bench"], preset["experiment"]
    machine, evaluator, data, task = results["machine"], results["evaluator"], results["data_row"], results["task"]
    train = experiment["train"]
    cells = results["cells"]
    if task is None:
        scoring = (f"- Evaluator: {evaluator['model'] or evaluator['name']}; gen-PPL = {evaluator['gen_ppl_definition']} "
                   f"(mode `{evaluator['gen_ppl_mode']}`), entropy in nats, MAUVE against as many held-out texts as samples"
                   f"{_mauve_seeds(preset)}.")
        samples = f"{_counts(cells)} per cell"
    else:
        scoring = f"- Task `{task['kind']}`: {task['how']}."
        samples = f"{_counts(cells)} per {'prompt' if task['kind'] == 'reply' else 'problem'}"
    lines = [
        f"# klflow bench `{preset['name']}`", "",
        bench["description"] or "", "",
        f"- Machine: {machine['cpu']} ({machine['cpu_count']} cores{', GPU ' + machine['gpu'] if machine.get('gpu') else ''}), "
        f"torch {machine['torch']} with {machine['torch_threads']} threads; load average {machine['load_average_at_start']} "
        f"at the start, {machine['load_average_at_end']} at the end of the last run.",
        f"- Data: {experiment['data']['source'] if not experiment['data']['dir'] else experiment['data']['dir']}, "
        f"tokenizer {experiment['data']['tokenizer']} (V = {results['data']['vocab_size']}), {results['data']['train_tokens']:,} "
        f"training and {results['data']['val_tokens']:,} validation tokens; sequence length {train['seq_len']}"
        f"{', layout ' + experiment['data']['layout'] if experiment['data']['layout'] != 'packed' else ''}.",
        f"- Training, every model alike: {train['max_steps']} optimizer steps of {train['batch_size']} x {train['seq_len']} "
        f"tokens, {train['optimizer']} (lr {train['lr']}), precision {train['precision']}, seed {train['seed']}; "
        f"backbone {experiment['model']['n_layer']} layers x {experiment['model']['d_model']} wide.",
        scoring,
        f"- Samples: {samples}, seed {bench['seed']}, batches of {bench['sample_batch_size']}, "
        f"sampling precision {bench['sample_precision']}.",
        f"- Wall time of the last run: {results['wall_seconds_of_this_run'] / 60:.1f} min (cached work excluded).",
        "",
    ]
    if data is not None:
        lines += ["## Data row (held-out text, same evaluator)", "",
                  "| texts | gen-PPL | entropy | distinct-2 |", "|---|---|---|---|",
                  f"| {data['n_texts']} | {fmt(data['gen_ppl'], 1)} | {fmt(data['entropy'], 3)} | {fmt(data['distinct_2'], 3)} |",
                  ""]
    lines += ["## Training (equal steps and tokens)", "",
              "| model | steps | tokens | train time | tokens/s | final val loss | peak memory |", "|---|---|---|---|---|---|---|"]
    for key, model in results["models"].items():
        lines.append(f"| {key} | {model['steps']} | {model['tokens']:,} | {model['train_seconds'] / 60:.1f} min | "
                     f"{model['tokens_per_second']:,.0f} | {fmt(model['val_loss'], 4)} | {describe_memory(model['peak_memory'])} |")
    lines += ["", "Validation losses are each method's own objective (klflow: cross-entropy of p(x1 | x_t); ar: "
              "next-token; mdlm: NELBO bound; dfm: cross-entropy), not comparable across methods.", ""]
    lines += _distillations(results["models"])
    grid = [row for row in cells if "grid" in row["groups"]] if task is None else []
    if task is not None:
        lines += task_markdown(results)
    if grid:
        lines += ["## Quality against NFE", "", "gen-PPL (entropy) per cell; the data row is the target.", ""]
        lines += _grid_table(grid, lambda r: f"{fmt(r['gen_ppl'], 1)} ({fmt(r['entropy'], 2)})")
        lines += ["", "MAUVE against held-out text (higher is closer), mean (min-max over k-means seeds); **bold**: the "
                      "highest at its NFE; =: its range overlaps the highest's, no difference:", ""]
        lines += _grid_table(grid, _ranked_mauve(grid))
        lines += ["", "distinct-2 (unique word bigrams over all samples):", ""]
        lines += _grid_table(grid, lambda r: fmt(r["distinct_2"], 3))
    lines += _sweeps(results["sweeps"])
    if results["ablation"]:
        lines += ablation_markdown(results)
    lines += _performance(results, grid)
    lines += ["", "## How the numbers were made", ""]
    if evaluator is not None:
        lines += [f"- {name}: {text if isinstance(text, str) else '; '.join(f'{k}: {v}' for k, v in text.items())}"
                  for name, text in evaluator["protocol"].items()]
    lines += [f"- training speed: {results['performance']['training_step']['how']}"]
    if task is None:
        lines += ["- sampling time: wall time of the cell's generate() calls / samples; NFE is nominal, the network calls "
                  "each batch made are in results.json (mdlm skips calls while no token changes)"]
    lines += ["- every cell, with its seed, settings, sample file and full scores, is in results.json", ""]
    return "\n".join(lines)


def _distillations(models: dict[str, dict[str, Any]]) -> list[str]:
    """One line per distilled student: whose samples it trained on, and what they cost besides its own steps."""
    lines = []
    for key, model in models.items():
        distilled = model.get("distillation")
        if distilled is None:
            continue
        options = ", ".join(f"{k}={v}" for k, v in distilled["options"].items()) or "default sampler"
        teacher = models.get(distilled["teacher"])
        cost = f"{teacher['train_seconds'] / 60:.1f} min of the teacher's training and " if teacher else ""
        lines.append(f"- {key} trained on {distilled['num_samples']:,} sequences of {distilled['teacher']} ({options}; "
                     f"{distilled['train_tokens']:,} tokens), validated on the real text; its compute adds {cost}"
                     f"{distilled['seconds'] / 60:.1f} min of drawing them to its own training.")
    return [*lines, ""] if lines else []


def _sweeps(sweeps: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = []
    if sweeps["t_star"]:
        lines += ["", f"## t* sweep (hybrid, NFE {sweeps['t_star'][0]['nfe']})", "",
                  "t* = 0 is the randomized sampler and t* = t_max the ODE.", "",
                  "| t* / t_max | t* | gen-PPL | entropy | MAUVE |", "|---|---|---|---|---|"]
        for p in sorted(sweeps["t_star"], key=lambda p: p["fraction"]):
            lines.append(f"| {p['fraction']:.3f}{' (default)' if p['default'] else ''} | {p['t_star']:.4f} | "
                         f"{fmt(p['gen_ppl'], 1)} | {fmt(p['entropy'], 3)} | {fmt_mauve(p)} |")
    if sweeps["beta"]:
        lines += ["", f"## beta sweep (klflow retrained, same steps; {sweeps['beta'][0]['sampler']} at NFE "
                      f"{sweeps['beta'][0]['nfe']})", "",
                  "| beta | t_max | final val loss | gen-PPL | entropy | MAUVE |", "|---|---|---|---|---|---|"]
        for p in sorted(sweeps["beta"], key=lambda p: p["beta"]):
            t_max = p["t_max"] if p["t_max"] is not None else "calibrated"
            lines.append(f"| {p['beta']:g} | {t_max} | {fmt(p['val_loss'], 4)} | {fmt(p['gen_ppl'], 1)} | "
                         f"{fmt(p['entropy'], 3)} | {fmt_mauve(p)} |")
    if sweeps["frontier"]:
        lines += ["", "## gen-PPL against entropy (sampling knobs)", "",
                  "| method / sampler | setting | NFE | gen-PPL | entropy | MAUVE |", "|---|---|---|---|---|---|"]
        for p in sweeps["frontier"]:
            lines.append(f"| {p['series']} | {p['knob']} | {p['nfe']} | {fmt(p['gen_ppl'], 1)} | {fmt(p['entropy'], 3)} | "
                         f"{fmt_mauve(p)} |")
    return lines


def _performance(results: dict[str, Any], grid: list[dict[str, Any]]) -> list[str]:
    speed = results["performance"]["training_step"]
    lines = ["", "## Speed and memory, side by side", "",
             f"Training step, interleaved on one micro-batch of {speed['tokens_per_step']} tokens ({speed['dtype']}, "
             f"{speed['threads']} threads, load average {speed['load_average']}); matmul peak "
             f"{speed['matmul_peak_flops'] / 1e9:,.1f} GFLOP/s:", "",
             "| method | s / step | tokens/s | tokens/s vs klflow | MFU |", "|---|---|---|---|---|"]
    for name, row in speed["methods"].items():
        lines.append(f"| {name} | {row['seconds_per_step']:.4f} | {row['tokens_per_second']:,.0f} | "
                     f"{fmt(row['tokens_per_second_over_klflow'], 2)} | {row['mfu']:.1%} |")
    models = results["models"]
    if speed["klflow_over_ar_tokens_per_second"] is not None:
        runs = models["klflow"]["tokens_per_second"] / models["ar"]["tokens_per_second"]
        lines += ["", f"klflow / ar training tokens/s: **{speed['klflow_over_ar_tokens_per_second']:.2f}** interleaved "
                      f"(same backbone and batch); {runs:.2f} from the two training runs' own clocks (run at different "
                      "times, so load differences enter)."]
    if not grid:  # the task and ablation tables give their own times
        return lines
    lines += ["", "Sampling wall time per sample (seconds; NFE = network calls per sample batch):", ""]
    lines += _grid_table(grid, lambda r: f"{r['seconds_per_sample']:.3g}")
    lines += ["", "Peak memory of sampling (largest NFE of each method / sampler):", "",
              "| method / sampler | NFE | peak |", "|---|---|---|"]
    for series in dict.fromkeys(r["series"] for r in grid):
        row = max((r for r in grid if r["series"] == series), key=lambda r: r["nfe"])
        lines.append(f"| {series} | {row['nfe']} | {describe_memory(row['sampling']['peak_memory'])} |")
    return lines


def _mauve_seeds(preset: dict[str, Any]) -> str:
    seeds = preset.get("evaluation", {}).get("mauve_seeds")
    return f" (mauve-text; mean and min-max over {seeds} k-means seeds)" if seeds else ""


def _ranked_mauve(grid: list[dict[str, Any]]) -> Callable[[dict[str, Any]], str]:
    """A grid cell's MAUVE text, marked against the other cells at its NFE (formatting.mauve_ranking)."""
    marks = {}
    for nfe in {row["nfe"] for row in grid}:
        at_nfe = [row for row in grid if row["nfe"] == nfe]
        marks |= {row["key"]: mark for row, mark in zip(at_nfe, mauve_ranking(at_nfe), strict=True)}
    return lambda row: fmt_ranked_mauve(row, marks[row["key"]])


def _grid_table(grid: list[dict[str, Any]], cell_text) -> list[str]:
    nfes = sorted({row["nfe"] for row in grid})
    lines = ["| method / sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for series in dict.fromkeys(row["series"] for row in grid):
        by_nfe = {row["nfe"]: row for row in grid if row["series"] == series}
        lines.append(f"| {series} | " + " | ".join(cell_text(by_nfe[n]) if n in by_nfe else "" for n in nfes) + " |")
    return lines


def _counts(cells: list[dict[str, Any]]) -> str:
    counts = sorted({row["num_samples"] for row in cells})
    return " / ".join(str(c) for c in counts)
