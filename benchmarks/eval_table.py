"""A table and a plot of `klflow eval --out` reports: samples files scored against one reference.

    python benchmarks/eval_table.py NAME=REPORT.json [NAME=REPORT.json ...] [--plot FILE.png]

Prints one markdown row per report (gen-PPL in the report's headline mode, unigram entropy, distinct-2, rep-4,
MAUVE as mean (min-max over its k-means seeds)) and the data row of the first report; every report must score
the same reference texts with the same judge (the same data row), or the rows would not compare. --plot draws gen-PPL against entropy,
each point labelled with its MAUVE, the data row as a star: a lower gen-PPL only counts at an entropy near the
data's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def scores(row: dict[str, Any]) -> dict[str, Any]:
    """gen-PPL (headline), entropy, distinct-2, rep-4 and MAUVE (None for the data row) of one report row."""
    judged = row["judged"][0]
    return {"gen_ppl": judged["gen_ppl_headline"], "entropy": judged["entropy_nats"],
            "distinct_2": row["distinct"]["distinct-2"], "rep_4": row["repetition"]["rep-4"],
            "mauve": judged["mauve"]}


def read(named: list[str]) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """(name, scores) per report and the data row's scores; a one-line error if the references differ."""
    rows, data, reference = [], None, None
    for item in named:
        name, sep, file = item.partition("=")
        if not sep:
            raise SystemExit(f"eval_table.py: give NAME=REPORT.json, got {item!r}")
        report = json.loads(Path(file).read_text())
        by_name = {row["name"]: row for row in report["rows"]}
        # The same texts under the same judge score the same data row (a distilled student's folder keeps a copy
        # of the real validation split, so the reference's path may differ).
        key = (report["evaluators"][0]["model"], report["reference"]["n_texts"], by_name["data"]["distinct"],
               by_name["data"]["judged"][0]["gen_ppl"])
        if reference not in (None, key):
            raise SystemExit(f"eval_table.py: {file} scores another reference or judge than the first report")
        reference = key
        rows.append((name, scores(by_name["samples"])))
        data = data or scores(by_name["data"])
    return rows, data


def markdown(rows: list[tuple[str, dict[str, Any]]], data: dict[str, Any]) -> str:
    lines = ["| cell | gen-PPL | entropy | distinct-2 | rep-4 | MAUVE |", "|---|---|---|---|---|---|"]
    for name, s in [*rows, ("data", data)]:
        mauve = s["mauve"]
        text = "" if mauve is None else f"{mauve['score']:.3f} ({mauve['min']:.3f}-{mauve['max']:.3f})"
        lines.append(f"| {name} | {s['gen_ppl']:.1f} | {s['entropy']:.3f} | {s['distinct_2']:.3f} | "
                     f"{s['rep_4']:.3f} | {text} |")
    return "\n".join(lines)


def plot(rows: list[tuple[str, dict[str, Any]]], data: dict[str, Any], file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5.5))
    for name, s in rows:
        axis.scatter(s["entropy"], s["gen_ppl"], s=30)
        axis.annotate(f"{name}\nMAUVE {s['mauve']['score']:.2f}", (s["entropy"], s["gen_ppl"]), fontsize=7,
                      xytext=(4, 4), textcoords="offset points")
    axis.scatter(data["entropy"], data["gen_ppl"], marker="*", s=160, color="black", label="data (held-out)")
    axis.set_yscale("log")
    axis.set_xlabel("unigram entropy of the samples (nats)")
    axis.set_ylabel("gen-PPL (log scale; lower is better at equal entropy)")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left")
    figure.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(file, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="NAME=REPORT.json, a `klflow eval --out` report")
    parser.add_argument("--plot", type=Path, help="write gen-PPL against entropy here")
    args = parser.parse_args(argv)
    rows, data = read(args.reports)
    print(markdown(rows, data))
    if args.plot:
        plot(rows, data, args.plot)


if __name__ == "__main__":
    main()
