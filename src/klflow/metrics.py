"""A run's training log: metrics.jsonl (and TensorBoard when installed), read back and plotted.

Every METRICS_EVERY optimizer steps, and at every validation, train() appends one JSON line to
RUN/metrics.jsonl: step, tokens, train_seconds, `loss` (the mean training loss over the steps
since the previous line), tokens_per_second (tokens / train_seconds so far) and lr_scale; a
validation line adds `train_loss` (the smoothed loss the progress bar shows) and the validation
scores: val_loss, its value per band of t (val_loss_t<lo>-<hi>, klflow.flow.validation) and
val_loss_free where positions are given. A skipped non-finite step is a line
{"step", "skipped_nonfinite"}. Runs from before metrics.jsonl wrote their validation lines to
log.jsonl, which read_metrics reads instead.

With the `tensorboard` package installed (pip install 'klflow[tensorboard]'), the same numbers go
to RUN/tensorboard through torch.utils.tensorboard: `tensorboard --logdir runs`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from klflow.errors import KLFlowError

METRICS = "metrics.jsonl"
LEGACY_LOG = "log.jsonl"
METRICS_EVERY = 10
BAND_PREFIX = "val_loss_t"


class MetricsLog:
    """Appends rows to RUN/metrics.jsonl and, when the tensorboard package is there, to RUN/tensorboard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.file = run_dir / METRICS
        self.board = _summary_writer(run_dir / "tensorboard") if tensorboard else None

    def write(self, row: dict[str, Any]) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.file, "ab+") as handle:
            # A crash mid-write leaves a torn last line; the next row must not be glued to it.
            if handle.seek(0, 2) and (handle.seek(-1, 2), handle.read(1))[1] != b"\n":
                handle.write(b"\n")
            handle.write((json.dumps(row) + "\n").encode())
        if self.board is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(_board_tag(key), value, row["step"])
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (or, for older runs, log.jsonl); a line torn by a crash is left
    out with a warning (MetricsLog starts a new line after it, so it may be followed by others)."""
    run_dir = Path(run_dir)
    file = next((run_dir / name for name in (METRICS, LEGACY_LOG) if (run_dir / name).is_file()), None)
    if file is None:
        raise KLFlowError(f"{run_dir} has no {METRICS} (is it a training run's directory?)")
    rows = []
    lines = file.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{file} line {number} is not JSON (a write torn by a crash); skipped", stacklevel=2)
    return rows


def plot_metrics(run_dir: Path, file: Path) -> Path:
    """A PNG of the training loss and the validation loss against steps, and beside it the validation
    loss per band of t / t_max where the run has those."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["step"], r.get("loss", r.get("train_loss"))) for r in rows if r.get("loss", r.get("train_loss")) is not None]
    val = [r for r in rows if "val_loss" in r]
    if not train and not val:
        raise KLFlowError(f"{run_dir}: no losses logged yet")
    bands = sorted({k for r in val for k in r if k.startswith(BAND_PREFIX)}, key=_band_start)
    figure, axes = plt.subplots(1, 2 if bands else 1, figsize=(11 if bands else 6, 4.2), squeeze=False)
    losses = axes[0][0]
    losses.plot([s for s, _ in train], [v for _, v in train], color="tab:blue", alpha=0.8, label="training")
    losses.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:orange", label="validation")
    if any("val_loss_free" in r for r in val):
        free = [r for r in val if "val_loss_free" in r]
        losses.plot([r["step"] for r in free], [r["val_loss_free"] for r in free], "s--", color="tab:red",
                    label="validation, generated positions")
    losses.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="loss")
    losses.legend()
    if bands:
        per_band = axes[0][1]
        colors = plt.get_cmap("viridis")
        for i, band in enumerate(bands):
            points = [r for r in val if band in r]
            per_band.plot([r["step"] for r in points], [r[band] for r in points], "o-", markersize=3,
                          color=colors(i / max(1, len(bands) - 1)), label=f"t/t_max {band[len(BAND_PREFIX):]}")
        per_band.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="validation loss per band of t")
        per_band.legend(fontsize=8)
    figure.suptitle(str(run_dir), fontsize=9)
    figure.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(file, dpi=110)
    plt.close(figure)
    return file


def _summary_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the optional tensorboard package is not installed
        return None
    return SummaryWriter(str(directory))


def _board_tag(key: str) -> str:
    """TensorBoard groups tags by their first '/': train/..., validation/..., validation_bands/..."""
    if key.startswith(BAND_PREFIX):
        return f"validation_bands/{key}"
    return f"validation/{key}" if key.startswith("val_") else f"train/{key}"


def _band_start(key: str) -> float:
    return float(key[len(BAND_PREFIX):].split("-")[0])
