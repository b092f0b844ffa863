"""The ablation's results and tables: each model's input and training-time choice, its validation
loss per band of t, and every sampler setting at every NFE on the gen-PPL / entropy / MAUVE frontier.

A cell is on the frontier at its NFE when no other cell of the ablation at that NFE has both a
lower gen-PPL and a higher entropy (gen-PPL alone rewards repetitive, low-entropy text). The cell
that wins at matched entropy is the one with the lowest gen-PPL among those whose unigram entropy
lies within MATCHED_ENTROPY_NATS of the held-out data's.
"""

from __future__ import annotations

from typing import Any

from klflow.bench.formatting import fmt, fmt_mauve, mauve_ranking
from klflow.bench.plan import BenchPlan
from klflow.config import Config
from klflow.flow.validation import BAND_EDGES, band_key

BANDS = [band_key(lo, hi) for lo, hi in zip(BAND_EDGES[:-1], BAND_EDGES[1:])]
# Wide enough for the spread of one sampler's entropy between 48-sample runs (0.06 nats between two runs
# of the same cell), narrow enough to exclude the repetitive samplers (randomized argmax on the evidence
# model sits 0.7-1.1 nats below the data).
MATCHED_ENTROPY_NATS = 0.2


def ablation_results(plan: BenchPlan, trained: dict[str, dict[str, Any]],
                     rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ablation's models (choices, validation loss overall and per band) and points (one per cell)."""
    keys = list(dict.fromkeys(point["model"] for point in plan.ablation))
    models = []
    for key in keys:
        record, config = trained[key], trained[key]["config"]
        final = record["history"][-1] if record["history"] else {}
        experiment = Config.from_dict(config)
        time = experiment.training_time_sampling
        models.append({"model": key, "input": experiment.denoiser_input, "output": experiment.denoiser_output,
                       "self_conditioning": experiment.self_conditioned,
                       "time_sampling": time + (f" (power {config['path']['time_power']:g})" if time == "power" else ""),
                       "val_loss": record["val_loss"], "bands": {band: final.get(band) for band in BANDS},
                       "tokens_per_second": record["tokens_per_second"], "train_seconds": record["train_seconds"]})
    points = []
    for point in plan.ablation:
        row = rows[point["cell"]]
        calibration = row["sampling"].get("switch_calibration")
        points.append({**point, "label": row["label"], "gen_ppl": row["gen_ppl"], "entropy": row["entropy"],
                       "mauve": row["mauve"], "mauve_range": row["mauve_range"], "distinct_2": row["distinct_2"],
                       "seconds_per_sample": row["seconds_per_sample"],
                       "switch_entropy": calibration["switch_entropy"] if calibration else None})
    for point in points:
        point["frontier"] = on_frontier(point, [p for p in points if p["nfe"] == point["nfe"]])
    return {"models": models, "settings": list(dict.fromkeys(p["setting"] for p in points)),
            "nfe": sorted({p["nfe"] for p in points}), "points": points,
            "how": "every model trained with the same steps, batches and data; val loss = the uniform-t cross-entropy "
                   "of p(x1 | x_t) on the validation split at the end of training, overall and per band of t / t_max "
                   "(klflow.flow.validation); a point is on the frontier when no other point at its NFE has both a lower "
                   "gen-PPL and a higher entropy"}


def matched_entropy_best(points: list[dict[str, Any]], data_entropy: float,
                         tolerance: float = MATCHED_ENTROPY_NATS) -> dict[str, Any] | None:
    """The point with the lowest gen-PPL among those within `tolerance` nats of the data's entropy."""
    matched = [p for p in points if abs(p["entropy"] - data_entropy) <= tolerance]
    return min(matched, key=lambda p: p["gen_ppl"], default=None)


def on_frontier(point: dict[str, Any], others: list[dict[str, Any]]) -> bool:
    """No other point has gen-PPL <= and entropy >= this one's, one of them strictly."""
    return not any(o["gen_ppl"] <= point["gen_ppl"] and o["entropy"] >= point["entropy"]
                   and (o["gen_ppl"] < point["gen_ppl"] or o["entropy"] > point["entropy"]) for o in others)


def ablation_markdown(results: dict[str, Any]) -> list[str]:
    ablation, data = results["ablation"], results["data_row"]
    models, points, nfes = ablation["models"], ablation["points"], ablation["nfe"]
    lines = ["", "## Ablation: the denoiser and its training-time distribution, and the samplers", "",
             "Validation cross-entropy of p(x1 | x_t) (nats/token) at uniform t over [0, t_max], overall and per band "
             "of t / t_max, at the end of training (every model trained with the same steps and tokens):", "",
             "| model | input | output | self-cond. | training t | tokens/s | val loss | "
             + " | ".join(_band_name(b) for b in BANDS) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(BANDS)]
    for m in models:
        lines.append(f"| {m['model']} | {m['input']} | {m['output']} | {'yes' if m['self_conditioning'] else 'no'} | "
                     f"{m['time_sampling']} | {m['tokens_per_second']:,.0f} | "
                     f"{fmt(m['val_loss'], 3)} | " + " | ".join(fmt(m["bands"][b], 3) for b in BANDS) + " |")
    lines += ["", f"gen-PPL / entropy / MAUVE of every model, sampler setting and NFE; **bold**: on the gen-PPL vs "
                  f"entropy frontier at that NFE. Data row: gen-PPL {fmt(data['gen_ppl'], 1)}, entropy "
                  f"{fmt(data['entropy'], 3)}.", "",
              "| model | setting | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for m in models:
        for setting in ablation["settings"]:
            by_nfe = {p["nfe"]: p for p in points if p["model"] == m["model"] and p["setting"] == setting}
            lines.append(f"| {m['model']} | {setting} | " + " | ".join(_point(by_nfe.get(n)) for n in nfes) + " |")
    lines += ["", f"Lowest gen-PPL at matched entropy (within {MATCHED_ENTROPY_NATS} nats of the data's "
                  f"{fmt(data['entropy'], 3)}) and highest MAUVE, at each NFE; MAUVE is the mean (min-max over "
                  "k-means seeds), and the points whose range overlaps the highest's are no different from it:", "",
              "| NFE | criterion | model | setting | gen-PPL | entropy | MAUVE |", "|---|---|---|---|---|---|---|"]
    for n in nfes:
        at_n = [p for p in points if p["nfe"] == n]
        marks = mauve_ranking(at_n)
        best = [("matched entropy", matched_entropy_best(at_n, data["entropy"])),
                ("MAUVE", next((p for p, mark in zip(at_n, marks) if mark == "best"), None))]
        best += [("MAUVE, no different", p) for p, mark in zip(at_n, marks) if mark == "tied"]
        for criterion, p in best:
            if p is None:
                lines.append(f"| {n} | {criterion} | none | | | | |")
            else:
                lines.append(f"| {n} | {criterion} | {p['model']} | {p['setting']} | {fmt(p['gen_ppl'], 1)} | "
                             f"{fmt(p['entropy'], 3)} | {fmt_mauve(p)} |")
    calibrated = [p for p in points if p["switch_entropy"] is not None]
    if calibrated:
        lines += ["", "Calibrated switch thresholds (nats of mean posterior entropy; klflow.flow.switch):", "",
                  "| model | setting | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
        for key, setting in dict.fromkeys((p["model"], p["setting"]) for p in calibrated):
            by_nfe = {p["nfe"]: p for p in calibrated if p["model"] == key and p["setting"] == setting}
            lines.append(f"| {key} | {setting} | "
                         + " | ".join(fmt(by_nfe[n]["switch_entropy"], 3) if n in by_nfe else "" for n in nfes) + " |")
    return lines + ["", f"How: {ablation['how']}.", ""]


def _point(point: dict[str, Any] | None) -> str:
    if point is None:
        return ""
    text = f"{fmt(point['gen_ppl'], 1)} / {fmt(point['entropy'], 2)} / {fmt_mauve(point)}"
    return f"**{text}**" if point["frontier"] else text


def _band_name(band: str) -> str:
    return "t/t_max " + band.removeprefix("val_loss_t")
