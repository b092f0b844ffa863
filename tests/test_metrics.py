"""Run logs and plots: metrics.jsonl rows, TensorBoard when installed, `klflow plot`, old runs' log.jsonl."""

import json
import sys

import pytest
import torch

from conftest import TINY_OVERRIDES
from klflow.cli import main
from klflow.config import load_config
from klflow.metrics import read_metrics
from klflow.flow.path import KLPath
from klflow.train import train

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_train(corpus, run_dir, monkeypatch, *extra):
    """23 steps, validation every 15; the training loss of optimizer step i is made exactly i."""
    original, calls = KLPath.loss, {"n": 0}

    def numbered(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        if not torch.is_grad_enabled():  # validation
            return loss
        calls["n"] += 1
        return loss * 0 + calls["n"]

    monkeypatch.setattr(KLPath, "loss", numbered)
    config = load_config("quickstart", [f"data.source={json.dumps(str(corpus))}", *TINY_OVERRIDES,
                                        "train.max_steps=23", "train.eval_interval=15", *extra])
    return train(config, run_dir, progress=False, log=lambda _: None)


def test_metrics_rows_every_ten_steps_and_at_each_validation(tiny_corpus, tmp_path, monkeypatch):
    result = tiny_train(tiny_corpus, tmp_path / "run", monkeypatch)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [10, 15, 20, 23]
    # The mean training loss over the steps since the previous row: steps 1-10, 11-15, 16-20, 21-23.
    assert [r["loss"] for r in rows] == [5.5, 13.0, 18.0, 22.0]
    assert all(r["tokens"] == r["step"] * 8 * 16 and r["tokens_per_second"] > 0 for r in rows)
    assert "val_loss" not in rows[0] and "val_loss" not in rows[2]
    for row, validation in zip((rows[1], rows[3]), result.history):
        assert {k: row[k] for k in validation} == validation  # the validation record, with its bands
        assert {f"val_loss_t{lo}-{hi}" for lo, hi in [(0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1)]} <= set(row)
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_without_tensorboard_the_metrics_file_is_all(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    tiny_train(tiny_corpus, tmp_path / "run", monkeypatch, "train.max_steps=10")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [10]
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_tensorboard_gets_the_same_numbers(tiny_corpus, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="TensorBoard logging needs the optional tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_train(tiny_corpus, tmp_path / "run", monkeypatch)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    rows = read_metrics(tmp_path / "run")
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(r["step"], r["loss"]) for r in rows]
    validation = [r for r in rows if "val_loss" in r]
    assert [e.value for e in events.Scalars("validation/val_loss")] == pytest.approx([r["val_loss"] for r in validation])
    assert [e.step for e in events.Scalars("validation_bands/val_loss_t0-0.2")] == [15, 23]


def test_plot_writes_a_png_of_the_run(tiny_corpus, tmp_path, monkeypatch, capsys):
    tiny_train(tiny_corpus, tmp_path / "run", monkeypatch)
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert f"wrote {tmp_path / 'run' / 'loss.png'}" in capsys.readouterr().out
    assert (tmp_path / "run" / "loss.png").read_bytes().startswith(PNG)
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "elsewhere" / "curve.png")]) == 0
    assert (tmp_path / "elsewhere" / "curve.png").read_bytes().startswith(PNG)
    assert main(["plot", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_an_older_runs_log_reads_and_plots(tmp_path):
    """Runs from before metrics.jsonl logged their validations to log.jsonl, smoothed loss as train_loss."""
    rows = [{"step": 5, "tokens": 640, "train_loss": 5.1, "val_loss": 5.0, "val_loss_t0-0.2": 5.6},
            {"step": 10, "tokens": 1280, "train_loss": 4.2, "val_loss": 4.4, "val_loss_t0-0.2": 5.3}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 1')  # a torn last line
    with pytest.warns(UserWarning, match="log.jsonl line 3 is not JSON"):
        assert read_metrics(tmp_path) == rows
    assert main(["plot", str(tmp_path)]) == 0 and (tmp_path / "loss.png").read_bytes().startswith(PNG)
    # A torn line followed by later rows (the log continued on a new line after a crash) is skipped too.
    (tmp_path / "log.jsonl").write_text('{"step": \n' + json.dumps(rows[0]) + "\n")
    with pytest.warns(UserWarning, match="log.jsonl line 1 is not JSON"):
        assert read_metrics(tmp_path) == rows[:1]
