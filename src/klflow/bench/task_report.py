"""The rows and tables of a task bench: replies (BLEU / ROUGE-L Top-k and Avg) or code (pass@k, compiled@k)."""

from __future__ import annotations

from typing import Any

from klflow.bench.formatting import fmt
from klflow.bench.plan import CellPlan


def task_metrics(scores: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of a task cell: BLEU, smoothed BLEU (0-100) and ROUGE-L (0-1) Top-k and Avg, or pass@k
    and compiled@k."""
    if "bleu" in scores:
        names = [name for name in ("bleu", "bleu_smoothed", "rouge_l") if name in scores]  # older results lack one
        return {f"{name}_{kind}": scores[name][kind] for name in names for kind in ("top_k", "avg")}
    return dict(scores["scores"])


def task_row(cell: CellPlan, result: dict[str, Any], seed: int, training_steps: int) -> dict[str, Any]:
    """A task cell for results.json: its settings, the headline metrics, the full scores and the cost."""
    scores = result["scores"]
    return {
        "key": cell.key, "label": cell.label, "model": cell.model, "method": cell.method, "series": cell.series,
        "groups": cell.groups, "settings": cell.settings, "nfe": cell.nfe, "steps": cell.steps,
        "network_calls_mean": scores["generation"]["nfe_mean"], "num_samples": cell.num_samples, "seed": seed,
        "training_steps": training_steps, "metrics": task_metrics(scores),
        "canonical_pass_rate": scores.get("canonical_pass_rate"),
        "seconds": result["seconds"], "seconds_per_prompt": result["seconds_per_prompt"],
        "scores": scores, "samples_file": f"cells/{cell.key}/samples.jsonl",
    }


def task_markdown(results: dict[str, Any]) -> list[str]:
    """The task's table (every cell, by method / sampler and NFE) and one example."""
    task, rows = results["task"], results["cells"]
    k = rows[0]["num_samples"]
    if task["kind"] == "reply":
        lines = [f"## Reply generation ({task['n_prompts']} held-out prompts of {task['source']}, k = {k} replies each)",
                 "", "BLEU as the paper's evaluation computes it (Hugging Face evaluate's bleu: unsmoothed, 4-grams, "
                 "0-100), sacrebleu's smoothed sentence BLEU beside it, and ROUGE-L F1 (0-1) against the real reply: "
                 "Top-k is the best of the k replies, Avg their mean, both averaged over prompts.", "",
                 f"| method / sampler | NFE | network calls | BLEU Top-{k} | BLEU Avg | smoothed BLEU Top-{k} | "
                 f"smoothed BLEU Avg | ROUGE-L Top-{k} | ROUGE-L Avg | s / prompt |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in _ordered(rows):
            m = row["metrics"]
            lines.append(f"| {row['series']} | {row['nfe']} | {row['network_calls_mean']:.1f} | {fmt(m['bleu_top_k'], 2)} | "
                         f"{fmt(m['bleu_avg'], 2)} | {fmt(m.get('bleu_smoothed_top_k'), 2)} | "
                         f"{fmt(m.get('bleu_smoothed_avg'), 2)} | {fmt(m['rouge_l_top_k'], 3)} | {fmt(m['rouge_l_avg'], 3)} | "
                         f"{row['seconds_per_prompt']:.2f} |")
        return lines + _reply_example(rows)
    names = list(rows[0]["metrics"])
    lines = [f"## Code infilling ({task['n_problems']} of the {task['n_fitting']} {task['problems']} problems that fit; "
             f"k = {k} fillings each)", "",
             f"{task['n_holes']} line holes of {task['line_slot'] or 'their own'} positions ({task['fraction']:g} of the "
             f"solution lines, at least one per problem); skipped: {task['skipped']}. pass@k and compiled@k are the "
             f"unbiased estimates from k programs run in the sandbox with the problems' tests; the canonical programs "
             f"pass at {fmt(rows[0]['canonical_pass_rate'], 3)} through the same harness.", "",
             "| method / sampler | NFE | network calls | " + " | ".join(names) + " | s / problem |",
             "|---|---|---|" + "---|" * len(names) + "---|"]
    for row in _ordered(rows):
        lines.append(f"| {row['series']} | {row['nfe']} | {row['network_calls_mean']:.1f} | "
                     + " | ".join(fmt(row["metrics"][name], 3) for name in names) + f" | {row['seconds_per_prompt']:.2f} |")
    return lines + _infill_example(rows)


def _ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    series = list(dict.fromkeys(row["series"] for row in rows))
    return sorted(rows, key=lambda row: (series.index(row["series"]), row["nfe"]))


def _largest_nfe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each series' cell at its largest NFE."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["series"] not in best or row["nfe"] > best[row["series"]]["nfe"]:
            best[row["series"]] = row
    return list(best.values())


def _reply_example(rows: list[dict[str, Any]]) -> list[str]:
    example = rows[0]["scores"]["examples"][0]
    lines = ["", "An example (the first prompt; each method's first reply at its largest NFE):", "",
             f"- prompt: {_quote(example['prompt'])}", f"- reference: {_quote(example['reference'])}"]
    lines += [f"- {row['series']}: {_quote(row['scores']['examples'][0]['replies'][0])}" for row in _largest_nfe(rows)]
    return lines + [""]


def _infill_example(rows: list[dict[str, Any]]) -> list[str]:
    example = rows[0]["scores"]["examples"][0]
    lines = ["", f"An example ({example['task_id']}; each method's first filling at its largest NFE):", "",
             f"- removed: {_quote(' / '.join(line.strip() for line in example['removed']))}"]
    for row in _largest_nfe(rows):
        first = row["scores"]["examples"][0]
        lines.append(f"- {row['series']}: {_quote(' / '.join(fill.strip() for fill in first['filled'][0]))} "
                     f"({first['status'][0]})")
    return lines + [""]


def _quote(text: str) -> str:
    """Inline code for a table-free markdown line: one line, no backticks."""
    return "`" + " ".join(text.replace("`", "'").split())[:200] + "`" if text.strip() else "(empty)"
