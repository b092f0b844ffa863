"""Bench presets: one TOML file holds the experiment every method is trained with and what is measured.

A preset has the experiment sections of a training preset ([data], [model], [path], [train]) and
the bench sections below, read and checked as klflow.config reads and checks a training preset
(unknown keys, types, finite numbers). `section.key=value` overrides reach both; `method.*` is not settable
(the bench trains every method in bench.methods) and neither is train.max_minutes (the budget is
optimizer steps, so that results do not depend on the machine's load).

[task] says what a cell is scored on: unconditional samples (gen-PPL, entropy, MAUVE; every
sweep applies) or a real task (reply: BLEU/ROUGE-L; infill: pass@k), for which the bench grid
(methods x samplers x NFE) is the experiment. [ablation] retrains klflow with other experiment
settings and samples each model with a list of sampler settings at an NFE grid.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from klflow.config import (
    PRECISIONS,
    Config,
    Settings,
    build_dataclass,
    check,
    merge_settings,
    parse_assignment,
    parse_override,
    parse_overrides,
    read_preset,
    toml_names,
)
from klflow.errors import KLFlowError
from klflow.evaluation.mauve import DEFAULT_SEEDS, MIN_SEEDS, MIN_TEXTS
from klflow.evaluation.perplexity import PPL_MODES
from klflow.evaluation.tasks import TASKS
from klflow.flow import SAMPLERS, SWITCH_CALIBRATIONS
from klflow.methods import method_names

EXPERIMENT_SECTIONS = ("data", "model", "path", "train")
PRESET_FOLDER = resources.files("klflow.bench") / "presets"
TASK_KINDS = ("unconditional", *TASKS)
HUMANEVAL = "humaneval"
_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass
class BenchSettings:
    """What is trained, and the main grid: every method (klflow with each sampler) at every NFE."""

    description: str = ""
    needs_data: str | None = None  # set: the user must name the data (--data); the text says which
    methods: list[str] = field(default_factory=lambda: ["klflow", "ar", "mdlm", "dfm"])
    # More models in the grid: "NAME:method.name=METHOD[,section.key=value]", a method trained with other
    # experiment settings or hyperparameters, e.g. "fisher-rao-evidence:method.name=fisher-rao,model.input=evidence"
    variants: list[str] = field(default_factory=list)
    samplers: list[str] = field(default_factory=lambda: list(SAMPLERS))  # klflow's samplers in the grid
    nfe: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    num_samples: int = 128  # per cell
    sample_batch_size: int = 64  # samples per generate() call
    sample_precision: str = "auto"  # the network's autocast while sampling: auto = bf16 where native (runtime.autocast_dtype)
    seed: int = 0

    def validate(self) -> None:
        check(bool(self.methods), "bench.methods must name at least one method")
        unknown = sorted(set(self.methods) - set(method_names()))
        check(not unknown, f"bench.methods: unknown method(s) {', '.join(unknown)}; methods: {', '.join(method_names())}")
        check(len(set(self.methods)) == len(self.methods), "bench.methods lists a method twice")
        check(set(self.samplers) <= set(SAMPLERS), f"bench.samplers must be among {', '.join(SAMPLERS)}, got {self.samplers}")
        check(not self.samplers or "klflow" in self.methods, "bench.samplers are klflow's: add klflow to bench.methods")
        check(bool(self.nfe) and all(n >= 1 for n in self.nfe), "bench.nfe must list network-evaluation counts >= 1")
        check(self.num_samples >= 1 and self.sample_batch_size >= 1, "bench.num_samples and bench.sample_batch_size must be >= 1")
        check(self.sample_precision in PRECISIONS, f"bench.sample_precision must be one of {', '.join(PRECISIONS)}")
        names = [parse_bench_variant(entry)[0] for entry in self.variants]
        check(len(set(names)) == len(names), "bench.variants names a variant twice")


@dataclass
class TStarSweep:
    """Hybrid at one NFE and several t*: the default t* always, plus these fractions of t_max.

    A fraction 0 is the randomized sampler and 1 the ODE, exactly (the hybrid takes an ODE step
    while t < t*, and every step's t is below t_max).
    """

    nfe: int = 64
    fractions: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.75, 1.0])
    num_samples: int | None = None  # None: bench.num_samples

    def validate(self) -> None:
        check(self.nfe >= 1, "t_star.nfe must be >= 1")
        check(all(0.0 <= f <= 1.0 for f in self.fractions), "t_star.fractions must lie in [0, 1] (fractions of t_max)")


@dataclass
class BetaSweep:
    """klflow trained again at each beta (same steps and data), sampled at one NFE."""

    betas: list[float] = field(default_factory=lambda: [0.003, 0.03])  # besides path.beta
    nfe: int = 64
    sampler: str = "hybrid"
    num_samples: int | None = None

    def validate(self) -> None:
        check(all(0.0 < b < 1.0 for b in self.betas), "beta.betas must lie in (0, 1)")
        check(self.nfe >= 1, "beta.nfe must be >= 1")
        check(self.sampler in SAMPLERS, f"beta.sampler must be one of {', '.join(SAMPLERS)}")


@dataclass
class FrontierSweep:
    """Sampling knobs of the stochastic samplers, for the gen-PPL vs entropy frontier.

    Each entry is "MODEL:key=value[,key=value]" (the options of `klflow sample --option`), MODEL a method of
    bench.methods or a bench variant; each is plotted with the same model and sampler at default settings.
    """

    nfe: int = 64
    settings: list[str] = field(default_factory=list)
    num_samples: int | None = None

    def validate(self) -> None:
        check(self.nfe >= 1, "frontier.nfe must be >= 1")
        for entry in self.settings:
            parse_frontier_entry(entry)


@dataclass
class TaskSettings:
    """What every cell is scored on (klflow.evaluation.tasks for the real tasks).

    unconditional: samples from scratch, by gen-PPL, entropy and MAUVE against the data row.
    reply: `prompts` held-out prompts of the pairs data (data.layout = "pairs"), each continued
        `samples_per_prompt` times; BLEU and ROUGE-L, Top-k (best of k) and Avg.
    infill: the first `prompts` code problems that fit the window (HumanEval, or a JSONL file of
        problems in its format) with `fraction` of their solution lines removed, each filled
        `samples_per_prompt` times and run in the sandbox: pass@k and compiled@k for k in pass_k.
        The models train on whole-line masks (data.layout = "infill", data.unit = "lines").
    """

    kind: str = "unconditional"
    prompts: int = 50
    samples_per_prompt: int = 5
    fraction: float = 0.1
    pass_k: list[int] = field(default_factory=lambda: [1])
    problems: str = HUMANEVAL

    def validate(self) -> None:
        check(self.kind in TASK_KINDS, f"task.kind must be one of {', '.join(TASK_KINDS)}, got {self.kind!r}")
        check(self.prompts >= 1 and self.samples_per_prompt >= 1, "task.prompts and task.samples_per_prompt must be >= 1")
        check(0.0 < self.fraction <= 1.0, f"task.fraction must lie in (0, 1], got {self.fraction}")
        check(self.kind != "infill" or (bool(self.pass_k) and all(1 <= k <= self.samples_per_prompt for k in self.pass_k)),
              f"task.pass_k must lie in [1, task.samples_per_prompt = {self.samples_per_prompt}], got {self.pass_k}")


@dataclass
class AblationSweep:
    """The preset's klflow and variants of it, each trained alike, each sampled with every setting at every NFE.

    variants: "NAME:section.key=value[,section.key=value]", experiment settings that differ from the
    preset's, e.g. "evidence-power:model.input=evidence,path.time_sampling=power" (values without commas).
    settings: "key=value[,key=value]", klflow's sampling options, e.g. "sampler=ode,integrator=exponential";
    switch_entropy = ode or data is calibrated for each model and NFE before sampling (klflow.flow.switch).
    """

    variants: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)
    nfe: list[int] = field(default_factory=lambda: [4, 8, 16, 64])
    num_samples: int | None = None  # None: bench.num_samples

    def validate(self) -> None:
        check(bool(self.nfe) and all(n >= 1 for n in self.nfe), "ablation.nfe must list network-evaluation counts >= 1")
        names = [parse_variant(entry)[0] for entry in self.variants]
        check(len(set(names)) == len(names), "ablation.variants names a variant twice")
        for entry in self.settings:
            parse_setting(entry)
        check(not self.variants or bool(self.settings), "ablation.variants need ablation.settings to sample them with")


@dataclass
class DistillSettings:
    """Students trained on a teacher's samples (sequence-level distillation, klflow.distill), sampled on the grid.

    teacher: a model of the bench (a method of bench.methods or a bench variant) whose `num_samples` sequences,
    drawn with `seed` and the sampler options `settings` ("key=value[,key=value]", e.g. "temperature=0.8") at
    `nfe` network calls (ar's NFE is the length), become the students' training data; the real validation
    split is kept, so the students' validation losses measure against the real text.
    students: "NAME:method.name=METHOD[,section.key=value]" as bench.variants, trained on that data with the
    preset's steps and sampled like the grid's models. The teacher's training and sampling are part of a
    student's cost: the report names both.
    """

    teacher: str = ""
    settings: str = ""
    nfe: int = 64
    num_samples: int = 16384
    batch_size: int = 128
    seed: int = 1
    students: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check(not self.students or bool(self.teacher),
              "distill.students need distill.teacher, the bench model whose samples they train on")
        check(self.num_samples >= 1 and self.batch_size >= 1 and self.nfe >= 1,
              "distill.num_samples, distill.batch_size and distill.nfe must be >= 1")
        if self.settings:
            _options(self.settings)
        names = [parse_bench_variant(entry)[0] for entry in self.students]
        check(len(set(names)) == len(names), "distill.students names a student twice")

    @property
    def options(self) -> dict[str, Any]:
        """The teacher's sampler options."""
        return _options(self.settings) if self.settings else {}


@dataclass
class EvaluationSettings:
    """How every cell is scored (see `klflow eval`)."""

    evaluator: str = "smollm2"
    ppl_mode: str = "mdlm"
    max_length: int = 1024
    batch_size: int = 16
    device: str = "auto"
    mauve: bool = True
    mauve_seeds: int = DEFAULT_SEEDS  # k-means seeds behind each MAUVE's mean and range

    def validate(self) -> None:
        check(self.ppl_mode in PPL_MODES, f"evaluation.ppl_mode must be one of {', '.join(PPL_MODES)}")
        check(self.mauve_seeds >= MIN_SEEDS, f"evaluation.mauve_seeds must be >= {MIN_SEEDS} (MAUVE's spread)")
        check(self.max_length >= 1 and self.batch_size >= 1, "evaluation.max_length and evaluation.batch_size must be >= 1")


@dataclass
class PerformanceSettings:
    """The side-by-side timing of training steps and the matmul peak behind the MFU."""

    repeats: int = 5
    matmul_size: int | None = None  # None: 1024 on a CPU, 8192 on a GPU

    def validate(self) -> None:
        check(self.repeats >= 1, "performance.repeats must be >= 1")
        check(self.matmul_size is None or self.matmul_size >= 64, "performance.matmul_size must be >= 64")


@dataclass
class BenchSections:
    """The bench tables of a preset, each built by build_dataclass (a table the preset leaves out: its defaults)."""

    bench: BenchSettings
    task: TaskSettings
    t_star: TStarSweep
    beta: BetaSweep
    frontier: FrontierSweep
    ablation: AblationSweep
    distill: DistillSettings
    evaluation: EvaluationSettings
    performance: PerformanceSettings


BENCH_SECTIONS = tuple(f.name for f in dataclasses.fields(BenchSections))


@dataclass
class BenchPreset:
    """A resolved, validated preset: the shared experiment and the bench sections."""

    name: str
    experiment: Config
    sections: BenchSections

    @property
    def bench(self) -> BenchSettings:
        return self.sections.bench

    @property
    def task(self) -> TaskSettings:
        return self.sections.task

    def samples_for(self, sweep: TStarSweep | BetaSweep | FrontierSweep | AblationSweep) -> int:
        return sweep.num_samples or self.bench.num_samples

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "experiment": self.experiment.to_dict(), **dataclasses.asdict(self.sections)}


def bench_preset_names() -> list[str]:
    return toml_names(PRESET_FOLDER)


def load_bench_preset(name_or_file: str, overrides: list[str] | tuple[str, ...] = (), data: str | None = None) -> BenchPreset:
    """A bench preset (see bench_preset_names) or TOML file, then `section.key=value` overrides and the data."""
    raw = read_preset(name_or_file, PRESET_FOLDER, "bench preset")
    experiment_raw = {k: v for k, v in raw.items() if k in EXPERIMENT_SECTIONS}
    bench_raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items() if k not in EXPERIMENT_SECTIONS}
    settings = {}
    for item in overrides:
        (section, name), value = parse_override(item)
        if section == "method":
            raise KLFlowError("the bench trains every method of bench.methods; set bench.methods instead of method.*")
        if section in EXPERIMENT_SECTIONS:
            settings[section, name] = value
        elif section in BENCH_SECTIONS:
            bench_raw.setdefault(section, {})[name] = value
        else:
            raise KLFlowError(f"override {item!r} must look like section.key=value with a section among "
                              f"{', '.join(EXPERIMENT_SECTIONS + BENCH_SECTIONS)}")
    named_data = data is not None or ("data", "source") in settings or ("data", "dir") in settings
    if data is not None:
        settings["data", "dir" if (Path(data).expanduser() / "meta.json").is_file() else "source"] = data
    sections = build_dataclass(BenchSections, bench_raw)
    for section in BENCH_SECTIONS:
        getattr(sections, section).validate()
    if sections.bench.needs_data and not named_data:
        raise KLFlowError(f"bench preset {name_or_file} needs its data: pass --data with {sections.bench.needs_data}")
    experiment = merge_settings(experiment_raw, settings)
    check(experiment.train.max_minutes is None,
          "the bench budgets training in optimizer steps (train.max_steps), not train.max_minutes")
    preset = BenchPreset(Path(name_or_file).stem, experiment, sections)
    _check_variants(preset)  # first: the other checks name the variants
    if preset.task.kind == "unconditional":
        _check_sample_counts(preset)
    else:
        _check_task(preset)
    _check_distill(preset)
    return preset


def variant_settings(preset: BenchPreset) -> dict[str, Settings]:
    """Each ablation variant's experiment settings, by name."""
    return dict(parse_variant(entry) for entry in preset.sections.ablation.variants)


def parse_frontier_entry(entry: str) -> tuple[str, dict[str, Any]]:
    """'MODEL:key=value,key=value' -> (MODEL, {key: value}), MODEL a method of bench.methods or a bench variant;
    values read as TOML, else as strings."""
    model, sep, rest = entry.partition(":")
    if not sep or not _NAME.fullmatch(model) or not rest:
        raise KLFlowError(f"frontier.settings entry {entry!r} must look like MODEL:key=value[,key=value] with MODEL "
                          f"a method of bench.methods or a bench variant")
    return model, _options(rest)


def parse_setting(entry: str) -> dict[str, Any]:
    """An ablation setting 'key=value[,key=value]' -> klflow's sampling options."""
    options = _options(entry)
    switch = options.get("switch_entropy")
    check(switch is None or switch in SWITCH_CALIBRATIONS or (isinstance(switch, (int, float)) and switch >= 0),
          f"ablation.settings entry {entry!r}: switch_entropy must be a number of nats >= 0 or one of "
          f"{', '.join(SWITCH_CALIBRATIONS)} (calibrated)")
    return options


def parse_variant(entry: str, sections: tuple[str, ...] = EXPERIMENT_SECTIONS,
                  where: str = "ablation.variants") -> tuple[str, Settings]:
    """A variant 'NAME:section.key=value[,section.key=value]' -> (NAME, its settings by (section, key))."""
    name, sep, rest = entry.partition(":")
    settings = parse_overrides(item.strip() for item in rest.split(",")) if rest.strip() else {}
    check(bool(sep) and bool(_NAME.fullmatch(name)) and bool(settings) and {s for s, _ in settings} <= set(sections),
          f"{where} entry {entry!r} must look like NAME:section.key=value[,section.key=value] with NAME "
          f"of letters, digits, '.', '_' or '-' and sections among {', '.join(sections)}")
    check(name not in method_names(), f"variant {name!r} of {where} is named like a method; choose another name")
    return name, settings


def parse_bench_variant(entry: str) -> tuple[str, str, Settings]:
    """A bench variant 'NAME:method.name=METHOD[,section.key=value]' -> (NAME, METHOD, its other settings)."""
    name, settings = parse_variant(entry, ("method",) + EXPERIMENT_SECTIONS, "bench.variants")
    method = settings.get(("method", "name"))
    check(method in method_names(),
          f"bench.variants entry {entry!r} must set method.name to one of {', '.join(method_names())}")
    return name, method, {key: value for key, value in settings.items() if key != ("method", "name")}


def bench_variants(preset: BenchPreset) -> dict[str, tuple[str, Settings]]:
    """Each bench variant's method and other experiment settings, by name."""
    return {name: (method, overrides) for name, method, overrides in map(parse_bench_variant, preset.bench.variants)}


def distill_students(preset: BenchPreset) -> dict[str, tuple[str, Settings]]:
    """Each distilled student's method and other experiment settings, by name."""
    return {name: (method, overrides)
            for name, method, overrides in map(parse_bench_variant, preset.sections.distill.students)}


def _options(text: str) -> dict[str, Any]:
    return dict(parse_assignment(pair) for pair in text.split(","))


def _check_task(preset: BenchPreset) -> None:
    """A real task scores the bench grid of models trained on its layout; the sweeps are unconditional."""
    s, kind, data = preset.sections, preset.task.kind, preset.experiment.data
    if kind == "reply":
        check(data.layout == "pairs", f'task.kind=reply trains on prompt/reply pairs: set data.layout="pairs", '
                                      f"got {data.layout!r}")
    else:
        check(data.layout == "infill" and data.unit == "lines",
              f'task.kind=infill trains on whole-line masks: set data.layout="infill" and data.unit="lines", '
              f"got {data.layout!r} and {data.unit!r}")
    check(not (s.t_star.fractions or s.beta.betas or s.frontier.settings or s.ablation.variants or s.ablation.settings),
          f"the t*, beta, frontier and ablation sweeps score unconditional samples; empty them for task.kind={kind}")


def _check_variants(preset: BenchPreset) -> None:
    ablation = preset.sections.ablation
    check(not (ablation.variants or ablation.settings) or "klflow" in preset.bench.methods,
          "the ablation is klflow's: add klflow to bench.methods or empty ablation.variants and ablation.settings")
    base = preset.experiment.to_dict()
    for name, settings in variant_settings(preset).items():
        check(merge_settings(base, settings).to_dict() != base,
              f"ablation variant {name!r} changes nothing in the preset's experiment")
    ablation_variants = variant_settings(preset)
    variants = {name: merge_settings(base, {("method", "name"): method, **settings}).to_dict()
                for name, (method, settings) in bench_variants(preset).items()}
    # The same name in both lists is one model (the grid's and the ablation's) when the settings agree.
    clashes = [name for name in sorted(set(ablation_variants) & set(variants))
               if merge_settings(base, ablation_variants[name]).to_dict() != variants[name]]
    check(not clashes, f"bench.variants and ablation.variants both name {', '.join(clashes)} with different settings")
    for name, (method, _) in bench_variants(preset).items():
        check(method not in preset.bench.methods
              or variants[name] != merge_settings(base, {("method", "name"): method}).to_dict(),
              f"bench variant {name!r} is the same model as {method} of bench.methods")


def grid_models(preset: BenchPreset) -> list[str]:
    """The keys of the models on the bench grid: the methods of bench.methods and the bench variants."""
    return [*preset.bench.methods, *bench_variants(preset)]


def _check_distill(preset: BenchPreset) -> None:
    distill = preset.sections.distill
    if not distill.students:
        return
    models = grid_models(preset)
    check(distill.teacher in models, f"distill.teacher {distill.teacher!r} must be a model of the bench: one of "
                                     f"{', '.join(models)}")
    clashes = sorted(set(distill_students(preset)) & (set(models) | set(variant_settings(preset))))
    check(not clashes, f"distill.students names {', '.join(clashes)}, already a model of the bench; rename it")
    check(preset.task.kind == "unconditional", "distill.students are sampled unconditionally; empty them for "
                                               f"task.kind={preset.task.kind}")


def _check_sample_counts(preset: BenchPreset) -> None:
    s = preset.sections
    sweeps = (s.t_star, s.beta, s.frontier) + ((s.ablation,) if s.ablation.settings else ())
    counts = [preset.bench.num_samples] + [preset.samples_for(sweep) for sweep in sweeps]
    if s.evaluation.mauve:
        check(min(counts) >= MIN_TEXTS, f"MAUVE needs at least {MIN_TEXTS} samples per cell; raise the sample "
                                        "counts or set evaluation.mauve=false")
    models = grid_models(preset)
    for model, _ in map(parse_frontier_entry, s.frontier.settings):
        check(model in models, f"frontier.settings names {model}, which is neither in bench.methods nor a bench "
                               "variant")
    check((not s.t_star.fractions and not s.beta.betas) or "klflow" in preset.bench.methods,
          "the t* and beta sweeps are klflow's: add klflow to bench.methods or empty t_star.fractions and beta.betas")
