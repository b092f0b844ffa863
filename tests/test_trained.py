"""klflow.load: generate and fill holes with any trained method in three lines, as `klflow sample` does."""

import json

import huggingface_hub.constants
import pytest
import torch

import klflow
from conftest import TINY_OVERRIDES
from klflow.cli import main
from klflow.config import load_config
from klflow.errors import KLFlowError
from klflow.methods import method_names
from klflow.train import train

STEPS = 3


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    """A 4-step run (seq_len 16, V = 300) of every method on the tiny corpus."""
    base = tmp_path_factory.mktemp("trained")
    made = {}
    for name in method_names():
        config = load_config("quickstart", [f"data.source={json.dumps(str(tiny_corpus))}", *TINY_OVERRIDES,
                                            f"method.name={json.dumps(name)}", "train.max_steps=4"])
        train(config, base / name, progress=False, log=lambda _: None)
        made[name] = base / name
    return made


@pytest.mark.parametrize("method", method_names())
def test_every_method_generates_continues_and_infills_in_three_lines(runs, method):
    run = klflow.load(runs[method])
    assert run.method == method
    texts = run.generate(3, steps=STEPS)
    assert len(texts) == 3 and all(isinstance(text, str) for text in texts)
    replies, ids = run.generate(2, prompt="The cat", steps=STEPS, return_ids=True)
    prompt_ids = run.tokenizer.encode("The cat")
    assert ids.shape == (2, 16) and (ids[:, : len(prompt_ids)] == torch.tensor(prompt_ids)).all()
    assert all(reply.startswith("The cat") for reply in replies)
    filled = run.infill("The dog <|hole:3|> a ball.", 2, steps=STEPS)
    assert len(filled) == 2 and all(text.startswith("The dog ") and text.endswith(" a ball.") for text in filled)


def test_the_api_gives_what_the_cli_writes(runs, tmp_path, capsys):
    """Same run, options and seed: klflow sample's file holds the texts and ids run.generate returns."""
    output = tmp_path / "samples.jsonl"
    assert main(["sample", str(runs["klflow"]), "-n", "3", "--steps", str(STEPS), "--sampler", "hybrid",
                 "--t-star", "0.2", "--select", "sample", "--option", "temperature=0.7", "--seed", "5", "--output", str(output)]) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    run = klflow.load(runs["klflow"], device="cpu")
    texts, ids = run.generate(3, steps=STEPS, t_star=0.2, select="sample", temperature=0.7, seed=5, return_ids=True)
    assert texts == [r["text"] for r in records] and ids.tolist() == [r["ids"] for r in records]
    assert records[0]["sampler"] == "hybrid" and records[0]["temperature"] == 0.7
    # Another seed, another draw; the CLI's infill file matches run.infill the same way.
    assert run.generate(3, steps=STEPS, t_star=0.2, select="sample", temperature=0.7, seed=6) != texts
    filled_file = tmp_path / "filled.jsonl"
    assert main(["infill", str(runs["klflow"]), "The cat <|hole:4|> ball.", "-n", "2", "--steps", str(STEPS),
                 "--output", str(filled_file)]) == 0
    assert run.infill("The cat <|hole:4|> ball.", 2, steps=STEPS) == [
        json.loads(line)["text"] for line in filled_file.read_text().splitlines()]


def test_sampler_options_are_the_methods_own(runs):
    ar = klflow.load(runs["ar"])
    assert len(ar.generate(2, steps=STEPS, temperature=0.5, top_k=5, top_p=0.9)) == 2
    with pytest.raises(KLFlowError, match="does not take the sampling option.*sampler"):
        ar.generate(2, sampler="ode")
    with pytest.raises(KLFlowError, match="num_samples must be >= 1"):
        klflow.load(runs["klflow"]).generate(0)
    with pytest.raises(KLFlowError, match="num_samples must be >= 1"):
        klflow.load(runs["klflow"]).infill("The <|hole:2|>", 0)
    with pytest.raises(KLFlowError, match="seq_len must be >= 1"):
        klflow.load(runs["klflow"]).generate(1, seq_len=0)


def test_sample_reports_each_step_or_token_to_progress(runs):
    """progress is the method's own callback: once per step, or once per token for the causal AR."""
    for method, calls in (("klflow", STEPS), ("ar", 16)):
        seen = []
        texts, ids, info = klflow.load(runs[method]).sample(2, STEPS, progress=seen.append)
        assert len(texts) == 2 and ids.shape == (2, 16) and len(seen) == calls, (method, seen)


def test_a_missing_path_is_one_line_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(KLFlowError, match="no such local path, and no klflow model"):
        klflow.load("nobody/no-such-run")
