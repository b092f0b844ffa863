"""One grammar for the command line: aliases, shown defaults, --version, progress, lazy imports, flag-naming errors."""

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_ARGS
from klflow import __version__
from klflow.cli import COMMANDS, build_parser, main
from klflow.errors import KLFlowError
from klflow.progress import ProgressLines, progress_bar
from klflow.flow.sampler import Selection



def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_top_level_help_and_version_do_not_import_torch():
    script = ("import sys\nfrom klflow.cli import main\nfor argv in (['--help'], ['--version']):\n"
              "    try:\n        main(argv)\n    except SystemExit as stop:\n        assert stop.code == 0\n"
              "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "no torch"
    assert f"klflow {__version__}" in run.stdout and "quickstart" in run.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"klflow {__version__}"


def test_every_option_of_every_command_has_help_and_shows_its_default():
    commands = subcommands(build_parser())
    assert set(commands) == set(COMMANDS)
    for name, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"klflow {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help"
            unset = action.default is None or action.default is False or action.default == []
            if action.option_strings and not unset:
                assert "default" in parser._get_formatter()._expand_help(action), f"{where} does not show its default"


@pytest.mark.parametrize("command, old, new", [
    (["train"], ["--steps", "7"], ["--train-steps", "7"]),
    (["sample", "RUN"], ["--steps", "7", "--output", "f.jsonl"], ["--sample-steps", "7", "--out", "f.jsonl"]),
    (["infill", "RUN", "x"], ["--steps", "7", "--output", "f.jsonl"], ["--sample-steps", "7", "--out", "f.jsonl"]),
    (["quickstart"], ["--steps", "7"], ["--sample-steps", "7"]),
    (["eval", "s.jsonl"], ["--steps", "7", "--output", "r.json"], ["--sample-steps", "7", "--out", "r.json"]),
])
def test_old_flags_are_aliases_of_the_one_name(command, old, new):
    parser = build_parser(command[:1])
    assert vars(parser.parse_args(command + old)) == vars(parser.parse_args(command + new))


def test_sampling_commands_take_temperature_top_p_top_k_and_no_progress():
    for name in ("sample", "infill", "quickstart", "eval"):
        args = build_parser([name]).parse_args([name] + (["X"] if name in ("sample", "infill", "eval") else [])
                                               + ["--temperature", "0.7", "--top-p", "0.9", "--top-k", "5", "--no-progress"])
        assert (args.temperature, args.top_p, args.top_k, args.no_progress) == (0.7, 0.9, 5, True)


def test_top_k_selects_among_the_k_most_probable():
    assert Selection.parse("sample", top_k=3) == Selection.parse("top_k:3")
    assert Selection.parse("top_k:3", top_k=3) == Selection.parse("top_k:3")
    with pytest.raises(KLFlowError, match="disagree"):
        Selection.parse("top_k:3", top_k=4)
    with pytest.raises(KLFlowError, match="draws nothing"):
        Selection.parse("argmax", top_k=2)
    with pytest.raises(KLFlowError, match="top_k must be an integer >= 0"):
        Selection.parse("sample", top_k=-1)



def test_sampling_flags_reach_the_sampler_and_its_record(tiny_run, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main(["sample", str(tiny_run), "--sample-steps", "3", "-n", "2", "--temperature", "0.5", "--top-p", "0.9",
                 "--top-k", "4", "--out", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert (record["temperature"], record["top_p"], record["select"]) == (0.5, 0.9, "top_k:4")
    assert capsys.readouterr().err == ""  # --no-progress: nothing on stderr


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tiny_run, capsys):
    assert main(["sample", str(tiny_run), "--sample-steps", "3", "-n", "1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "sample (randomized): 3/3 step (100%)" in err


def test_progress_bar_is_tqdm_on_a_terminal_and_lines_elsewhere():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = progress_bar(4, "work", "step", file=Terminal())
    assert not isinstance(terminal, ProgressLines)
    terminal.close()
    log = io.StringIO()
    with progress_bar(4, "work", "step", file=log, interval=0.0) as bar:
        bar.set_postfix(loss="1.500")
        bar.update()
        bar.update(3)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 3  # one per update (interval 0), one at the end
    assert lines[0].startswith("work: 1/4 step (25%), 0:00:00 elapsed, loss=1.500")
    assert lines[-1].startswith("work: 4/4 step (100%)")
    quiet = io.StringIO()
    with progress_bar(4, "work", "step", file=quiet, interval=3600.0) as bar:
        bar.update(4)
    assert len(quiet.getvalue().splitlines()) == 1  # only the closing line within the interval


def test_train_writes_periodic_lines_not_carriage_returns(tiny_corpus, tmp_path, capsys):
    assert main(["train", "--data", str(tiny_corpus), "--out", str(tmp_path / "run"), "--train-steps", "2", *TINY_ARGS]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "train: 2/2 step (100%)" in err


def test_train_vocab_size_reuses_what_prepare_built(tiny_corpus, tmp_path, capsys):
    assert main(["prepare", str(tiny_corpus), "--vocab-size", "280", "--no-progress"]) == 0
    prepared = Path(capsys.readouterr().out.split(" -> ")[1].split(" (")[0])
    built = (prepared / "tokenizer.json").stat().st_mtime_ns
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_corpus), "--vocab-size", "280", "--out", str(run), "--train-steps", "1",
                 "--no-progress", *TINY_ARGS]) == 0
    config = json.loads(next(run.glob("step-*/config.json")).read_text())
    assert Path(config["data_dir"]) == prepared and config["experiment"]["data"]["vocab_size"] == 280
    assert (prepared / "tokenizer.json").stat().st_mtime_ns == built  # reused, not prepared again


def test_data_errors_name_the_flag_that_fixes_them(tiny_corpus, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("One short paragraph.\n\nAnd another one.\n\nA third.\n")
    assert main(["train", "--data", str(small), "--vocab-size", "4000", "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "larger than this corpus supports" in err and "--vocab-size" in err
    assert main(["train", "--data", str(small), "--vocab-size", "100", "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    assert "(--vocab-size) must be >= 259" in capsys.readouterr().err
    assert main(["prepare", str(small), "--vocab-size", "100", "--no-progress", "--out", str(tmp_path / "d")]) == 2
    assert "at least 259 (--vocab-size" in capsys.readouterr().err
    single = tmp_path / "single.txt"
    single.write_text("Just one paragraph of text.\nStill the same paragraph.\n")
    assert main(["prepare", str(single), "--no-progress", "--out", str(tmp_path / "b")]) == 2
    assert "blank line separates documents" in capsys.readouterr().err
