"""Fault injection: killed writers, signals, NaNs, damaged files. No case may lose more than the
steps since the last checkpoint, and a resumed run must equal an uninterrupted one."""

import errno
import json
import os
import shutil
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
from klflow.cli import main
from klflow.config import load_config
from klflow.errors import KLFlowError
from klflow.metrics import read_metrics
from klflow.flow.path import KLPath
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
    ck.write_atomic = second(ck.write_atomic, before=lambda f, t: die())
elif stage == "during-latest":  # temp pointer written, not yet renamed over `latest`
    ck.write_atomic = second(ck.write_atomic, before=lambda f, t: (f.with_name(f".{f.name}.tmp-{os.getpid()}").write_text(t), die()))
config = load_config("quickstart", [f'data.source="{corpus}"', *overrides])
train(config, run_dir, progress=False)
"""


def tiny(corpus, *extra):
    return [f"data.source={json.dumps(str(corpus))}", *TINY_OVERRIDES, "train.checkpoint_interval=3", *extra]


def env():
    """The child's environment: this checkout's sources, and this process's thread count, since a float
    reduction's bits depend on how many threads split it."""
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": str(torch.get_num_threads())}


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


def _train_args(corpus, run_dir, *extra):
    args = ["train", "--data", str(corpus), "--out", str(run_dir), "--no-progress", *extra]
    for item in tiny(corpus)[1:]:
        args += ["--set", item]
    return args


def test_rotation_keeps_the_new_checkpoint_beside_another_historys_later_steps(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    first = train(load_config("quickstart", tiny(tiny_corpus, "train.max_steps=3")), run_dir, progress=False,
                  log=lambda _: None)
    shutil.copytree(first.checkpoint, run_dir / "step-0000030")  # a later step of an earlier history
    resumed = train(load_config("quickstart", tiny(tiny_corpus, "train.max_steps=6")), run_dir, resume=True,
                    progress=False, log=lambda _: None)
    assert resumed.checkpoint.is_dir()
    assert load_checkpoint(run_dir).state["step"] == 6
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-0000003", "step-0000006", "step-0000030"]


def test_a_second_writer_is_refused_while_a_training_holds_the_run(tiny_corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "klflow", *_train_args(tiny_corpus, run_dir, "--steps", "100000")]
    proc = subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        code = main(["train", "--out", str(run_dir), "--resume", "--steps", "100001", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and f"is in use by another training (pid {proc.pid})" in err, err
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)


def test_a_torn_last_log_line_stays_alone_on_resume(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(load_config("quickstart", tiny(tiny_corpus, "train.max_steps=5")), run_dir, progress=False, log=lambda _: None)
    log_file = run_dir / "metrics.jsonl"
    with open(log_file, "a") as handle:
        handle.write('{"step": 6, "tra')  # killed mid-write
    train(load_config("quickstart", tiny(tiny_corpus, "train.max_steps=10")), run_dir, resume=True, progress=False,
          log=lambda _: None)
    lines = log_file.read_text().splitlines()
    assert lines.count('{"step": 6, "tra') == 1
    records = [json.loads(line) for line in lines if line != '{"step": 6, "tra']
    assert [r["step"] for r in records if "val_loss" in r] == [5, 10]
    with pytest.warns(UserWarning, match="not JSON"):
        rows = read_metrics(run_dir)
    assert rows == records


def test_a_warmup_longer_than_the_run_is_clamped_with_a_warning(tiny_corpus, tmp_path):
    notes = []
    result = train(load_config("quickstart", tiny(tiny_corpus, "train.max_steps=5", "train.warmup_steps=100",
                                                  "train.schedule=constant")),
                   tmp_path / "run", progress=False, log=notes.append)
    assert any("train.warmup_steps=100 is not shorter than the run's 5 steps" in note for note in notes)
    assert result.history[-1]["lr_scale"] == 1.0


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("klflow: error: "), err
    return lines[-1]


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_temporary_folder(tiny_corpus, tmp_path, monkeypatch,
                                                                                      capsys):
    import klflow.checkpoint as ck

    def full(_weights, filename):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(ck, "save_file", full)
    code = main(_train_args(tiny_corpus, tmp_path / "run", "--steps", "3"))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "model.safetensors: No space left on device" in line
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_a_failed_samples_write_is_one_line_and_leaves_no_temporary_file(tiny_corpus, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    train(load_config("quickstart", tiny(tiny_corpus, "train.max_steps=2")), run_dir, progress=False, log=lambda _: None)

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(src), str(dst))

    monkeypatch.setattr(os, "replace", full)
    code = main(["sample", str(run_dir), "-n", "1", "--steps", "2", "--output", str(tmp_path / "s.jsonl")])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "No space left on device" in line
    assert not list(tmp_path.glob(".s.jsonl*")) and not (tmp_path / "s.jsonl").exists()


def test_a_klflow_home_that_is_a_file_is_one_line_before_any_work(tiny_corpus, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("KLFLOW_HOME", str(home))
    code = main(["prepare", str(tiny_corpus), "--vocab-size", "300", "--no-progress"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "the data cache ($KLFLOW_HOME)" in line and "which is a file" in line


def test_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
    import klflow.trained

    def exhausted(*_args, **_kwargs):
        raise MemoryError

    monkeypatch.setattr(klflow.trained, "load_checkpoint", exhausted)
    code = main(["sample", str(tmp_path)])
    assert code == 2 and "out of memory" in _one_error_line(capsys.readouterr().err)


def test_output_replaces_an_earlier_samples_file_and_anything_else_only_with_overwrite(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(load_config("quickstart", tiny(tiny_corpus, "train.max_steps=2")), run_dir, progress=False, log=lambda _: None)
    output, notes = tmp_path / "s.jsonl", tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    sample = ["sample", str(run_dir), "-n", "1", "--steps", "2", "--output"]
    assert main([*sample, str(output)]) == 0 and main([*sample, str(output)]) == 0
    assert main([*sample, str(notes)]) == 2 and notes.read_text() == "my notes\n"
    assert main([*sample, str(notes), "--overwrite"]) == 0 and json.loads(notes.read_text())["method"] == "klflow"


def test_sampling_past_the_trained_length_warns(tiny_corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(load_config("quickstart", tiny(tiny_corpus, "train.max_steps=2")), run_dir, progress=False, log=lambda _: None)
    assert main(["sample", str(run_dir), "-n", "1", "--steps", "2", "--seq-len", "32"]) == 0
    assert "--seq-len 32 is past the 16 tokens the model was trained on" in capsys.readouterr().err


def test_an_edit_that_keeps_size_and_mtime_is_not_served_from_the_cache(tiny_corpus, tmp_path):
    from klflow.data import prepare

    corpus = tmp_path / "corpus.txt"
    shutil.copy2(tiny_corpus, corpus)
    first = prepare(str(corpus), tmp_path / "data", vocab_size=300, progress=False)
    stat = corpus.stat()
    text = corpus.read_text()
    corpus.write_text(text.replace("cat", "dog"))  # same length, then the old mtime back (cp -p, rsync -a)
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = prepare(str(corpus), tmp_path / "data", vocab_size=300, progress=False)
    assert not again.reused and "cat" not in again.tokenizer().decode(again.train_tokens()[:2000].tolist())
    assert first.dir == again.dir
    assert prepare(str(corpus), tmp_path / "data", vocab_size=300, progress=False).reused
    assert not prepare(str(corpus), tmp_path / "data", vocab_size=300, progress=False, force=True).reused


def test_train_data_may_name_a_prepared_folder(tiny_corpus, tmp_path):
    from klflow.data import prepare

    data = prepare(str(tiny_corpus), tmp_path / "data", vocab_size=300, progress=False)
    overrides = [f"data.source={json.dumps(str(data.dir))}", *tiny(tiny_corpus, "train.max_steps=2")[1:]]
    result = train(load_config("quickstart", overrides), tmp_path / "run", progress=False, log=lambda _: None)
    assert load_checkpoint(result.checkpoint).config["data_dir"] == str(data.dir.resolve())


def test_lone_surrogates_in_a_corpus_and_in_prompts_are_replaced_with_a_warning(tiny_corpus, tmp_path, capsys):
    from klflow.data import load_corpus

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "broken \\ud800 text"}\n{"text": "fine"}\n')
    assert load_corpus(str(corpus)).documents[0] == "broken \ufffd text"
    assert "1 undecodable bytes" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    train(load_config("quickstart", tiny(tiny_corpus, "train.max_steps=2")), run_dir, progress=False, log=lambda _: None)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the \\udc80 cat"}\n')
    assert main(["sample", str(run_dir), "--prompts", str(prompts), "-n", "1", "--steps", "2"]) == 0
    assert "1 lone surrogates" in capsys.readouterr().err
    assert main(["sample", str(run_dir), "--prompt", "the \udc80 cat", "-n", "1", "--steps", "2"]) == 0


def test_runs_and_samples_record_absolute_paths(tiny_corpus, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(tiny_corpus, tmp_path / "a" / "my.txt")
    monkeypatch.chdir(tmp_path / "a")
    assert main(_train_args("./my.txt", "run", "--steps", "2")) == 0
    assert main(["sample", "run", "-n", "1", "--steps", "2", "--output", "s.jsonl"]) == 0
    assert Path(json.loads(Path("s.jsonl").read_text().splitlines()[0])["checkpoint"]).is_absolute()
    monkeypatch.chdir(tmp_path / "b")
    assert main(["train", "--out", str(tmp_path / "a" / "run"), "--resume", "--steps", "3", "--no-progress"]) == 0


def test_a_bom_is_stripped_and_gzip_files_are_read(tiny_corpus, tmp_path):
    import gzip

    from klflow.data import load_corpus

    plain = load_corpus(str(tiny_corpus)).documents
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + tiny_corpus.read_bytes())
    assert load_corpus(str(bom)).documents == plain
    packed = tmp_path / "tiny.txt.gz"
    packed.write_bytes(gzip.compress(tiny_corpus.read_bytes()))
    assert load_corpus(str(packed)).documents == plain
    lines = tmp_path / "tiny.jsonl.gz"
    lines.write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in plain).encode()))
    assert load_corpus(str(lines)).documents == plain
