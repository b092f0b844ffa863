"""The evaluation report: a JSON record of every number and how it was made, and a terminal table."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import klflow
from klflow.evaluation.evaluator import Evaluator
from klflow.evaluation.mauve import MauveResult
from klflow.evaluation.ngrams import DISTINCT_NS, REPETITION_NS
from klflow.evaluation.perplexity import PPL_DEFINITIONS, PPL_MODES
from klflow.evaluation.samples import SampleSet
from klflow.evaluation.unconditional import UnconditionalRow

PROTOCOL = {
    "gen_ppl": PPL_DEFINITIONS,
    "scored_tokens": "each text re-tokenized by the evaluator, cut after its first end-of-text, truncated to max_length "
                     "tokens, scored after the end-of-text token as context (so its first token is scored too)",
    "entropy": "unigram entropy of each text's scored evaluator token ids (unpadded), nats, mean over texts",
    "distinct_n": "unique / total word n-grams over all texts together (whitespace words)",
    "repetition_n": "1 - unique / total word n-grams within a text, mean over texts (whitespace words)",
    "mauve": "Pillutla et al. 2021: final-layer hidden state of the evaluator at each text's last kept token, "
             "L2-normalized, PCA to 90% variance, k-means on the union (k = max(2, round(min(n_p, n_q) / 10))), "
             "area under the divergence curve with scaling 5; samples against an equal number of reference texts",
}


def build_report(
    samples: SampleSet,
    sample_row: UnconditionalRow,
    evaluator: Evaluator,
    ppl_mode: str,
    max_length: int,
    data_row: UnconditionalRow | None = None,
    reference: dict[str, Any] | None = None,
    mauve: MauveResult | None = None,
    seconds: float | None = None,
) -> dict[str, Any]:
    """Everything `klflow eval` measured, with the evaluator, counts, modes, units and generation settings."""
    rows = [sample_row.to_dict()] + ([data_row.to_dict()] if data_row else [])
    for row in rows:
        row["gen_ppl_headline"] = row["gen_ppl"][ppl_mode]
        row["mauve"] = None  # the reference row is what MAUVE compares against
    rows[0]["mauve"] = mauve.to_dict() if mauve else None
    return {
        "klflow_version": klflow.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "samples_file": str(samples.path),
        "n_samples": len(samples.texts),
        "generation": samples.settings(),
        "evaluator": {"name": evaluator.name, "model": evaluator.description, "dtype": "float32",
                      "device": str(evaluator.device), "context_and_end_of_text_token": evaluator.eos_token,
                      "max_length_tokens": max_length},
        "gen_ppl_mode": ppl_mode,
        "units": {"gen_ppl": "perplexity (exp of nats per evaluator token)", "entropy": "nats",
                  "distinct_n": "fraction", "repetition_n": "fraction", "mauve": "area in [0, 1]"},
        "protocol": PROTOCOL,
        "reference": reference,
        "rows": rows,
        "seconds": seconds,
    }


def write_report(report: dict[str, Any], path: str | Path) -> None:
    """Write the report as indented JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def format_table(report: dict[str, Any]) -> str:
    """The report for a terminal: settings, one line per row, entropy between the two perplexities."""
    mode = report["gen_ppl_mode"]
    other = next(m for m in PPL_MODES if m != mode)
    generation = report["generation"]
    settings = ", ".join(f"{key}={generation[key]}" for key in ("sampler", "steps", "nfe", "seed", "seq_len")
                         if key in generation)
    header = ["row", "texts", "tok/text", f"gen-PPL {mode}", "H nats", f"gen-PPL {other}", "MAUVE"]
    header += [f"dist-{n}" for n in DISTINCT_NS] + [f"rep-{n}" for n in REPETITION_NS]
    lines = [[str(cell) for cell in header]]
    for row in report["rows"]:
        mauve = row.get("mauve")
        lines.append([
            row["name"], str(row["n_texts"]), f"{row['evaluator_tokens']['mean_per_text']:.1f}",
            f"{row['gen_ppl'][mode]:.2f}", f"{row['entropy_nats']:.3f}", f"{row['gen_ppl'][other]:.2f}",
            f"{mauve['score']:.3f}" if mauve else "-",
            *(_fraction(row["distinct"][f"distinct-{n}"]) for n in DISTINCT_NS),
            *(_fraction(row["repetition"][f"rep-{n}"]) for n in REPETITION_NS),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(line, widths, strict=True))) for line in lines]
    evaluator = report["evaluator"]
    reference = report.get("reference") or {}
    notes = [
        f"samples: {report['samples_file']} ({report['n_samples']} texts; {settings or 'no generation settings recorded'})",
        f"evaluator: {evaluator['model']}, {evaluator['dtype']}, max {evaluator['max_length_tokens']} tokens",
        f"gen-PPL {mode} (headline) = {PPL_DEFINITIONS[mode]}; H = unigram entropy of evaluator tokens, nats, mean over texts",
        f"reference: {reference.get('description', 'none')}",
    ]
    return "\n".join(notes + [""] + table)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
