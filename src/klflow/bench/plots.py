"""The bench's PNG plots, drawn from results.json alone (so they can be redrawn from a finished run).

- gen_ppl_vs_nfe.png: gen-PPL, entropy and MAUVE (error bars: min-max over k-means seeds) against NFE,
  one line per method and sampler;
- frontier.png: gen-PPL against entropy under the sampling knobs;
- t_star.png and beta.png: the sweeps;
- ablation_frontier.png: gen-PPL against entropy of every ablation model and setting, one panel per NFE;
- task.png (task benches): BLEU / ROUGE-L or pass@k against NFE, one line per method and sampler.
The data row (held-out text) is drawn as the target in each unconditional plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from klflow.bench.formatting import mauve_range
from klflow.errors import KLFlowError
from klflow.evaluation.evaluator import INSTALL_HINT


def write_plots(results: dict[str, Any], folder: Path) -> list[Path]:
    """Draw every plot the results have data for into `folder`; returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KLFlowError(f"the bench plots need matplotlib: {INSTALL_HINT}") from None
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("gen_ppl_vs_nfe", _nfe), ("frontier", _frontier), ("t_star", _t_star), ("beta", _beta),
                       ("ablation_frontier", _ablation), ("task", _task)):
        figure = draw(plt, results)
        if figure is None:
            continue
        figure.suptitle(f"klflow bench {results['preset']['name']}: {_evaluator(results)}", fontsize=9)
        figure.tight_layout()
        file = folder / f"{name}.png"
        figure.savefig(file, dpi=120)
        plt.close(figure)
        written.append(file)
    return written


def _nfe(plt, results: dict[str, Any]):
    grid = [row for row in results["cells"] if "grid" in row["groups"]]
    if results["task"] is not None or not grid:
        return None
    with_mauve = any(row["mauve"] is not None for row in grid)
    figure, axes = plt.subplots(1, 3 if with_mauve else 2, figsize=(16 if with_mauve else 11, 4.2))
    ppl, entropy = axes[:2]
    for i, series in enumerate(dict.fromkeys(row["series"] for row in grid)):
        rows = sorted((row for row in grid if row["series"] == series), key=lambda row: row["nfe"])
        style = "*" if len(rows) == 1 else "o-"
        ppl.plot([r["nfe"] for r in rows], [r["gen_ppl"] for r in rows], style, color=f"C{i}", label=series,
                 markersize=8)
        entropy.plot([r["nfe"] for r in rows], [r["entropy"] for r in rows], style, color=f"C{i}", label=series,
                     markersize=8)
        scored = [r for r in rows if r["mauve"] is not None]
        if scored:
            means = [r["mauve"] for r in scored]
            lows, highs = zip(*(mauve_range(r) for r in scored))
            below = [m - low for m, low in zip(means, lows)]
            above = [high - m for m, high in zip(means, highs)]
            axes[2].errorbar([r["nfe"] for r in scored], means, yerr=[below, above], fmt=style, color=f"C{i}",
                             capsize=3, markersize=8, label=series)
    data = results["data_row"]
    ppl.axhline(data["gen_ppl"], color="gray", linestyle="--", label="data")
    entropy.axhline(data["entropy"], color="gray", linestyle="--", label="data")
    if with_mauve:
        axes[2].set_ylim(0, 1.02)
    names = ("gen-PPL", "entropy (nats)", "MAUVE (bars: min-max over k-means seeds)")
    for axis, name in zip(axes, names):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("NFE (network calls per sample)")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    ppl.set_yscale("log")
    ppl.legend(fontsize=8)
    return figure


def _frontier(plt, results: dict[str, Any]):
    points = results["sweeps"]["frontier"]
    if not points:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for series in dict.fromkeys(p["series"] for p in points):
        rows = sorted((p for p in points if p["series"] == series), key=lambda p: p["entropy"])
        axis.plot([p["entropy"] for p in rows], [p["gen_ppl"] for p in rows], "o-", label=series)
        for p in rows:
            axis.annotate(p["knob"], (p["entropy"], p["gen_ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    data = results["data_row"]
    axis.plot([data["entropy"]], [data["gen_ppl"]], "k*", markersize=12, label="data")
    axis.set_yscale("log")
    axis.set_xlabel("entropy (nats)")
    axis.set_ylabel("gen-PPL")
    axis.set_title(f"NFE {results['preset']['frontier']['nfe']} (ar: the length); entropy below the data's "
                   "buys gen-PPL with repetition", fontsize=8)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def _t_star(plt, results: dict[str, Any]):
    points = sorted(results["sweeps"]["t_star"], key=lambda p: p["fraction"])
    if not points:
        return None
    return _sweep(plt, results, [p["fraction"] for p in points], points, "t* / t_max (0: randomized, 1: ODE)",
                  f"klflow hybrid, NFE {points[0]['nfe']}", log_x=False)


def _beta(plt, results: dict[str, Any]):
    points = sorted(results["sweeps"]["beta"], key=lambda p: p["beta"])
    if not points:
        return None
    return _sweep(plt, results, [p["beta"] for p in points], points, "beta (target smoothing)",
                  f"klflow retrained per beta, {points[0]['sampler']} at NFE {points[0]['nfe']}", log_x=True)


def _sweep(plt, results: dict[str, Any], xs: list[float], points: list[dict[str, Any]], xlabel: str, title: str,
           log_x: bool):
    figure, ppl = plt.subplots(figsize=(6.5, 4.2))
    ppl.plot(xs, [p["gen_ppl"] for p in points], "o-", color="C0", label="gen-PPL")
    ppl.axhline(results["data_row"]["gen_ppl"], color="C0", linestyle="--", alpha=0.6, label="data gen-PPL")
    ppl.set_yscale("log")
    ppl.set_ylabel("gen-PPL", color="C0")
    entropy = ppl.twinx()
    entropy.plot(xs, [p["entropy"] for p in points], "s-", color="C1", label="entropy")
    entropy.axhline(results["data_row"]["entropy"], color="C1", linestyle=":", alpha=0.6, label="data entropy")
    entropy.set_ylabel("entropy (nats)", color="C1")
    if log_x:
        ppl.set_xscale("log")
    ppl.set_xlabel(xlabel)
    ppl.set_title(title, fontsize=9)
    ppl.grid(alpha=0.3)
    handles = ppl.get_legend_handles_labels()
    extra = entropy.get_legend_handles_labels()
    ppl.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8)
    return figure


def _ablation(plt, results: dict[str, Any]):
    ablation = results["ablation"]
    if not ablation:
        return None
    nfes, points = ablation["nfe"], ablation["points"]
    models = [m["model"] for m in ablation["models"]]
    markers = "osD^v<>pPX*h"
    figure, axes = plt.subplots(1, len(nfes), figsize=(4.2 * len(nfes) + 3.5, 4.4), sharey=True, squeeze=False)
    data = results["data_row"]
    for axis, nfe in zip(axes[0], nfes):
        for i, model in enumerate(models):
            for j, setting in enumerate(ablation["settings"]):
                for p in (p for p in points if p["nfe"] == nfe and p["model"] == model and p["setting"] == setting):
                    axis.plot(p["entropy"], p["gen_ppl"], markers[j % len(markers)], color=f"C{i}", markersize=7,
                              markerfacecolor=f"C{i}" if p["frontier"] else "none")
        axis.plot([data["entropy"]], [data["gen_ppl"]], "k*", markersize=12)
        axis.set_yscale("log")
        axis.set_xlabel("entropy (nats)")
        axis.set_title(f"NFE {nfe}", fontsize=9)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("gen-PPL (filled: on the frontier)")
    handles = [plt.Line2D([], [], color=f"C{i}", marker="o", linestyle="", label=m) for i, m in enumerate(models)]
    handles += [plt.Line2D([], [], color="gray", marker=markers[j % len(markers)], linestyle="", markerfacecolor="none",
                           label=s) for j, s in enumerate(ablation["settings"])]
    handles.append(plt.Line2D([], [], color="k", marker="*", linestyle="", markersize=10, label="data"))
    axes[0][-1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return figure


def _task(plt, results: dict[str, Any]):
    task = results["task"]
    if task is None:
        return None
    rows = results["cells"]
    names = list(rows[0]["metrics"])
    pairs = [names[i : i + 2] for i in range(0, len(names), 2)]  # Top-k with Avg; pass@k with compiled@k
    figure, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.2), squeeze=False)
    for axis, (solid, dashed) in zip(axes[0], pairs):
        for i, series in enumerate(dict.fromkeys(row["series"] for row in rows)):
            line = sorted((row for row in rows if row["series"] == series), key=lambda row: row["nfe"])
            style = "*" if len(line) == 1 else "o"
            xs = [row["nfe"] for row in line]
            axis.plot(xs, [row["metrics"][solid] for row in line], style + "-", color=f"C{i}", label=f"{series} {solid}")
            axis.plot(xs, [row["metrics"][dashed] for row in line], style + "--", color=f"C{i}", alpha=0.6,
                      label=f"{series} {dashed}")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("NFE (ar: the length, with its KV cache)")
        axis.set_ylabel(f"{solid} (solid), {dashed} (dashed)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return figure


def _evaluator(results: dict[str, Any]) -> str:
    counts = sorted({row["num_samples"] for row in results["cells"]})
    if results["task"] is not None:
        return (f"task {results['task']['kind']}, {'/'.join(map(str, counts))} samples per prompt, "
                f"seed {results['preset']['bench']['seed']}")
    return (f"gen-PPL ({results['evaluator']['gen_ppl_mode']}) under {results['evaluator']['name']}, "
            f"{'/'.join(map(str, counts))} samples per point, seed {results['preset']['bench']['seed']}")
