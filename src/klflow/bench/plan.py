"""What a bench run makes, from a preset: the models to train and the sampling cells to evaluate.

No I/O here. A cell is one (model, sampler settings, NFE, sample count, seed); the grid and the
sweeps may ask for the same cell (the hybrid at its default t* is in the grid, the t* sweep, the
beta sweep and the frontier), which is then made and evaluated once. A task bench (task.kind
reply or infill) has the grid only, k samples per prompt in each cell, and the task's settings in
each cell's spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from klflow.bench.preset import (
    BenchPreset,
    bench_variants,
    distill_students,
    parse_frontier_entry,
    parse_setting,
    variant_settings,
)
from klflow.config import Config, Settings, merge_settings
from klflow.errors import KLFlowError
from klflow.methods import Method, SpecialTokens, build_method, check_sample_options


@dataclass(frozen=True)
class Distillation:
    """Where a distilled student's training data comes from: `num_samples` of the teacher model's sequences,
    drawn with these sampler options, steps, batch size and seed (klflow.distill.distill)."""

    teacher: str  # ModelPlan.key
    options: dict[str, Any]
    steps: int
    num_samples: int
    batch_size: int
    seed: int
    key: str  # the data folder's name: the teacher and a digest of everything the data depends on


@dataclass(frozen=True)
class ModelPlan:
    """One training run: a method on the shared experiment (klflow possibly at another beta), on the preset's data
    or, for a distilled student, on a teacher's samples."""

    key: str
    config: Config
    distillation: Distillation | None = None

    @property
    def method(self) -> str:
        return self.config.method.name


@dataclass
class CellPlan:
    """One set of samples and its evaluation."""

    key: str  # folder name: label, NFE and a digest of the spec
    model: str  # ModelPlan.key
    method: str
    series: str  # method and sampler, one line in the plots: "klflow-hybrid", "mdlm"
    label: str  # model and the settings that differ from the method's defaults
    options: dict[str, Any]  # passed to generate()
    settings: dict[str, Any]  # generate()'s effective settings, defaults filled in
    nfe: int  # network calls per sample batch (nominal; mdlm's cache may make fewer)
    steps: int
    num_samples: int
    spec: dict[str, Any]  # everything the samples depend on
    groups: list[str] = field(default_factory=list)  # grid, t_star, beta, frontier, ablation


@dataclass
class BenchPlan:
    models: list[ModelPlan]
    cells: list[CellPlan]
    t_star: list[dict[str, Any]]  # {"fraction", "t_star", "cell"}
    beta: list[dict[str, Any]]  # {"beta", "model", "sampler", "cell"}
    frontier: list[dict[str, Any]]  # {"series", "knob", "cell"}
    ablation: list[dict[str, Any]]  # {"model", "setting", "nfe", "cell"}

    def cell(self, key: str) -> CellPlan:
        return next(c for c in self.cells if c.key == key)


def steps_for_nfe(method: Method, nfe: int, seq_len: int, options: Mapping[str, Any] | None = None) -> int | None:
    """The loop steps at which `method` with these sampler options makes `nfe` network calls (klflow's
    self_condition="recompute" makes two per step); None when its NFE is fixed (ar: the length)."""
    options = options or {}
    if method.nfe(1, seq_len, **options) == method.nfe(2 * nfe + 2, seq_len, **options):
        return None
    for steps in range(1, 2 * nfe + 3):
        if method.nfe(steps, seq_len, **options) == nfe:
            return steps
    raise KLFlowError(f"method {method.name} cannot make exactly {nfe} network calls; choose another NFE")


def make_plan(preset: BenchPreset, vocab_size: int, specials: SpecialTokens) -> BenchPlan:
    """The models and cells of a preset, for data with this vocabulary."""
    s = preset.sections
    builder = _Builder(preset, vocab_size, specials)
    main = {m: builder.model(m, m, {}) for m in preset.bench.methods}
    variants = [builder.model(name, method, settings, series=name)
                for name, (method, settings) in bench_variants(preset).items()]
    students = []
    if s.distill.students:
        distillation = builder.distillation(builder.models[s.distill.teacher])
        students = [builder.model(name, method, settings, series=name, distillation=distillation)
                    for name, (method, settings) in distill_students(preset).items()]
    per_cell = preset.bench.num_samples if preset.task.kind == "unconditional" else preset.task.samples_per_prompt
    for model in [*main.values(), *variants, *students]:
        samplers = preset.bench.samplers if model.method == "klflow" else [None]
        for sampler in samplers:
            options = {"sampler": sampler} if sampler else {}
            for nfe in preset.bench.nfe:
                builder.cell(model, options, nfe, per_cell, "grid")

    t_star = []
    if s.t_star.fractions:
        klflow = builder.methods[main["klflow"].key]
        n = preset.samples_for(s.t_star)
        cell = builder.cell(main["klflow"], {"sampler": "hybrid"}, s.t_star.nfe, n, "t_star")
        t_star.append({"fraction": cell.settings["t_star"] / klflow.path.t_max, "t_star": cell.settings["t_star"],
                       "default": True, "cell": cell.key})
        for fraction in s.t_star.fractions:
            options = _t_star_options(fraction, klflow.path.t_max)
            cell = builder.cell(main["klflow"], options, s.t_star.nfe, n, "t_star")
            t_star.append({"fraction": fraction, "t_star": round(fraction * klflow.path.t_max, 6), "default": False,
                           "cell": cell.key})

    beta = []
    if s.beta.betas:
        n = preset.samples_for(s.beta)
        betas = [preset.experiment.path.beta] + [b for b in s.beta.betas if b != preset.experiment.path.beta]
        for value in betas:
            model = main["klflow"] if value == preset.experiment.path.beta else \
                builder.model(f"klflow-beta{value:g}", "klflow", {("path", "beta"): value})
            cell = builder.cell(model, {"sampler": s.beta.sampler}, s.beta.nfe, n, "beta")
            beta.append({"beta": value, "model": model.key, "sampler": s.beta.sampler, "cell": cell.key})

    frontier = []
    n = preset.samples_for(s.frontier)
    for entry in s.frontier.settings:
        name, options = parse_frontier_entry(entry)
        model = builder.models[name]  # a method of bench.methods or a bench variant (checked with the preset)
        base_options = {k: v for k, v in options.items() if k == "sampler"}
        base = builder.cell(model, base_options, s.frontier.nfe, n, "frontier")
        if not any(f["cell"] == base.key for f in frontier):
            frontier.append({"series": base.series, "knob": "default", "cell": base.key})
        cell = builder.cell(model, options, s.frontier.nfe, n, "frontier")
        knob = ",".join(f"{k}={v}" for k, v in options.items() if k != "sampler")
        frontier.append({"series": cell.series, "knob": knob or "default", "cell": cell.key})

    ablation = []
    if s.ablation.settings:
        n = preset.samples_for(s.ablation)
        variants = [builder.model(name, "klflow", settings) for name, settings in variant_settings(preset).items()]
        for model in [main["klflow"], *variants]:
            for setting in s.ablation.settings:
                for nfe in s.ablation.nfe:
                    cell = builder.cell(model, parse_setting(setting), nfe, n, "ablation")
                    ablation.append({"model": model.key, "setting": setting, "nfe": cell.nfe, "cell": cell.key})
    if not builder.cells:
        raise KLFlowError("the preset samples nothing: give bench.samplers (for klflow), another method in "
                          "bench.methods, or ablation.settings")
    return BenchPlan(list(builder.models.values()), list(builder.cells.values()), t_star, beta, frontier, ablation)


def _t_star_options(fraction: float, t_max: float) -> dict[str, Any]:
    if fraction == 0.0:
        return {"sampler": "randomized"}
    if fraction == 1.0:
        return {"sampler": "ode"}
    return {"sampler": "hybrid", "t_star": round(fraction * t_max, 6)}


class _Builder:
    """Collects models and cells, each once."""

    def __init__(self, preset: BenchPreset, vocab_size: int, specials: SpecialTokens) -> None:
        self.preset = preset
        self.vocab_size = vocab_size
        self.specials = specials
        self.models: dict[str, ModelPlan] = {}
        self.methods: dict[str, Any] = {}
        self.series: dict[str, str] = {}
        self.cells: dict[str, CellPlan] = {}

    def model(self, key: str, method: str, settings: Settings, series: str | None = None,
              distillation: Distillation | None = None) -> ModelPlan:
        """A model to train: the preset's experiment with method.name = method and these settings (on a teacher's
        samples with a distillation); `series` names its cells in the tables and plots (default: the method's
        name)."""
        config = merge_settings(self.preset.experiment.to_dict(), {("method", "name"): method, **settings})
        if key in self.models:
            # A bench variant that is also an ablation variant, with the same settings, is one model.
            if self.models[key].config == config:
                return self.models[key]
            raise KLFlowError(f"two models of the bench are named {key!r} with different settings; rename one")
        plan = ModelPlan(key, config, distillation)
        self.models[key] = plan
        self.methods[key] = build_method(method, config, self.vocab_size, self.specials)
        self.series[key] = series or method
        return plan

    def distillation(self, teacher: ModelPlan) -> Distillation:
        """The data of the preset's distill section, drawn from `teacher`."""
        distill = self.preset.sections.distill
        method = self.methods[teacher.key]
        options = distill.options
        check_sample_options(method, options)
        steps = steps_for_nfe(method, distill.nfe, teacher.config.train.seq_len, options) or 1
        spec = {"teacher": teacher.key, "teacher_config": teacher.config.to_dict(), "options": options, "steps": steps,
                "num_samples": distill.num_samples, "batch_size": distill.batch_size, "seed": distill.seed}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
        return Distillation(teacher.key, options, steps, distill.num_samples, distill.batch_size, distill.seed,
                            f"{teacher.key}-{digest}")

    def cell(self, model: ModelPlan, options: dict[str, Any], nfe: int, num_samples: int, group: str) -> CellPlan:
        method = self.methods[model.key]
        check_sample_options(method, options)
        seq_len = model.config.train.seq_len
        steps = steps_for_nfe(method, nfe, seq_len, options)
        if steps is None:  # one NFE only: the cell is the same at every requested NFE
            steps, nfe = 1, method.nfe(1, seq_len, **options)
        settings = method.sample_settings(**options)
        defaults = method.sample_settings()
        shown = {k: v for k, v in settings.items() if k == "sampler" or (v is not None and v != defaults.get(k))}
        label = " ".join([model.key] + [str(v) if k == "sampler" else f"{k}={v}" for k, v in shown.items()])
        name = self.series[model.key]
        series = f"{name}-{settings['sampler']}" if "sampler" in settings else name
        bench = self.preset.bench
        spec = {"model": model.key, "settings": settings, "steps": steps, "nfe": nfe, "num_samples": num_samples,
                "seed": bench.seed, "sample_batch_size": bench.sample_batch_size,
                "sample_precision": bench.sample_precision, "seq_len": seq_len}
        if self.preset.task.kind != "unconditional":
            spec["task"] = dataclasses.asdict(self.preset.task)
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
        key = f"{_slug(label)}-nfe{nfe}-n{num_samples}-{digest}"
        if key not in self.cells:
            self.cells[key] = CellPlan(key, model.key, method.name, series, label, dict(options), settings, nfe, steps,
                                       num_samples, spec)
        cell = self.cells[key]
        if group not in cell.groups:
            cell.groups.append(group)
        return cell


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace(" ", "-"))
