"""Runs every row of docs/BAD_INPUTS.md: exit status 2, one error line with the message, nothing written."""

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES
from klflow.cli import main
from klflow.data import TextTokenizer

TABLE = Path(__file__).resolve().parents[1] / "docs" / "BAD_INPUTS.md"
ROW = re.compile(r"^\| (\d+) \| [^|]+ \| `(klflow [^`]+)` \| `([^`]+)` \|$")
ROWS = [m.groups() for m in map(ROW.match, TABLE.read_text().splitlines()) if m]


def test_table_has_enough_rows():
    assert len(ROWS) >= 25
    assert [int(n) for n, _, _ in ROWS] == list(range(1, len(ROWS) + 1))


@pytest.fixture(scope="module")
def files(tiny_corpus, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    run = base / "run"
    args = ["train", "--data", str(tiny_corpus), "--out", str(run), "--steps", "2", "--no-progress"]
    for item in TINY_OVERRIDES:
        args += ["--set", item]
    assert main(args) == 0
    ckpt = next(run.glob("step-*"))

    def broken(name, edit):
        target = base / name
        shutil.copytree(ckpt, target)
        edit(target)
        return target

    def flip(d):
        data = bytearray((d / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0x01
        (d / "model.safetensors").write_bytes(bytes(data))

    def set_format(d):
        config = json.loads((d / "config.json").read_text())
        config["format_version"] = 99
        (d / "config.json").write_text(json.dumps(config))

    def run_copy(name, latest):
        target = base / name
        shutil.copytree(run, target)
        (target / "latest").unlink() if latest is None else (target / "latest").write_text(latest)
        return target

    other_tokenizer = TextTokenizer.train(tiny_corpus.read_text().split("\n\n"), 280)
    (base / "empty.txt").write_text("  \n\n ")
    (base / "binary.bin").write_bytes(b"\x00\x01\x02text\x00" * 100)
    (base / "nofield.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    (base / "bad.jsonl").write_text("{not json\n")
    (base / "single.txt").write_text("one single paragraph and nothing else")
    (base / "bad.toml").write_text("[train\nlr =")
    (base / "long_prompts.jsonl").write_text(json.dumps({"prompt": "short"}) + "\n"
                                             + json.dumps({"prompt": "the cat likes a red ball " * 10}) + "\n")
    (base / "no_prompt.jsonl").write_text(json.dumps({"text": "a text, not a prompt"}) + "\n")
    (base / "samples.jsonl").write_text('{"text": "The cat likes a red ball."}\n')
    (base / "notes.txt").write_text("my notes, not samples\n")
    (base / "utf16.txt").write_text("a text in UTF-16\n\nand a second paragraph\n", encoding="utf-16")
    return {
        "corpus": tiny_corpus, "run": run, "empty": base / "empty.txt", "binary": base / "binary.bin",
        "no_text_field": base / "nofield.jsonl", "bad_jsonl": base / "bad.jsonl", "single_doc": base / "single.txt",
        "bad_toml": base / "bad.toml", "samples": base / "samples.jsonl",
        "bit_flipped": broken("flipped", flip),
        "truncated": broken("truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100])),
        "bad_state": broken("badstate", lambda d: (d / "state.json").write_text("{oops")),
        "wrong_tokenizer": broken("wrongtok", lambda d: other_tokenizer.save(d / "tokenizer.json")),
        "wrong_format": broken("wrongformat", set_format),
        "long_prompt": "the cat likes a red ball " * 10,
        "long_prompts": base / "long_prompts.jsonl", "no_prompt_field": base / "no_prompt.jsonl",
        "big_hole": "The cat <|hole:40|> ball.", "bad_marker": "The cat <|hole:x|> ball.",
        "inline_line_hole": "The cat <|hole-line:4|> ball.",
        "no_latest": run_copy("nolatest", None), "foreign_latest": run_copy("foreign", f"{ckpt.resolve()}\n"),
        "empty_latest": run_copy("emptylatest", ""),
        "notes": base / "notes.txt", "hole": "The cat <|hole:2|> ball.",
        "utf16": base / "utf16.txt",
    }


@pytest.mark.parametrize("number, command, message", ROWS, ids=[f"row{n}" for n, _, _ in ROWS])
def test_bad_input_row(files, tmp_path, capsys, number, command, message):
    text = command.format(tmp=tmp_path, **files)
    code = main(shlex.split(text)[1:])
    err = capsys.readouterr().err
    assert code == 2, f"row {number}: exit {code}"
    # progress notes may precede it on stderr, but the answer is one error line, last, and no traceback
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("klflow: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, f"row {number}: {err!r}"
    assert message in errors[0], f"row {number}: {errors[0]!r}"
    assert not (tmp_path / "out").exists(), f"row {number} left output behind"
