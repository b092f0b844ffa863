import json

import pytest

from conftest import TINY_OVERRIDES
from klflow.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tiny_train_args(corpus, out, steps=6):
    args = ["train", "--data", str(corpus), "--out", str(out), "--steps", str(steps), "--no-progress"]
    for item in TINY_OVERRIDES:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def trained_run(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(tiny_train_args(tiny_corpus, out)) == 0
    return out


def test_calibrate_prints_t_max(capsys):
    code, out, _ = run_cli(capsys, "calibrate", "--vocab-size", "50258", "--beta", "0.01")
    assert code == 0 and "t_max=0.2913" in out and "0.98" in out


def test_prepare_reports_counts(capsys, tiny_corpus, tmp_path):
    code, out, _ = run_cli(capsys, "prepare", str(tiny_corpus), "--vocab-size", "300", "--out", str(tmp_path / "d"))
    assert code == 0 and "300 documents" in out and "bytes/token" in out
    assert (tmp_path / "d" / "train.bin").is_file()


@pytest.mark.parametrize("sampler", ["ode", "randomized", "hybrid"])
def test_sample_writes_jsonl_with_honest_nfe(capsys, trained_run, tmp_path, sampler):
    output = tmp_path / "s.jsonl"
    code, out, _ = run_cli(capsys, "sample", str(trained_run), "--sampler", sampler, "--steps", "5", "-n", "3",
                           "--select", "top_k:4", "--readout", "sample", "--output", str(output))
    assert code == 0 and f"({sampler}, NFE 6)" in out
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 3 and all(r["nfe"] == 6 and r["sampler"] == sampler and len(r["ids"]) == 16 for r in rows)


@pytest.mark.parametrize("source", ["data", "ode"])
def test_sample_with_the_new_klflow_options_records_them(capsys, trained_run, tmp_path, source):
    output = tmp_path / "s.jsonl"
    code, out, _ = run_cli(capsys, "sample", str(trained_run), "--steps", "7", "-n", "2", "--integrator", "exponential",
                           "--switch-entropy", source, "--select", "sample", "--option", "temperature=0.8",
                           "--option", "top_p=0.9", "--output", str(output))
    assert code == 0 and f"switch_entropy={source}:" in out and "(hybrid, NFE 8)" in out
    row = json.loads(output.read_text().splitlines()[0])
    assert row["integrator"] == "exponential" and row["temperature"] == 0.8 and row["top_p"] == 0.9
    assert isinstance(row["switch_entropy"], float) and row["switch_entropy"] > 0 and row["t_star"] is None
    with pytest.raises(SystemExit) as stop:
        main(["sample", str(trained_run), "--switch-entropy", "low"])
    assert stop.value.code == 2 and "expected a number of nats, 'data' or 'ode'" in capsys.readouterr().err


def test_prompt_is_kept(capsys, trained_run, tmp_path):
    output = tmp_path / "p.jsonl"
    code, _, _ = run_cli(capsys, "sample", str(trained_run), "--prompt", "The cat likes", "--steps", "3", "-n", "2",
                         "--output", str(output))
    assert code == 0
    assert all(json.loads(line)["text"].startswith("The cat likes") for line in output.read_text().splitlines())


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "steps must be a positive integer"),
    (["--t-star", "0.9"], "t_star must lie in"),
    (["--t-star", "-0.1"], "t_star must lie in"),
    (["--prompt", "the cat likes a red ball " * 10], "shorter than the sequence length"),
    (["--select", "top_k:x"], "select must be"),
    (["-n", "0"], "num-samples"),
])
def test_bad_sampling_input_is_one_line_error(capsys, trained_run, tmp_path, extra, message):
    output = tmp_path / "never.jsonl"
    code, out, err = run_cli(capsys, "sample", str(trained_run), "--output", str(output), *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not output.exists()


def test_bad_training_input_writes_nothing(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n  ")
    for data, message in [(tmp_path / "missing.txt", "data path not found"), (empty, "is empty")]:
        out_dir = tmp_path / "run"
        code, _, err = run_cli(capsys, "train", "--data", str(data), "--out", str(out_dir), "--steps", "2")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
        assert not out_dir.exists()
    code, _, err = run_cli(capsys, "sample", str(tmp_path / "nothing"))
    assert code == 2 and "checkpoint not found" in err


def test_resume_continues_from_the_checkpoint_config(capsys, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_corpus, out, steps=3)) == 0
    code, stdout, _ = run_cli(capsys, "train", "--out", str(out), "--resume", "--steps", "5", "--no-progress")
    assert code == 0 and "trained 5 steps" in stdout
    assert (out / "latest").read_text().strip() == "step-0000005"


def test_every_subcommand_has_help(capsys):
    for command in ("prepare", "train", "sample", "calibrate", "quickstart", "export", "plot"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: klflow" in capsys.readouterr().out


def test_quickstart_runs_end_to_end(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "quickstart", "--minutes", "0.05", "--steps", "3", "-n", "2", "--out",
                           str(tmp_path / "qs"), "--no-progress")
    assert code == 0
    for sampler in ("ode", "randomized", "hybrid"):
        assert f"=== {sampler} (NFE 4" in out
        assert (tmp_path / "qs" / f"samples-{sampler}.jsonl").is_file()
    assert "validation loss" in out
    # A file of the samples as printed, and the loss plot, both named at the end.
    samples, plot = tmp_path / "qs" / "samples.txt", tmp_path / "qs" / "loss.png"
    assert f"samples: {samples}" in out and f"loss plot: {plot}" in out
    assert samples.read_text().split("\n=== ")[0] in out and samples.read_text().count("=== ") == 3
    assert plot.read_bytes().startswith(b"\x89PNG")
