"""KL-geodesic flow matching as a Method: KLPath's cross-entropy and the ODE/randomized/hybrid samplers."""

from __future__ import annotations

import dataclasses
from itertools import pairwise
from typing import Any, Callable, ClassVar

import torch

from klflow.flow.path import SELF_CONDITION_RATE, KLPath, takes_self_condition
from klflow.flow.sampler import KLFlowSampler, SamplerOptions
from klflow.flow.time_sampling import TimeSampling
from klflow.flow.time_warp import TimeWarp, alpha_warp, learned_warp
from klflow.flow.validation import BAND_EDGES, band_key, banded_validation
from klflow.methods.base import MethodDefaults, Model, SpecialTokens, register
from klflow.sampling import Observer, nfe


class KLFlow(MethodDefaults):
    name = "klflow"
    causal = False
    options_type: ClassVar[type] = SamplerOptions  # generate()'s **options (klflow.methods.base.option_defaults)

    def __init__(self, path: KLPath, banned_ids: tuple[int, ...] = (), time_sampling: TimeSampling | None = None,
                 self_condition_rate: float = SELF_CONDITION_RATE, condition_dropout: float = 0.0,
                 self_conditioned: bool = False) -> None:
        self.path = path
        self.banned_ids = banned_ids
        self.time_sampling = time_sampling or TimeSampling(path.t_max)
        # CDCD's warp, fitted at each validation (learn) whatever the time sampling, so that every run
        # trained by this version can sample with grid="learned".
        self.learned_warp: TimeWarp | None = None
        self.self_condition_rate = self_condition_rate
        self.condition_dropout = condition_dropout  # classifier-free guidance's training (KLPath.position_losses)
        self.self_conditioned = self_conditioned  # whether the method's model reads its estimate (model.self_conditioning)

    def loss(self, model: Model, ids: torch.Tensor, cond_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The path's cross-entropy at t drawn by time_sampling, importance-weighted to the uniform-t objective;
        a self-conditioned model gets a first pass on self_condition_rate of the batches, and condition_dropout of
        the sequences have their given positions hidden (KLPath.position_losses)."""
        t, weight = self.time_sampling.sample(ids.shape[0], generator, ids.device)
        return self.path.loss(model, ids, cond_mask, generator, t=t, weight=weight,
                              self_condition_rate=self.self_condition_rate, condition_dropout=self.condition_dropout)

    def validation_scores(self, model: Model, batches: list, device: torch.device, seed: int) -> dict[str, float]:
        """Uniform-t validation loss, overall and per band of t / t_max (klflow.flow.validation), with the
        training's self-conditioning rule drawn from each batch's seeded noise."""
        return banded_validation(model, self.path, batches, device, seed, self_condition_rate=self.self_condition_rate)

    def learn(self, scores: dict[str, float]) -> dict[str, Any]:
        """Refit the learned time warp from validation_scores' per-band losses (klflow.flow.time_warp.learned_warp);
        "learned" time sampling draws through it from now on. Returns the record to store with the run."""
        keys = [band_key(lo, hi) for lo, hi in pairwise(BAND_EDGES)]
        if not all(key in scores for key in keys):
            return self.learned_state()
        self._adopt(learned_warp(self.path.t_max, BAND_EDGES, [scores[key] for key in keys]))
        return self.learned_state()

    def learned_state(self) -> dict[str, Any]:
        """What the method learned besides the weights: {"time_warp": its record} once fitted."""
        return {} if self.learned_warp is None else {"time_warp": self.learned_warp.record()}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back what learned_state recorded (a run's checkpoint); {} leaves the method as built."""
        if "time_warp" in state:
            self._adopt(TimeWarp.from_record(state["time_warp"]))

    def _adopt(self, warp: TimeWarp) -> None:
        self.learned_warp = warp
        if self.time_sampling.kind == "learned":
            self.time_sampling = dataclasses.replace(self.time_sampling, warp=warp)

    def generate(self, model: Model, num_samples: int, seq_len: int, steps: int,
                 prompt: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 progress: Callable[[int], None] | None = None, observe: Observer | None = None,
                 **options: Any) -> torch.Tensor:
        """KLFlowSampler.sample with this method's path and banned ids; options are SamplerOptions' fields.
        A guided or recomputing sampler's extra calls per step are in last_nfe (None: nfe() is exact)."""
        sampler = KLFlowSampler(self.path, SamplerOptions(**options), self.banned_ids, self.learned_warp)
        calls = sampler.options.calls_per_step(takes_self_condition(model))
        self.last_nfe = calls * nfe(steps) if calls > 1 else None
        return sampler.sample(model, num_samples, seq_len, steps, prompt, cond_mask, generator, device, progress, observe)

    def nfe(self, steps: int, seq_len: int, **options: Any) -> int:
        """steps + 1 calls (the read-out's), times SamplerOptions.calls_per_step (guidance; a self-conditioned
        model's recomputed estimate)."""
        return SamplerOptions(**options).calls_per_step(self.self_conditioned) * nfe(steps)

    def sample_settings(self, **options: Any) -> dict[str, Any]:
        """The resolved SamplerOptions of these options on this path, as recorded (SamplerOptions.record)."""
        resolved = SamplerOptions(**options).resolve(self.path)
        return {**resolved.record(), **({"self_condition": resolved.self_condition} if self.self_conditioned else {})}

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "beta": self.path.beta, "t_max": self.path.t_max,
                "t_max_calibrated": self.path.t_max_calibrated, "default_t_star": self.path.default_t_star,
                "time_sampling": self.time_sampling.kind,
                **({"time_power": self.time_sampling.power} if self.time_sampling.kind == "power" else {})}


@register("klflow")
def build(config: Any, vocab_size: int, specials: SpecialTokens) -> KLFlow:
    path = KLPath(vocab_size, config.path.beta, config.path.t_max)
    if config.train.compile:
        path.compile()  # with the network: the source and softmax passes over [B, L, V] fuse into few
    kind = config.training_time_sampling
    power = config.path.time_power if kind == "power" else 1.0
    warp = alpha_warp(path) if kind == "alpha" else TimeWarp("uniform", path.t_max) if kind == "learned" else None
    # Padding and mask never occur as targets in the training data; never emit them.
    return KLFlow(path, banned_ids=(specials.pad, specials.mask),
                  time_sampling=TimeSampling(path.t_max, kind, power, warp),
                  self_condition_rate=config.train.self_condition_rate,
                  condition_dropout=config.train.condition_dropout, self_conditioned=config.self_conditioned)
