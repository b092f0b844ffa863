"""docs/own-text.md's commands, run as written on a small synthetic my.txt."""

import re
import shlex
import shutil
from pathlib import Path

from klflow.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "own-text.md"


def doc_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip()]


def test_the_walk_through_runs_as_written(tiny_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KLFLOW_HOME", str(tmp_path / "home"))
    shutil.copy(tiny_corpus, tmp_path / "my.txt")
    commands = doc_commands()
    assert [c[:2] for c in commands] == [["klflow", "prepare"], ["klflow", "train"], ["klflow", "sample"],
                                        ["klflow", "plot"]]
    for command in commands:
        assert main(command[1:]) == 0, command
    run = tmp_path / "runs" / "mine"
    assert (run / "latest").is_file() and (run / "loss.png").is_file()
    assert len((run / "samples.jsonl").read_text().splitlines()) == 4
    assert len(list((tmp_path / "home").rglob("tokenizer.json"))) == 1  # train reused what prepare built
    (python,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    exec(compile(python, str(DOC), "exec"), {})
    assert "The cat" in capsys.readouterr().out
