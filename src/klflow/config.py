"""Typed configuration: TOML presets, typed settings and dotted overrides (`train.lr=3e-4`), strict validation.

Everything a user types is checked here, at the edge; the rest of klflow takes plain arguments. There is
one way in: a nested dict (a TOML preset, a checkpoint's experiment) with typed settings merged into it
by (section, key) (merge_settings), then coerced to the annotated types and validated once
(Config.from_dict). `--set section.key=value` text is parsed into such settings by parse_overrides.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from klflow.data.layouts import CONDITIONAL_LAYOUTS, LAYOUTS, check_layout_options
from klflow.errors import KLFlowError, alternatives
from klflow.flow.path import SELF_CONDITION_RATE
from klflow.flow.time_sampling import TIME_SAMPLINGS
from klflow.methods import method_names
from klflow.methods.absorbing import T_MIN
from klflow.methods.dfm import DEFAULT_KAPPA_POWER
from klflow.methods.dirichlet import DEFAULT_ALPHA_MAX, DEFAULT_ALPHA_SCALE
from klflow.methods.simplex import DEFAULT_T_MAX
from klflow.model import check_architecture

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# klflow's defaults of the quality levers, where model.output, model.self_conditioning and path.time_sampling are
# unset: what the cpu-quality bench measured best (BENCHMARKS.md, cpu-quality); the other methods have none of them.
KLFLOW_OUTPUT = "plain"
KLFLOW_SELF_CONDITIONING = False
KLFLOW_TIME_SAMPLING = "alpha"
GUIDED_METHODS = ("klflow", "mdlm", "dfm")  # the methods with classifier-free guidance (train.condition_dropout)
EVIDENCE_METHODS = ("klflow", "linear-simplex", "fisher-rao", "dirichlet")  # paths with a closed-form q(x_t, t)
# x_t at a smaller t_max shows nothing of the target; calibrated values lie far above (docs/methods.md).
MIN_T_MAX = 0.01
PRECISIONS = ("auto", "fp32", "bf16")  # the network's autocast: bf16 (the path math stays fp32), fp32, auto
OPTIMIZERS = ("adamw", "muon")  # muon: Muon for the 2-D weights inside blocks, AdamW for the rest
SCHEDULES = ("constant", "warmdown")  # warmdown: linear decay of the learning rate over the last warmdown_fraction

Settings = Mapping[tuple[str, str], Any]
"""Config values by (section, key), e.g. {("train", "max_steps"): 200}; the types are checked when merged."""


@dataclass
class DataConfig:
    """Which corpus, and how it is tokenized and split."""

    source: str = "chitchat"  # a named corpus (klflow prepare --list), a local path, or hf:NAME
    dir: str | None = None  # a prepared data directory; None: the cache directory for `source`
    tokenizer: str = "bpe"  # "bpe" (trained on the corpus) | "gpt2" | "char" | a tokenizer.json path
    layout: str = "packed"  # "packed" | "padded" | "pairs" (prompt clamped) | "infill"
    vocab_size: int = 4096
    val_fraction: float = 0.05
    seed: int = 0
    # Layout options (klflow.data.layouts); None leaves the layout's default. Each applies to some layouts only.
    max_prompt_len: int | None = None  # pairs: prompt tokens kept (default seq_len // 2)
    unit: str | None = None  # infill: "spans" (default) | "lines" (whole lines, for code)
    mask_fraction: list[float] | float | None = None  # infill: a fraction or a [low, high] range (default [0, 1])
    max_spans: int | None = None  # infill, spans: at most this many masked spans per row (default 4)
    line_slot: int | None = None  # infill, lines: each masked line becomes a slot of this many positions
    long_docs: str | None = None  # padded, infill: "split" (default) | "window"

    def validate(self) -> None:
        check(self.vocab_size >= 259, "data.vocab_size (--vocab-size) must be >= 259 (256 bytes + 3 special tokens)")
        check(0.0 < self.val_fraction < 1.0, "data.val_fraction must lie in (0, 1)")
        check(self.layout in LAYOUTS, f"data.layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        check(0 <= self.seed < 2**63, f"data.seed must lie in [0, 2**63), got {self.seed}")

    def layout_options(self) -> dict[str, Any]:
        """The layout options that were set, by the names klflow.data.make_batches takes."""
        names = ("max_prompt_len", "unit", "mask_fraction", "max_spans", "line_slot", "long_docs")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class ModelConfig:
    """The transformer denoiser's shape."""

    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    mlp_ratio: int = 4
    dropout: float = 0.0
    rope_base: float = 10000.0
    time_scale: float = 1000.0
    # "simplex": x_t @ W (the paper) | "evidence": q(x_t, t) @ W, the closed-form single-token posterior of the
    # method's path (klflow and the simplex flows, see EVIDENCE_METHODS) | None: the method's default, evidence
    # for klflow (its denoiser cannot read x_t near t_max from x_t alone, BENCHMARKS.md) and simplex otherwise
    input: str | None = None
    # Whether the bidirectional denoiser reads t; None: the method's default, false for mdlm (MDLM's
    # time_conditioning=False, which makes its no-change cache exact) and true otherwise
    time_conditioning: bool | None = None
    # "plain": the network's logits (the paper) | "residual": log q(x_t, t) + the network's logits, so the network
    # models only what the other positions add to the evidence; needs the evidence input (klflow.model.OUTPUTS) |
    # None: the method's default, KLFLOW_OUTPUT for klflow on the evidence input and plain otherwise
    output: str | None = None
    # The denoiser also reads its previous estimate of p(x1 | x_t) (Chen et al. 2022); klflow only, trained on
    # train.self_condition_rate of the batches; None: the method's default, KLFLOW_SELF_CONDITIONING for klflow
    self_conditioning: bool | None = None

    def validate(self) -> None:
        try:
            check_architecture(self.n_layer, self.n_head, self.d_model, self.mlp_ratio, self.dropout, self.rope_base,
                               self.time_scale, self.input, prefix="model.", output=self.output or "plain")
        except ValueError as err:
            raise KLFlowError(str(err)) from None


@dataclass
class PathConfig:
    """The KL path: target smoothing and the end of the time range."""

    beta: float = 0.01
    t_max: float | None = None  # None: calibrated from V and beta
    # training t: "uniform" U(0, t_max) (the paper) | "power" (weighted) | "alpha" | "learned" (time warps, weight 1),
    # see flow/time_sampling.py | None: the method's default, KLFLOW_TIME_SAMPLING for klflow
    time_sampling: str | None = None
    time_power: float = 2.0  # "power": t = t_max U^time_power, loss weighted by time_power U^(time_power - 1)

    def validate(self) -> None:
        check(0.0 < self.beta < 1.0, f"path.beta must lie in (0, 1), got {self.beta}")
        check(self.t_max is None or 0.0 < self.t_max < 1.0, f"path.t_max must lie in (0, 1), got {self.t_max}")
        check(self.t_max is None or self.t_max >= MIN_T_MAX,
              f"path.t_max must be >= {MIN_T_MAX} (x_t at a smaller t_max shows nothing of the target), got {self.t_max}")
        check(self.time_sampling is None or self.time_sampling in TIME_SAMPLINGS,
              f"path.time_sampling must be one of {', '.join(TIME_SAMPLINGS)}, got {self.time_sampling!r}")
        check(self.time_power > 0.5, f"path.time_power must be > 0.5 (finite-variance weights), got {self.time_power}")


@dataclass
class MethodConfig:
    """Which generative method is trained (klflow, or a baseline under the same harness), and the baselines'
    hyperparameters, the papers' values by default; each applies to the methods named beside it."""

    name: str = "klflow"
    simplex_t_max: float = DEFAULT_T_MAX  # linear-simplex, fisher-rao: the end of the time range, in (0, 1)
    alpha_max: float = DEFAULT_ALPHA_MAX  # dirichlet: the largest alpha, sampled up to
    alpha_scale: float = DEFAULT_ALPHA_SCALE  # dirichlet: the scale of the training alphas' exponential law
    t_min: float = T_MIN  # mdlm, sedd: the smallest training time (keeps the 1/t weight finite)
    kappa_power: float = DEFAULT_KAPPA_POWER  # dfm: the scheduler kappa(t) = 1 - (1 - t)^kappa_power, >= 1

    def validate(self) -> None:
        check(self.name in method_names(), f"method.name must be one of {', '.join(method_names())}, got {self.name!r}")
        check(0.0 < self.simplex_t_max < 1.0, f"method.simplex_t_max must lie in (0, 1), got {self.simplex_t_max}")
        check(self.alpha_max > 0 and self.alpha_scale > 0,
              f"method.alpha_max and method.alpha_scale must be > 0, got {self.alpha_max} and {self.alpha_scale}")
        check(0.0 < self.t_min < 1.0, f"method.t_min must lie in (0, 1), got {self.t_min}")
        check(self.kappa_power >= 1.0, f"method.kappa_power must be >= 1 (the last step unmasks all), got {self.kappa_power}")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    seq_len: int = 128
    batch_size: int = 32  # sequences per optimizer step, over all processes
    micro_batch_size: int | None = None  # per process and forward pass; None: batch_size / processes
    max_steps: int = 20000
    max_minutes: float | None = None  # a wall-clock budget; the schedule follows whichever ends first
    optimizer: str = "adamw"  # one of OPTIMIZERS
    lr: float = 1e-3
    muon_lr: float = 0.02
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "warmdown"  # one of SCHEDULES
    warmdown_fraction: float = 0.3
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_windows: int = 256
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 2
    precision: str = "auto"  # one of PRECISIONS
    device: str = "auto"
    compile: bool = False  # torch.compile the network
    # model.self_conditioning: the fraction of batches whose loss feeds the second pass the first pass's estimate
    # (the rest get none); validation draws the same rule from its seeded noise (klflow.flow.validation)
    self_condition_rate: float = SELF_CONDITION_RATE
    # classifier-free guidance's training: the fraction of sequences whose given positions the network sees
    # hidden (klflow.flow.path.KLPath.position_losses); needs a layout with given positions
    condition_dropout: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        check(self.seq_len >= 2 and self.batch_size >= 1, "train.seq_len must be >= 2 and train.batch_size >= 1")
        check(self.micro_batch_size is None or 1 <= self.micro_batch_size <= self.batch_size,
              "train.micro_batch_size must lie in [1, train.batch_size]")
        check(self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}")
        check(self.max_minutes is None or self.max_minutes > 0, "train.max_minutes must be > 0")
        check(self.optimizer in OPTIMIZERS, f"train.optimizer must be {alternatives(OPTIMIZERS)}, got {self.optimizer!r}")
        check(self.lr > 0 and self.muon_lr > 0, "train.lr and train.muon_lr must be > 0")
        check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "train.betas must be two numbers in [0, 1)")
        check(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        # A decoupled decay step multiplies each weight by 1 - lr x weight_decay.
        check(self.weight_decay * max(self.lr, self.muon_lr if self.optimizer == "muon" else 0.0) < 1,
              f"train.weight_decay={self.weight_decay} x the learning rate must be < 1 (each step multiplies "
              "the weights by 1 - lr x weight_decay)")
        check(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        check(self.schedule in SCHEDULES, f"train.schedule must be {alternatives(SCHEDULES)}, got {self.schedule!r}")
        check(0.0 <= self.warmdown_fraction <= 1.0, "train.warmdown_fraction must lie in [0, 1]")
        check(self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)")
        check(self.eval_interval >= 1 and self.eval_windows >= 1, "train.eval_interval and train.eval_windows must be >= 1")
        check(self.checkpoint_interval >= 1 and self.keep_checkpoints >= 1,
              "train.checkpoint_interval and train.keep_checkpoints must be >= 1")
        check(0 <= self.seed < 2**63, f"train.seed must lie in [0, 2**63), got {self.seed}")
        check(self.precision in PRECISIONS, f"train.precision must be {alternatives(PRECISIONS)}, got {self.precision!r}")
        check(0.0 <= self.self_condition_rate <= 1.0,
              f"train.self_condition_rate must lie in [0, 1], got {self.self_condition_rate}")
        check(0.0 <= self.condition_dropout <= 1.0,
              f"train.condition_dropout must lie in [0, 1], got {self.condition_dropout}")


@dataclass
class Config:
    """A whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    path: PathConfig = field(default_factory=PathConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        for section in (self.data, self.method, self.model, self.path, self.train):
            section.validate()
        try:
            check_layout_options(self.data.layout, self.train.seq_len, self.data.layout_options())
        except KLFlowError as err:
            raise KLFlowError(f"data: {err}") from None
        # The evidence input needs a path with a closed-form single-token posterior: klflow's and the simplex flows'.
        check(self.model.input in (None, "simplex") or self.method.name in EVIDENCE_METHODS,
              f"model.input={self.model.input!r} needs method.name among {', '.join(EVIDENCE_METHODS)}, "
              f"got {self.method.name!r}")
        check(self.model.output in (None, "plain") or self.denoiser_input == "evidence",
              f"model.output={self.model.output!r} adds log q(x_t, t) of the evidence input: set model.input='evidence' "
              f"(method.name among {', '.join(EVIDENCE_METHODS)}), got input {self.denoiser_input!r} with method "
              f"{self.method.name!r}")
        check(not self.model.self_conditioning or self.method.name == "klflow",
              f"model.self_conditioning needs method.name='klflow' (its loss and samplers feed the previous estimate), "
              f"got {self.method.name!r}")
        check(not self.train.condition_dropout or self.data.layout in CONDITIONAL_LAYOUTS,
              f"train.condition_dropout hides given positions: it needs data.layout among "
              f"{', '.join(CONDITIONAL_LAYOUTS)}, got {self.data.layout!r}")
        check(not self.train.condition_dropout or self.method.name in GUIDED_METHODS,
              f"train.condition_dropout needs method.name among {', '.join(GUIDED_METHODS)}, got {self.method.name!r}")
        check(self.path.time_sampling in (None, "uniform") or self.method.name == "klflow",
              f"path.time_sampling={self.path.time_sampling!r} needs method.name='klflow', got {self.method.name!r}")
        return self

    @property
    def denoiser_input(self) -> str:
        """model.input, or the method's default: evidence for klflow, simplex otherwise (see ModelConfig.input)."""
        if self.model.input is not None:
            return self.model.input
        return "evidence" if self.method.name == "klflow" else "simplex"

    @property
    def denoiser_output(self) -> str:
        """model.output, or the method's default: KLFLOW_OUTPUT for klflow on the evidence input, plain otherwise."""
        if self.model.output is not None:
            return self.model.output
        return KLFLOW_OUTPUT if self.method.name == "klflow" and self.denoiser_input == "evidence" else "plain"

    @property
    def self_conditioned(self) -> bool:
        """model.self_conditioning, or the method's default: KLFLOW_SELF_CONDITIONING for klflow, false otherwise."""
        if self.model.self_conditioning is not None:
            return self.model.self_conditioning
        return KLFLOW_SELF_CONDITIONING and self.method.name == "klflow"

    @property
    def training_time_sampling(self) -> str:
        """path.time_sampling, or the method's default: KLFLOW_TIME_SAMPLING for klflow, uniform otherwise."""
        if self.path.time_sampling is not None:
            return self.path.time_sampling
        return KLFLOW_TIME_SAMPLING if self.method.name == "klflow" else "uniform"

    @property
    def time_conditioning(self) -> bool:
        """model.time_conditioning, or the method's default: false for mdlm, true otherwise."""
        if self.model.time_conditioning is not None:
            return self.model.time_conditioning
        return self.method.name != "mdlm"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        """Build and validate from nested dicts; unknown keys and wrong types are errors."""
        return build_dataclass(cls, raw).validate()


def preset_names() -> list[str]:
    return toml_names(resources.files("klflow.configs"))


def toml_names(folder: Traversable) -> list[str]:
    """The presets of a package folder: its .toml files, by name without the suffix."""
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_config(preset_or_file: str | None = None, overrides: Iterable[str] = ()) -> Config:
    """A preset name (see preset_names) or a TOML file, then `section.key=value` overrides."""
    return apply_overrides(read_config_file(preset_or_file) if preset_or_file else {}, overrides)


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> Config:
    """`section.key=value` overrides applied to a nested config dict, then built and validated."""
    return merge_settings(raw, parse_overrides(overrides))


def merge_settings(raw: Mapping[str, Any], settings: Settings) -> Config:
    """Typed settings merged into a nested config dict (a later setting of a key wins), then built and validated.

    raw is not changed. The values go through the same type checks as a TOML file's (Config.from_dict).
    """
    merged = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for (section, name), value in settings.items():
        merged.setdefault(section, {})[name] = value
    return Config.from_dict(merged)


def read_config_file(preset_or_file: str) -> dict[str, Any]:
    """The nested dict of a training preset (see preset_names) or of a TOML file."""
    return read_preset(preset_or_file, resources.files("klflow.configs"), "preset")


def read_preset(name_or_file: str, folder: Traversable, kind: str) -> dict[str, Any]:
    """The TOML table of the preset `name_or_file` of a package folder, or of a .toml file; `kind` names
    such presets in the error messages ("preset", "bench preset")."""
    names = toml_names(folder)
    if name_or_file in names:
        text = (folder / f"{name_or_file}.toml").read_text()
    else:
        file = Path(name_or_file)
        if not file.is_file():
            if file.suffix != ".toml":
                raise KLFlowError(f"unknown {kind} {name_or_file!r}; {kind}s: {', '.join(names)}, or give a .toml file")
            raise KLFlowError(f"config file not found: {file}")
        text = file.read_text()
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise KLFlowError(f"{name_or_file}: invalid TOML ({err})") from None


def parse_overrides(items: Iterable[str]) -> dict[tuple[str, str], Any]:
    """`section.key=value` items as settings by (section, key); of a key given twice, the later wins."""
    return dict(map(parse_override, items))


def parse_override(item: str) -> tuple[tuple[str, str], Any]:
    """`section.key=value` -> ((section, key), value), the value read as by parse_assignment."""
    key, value = parse_assignment(item)
    section, _, name = key.partition(".")
    if not name or "." in name:
        raise KLFlowError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
    return (section, name), value


def parse_assignment(item: str) -> tuple[str, Any]:
    """`key=value` with the value read as TOML (numbers, booleans, lists), else as a bare string."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise KLFlowError(f"{item!r} must look like key=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word is a string: data.source=chitchat
    return key.strip(), value


def build_dataclass(cls: type, raw: Any, section: str = "") -> Any:
    """A config dataclass from a nested dict: unknown keys and wrong types are errors, and a dataclass-typed
    field whose table is absent is built from an empty one (all defaults). `section` prefixes keys in
    error messages. Config.from_dict builds with it; so do other typed tables read from TOML, such as
    the bench presets' sections."""
    if not isinstance(raw, dict):
        raise KLFlowError(f"{section or 'config'} must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = sorted(f.name for f in dataclasses.fields(cls))
    tables = [name for name in names if dataclasses.is_dataclass(hints[name])]
    values = {}
    for name, value in {**raw, **{name: {} for name in tables if name not in raw}}.items():
        key = f"{section}.{name}" if section else name
        if name not in names:
            raise KLFlowError(f"unknown config key {key!r} (known here: {', '.join(names)})")
        hint = hints[name]
        values[name] = build_dataclass(hint, value, key) if name in tables else _coerce(value, hint, key)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check value against a simple annotation (int, float, str, bool, list[float], X | None); numbers are finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise KLFlowError(f"{key} must be a finite number, got {value!r}")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if type(None) in options:
                return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except KLFlowError:
                pass
        raise KLFlowError(f"{key} must be {_describe(hint)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise KLFlowError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise KLFlowError(f"{key} must be {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "none"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def check(condition: bool, message: str) -> None:
    """Raise KLFlowError(message) unless condition holds: the form of every config check."""
    if not condition:
        raise KLFlowError(message)

