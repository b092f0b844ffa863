"""The evaluation report: a JSON record of every number and how it was made, and a terminal table."""

from __future__ import annotations

import json
from collections.abc import Sequence
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
from klflow.outputs import write_atomic

PROTOCOL = {
    "gen_ppl": PPL_DEFINITIONS,
    "scored_tokens": "each text re-tokenized by the evaluator, cut after its first end-of-text, truncated to max_length "
                     "tokens, scored after the end-of-text token as context (so its first token is scored too); a row "
                     "longer than the evaluator's window_positions W is scored in windows of W advancing by W // 2, "
                     "every token once, with at least W - W // 2 tokens of context",
    "entropy": "unigram entropy of each text's scored evaluator token ids (unpadded), nats, mean over texts",
    "distinct_n": "unique / total word n-grams over all texts together (whitespace words)",
    "repetition_n": "1 - unique / total word n-grams within a text, mean over texts (whitespace words)",
    "mauve": "Pillutla et al. 2021, computed by mauve-text with its defaults: final-layer hidden state of the "
             "evaluator at each text's last kept token, L2-normalized, PCA to 90% variance, faiss k-means on the union "
             "(k = max(2, round(min(n_p, n_q) / 10)), 5 restarts, 500 iterations), area under the divergence curve "
             "(25 mixtures, scaling 5); samples against an equal number of reference texts, once per evaluator and "
             "k-means seed: score = the mean, min-max = the range over the seeds; two MAUVE whose ranges overlap "
             "are no different",
}


def build_report(
    samples: SampleSet,
    sample_row: UnconditionalRow,
    evaluators: Sequence[Evaluator],
    ppl_mode: str,
    max_length: int,
    data_row: UnconditionalRow | None = None,
    reference: dict[str, Any] | None = None,
    mauve: Sequence[MauveResult | None] | None = None,
    seconds: float | None = None,
) -> dict[str, Any]:
    """Everything `klflow eval` measured, with the evaluators, counts, modes, units and generation settings.

    Each row's "judged" list holds one entry per evaluator (in the order of "evaluators"), named
    by its "evaluator" field; `mauve` is the samples-vs-reference score under each evaluator.
    """
    rows = [sample_row.to_dict()] + ([data_row.to_dict()] if data_row else [])
    for row in rows:
        for judged in row["judged"]:
            judged["gen_ppl_headline"] = judged["gen_ppl"][ppl_mode]
            judged["mauve"] = None  # the reference row is what MAUVE compares against
    for judged, score in zip(rows[0]["judged"], mauve or [None] * len(evaluators), strict=True):
        judged["mauve"] = score.to_dict() if score else None
    return {
        "klflow_version": klflow.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "samples_file": str(samples.path),
        "n_samples": len(samples.texts),
        "generation": samples.settings(),
        "evaluators": [evaluator.describe() | {"max_length_tokens": max_length} for evaluator in evaluators],
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
    write_atomic(path, json.dumps(report, indent=2) + "\n")


def format_table(report: dict[str, Any]) -> str:
    """The report for a terminal: settings; per evaluator, a line per row with entropy between the two
    perplexities; then the evaluator-free n-gram statistics of each row."""
    mode = report["gen_ppl_mode"]
    other = next(m for m in PPL_MODES if m != mode)
    generation = report["generation"]
    settings = ", ".join(f"{key}={generation[key]}" for key in ("sampler", "steps", "nfe", "seed", "seq_len")
                         if key in generation)
    judged_lines = [["row", "evaluator", "tok/text", f"gen-PPL {mode}", "H nats", f"gen-PPL {other}", "MAUVE"]]
    for index, evaluator in enumerate(report["evaluators"]):
        for row in report["rows"]:
            judged = row["judged"][index]
            mauve = judged.get("mauve")
            judged_lines.append([
                row["name"], evaluator["name"], f"{judged['evaluator_tokens']['mean_per_text']:.1f}",
                f"{judged['gen_ppl'][mode]:.2f}", f"{judged['entropy_nats']:.3f}", f"{judged['gen_ppl'][other]:.2f}",
                format_mauve(mauve) if mauve else "-",
            ])
    text_lines = [["row", "texts", "words/text", *(f"dist-{n}" for n in DISTINCT_NS), *(f"rep-{n}" for n in REPETITION_NS)]]
    for row in report["rows"]:
        text_lines.append([
            row["name"], str(row["n_texts"]), f"{row['mean_words_per_text']:.1f}",
            *(_fraction(row["distinct"][f"distinct-{n}"]) for n in DISTINCT_NS),
            *(_fraction(row["repetition"][f"rep-{n}"]) for n in REPETITION_NS),
        ])
    reference = report.get("reference") or {}
    notes = [f"samples: {report['samples_file']} ({report['n_samples']} texts; {settings or 'no generation settings recorded'})"]
    notes += [f"evaluator {evaluator['name']}: {evaluator['model']}, {evaluator['dtype']}, max {evaluator['max_length_tokens']} "
              f"tokens, windows of {evaluator['window_positions'] or 'unlimited'} positions"
              for evaluator in report["evaluators"]]
    notes += [
        f"gen-PPL {mode} (headline) = {PPL_DEFINITIONS[mode]}; H = unigram entropy of evaluator tokens, nats, mean over texts",
        f"reference: {reference.get('description', 'none')}",
    ]
    scored = [judged["mauve"] for row in report["rows"] for judged in row["judged"] if judged.get("mauve")]
    if scored:
        notes.append(f"MAUVE: mean (min-max) over k-means seeds {scored[0]['seeds']}; a difference inside the range "
                     "is no difference")
    return "\n".join(notes + [""] + _aligned(judged_lines, 2) + [""] + _aligned(text_lines, 1))


def format_mauve(record: dict[str, Any]) -> str:
    """A MAUVE record as its mean and min-max range over k-means seeds (the mean alone for a record without one)."""
    if "min" not in record:
        return f"{record['score']:.3f}"
    return f"{record['score']:.3f} ({record['min']:.3f}-{record['max']:.3f})"


def _aligned(lines: list[list[str]], names: int) -> list[str]:
    """Columns padded to their widest cell: the first `names` left-aligned, the numbers right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(cell.ljust(width) if i < names else cell.rjust(width)
                      for i, (cell, width) in enumerate(zip(line, widths, strict=True))) for line in lines]


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
