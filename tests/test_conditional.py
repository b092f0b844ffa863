"""Conditional generation and infilling: clamping in every method and sampler, the hole markers,
`klflow infill`, `klflow sample --prompts`, `klflow train --task`, and the real-task evaluation
drivers (replies scored by BLEU/ROUGE, infilled code by pass@k in the sandbox)."""

import json
import math

import pytest
import torch

from conftest import HUMANEVAL_PROBLEMS as TASKS
from conftest import TINY_OVERRIDES
from klflow.checkpoint import load_checkpoint
from klflow.cli import DEFAULT_LINE_SLOT, main, task_settings
from klflow.config import Config, load_config
from klflow.data import TextTokenizer
from klflow.errors import KLFlowError
from klflow.evaluation.tasks import evaluate_infill, evaluate_reply, infill_problems, score_infill
from klflow.filling import CheckpointSampler, fill_templates
from klflow.infill import Given, Hole, continuation, parse
from klflow.methods import SpecialTokens, build_method, method_names
from klflow.model import Denoiser
from klflow.runtime import network_forward, special_tokens

V, L = 24, 12
SPECIALS = SpecialTokens(eot=0, pad=1, mask=2)
# Every method with each of its samplers: all of them condition on a cond_mask.
METHOD_SAMPLERS = [("klflow", {"sampler": s}) for s in ("ode", "randomized", "hybrid")] + [
    (name, {}) for name in method_names() if name != "klflow"]


def tiny_network(causal: bool, seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(V, n_layer=1, n_head=2, d_model=16, causal=causal).eval()


def test_every_method_is_covered():
    assert {name for name, _ in METHOD_SAMPLERS} == set(method_names())
    assert {"klflow", "mdlm", "dfm", "sedd", "ar", "linear-simplex", "fisher-rao", "dirichlet"} <= set(method_names())


@pytest.mark.parametrize("name, options", METHOD_SAMPLERS, ids=[f"{n}-{o.get('sampler', '')}" for n, o in METHOD_SAMPLERS])
@pytest.mark.parametrize("layout", ["holes", "prefix"])
def test_clamped_positions_are_bit_identical_after_sampling(name, options, layout):
    method = build_method(name, Config(), V, SPECIALS)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, V, (3, L), generator=generator)
    cond = torch.zeros(3, L, dtype=torch.bool)
    if layout == "prefix":
        cond[:, :5] = True
    else:  # holes at different places in each row; the AR baseline fills one layout per call
        cond[:, [0, 1, 4, 5, 6, 10]] = True
        if name != "ar":
            cond[1] = torch.roll(cond[1], 1)
    out = method.generate(tiny_network(method.causal), 3, L, 4, prompt=prompt, cond_mask=cond,
                          generator=torch.Generator().manual_seed(1), **options)
    assert out.shape == (3, L) and out.dtype == torch.long
    assert torch.equal(out[cond], prompt[cond])
    assert not torch.isin(out[~cond], torch.tensor([SPECIALS.pad, SPECIALS.mask])).any()


@pytest.mark.parametrize("name", method_names())
def test_every_method_trains_with_cond_mask(name):
    """The loss reads cond_mask (it changes the loss), stays finite and has gradients."""
    method = build_method(name, Config(), V, SPECIALS)
    network = tiny_network(method.causal).train()
    ids = torch.randint(3, V, (4, L), generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(4, L, dtype=torch.bool)
    cond[:, [0, 1, 2, 7, 8]] = True
    with_mask = method.loss(network, ids, cond, generator=torch.Generator().manual_seed(2))
    without = method.loss(network, ids, None, generator=torch.Generator().manual_seed(2))
    assert math.isfinite(with_mask.item()) and with_mask.item() != without.item()
    with_mask.backward()
    assert all(p.grad is not None for p in network.parameters() if p.requires_grad)


def test_fill_templates_batches_rows_and_keeps_given_text(tmp_path):
    tok = TextTokenizer.train([f"the cat {i} sees the dog {i}." for i in range(200)], 300)
    templates = [parse("the cat <|hole:3|> dog.", tok), parse("<|hole:2|> sees the", tok), continuation("the cat", tok, 16)]
    for name in ("klflow", "ar"):
        method = build_method(name, Config(), tok.vocab_size, special_tokens(tok))
        network = Denoiser(tok.vocab_size, n_layer=1, n_head=2, d_model=16, causal=method.causal).eval()
        results = fill_templates(method, network, templates, tok, 16, 3, 2, generator=torch.Generator().manual_seed(0),
                                 max_rows=6)
        assert [len(samples) for samples in results] == [3, 3, 3]
        for template, samples in zip(templates, results):
            ids, given = template.row(16, tok)
            for sample in samples:
                assert torch.equal(torch.tensor(sample.ids)[given], ids[given])
                assert len(sample.fills) == len(template.holes)
        assert all(s.text.startswith("the cat ") and s.text.endswith(" dog.") for s in results[0])
        assert all(s.text.endswith(" sees the") for s in results[1])


# --- the hole markers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    lines = ["def add(a, b):", "    return a + b", "x = add(1, 2)", "print(x)", "the cat sees the dog"]
    return TextTokenizer.train(["\n".join(lines)] * 50 + [f"value {i} = {i * 7}" for i in range(300)], 300)


def test_parse_splits_text_into_given_pieces_and_holes(tok):
    template = parse("a <|hole:3|> b\n    <|hole-line:8|>\nend", tok)
    kinds = [(type(p).__name__, getattr(p, "text", None), getattr(p, "size", None), getattr(p, "line", None))
             for p in template.pieces]
    assert kinds == [("Given", "a ", None, None), ("Hole", None, 3, False), ("Given", " b\n    ", None, None),
                     ("Hole", None, 8, True), ("Given", "end", None, None)]
    assert template.length == len(tok.encode("a ")) + 3 + len(tok.encode(" b\n    ")) + 8 + len(tok.encode("end"))
    ids, given = template.row(40, tok)
    n = template.length
    assert ids[n] == tok.eot_id and (ids[n + 1 :] == tok.pad_id).all() and given[n:].all()
    assert int((~given).sum()) == 11


def test_fills_stop_at_end_of_text_and_line_holes_end_with_one_newline(tok):
    template = parse("x = <|hole:4|>\n<|hole-line:6|>\nprint(x)\n", tok)
    ids, _ = template.row(30, tok)
    row = ids.tolist()
    start = len(tok.encode("x = "))
    row[start : start + 4] = tok.encode("7") + [tok.eot_id] * 3
    second = start + 4 + len(tok.encode("\n"))
    line = tok.encode("y = x\nz") + [tok.eot_id]
    row[second : second + len(line)] = line  # a newline inside the slot ends the line
    assert template.fills(row, tok) == ["7", "y = x\n"]
    assert template.render(row, tok) == "x = 7\ny = x\nprint(x)\n"


def test_a_text_without_holes_renders_verbatim(tok):
    text = "  odd   spacing\tand ünïcode ☃\n\n"
    template = parse(text, tok)
    ids, given = template.row(len(tok.encode(text)) + 5, tok)
    assert given.all() and template.holes == [] and template.render(ids.tolist(), tok) == text


@pytest.mark.parametrize("text, message", [
    ("a <|hole:0|> b", "needs at least 1 position"),
    ("a <|hole:x|> b", "malformed hole marker '<|hole:x|>'"),
    ("a <|hole-line:3|>\n", "must be alone on its line"),
    ("<|hole-line:3|> b\n", "must be alone on its line"),
    ("a <|hole 3|>", "malformed hole marker"),
])
def test_bad_markers_are_one_line_errors(tok, text, message):
    with pytest.raises(KLFlowError, match=message):
        parse(text, tok)


def test_window_errors(tok):
    with pytest.raises(KLFlowError, match="with its holes .40 to generate.; the model's window is 16 tokens"):
        parse("a <|hole:40|> b", tok).row(16, tok)
    with pytest.raises(KLFlowError, match="it must be shorter than the sequence length 4"):
        continuation("the cat sees the dog", tok, 4)
    reply = continuation([5, 6, 7], tok, 10)
    assert reply.pieces[1] == Hole(7) and isinstance(reply.pieces[0], Given) and reply.row(10, tok)[1].sum() == 3


# --- CLI: train --task, infill, sample --prompts ------------------------------------------------


def tiny_args(*extra):
    """The tiny test settings, then `extra` (which wins)."""
    args = []
    for item in TINY_OVERRIDES:
        args += ["--set", item]
    return args + list(extra)


@pytest.fixture(scope="module")
def pairs_run(pairs_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs-run") / "run"
    argv = ["train", "--task", "pairs", "--out", str(out), "--steps", "3", "--no-progress",
            *tiny_args("--set", f"data.dir={json.dumps(str(pairs_data.dir))}", "--set", "train.seq_len=24")]
    assert main(argv) == 0
    return out


def test_task_settings():
    assert task_settings("pairs", "chitchat-pairs", None, None) == {("data", "layout"): "pairs"}
    assert task_settings("infill", "chitchat", None, None) == {("data", "layout"): "infill", ("data", "unit"): "spans"}
    assert task_settings("infill", "python-code", None, None) == {
        ("data", "layout"): "infill", ("data", "unit"): "lines", ("data", "line_slot"): DEFAULT_LINE_SLOT}
    assert task_settings("infill", "my/code.py", None, 0) == {("data", "layout"): "infill", ("data", "unit"): "lines"}
    assert task_settings("infill", "notes.txt", "lines", 12)["data", "line_slot"] == 12
    with pytest.raises(KLFlowError, match="go with --task infill"):
        task_settings("pairs", "x", "lines", None)
    with pytest.raises(KLFlowError, match="--line-slot must be >= 0 and goes with whole-line masks"):
        task_settings("infill", "notes.txt", None, 12)


def test_train_task_pairs_records_the_layout(pairs_run):
    config = load_checkpoint(pairs_run).experiment()
    assert config.data.layout == "pairs"


@pytest.mark.parametrize("method", ["klflow", "ar"])
def test_train_task_infill_on_code_uses_line_slots(tmp_path, method):
    programs = [f"def f{i}(x):\n    y = x + {i}\n    return y * {i % 7}\n" for i in range(120)]
    corpus = tmp_path / "code.py"
    corpus.write_text("\n\n".join(programs))
    out = tmp_path / "run"
    assert main(["train", "--task", "infill", "--method", method, "--data", str(corpus), "--out", str(out), "--steps", "2",
                 "--no-progress", "--line-slot", "10", *tiny_args("--set", "train.seq_len=48")]) == 0
    config = load_checkpoint(out).experiment()
    assert (config.data.layout, config.data.unit, config.data.line_slot) == ("infill", "lines", 10)
    assert math.isfinite(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"])
    # The trained slot is the holes' size; the canonical programs pass through the same harness.
    report = evaluate_infill(out, fraction=0.5, num_samples=2, ks=(1,), steps=2, tasks=TASKS, seq_len=128, progress=False)
    assert report["line_slot"] == 10 and report["canonical_pass_rate"] == 1.0 and report["n_holes"] >= 2
    assert all(len(fills) == len(example["removed"]) for example in report["examples"] for fills in example["filled"])


def test_layout_options_are_checked_with_the_config(tmp_path):
    with pytest.raises(KLFlowError, match="data: layout packed has no option unit"):
        load_config("quickstart", ["data.unit=lines"])
    with pytest.raises(KLFlowError, match="data: line_slot applies to whole-line masks only"):
        load_config("quickstart", ["data.layout=infill", "data.line_slot=8"])
    config = load_config("quickstart", ["data.layout=infill", "data.unit=lines", "data.mask_fraction=[0.1, 0.3]"])
    assert config.data.layout_options() == {"unit": "lines", "mask_fraction": [0.1, 0.3]}


def test_infill_without_holes_round_trips_and_fills_holes(pairs_run, tmp_path, capsys):
    text = "question 12 about  the\ttree?\nthe tree is"
    assert main(["infill", str(pairs_run), text, "-n", "2", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"(0 holes, NFE 4) ---\n{text}\n") == 2
    (tmp_path / "in.txt").write_text("question 3 <|hole:4|> cat?\nthe cat is")
    output = tmp_path / "filled.jsonl"
    assert main(["infill", str(pairs_run), "--file", str(tmp_path / "in.txt"), "-n", "3", "--steps", "3",
                 "--sampler", "randomized", "--output", str(output)]) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        assert record["text"] == f"question 3 {record['fills'][0]} cat?\nthe cat is"
        assert record["sampler"] == "randomized" and record["input"].startswith("question 3 <|hole:4|>")


def test_sample_prompts_file_end_to_end(pairs_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "question 7 about the cat?\n", "reference": "the cat is number 7."}) + "\n"
                       + json.dumps({"prompt": "question 9 about the tree?\n"}) + "\n")
    output = tmp_path / "replies.jsonl"
    assert main(["sample", str(pairs_run), "--prompts", str(prompts), "-n", "3", "--steps", "3", "--output", str(output)]) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["question 7 about the cat?\n"] * 3 + ["question 9 about the tree?\n"] * 3
    assert all(r["reference"] == "the cat is number 7." for r in records[:3]) and all("reference" not in r for r in records[3:])
    for record in records:
        assert record["text"] == record["prompt"] + record["sample"] and record["nfe"] == 4 and len(record["ids"]) == 24
    assert "wrote 6 samples (2 prompts x 3)" in capsys.readouterr().out


def needs_reply_metrics():
    """Skip without the [eval] extra's BLEU and ROUGE packages, which score replies."""
    pytest.importorskip("sacrebleu", reason="BLEU needs the [eval] extra (sacrebleu)")
    pytest.importorskip("rouge_score", reason="ROUGE-L needs the [eval] extra (rouge-score)")


def test_eval_task_reply_through_the_cli(pairs_run, pairs_data, tmp_path, capsys):
    needs_reply_metrics()
    report_file = tmp_path / "reply.json"
    assert main(["eval", "--task", "reply", str(pairs_run), "--data", str(pairs_data.dir), "--limit", "4", "-n", "2",
                 "--steps", "2", "--no-progress", "--output", str(report_file)]) == 0
    assert "reply: 4 prompts x 2 replies" in capsys.readouterr().out
    report = json.loads(report_file.read_text())
    assert report["n_prompts"] == 4 and report["k"] == 2 and report["generation"]["nfe_mean"] == 3
    for metric in ("bleu", "bleu_smoothed", "rouge_l"):
        assert report[metric]["top_k"] >= report[metric]["avg"] >= 0
    example = report["examples"][0]
    assert example["prompt"].startswith("question ") and example["reference"].startswith("the ")


# --- code infilling scored by pass@k ------------------------------------------------------------


class Oracle:
    """A 'denoiser' that knows each problem's filled row: it finds the row by its clamped tokens."""

    def __init__(self, problems, tok, seq_len, filling):
        self.vocab = tok.vocab_size
        self.rows = []
        for problem in problems:
            ids, given = problem.template.row(seq_len, tok)
            full, position = ids.clone(), 0
            for piece, text in zip(problem.template.pieces, filling(problem)):
                size = len(piece.ids) if isinstance(piece, Given) else piece.size
                if isinstance(piece, Hole):
                    content = tok.encode(text)
                    full[position : position + size] = torch.tensor((content + [tok.eot_id] * size)[:size])
                position += size
            self.rows.append((ids, given, full))

    def __call__(self, x, t):
        shown = x.argmax(-1) if x.is_floating_point() else x
        logits = []
        for row in shown:
            (full,) = [full for ids, given, full in self.rows if torch.equal(row[given], ids[given])]
            logits.append(torch.nn.functional.one_hot(full, self.vocab).float() * 30)
        return torch.stack(logits)


def removed_lines(problem):
    """What the oracle writes into each piece: the removed lines (stripped) in the holes."""
    lines = iter(problem.removed)
    return [None if isinstance(piece, Given) else next(lines).strip() + "\n" for piece in problem.template.pieces]


@pytest.mark.parametrize("name", ["klflow", "mdlm"])
def test_pass_at_k_is_one_for_a_known_correct_filling(tok, name):
    problems, skipped = infill_problems(TASKS, 0.5, 12, tok, 96, seed=0)
    assert len(problems) == 2 and skipped == {"too_long": 0, "no_line_fits": 0}
    assert all("<|hole-line:12|>" in p.text for p in problems)
    method = build_method(name, Config(), tok.vocab_size, special_tokens(tok))
    oracle = Oracle(problems, tok, 96, removed_lines)
    sampler = CheckpointSampler(method, oracle, tok, 96, torch.device("cpu"), {}, {"method": name})
    report = score_infill(sampler, problems, num_samples=3, ks=(1, 3), steps=3, progress=False)
    assert report["scores"]["pass@1"] == 1.0 and report["scores"]["pass@3"] == 1.0
    assert report["canonical_pass_rate"] == 1.0 and report["examples"][0]["status"] == ["passed"] * 3

    wrong = Oracle(problems, tok, 96, lambda p: [None if isinstance(x, Given) else "return 0\n" for x in p.template.pieces])
    sampler = CheckpointSampler(method, wrong, tok, 96, torch.device("cpu"), {}, {"method": name})
    assert score_infill(sampler, problems, 2, (1,), 3, progress=False)["scores"]["pass@1"] == 0.0


def test_infill_problems_skip_what_does_not_fit(tok):
    problems, skipped = infill_problems(TASKS, 1.0, 12, tok, 20)
    assert problems == [] and skipped == {"too_long": 2, "no_line_fits": 0}
    problems, skipped = infill_problems(TASKS, 1.0, 1, tok, 200)
    assert skipped["no_line_fits"] == 2
    own, _ = infill_problems(TASKS, 1.0, 0, tok, 400)
    sizes = [hole.size for hole in own[0].template.holes]
    assert sizes == [len(tok.encode(line.strip() + "\n")) for line in own[0].removed]
    with pytest.raises(KLFlowError, match="fraction of lines removed must lie in"):
        infill_problems(TASKS, 0.0, 12, tok, 96)


def test_evaluate_infill_and_reply_from_a_checkpoint(pairs_run, pairs_data):
    needs_reply_metrics()
    report = evaluate_infill(pairs_run, fraction=0.5, num_samples=2, ks=(1, 2), steps=2, line_slot=0, tasks=TASKS,
                             seq_len=128, progress=False)
    assert report["n_problems"] == report["n_fitting"] == report["n_tasks"] == 2
    assert set(report["scores"]) == {"pass@1", "compiled@1", "pass@2", "compiled@2"}
    assert report["canonical_pass_rate"] == 1.0 and report["line_slot"] == 0 and report["trained_line_slot"] is None
    reply = evaluate_reply(pairs_run, n_prompts=3, num_samples=2, steps=2, data=str(pairs_data.dir), progress=False)
    assert reply["n_prompts"] == 3 and len(reply["examples"][0]["replies"]) == 2


@pytest.mark.parametrize("input", ["evidence", "simplex"])
def test_the_klflow_loss_feeds_an_evidence_denoiser_its_posterior_drawn_from_the_noise(input, tmp_path):
    """network_forward exposes the Denoiser's input through torch.compile and DDP wrappers; KLPath
    then hands q(x_t, t) to an evidence model (posterior=True): the loss of the same noise as
    when the network maps x_t itself."""
    config = Config()
    config.model.input = input
    method = build_method("klflow", config, V, SPECIALS)
    torch.manual_seed(0)
    extra = {"input": "evidence", "path_beta": config.path.beta} if input == "evidence" else {}
    net = Denoiser(V, n_layer=1, n_head=2, d_model=16, **extra)
    forward = network_forward(net, None, torch.device("cpu"))
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.compile(torch.nn.parallel.DistributedDataParallel(net))
        assert forward.input == input == network_forward(wrapped, None, torch.device("cpu")).input
    finally:
        torch.distributed.destroy_process_group()
    ids = torch.randint(3, V, (4, 6))
    loss = method.loss(forward, ids, generator=torch.Generator().manual_seed(1))
    same = torch.Generator().manual_seed(1)
    t, weight = method.time_sampling.sample(4, same)
    by_x_t = method.path.loss(lambda x, t: forward(x, t), ids, generator=same, t=t, weight=weight)
    torch.testing.assert_close(loss, by_x_t, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert net.embed.grad.abs().sum() > 0
