"""The in-domain judge: a klflow checkpoint trained with --method ar, and scoring in windows.

A tiny AR model trained for 100 steps on the tiny corpus (about a second) is judge enough to
tell held-out text from the same words shuffled and from random tokens.
"""

import json
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from conftest import TINY_OVERRIDES
from klflow.cli import main
from klflow.config import load_config
from klflow.data import PreparedData
from klflow.errors import KLFlowError
from klflow.evaluation import ARJudge, Evaluator, generative_perplexity, load_evaluator, score_texts, validation_texts
from klflow.evaluation.scoring import row_windows
from klflow.train import train

STEPS = 100
FAST = ["train.eval_interval=1000", "train.checkpoint_interval=50", "train.lr=3e-3", "train.warmup_steps=5"]


def tiny_run(corpus, run_dir, *extra):
    config = load_config("quickstart", [f"data.source={json.dumps(str(corpus))}", *TINY_OVERRIDES, *FAST, *extra])
    train(config, run_dir, progress=False, log=lambda _: None)
    return run_dir


@pytest.fixture(scope="module")
def ar_run(tiny_corpus, tmp_path_factory):
    """An AR run of 100 steps (seq_len 16) keeping its step-50 and step-100 checkpoints."""
    return tiny_run(tiny_corpus, tmp_path_factory.mktemp("ar") / "run", 'method.name="ar"', f"train.max_steps={STEPS}")


@pytest.fixture(scope="module")
def held_out(ar_run):
    """16 validation windows of 48 tokens (three of the judge's 16-position windows), the prepared data."""
    config = json.loads((ar_run / "step-0000100" / "config.json").read_text())
    data = PreparedData.load(config["data_dir"])
    return validation_texts(data, 16, 48), data


def test_ar_checkpoint_loads_as_judge_and_scores_as_its_loss(ar_run):
    judge = load_evaluator(str(ar_run))
    assert isinstance(judge, ARJudge) and load_evaluator(str(ar_run)) is judge
    assert judge.max_positions == 16 and judge.hidden_size == 32 and judge.eos_token == "<|endoftext|>"
    assert judge.eos_id == judge.tokenizer.eot_id and "klflow AR checkpoint" in judge.description
    assert "step-0000100" in judge.description and judge.describe()["window_positions"] == 16
    text = "The cat likes a red ball."
    ids = judge.tokenizer.encode(text)
    scores = score_texts(judge, [text], progress=False)
    assert scores.ids == [ids] and scores.n_tokens[0] == len(ids) < 15 and scores.n_windowed == 0
    # One window: the summed next-token NLL of [eot] + ids, as the AR training loss computes it.
    row = torch.tensor([[judge.eos_id, *ids]])
    expected = torch.nn.functional.cross_entropy(judge.model(row[:, :-1], None)[0], row[0, 1:], reduction="sum")
    assert scores.nll[0] == pytest.approx(expected.item(), rel=1e-5)
    # A written end-of-text is the end-of-text token, and the text ends there.
    cut = score_texts(judge, [text + "<|endoftext|> not part of it"], progress=False)
    assert cut.ids == [ids + [judge.eos_id]] and cut.n_cut_at_eos == 1


def test_ar_judge_prefers_held_out_text_to_shuffled_words_and_random_tokens(ar_run, held_out):
    judge = load_evaluator(str(ar_run))
    real, _ = held_out
    rng = random.Random(0)
    shuffled = [" ".join(rng.sample(text.split(), len(text.split()))) for text in real]
    noise_ids = np.random.default_rng(0).integers(3, judge.tokenizer.vocab_size, size=(len(real), 48))
    noise = [judge.tokenizer.decode(row.tolist()) for row in noise_ids]
    scores = {name: score_texts(judge, texts, progress=False)
              for name, texts in (("real", real), ("shuffled", shuffled), ("noise", noise))}
    ppl = {name: generative_perplexity(s) for name, s in scores.items()}
    # Measured with training seeds 0-3: real 4.1-4.4, shuffled 14-15, random tokens 3,400-3,900.
    assert len(real) >= 10 and scores["real"].n_windowed == len(real)
    assert ppl["shuffled"] > 2 * ppl["real"], ppl
    assert ppl["noise"] > 100 * ppl["real"], ppl


def test_other_methods_are_refused_as_judges(tiny_corpus, tmp_path):
    run = tiny_run(tiny_corpus, tmp_path / "klflow-run", "train.max_steps=2")
    with pytest.raises(KLFlowError, match="trained with --method klflow; only an autoregressive checkpoint"):
        load_evaluator(str(run))


# ---------------------------------------------------------------- windows


@pytest.mark.parametrize("length, width", [(5, 8), (8, 8), (9, 8), (17, 8), (40, 7), (30, 2)])
def test_windows_score_every_token_once_with_half_a_window_of_context(length, width):
    windows = row_windows(0, length, width)
    scored = [t for w in windows for t in range(w.first, w.end)]
    assert scored == list(range(1, length))
    assert all(w.end - w.start <= width and w.start <= w.first - 1 for w in windows)
    assert all(t - w.start >= min(t, width - width // 2) for w in windows for t in range(w.first, w.end))
    assert [w.last for w in windows] == [False] * (len(windows) - 1) + [True] and windows[-1].end == length


@dataclass(frozen=True)
class BigramJudge(Evaluator):
    """A judge whose next-token distribution depends on the current token only, so windows cannot change a score."""

    table: torch.Tensor  # [V, V] next-token logits given the current token
    window: int | None

    device = property(lambda self: torch.device("cpu"))
    hidden_size = property(lambda self: self.table.shape[1])
    max_positions = property(lambda self: self.window)
    eos_token = property(lambda self: "0")

    def encode(self, texts):
        return [[int(word) for word in text.split()] for text in texts]

    def forward(self, input_ids, lengths):
        logits = self.table[input_ids]
        return logits, logits


def test_windowed_scores_equal_whole_row_scores_for_a_bigram_judge():
    table = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    texts = [" ".join(str(i) for i in np.random.default_rng(n).integers(1, 6, size=n)) for n in (3, 7, 8, 20, 33, 0)]
    whole = score_texts(BigramJudge("bigram", "", 0, table, None), texts, batch_size=4, progress=False)
    windowed = score_texts(BigramJudge("bigram", "", 0, table, 8), texts, batch_size=4, progress=False)
    np.testing.assert_allclose(windowed.nll, whole.nll, rtol=1e-6)
    np.testing.assert_allclose(windowed.features, whole.features)
    assert whole.n_windowed == 0 and windowed.n_windowed == 3  # rows of 21, 34 and 9 positions (with the context)
    assert list(windowed.n_tokens) == [3, 7, 8, 20, 33, 0]


# ---------------------------------------------------------------- klflow eval with two judges


def test_eval_cli_scores_with_two_judges_side_by_side(ar_run, tmp_path, capsys):
    pytest.importorskip("sklearn", reason="MAUVE needs the [eval] extra (scikit-learn)")
    samples, report_file = tmp_path / "samples.jsonl", tmp_path / "report.json"
    assert main(["sample", str(ar_run), "-n", "12", "--seq-len", "16", "--output", str(samples)]) == 0
    early = ar_run / "step-0000050"
    capsys.readouterr()
    assert main(["eval", str(samples), "--evaluator", str(ar_run), "--evaluator", str(early),
                 "--output", str(report_file), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for row in ("samples", "data"):
        for judge in (ar_run, early):
            assert f"\n{row:<8} {judge} " in out, out
    report = json.loads(report_file.read_text())
    assert [e["name"] for e in report["evaluators"]] == [str(ar_run), str(early)]
    assert all(e["window_positions"] == 16 for e in report["evaluators"])
    samples_row, data_row = report["rows"]
    for row in report["rows"]:
        assert [j["evaluator"] for j in row["judged"]] == [str(ar_run), str(early)]
        assert all(j["gen_ppl"]["per-sample"] >= j["gen_ppl"]["mdlm"] > 1 for j in row["judged"])
    assert all(0 <= j["mauve"]["score"] <= 1 for j in samples_row["judged"])
    # The judge trained twice as long finds the held-out data more likely.
    assert data_row["judged"][0]["gen_ppl"]["mdlm"] < data_row["judged"][1]["gen_ppl"]["mdlm"]
    assert main(["eval", str(samples), "--evaluator", str(early), "--evaluator", str(early)]) == 2
    assert f"--evaluator {early} is given twice" in capsys.readouterr().err


def test_judge_tokens_follow_its_own_tokenizer(ar_run, held_out):
    judge = load_evaluator(str(ar_run))
    real, data = held_out
    assert judge.tokenizer.fingerprint == data.tokenizer().fingerprint
    assert judge.encode(real[:2]) == [data.tokenizer().encode(text) for text in real[:2]]
