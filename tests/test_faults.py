"""Fault injection: killed writers, signals, NaNs, damaged files. No case may lose more than the
steps since the last checkpoint, and a resumed run must equal an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_OVERRIDES
from klflow.checkpoint import load_checkpoint
from klflow.config import load_config
from klflow.errors import KLFlowError
from klflow.path import KLPath
from klflow.train import train

SRC = str(Path(__file__).resolve().parents[1] / "src")
CONSTANT = ["train.schedule=constant", "model.dropout=0.1"]

# Run in a child process: train with checkpoints every 3 steps and SIGKILL ourselves at a chosen
# point of the second checkpoint write (step 6).
KILLER = r"""
import os, signal, sys
from pathlib import Path
import klflow.checkpoint as ck
from klflow.config import load_config
from klflow.train import train

stage, corpus, run_dir, overrides = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
calls = {"n": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def second(fn, before=None, after=None):
    def wrapped(*args, **kwargs):
        calls[fn.__name__] = calls.get(fn.__name__, 0) + 1
        if calls[fn.__name__] == 2 and before:
            before(*args)
        result = fn(*args, **kwargs)
        if calls[fn.__name__] == 2 and after:
            after(*args)
        return result
    return wrapped

if stage == "weights":          # half of model.safetensors written
    ck.save_file = second(ck.save_file, before=lambda w, f: (open(f, "wb").write(b"\0" * 1000), die()))
elif stage == "before-rename":  # complete temp directory, not yet renamed
    ck._fsync_dir = second(ck._fsync_dir, after=lambda d: die())
elif stage == "before-latest":  # new directory in place, `latest` still names the old one
    ck._write_atomic = second(ck._write_atomic, before=lambda f, t: die())
elif stage == "during-latest":  # temp pointer written, not yet renamed over `latest`
    ck._write_atomic = second(ck._write_atomic, before=lambda f, t: (f.with_name(f".{f.name}.tmp-{os.getpid()}").write_text(t), die()))
config = load_config("quickstart", [f'data.source="{corpus}"', *overrides])
train(config, run_dir, progress=False)
"""


def tiny(corpus, *extra):
    return [f"data.source={json.dumps(str(corpus))}", *TINY_OVERRIDES, "train.checkpoint_interval=3", *extra]


def env():
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def weights(directory):
    return load_file(str(Path(directory) / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    """An uninterrupted 9-step run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = train(load_config("quickstart", tiny(tiny_corpus, "train.max_steps=9", *CONSTANT)), out, progress=False,
                   log=lambda _: None)
    return weights(result.checkpoint)


@pytest.mark.parametrize("stage", ["weights", "before-rename", "before-latest", "during-latest"])
def test_kill_9_during_a_checkpoint_write_then_resume(tiny_corpus, tmp_path, reference, stage):
    run_dir = tmp_path / "run"
    overrides = tiny(tiny_corpus, "train.max_steps=9", *CONSTANT)
    child = subprocess.run([sys.executable, "-c", KILLER, stage, str(tiny_corpus), str(run_dir), *overrides],
                           env=env(), capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    survivor = load_checkpoint(run_dir)  # the previous checkpoint, intact
    assert survivor.state["step"] == 3
    resumed = train(load_config("quickstart", overrides), run_dir, resume=True, progress=False, log=lambda _: None)
    assert resumed.steps == 9
    final = weights(resumed.checkpoint)
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert not list(run_dir.glob(".*tmp*")), "stale temporary files were left behind"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_final_checkpoint_and_resume_continues(tiny_corpus, tmp_path, sig):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "klflow", "train", "--data", str(tiny_corpus), "--out", str(run_dir),
            "--steps", "100000", "--no-progress"]
    for item in tiny(tiny_corpus)[1:]:
        args += ["--set", item]
    proc = subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"stopped by {sig.name}" in out
    ckpt = load_checkpoint(run_dir)
    stopped_at = ckpt.state["step"]
    assert stopped_at >= 5 and f"trained {stopped_at} steps" in out  # nothing lost: the final step is saved
    more = subprocess.run([sys.executable, "-m", "klflow", "train", "--out", str(run_dir), "--resume", "--steps",
                           str(stopped_at + 2), "--no-progress"], env=env(), capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr
    assert load_checkpoint(run_dir).state["step"] == stopped_at + 2


def test_injected_nan_is_skipped_and_counted(tiny_corpus, tmp_path, monkeypatch):
    original = KLPath.loss
    calls = {"n": 0}

    def sometimes_nan(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] in (3, 4) else loss

    monkeypatch.setattr(KLPath, "loss", sometimes_nan)
    result = train(load_config("quickstart", tiny(tiny_corpus, "train.max_steps=6")), tmp_path / "run",
                   progress=False, log=lambda _: None)
    assert result.steps == 6 and result.skipped_steps == 2
    assert all(torch.isfinite(v).all() for v in weights(result.checkpoint).values())
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 2, "skipped_nonfinite": 1} in logged


def test_repeated_nan_stops_with_the_last_good_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    original = KLPath.loss
    calls = {"n": 0}

    def nan_after_four(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(KLPath, "loss", nan_after_four)
    with pytest.raises(KLFlowError, match=r"non-finite steps in a row at step 4; the last good checkpoint is .*step-0000003"):
        train(load_config("quickstart", tiny(tiny_corpus, "train.max_steps=50")), tmp_path / "run", progress=False,
              log=lambda _: None)
    assert load_checkpoint(tmp_path / "run").state["step"] == 3


def test_truncated_files_and_foreign_tokenizers_are_rejected(tiny_corpus, tmp_path):
    result = train(load_config("quickstart", tiny(tiny_corpus, "train.max_steps=3")), tmp_path / "run",
                   progress=False, log=lambda _: None)
    trainer = result.checkpoint / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[:100])
    with pytest.raises(KLFlowError, match="trainer.pt is unreadable"):
        train(load_config("quickstart", tiny(tiny_corpus, "train.max_steps=6")), tmp_path / "run", resume=True,
              progress=False, log=lambda _: None)
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"completely different words number {i} here and there" for i in range(200)))
    fresh = train(load_config("quickstart", tiny(other, "train.max_steps=3")), tmp_path / "other-run",
                  progress=False, log=lambda _: None)
    (fresh.checkpoint / "trainer.pt").unlink()
    with pytest.raises(KLFlowError, match="different tokenizer"):
        train(load_config("quickstart", tiny(tiny_corpus, "train.max_steps=6")), tmp_path / "other-run", resume=True,
              progress=False, log=lambda _: None)
    weights_file = result.checkpoint / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-64])
    with pytest.raises(KLFlowError, match="damaged"):
        load_checkpoint(tmp_path / "run")
