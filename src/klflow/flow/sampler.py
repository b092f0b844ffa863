"""Samplers for the KL path: the ODE, the randomized denoise-and-renoise scheme, and their hybrid.

Time runs on a grid t_0 = 0 < ... < t_steps = t_max, uniform in the coordinate s of a time warp
(klflow.flow.time_warp; by default tau = -ln(1 - t), h = tau_max / steps), and step n advances tau
by its own h_n = tau(t_{n+1}) - tau(t_n). One model call per step (`steps` = NFE of the loop)
plus one final read-out call at t_max: NFE = steps + 1.

- ODE step of dl/dtau = v - l, v = E[l1 | x_t] held for the step: Euler l <- l + h (v - l), or
  the exponential integrator l <- e^{-h} l + (1 - e^{-h}) v, exact when v is constant (the ODE
  is linear in l), so its only error is v's change within the step.
- Randomized step: pick x1 from p(x1 | x_t) (argmax, or a float64 draw at a temperature from
  the whole posterior, its top k or its top-p nucleus), draw a fresh Dirichlet source and jump
  to the path point at the next time: l <- (1 - t') log E + t' l1(x1).
- Hybrid: ODE steps while t < t_star, randomized steps after; or, with switch_entropy, each
  sequence switches for good once the mean entropy of its posterior falls to the threshold
  (calibrated at t_star by klflow.flow.switch).

SamplerOptions holds every choice above, checked once; KLFlowSampler runs them on a path.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from klflow.errors import KLFlowError
from klflow.flow.path import (
    KLPath,
    Model,
    call_model,
    reads_posterior,
    takes_self_condition,
)
from klflow.flow.time_warp import WARPS, TimeWarp, build_warp
from klflow.sampling import (
    Frame,
    Observer,
    ban_,
    check_draw_options,
    check_guidance,
    check_readout,
    check_sizes,
    clamp_one_hot,
    expand_prompt,
    filter_logits,
    guidance_calls,
    guided_calls,
    guided_logits,
    hide_given_,
    nfe,
    read_out,
    sample_categorical,
    sampling_device,
    sampling_mode,
    top_tokens,
)

SAMPLERS = ("ode", "randomized", "hybrid")
SELECTS = ("argmax", "sample", "top_k:K")  # the forms of select; K >= 1
INTEGRATORS = ("euler", "exponential")
SWITCH_CALIBRATIONS = ("data", "ode")  # switch_entropy values that name a calibration source (klflow.flow.switch)
SELF_CONDITIONS = ("previous", "recompute")  # where a self-conditioned model's estimate comes from (SamplerOptions)
# The defaults (randomized steps, x1 drawn at this temperature) won the cpu-ablation preset; the hybrid
# keeps argmax, with which it did better than with draws (BENCHMARKS.md, cpu-ablation and evidence input).
DEFAULT_TEMPERATURE = 0.8


def default_select(sampler: str) -> str:
    """The x1 choice a sampler uses unless told: draws for the randomized sampler, argmax otherwise."""
    return "sample" if sampler == "randomized" else "argmax"


def default_temperature(select: str) -> float:
    """The temperature of a selection unless told: DEFAULT_TEMPERATURE for draws; argmax draws nothing."""
    return 1.0 if select == "argmax" else DEFAULT_TEMPERATURE


@dataclass(frozen=True)
class Selection:
    """How x1 is picked from the posterior: argmax, or a float64 draw from softmax(logits / temperature)
    restricted to its top k (select "top_k:K", or "sample" with top_k K; k = 0: no limit) and its top_p nucleus."""

    kind: str
    k: int = 0
    temperature: float = 1.0
    top_p: float = 1.0

    @classmethod
    def parse(cls, text: str, temperature: float | None = None, top_p: float = 1.0, top_k: int = 0) -> Selection:
        """temperature None: default_temperature(text); top_k K > 0 turns "sample" into "top_k:K"."""
        if temperature is None:
            temperature = default_temperature(text)
        check_draw_options(temperature, top_k, top_p)
        if text == "argmax":
            if temperature != 1.0 or top_p != 1.0 or top_k:
                raise KLFlowError("temperature, top_p and top_k shape the draws of select='sample' or 'top_k:K'; "
                                  "select='argmax' draws nothing")
            return cls(text)
        if text == "sample":
            return cls("top_k" if top_k else text, top_k, float(temperature), float(top_p))
        if text.startswith("top_k:"):
            value = text.split(":", 1)[1]
            if value.isdigit() and int(value) >= 1:
                if top_k and top_k != int(value):
                    raise KLFlowError(f"select={text!r} and top_k={top_k} disagree; give one of them")
                return cls("top_k", int(value), float(temperature), float(top_p))
        forms = ", ".join(repr(form) for form in SELECTS[:-1])
        raise KLFlowError(f"select must be {forms} or {SELECTS[-1]!r} with K >= 1, got {text!r}")

    @property
    def select(self) -> str:
        """The select form of this selection: "argmax", "sample" or "top_k:K"."""
        return f"top_k:{self.k}" if self.kind == "top_k" else self.kind

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Token ids [...] from logits [..., V]."""
        if self.kind == "argmax":
            return logits.argmax(dim=-1)
        return sample_categorical(filter_logits(logits, self.temperature, self.k, self.top_p), generator)


@dataclass(frozen=True)
class SamplerOptions:
    """Every choice of the KL-flow samplers, checked when made; None leaves a default to resolve().

    Args:
        sampler: one of SAMPLERS.
        t_star: hybrid switch time in [0, t_max]; None: path.default_t_star (KLPath.switch_time).
        select: x1 choice in randomized steps, one of SELECTS; None: default_select(sampler).
        readout: final choice at t_max, one of READOUTS.
        temperature, top_p, top_k: shape the draws of select "sample" / "top_k:K" (1, 1, 0: the posterior;
            temperature None: default_temperature(select)); top_k K with "sample" is "top_k:K".
        integrator: ODE steps by one of INTEGRATORS ("exponential" is exact for a v constant over the step).
        switch_entropy: hybrid only, instead of t_star: a sequence switches to randomized steps once the
            mean entropy (nats) of its posterior over its free positions is <= this; one of
            SWITCH_CALIBRATIONS names where klflow.flow.switch.calibrate_switch finds the threshold.
        grid: the time warp the steps are uniform in, one of WARPS: "tau" (uniform in tau = -ln(1 - t)),
            "alpha" (uniform in P(argmax x_t = x1)), "uniform" (in t) or "learned" (the run's CDCD warp).
        guidance: classifier-free guidance weight W: with W != 0 each step calls the model twice, with the
            given positions clamped and hidden (klflow.sampling.hide_given_), and uses
            logits_cond + W (logits_cond - logits_uncond) at the free positions (see guided_logits); 0: one call.
        self_condition: where a self-conditioned model's estimate of p(x1 | x_t) comes from, one of
            SELF_CONDITIONS: "recompute", a first call at this x_t without an estimate, as training's first pass
            gives it, at two calls per step and read-out; "previous", the posterior of the step before, at no
            extra call (x_t was re-noised from a draw of it, so the network reads that draw twice, and the
            samples lose entropy as the steps grow: BENCHMARKS.md, cpu-quality). A model without
            self-conditioning takes no estimate: either value makes one call per step.
    """

    sampler: str = "randomized"
    t_star: float | None = None
    select: str | None = None
    readout: str = "argmax"
    temperature: float | None = None
    top_p: float = 1.0
    integrator: str = "euler"
    switch_entropy: float | str | None = None
    top_k: int = 0
    grid: str = "tau"
    guidance: float = 0.0
    self_condition: str = "recompute"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise KLFlowError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.grid not in WARPS:
            raise KLFlowError(f"grid must be one of {', '.join(WARPS)}, got {self.grid!r}")
        check_readout(self.readout)
        if self.integrator not in INTEGRATORS:
            raise KLFlowError(f"integrator must be one of {', '.join(INTEGRATORS)}, got {self.integrator!r}")
        check_guidance(self.guidance)
        if self.self_condition not in SELF_CONDITIONS:
            raise KLFlowError(f"self_condition must be one of {', '.join(SELF_CONDITIONS)}, got {self.self_condition!r}")
        calibrated = self.switch_entropy in SWITCH_CALIBRATIONS  # then t_star is where the threshold is calibrated
        if self.switch_entropy is not None and (self.sampler != "hybrid" or (self.t_star is not None and not calibrated)):
            raise KLFlowError("switch_entropy is the hybrid sampler's switch rule instead of t_star: use it with "
                              f"sampler='hybrid' and no t_star (got sampler={self.sampler!r}, t_star={self.t_star})")
        if self.switch_entropy is not None and not calibrated:
            check_threshold(self.switch_entropy)
        self.selection()

    def selection(self) -> Selection:
        """How randomized steps pick x1 (checks select, temperature, top_p and top_k)."""
        select = default_select(self.sampler) if self.select is None else self.select
        return Selection.parse(select, self.temperature, self.top_p, self.top_k)

    def resolve(self, path: KLPath) -> SamplerOptions:
        """These options as the sampler runs them on `path`: select and temperature filled in, top_k recorded
        in the select it makes (sample with top_k K is top_k:K), and t_star the hybrid's path.switch_time
        (None for the other samplers; with switch_entropy, the calibration time if given)."""
        switch_time = path.switch_time(self.t_star)  # checks a given t_star, whatever the sampler
        if self.sampler != "hybrid":
            t_star = None
        elif self.switch_entropy is None:
            t_star = switch_time
        else:
            t_star = self.t_star  # None, or where a calibration source is calibrated
        selection = self.selection()
        return dataclasses.replace(self, t_star=t_star, select=selection.select, temperature=selection.temperature,
                                   top_k=0)

    def keywords(self) -> dict[str, Any]:
        """The options that differ from the defaults, as generate() keywords."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    def record(self) -> dict[str, Any]:
        """The options for a sample file's record: their fields, top_k left out since select carries it,
        guidance only when set (an unguided record stays as it was before guidance existed), self_condition
        only for a self-conditioned model (KLFlow.sample_settings), which alone reads it."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("top_k", "self_condition") and (k != "guidance" or v)}

    def calls_per_step(self, self_conditioned: bool) -> int:
        """Network calls of each step and of the read-out: 2 with guidance, twice that for a self-conditioned
        model whose estimate is recomputed."""
        recompute = self_conditioned and self.self_condition == "recompute"
        return guided_calls(self.guidance) * (2 if recompute else 1)


def check_threshold(switch_entropy: object) -> None:
    """A one-line error unless switch_entropy is a finite number of nats >= 0."""
    if (not isinstance(switch_entropy, (int, float)) or isinstance(switch_entropy, bool)
            or not 0 <= switch_entropy < math.inf):
        raise KLFlowError(f"switch_entropy must be a finite number of nats >= 0, got {switch_entropy!r}")


class KLFlowSampler:
    """The KL-flow samplers on a path, with resolved options and the ids they never produce.

    Args:
        path: the KLPath the model was trained on.
        options: the sampler's choices; a switch_entropy calibration source must be calibrated first.
        banned_ids: ids never produced (e.g. padding); they get zero posterior mass.
        learned_warp: the run's learned time warp, which grid="learned" steps through.
    """

    def __init__(self, path: KLPath, options: SamplerOptions, banned_ids: Sequence[int] = (),
                 learned_warp: TimeWarp | None = None) -> None:
        if options.switch_entropy is not None:
            check_threshold(options.switch_entropy)
        self.path = path
        self.options = options.resolve(path)
        self.selection = self.options.selection()
        self.banned_ids = tuple(banned_ids)
        self.warp = build_warp(self.options.grid, path, learned_warp)

    def sample(
        self,
        model: Model,
        num_samples: int,
        seq_len: int,
        steps: int,
        prompt: torch.Tensor | None = None,
        cond_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        progress: Callable[[int], None] | None = None,
        observe: Observer | None = None,
    ) -> torch.Tensor:
        """Token ids [num_samples, seq_len] from `steps` loop steps and the read-out at t_max.

        Args:
            model: callable model(x_t [B, L, V], t [B]) -> logits of p(x1 | x_t) [B, L, V].
            prompt: ids [B or 1, L] with cond_mask [B or 1, L], or a prefix [B or 1, P] (cond_mask None).
                Given positions are fed as exact one-hots at every step and returned unchanged.
            generator: torch.Generator; the same seed gives the same output.
            progress: called with the step index after every loop step.
            observe: called with a Frame of the posterior at every step and at the read-out (step = steps,
                the ids returned); None costs nothing.
        """
        check_sizes(num_samples, seq_len, steps)
        path, options = self.path, self.options
        guidance_calls(options.guidance, prompt)  # a one-line error for guidance without given positions
        self_conditioned = takes_self_condition(model)
        recompute = self_conditioned and options.self_condition == "recompute"
        calls = options.calls_per_step(self_conditioned)
        device = sampling_device(model, device)
        prompt, cond_mask = expand_prompt(prompt, cond_mask, num_samples, seq_len, path.vocab_size, device)
        with sampling_mode(model):
            times, sizes = self.warp.grid(steps)
            l = path.sample_source_logits((num_samples, seq_len, path.vocab_size), generator, device)
            switched = torch.zeros(num_samples, dtype=torch.bool, device=device)
            estimate = None  # a self-conditioned model's previous posterior: none before the first step
            for n in range(steps):
                if recompute:
                    estimate = self_estimate(model, path, l, times[n], prompt, cond_mask, self.banned_ids,
                                             options.guidance)
                logits = posterior_logits(model, path, l, times[n], prompt, cond_mask, self.banned_ids, estimate,
                                          options.guidance)
                if self_conditioned and not recompute:
                    estimate = torch.softmax(logits, dim=-1)
                if options.switch_entropy is not None:
                    switched |= mean_posterior_entropy(logits, cond_mask) <= options.switch_entropy
                else:
                    switched.fill_(options.sampler == "randomized"
                                   or (options.sampler == "hybrid" and times[n] >= options.t_star))
                if observe is not None:
                    observe(Frame(n, times[n], calls * (n + 1), *top_tokens(logits, prompt, cond_mask)))
                l = self._step(l, logits, switched, sizes[n], times[n + 1], generator)
                if progress is not None:
                    progress(n)
            if recompute:
                estimate = self_estimate(model, path, l, path.t_max, prompt, cond_mask, self.banned_ids,
                                         options.guidance)
            logits = posterior_logits(model, path, l, path.t_max, prompt, cond_mask, self.banned_ids, estimate,
                                      options.guidance)
            out = read_out(logits, options.readout, generator, prompt, cond_mask)
            if observe is not None:
                chosen = logits.log_softmax(dim=-1).gather(-1, out.unsqueeze(-1)).squeeze(-1).exp()
                observe(Frame(steps, path.t_max, calls * (steps + 1), out,
                              chosen if cond_mask is None else chosen.masked_fill(cond_mask, 1.0)))
        return out

    def _step(self, l: torch.Tensor, logits: torch.Tensor, randomized: torch.Tensor, h: float, t_next: float,
              generator: torch.Generator | None) -> torch.Tensor:
        """One step of every sequence: randomized where `randomized` [B] is True, an ODE step elsewhere.

        Returns the new logits: l itself, stepped in place, unless every row was re-noised."""
        ode = ~randomized
        if ode.any():
            rows = _rows(ode)
            v = self.path.expected_target_logits(torch.softmax(logits[rows], dim=-1))
            stepped = ode_step(l[rows], v, h, self.options.integrator)
            if not isinstance(rows, slice):  # a slice is a view of all of l, already stepped
                l[rows] = stepped
        if randomized.any():
            rows = _rows(randomized)
            x1 = self.selection(logits[rows], generator)
            renoised = self.path.noisy_logits(x1, torch.full((x1.shape[0],), t_next, device=l.device), generator)
            if isinstance(rows, slice):
                return renoised
            l[rows] = renoised
        return l


def generate(
    model: Model,
    path: KLPath,
    num_samples: int,
    seq_len: int,
    *,
    steps: int = 256,
    prompt: torch.Tensor | None = None,
    cond_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    banned_ids: Sequence[int] = (),
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
    observe: Observer | None = None,
    **options: Any,
) -> torch.Tensor:
    """Token ids [num_samples, seq_len] with the KL-flow samplers, as one keyword call:
    KLFlowSampler(path, SamplerOptions(**options), banned_ids).sample(model, ...).

    options are SamplerOptions' fields (sampler, t_star, select, readout, temperature, top_p, integrator,
    switch_entropy, top_k, grid, guidance); steps are the loop's (NFE = steps + 1 with the read-out, twice that
    when guided). See KLFlowSampler.sample
    for the rest.
    """
    sampler = KLFlowSampler(path, SamplerOptions(**options), banned_ids)
    return sampler.sample(model, num_samples, seq_len, steps, prompt, cond_mask, generator, device, progress, observe)


def ode_step(l: torch.Tensor, v: torch.Tensor, h: float, integrator: str) -> torch.Tensor:
    """Advance dl/dtau = v - l by h with v held fixed, in place (v is overwritten).

    Euler: l + h (v - l). Exponential: l + (1 - e^{-h}) (v - l) = e^{-h} l + (1 - e^{-h}) v, the
    exact solution for a constant v; the two agree to first order in h.
    """
    return l.add_(v.sub_(l), alpha=h if integrator == "euler" else -math.expm1(-h))


def self_estimate(model: Model, path: KLPath, l: torch.Tensor, t: float, prompt: torch.Tensor | None,
                  cond_mask: torch.Tensor | None, banned_ids: Sequence[int], guidance: float = 0.0) -> torch.Tensor:
    """A self-conditioned model's own estimate p(x1 | x_t) at this x_t, from a call without one: the first pass
    of training (klflow.flow.path.KLPath.position_losses), which self_condition="recompute" feeds the second."""
    return torch.softmax(posterior_logits(model, path, l, t, prompt, cond_mask, banned_ids, None, guidance), dim=-1)


def _rows(mask: torch.Tensor) -> torch.Tensor | slice:
    """Index of the rows where mask [B] is True: a slice (views, no copies) when it is True everywhere."""
    return slice(None) if bool(mask.all()) else mask


def mean_posterior_entropy(logits: torch.Tensor, cond_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over free positions (cond_mask False) of H(softmax(logits)) in nats: logits [B, L, V] -> [B]."""
    entropy = torch.special.entr(torch.softmax(logits.double(), dim=-1)).sum(dim=-1)
    if cond_mask is None:
        return entropy.mean(dim=-1)
    free = (~cond_mask).double()
    return (entropy * free).sum(dim=-1) / free.sum(dim=-1).clamp_min(1.0)


def posterior_logits(
    model: Model,
    path: KLPath,
    l: torch.Tensor,
    t: float,
    prompt: torch.Tensor | None,
    cond_mask: torch.Tensor | None,
    banned_ids: Sequence[int],
    self_condition: torch.Tensor | None = None,
    guidance: float = 0.0,
) -> torch.Tensor:
    """float32 logits of p_theta(x1 | x_t = softmax(l)) at time t, given positions clamped, banned ids at -inf.

    guidance W != 0 (with cond_mask): a second call with the given positions hidden (hide_given_, as
    training's condition dropout shows them), combined by guided_logits; the given positions' own logits
    do not matter, since the sampler keeps their tokens.

    An evidence-input model (klflow.flow.path.Model) is fed q(x_t, t) computed from l directly; a
    self-conditioned one gets self_condition, the previous step's posterior, when there is one."""
    t_batch = torch.full((l.shape[0],), t, device=l.device, dtype=torch.float32)
    evidence = reads_posterior(model)
    x = path.posterior_from_logits(l, t_batch) if evidence else torch.softmax(l, dim=-1)
    hidden = hide_given_(x.clone(), cond_mask) if guidance and cond_mask is not None else None
    if cond_mask is not None:
        x = clamp_one_hot(x, prompt, cond_mask)
    logits = call_model(model, x, t_batch, evidence, self_condition).float()
    if hidden is not None:
        logits = guided_logits(logits, call_model(model, hidden, t_batch, evidence, self_condition).float(), guidance)
    return ban_(logits, banned_ids)
