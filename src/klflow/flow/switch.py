"""Calibrating the data-driven switch rule of the hybrid sampler once, before sampling.

The fixed rule switches every sequence from ODE to randomized steps at t_star. The entropy rule
(SamplerOptions(switch_entropy=H)) switches each sequence when the mean entropy of its posterior
p_theta(x1 | x_t) falls to H: earlier for sequences the model is already sure of, later for the
ones it is not. H is calibrated as a mean posterior entropy at t_star, over either

- validation sequences noised to t_star (entropy_on_data), or
- the sampler's own ODE trajectories at the step where the fixed rule would switch
  (entropy_along_ode; needs no data).

For the exact posterior the two agree: the ODE transports the path's marginals. For a trained
denoiser they need not: ODE states can be far less peaked than noised data, and then a threshold
from data is never reached along the ODE (the rule degenerates to the pure ODE).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import torch

from klflow.errors import KLFlowError
from klflow.flow.path import KLPath, Model, takes_self_condition
from klflow.flow.sampler import (
    SWITCH_CALIBRATIONS,
    KLFlowSampler,
    SamplerOptions,
    mean_posterior_entropy,
    posterior_logits,
    self_estimate,
)
from klflow.flow.time_warp import TimeWarp
from klflow.sampling import ban_

ODE_CALIBRATION_SAMPLES = 32  # trajectories behind an 'ode' calibration


@torch.inference_mode()
def entropy_on_data(
    model: Model,
    path: KLPath,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    t_star: float | None = None,
    banned_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> float:
    """Mean over validation sequences of their mean posterior entropy (nats) at t_star.

    batches: (ids [B, L], cond_mask [B, L] or None) pairs; given positions are clamped and left
    out of the mean, as in the sampler. t_star None: path.default_t_star (KLPath.switch_time).
    A self-conditioned model reads its own first estimate at x_t there (self_estimate), as the default sampler
    (self_condition="recompute") gives it.
    """
    t_star = path.switch_time(t_star)
    total, count = 0.0, 0
    for ids, cond_mask in batches:
        ids = ids.to(device)
        cond_mask = cond_mask.to(device) if cond_mask is not None else None
        l_t = path.noisy_logits(ids, torch.full((len(ids),), t_star, device=device), generator)
        estimate = self_estimate(model, path, l_t, t_star, ids, cond_mask, banned_ids) \
            if takes_self_condition(model) else None
        logits = posterior_logits(model, path, l_t, t_star, ids, cond_mask, banned_ids, estimate)
        total += mean_posterior_entropy(logits, cond_mask).sum().item()
        count += len(ids)
    return total / count


class _Reached(Exception):
    """Ends the calibration's ODE run once the switch step's entropy is known."""


@dataclasses.dataclass
class _Watcher:
    """The model as the ODE sees it, stopping the run at the first posterior the sampler reads with t >= t_star,
    where it records the mean posterior entropy. self_conditioning is the model's, so the sampler feeds it as it
    feeds the model; with first_passes, the calls without an estimate are self_estimate's first passes, which the
    sampler does not read."""

    model: Model
    t_star: float
    banned_ids: Sequence[int]
    self_conditioning: bool
    first_passes: bool
    entropy: float = float("nan")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **options: object) -> torch.Tensor:
        logits = self.model(x, t, **options)
        if t[0].item() >= self.t_star and not (self.first_passes and "self_condition" not in options):
            self.entropy = mean_posterior_entropy(ban_(logits.float().clone(), self.banned_ids)).mean().item()
            raise _Reached
        return logits


def entropy_along_ode(
    model: Model,
    path: KLPath,
    num_samples: int,
    seq_len: int,
    steps: int,
    t_star: float | None = None,
    banned_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    integrator: str = "euler",
    grid: str = "tau",
    learned_warp: TimeWarp | None = None,
    self_condition: str = "recompute",
) -> float:
    """Mean over num_samples unconditional ODE trajectories (the sampler's `grid` of `steps` and its
    `self_condition`, see SamplerOptions) of the mean posterior entropy (nats) at the first step with
    t >= t_star, where the fixed rule switches (t_star None: path.default_t_star, KLPath.switch_time)."""
    options = SamplerOptions(sampler="ode", integrator=integrator, grid=grid, self_condition=self_condition)
    self_conditioned = takes_self_condition(model)
    watch = _Watcher(model, path.switch_time(t_star), banned_ids, self_conditioned,
                     first_passes=self_conditioned and self_condition == "recompute")
    ode = KLFlowSampler(path, options, banned_ids, learned_warp)
    try:
        ode.sample(watch, num_samples, seq_len, steps, generator=generator, device=device)
    except _Reached:
        pass
    return watch.entropy


def calibrate_switch(
    options: SamplerOptions,
    model: Model,
    path: KLPath,
    seq_len: int,
    steps: int,
    banned_ids: Sequence[int] = (),
    device: torch.device | str = "cpu",
    seed: int = 0,
    batches: Callable[[], list] | None = None,
    learned_warp: TimeWarp | None = None,
) -> tuple[SamplerOptions, str]:
    """The options with switch_entropy 'data' or 'ode' replaced by its calibrated threshold (and t_star,
    where it was calibrated, dropped), and where the threshold comes from; other options come back
    unchanged (with an empty note).

    The threshold is the mean posterior entropy at path.switch_time(options.t_star) of the validation sequences
    `batches()` gives ('data') or of ODE_CALIBRATION_SAMPLES of the sampler's own ODE trajectories of
    `steps` steps on the options' grid ('ode'; learned_warp: the run's, for grid "learned").
    """
    source = options.switch_entropy
    if source not in SWITCH_CALIBRATIONS:
        return options, ""
    t_star = path.switch_time(options.t_star)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    if source == "data":
        if batches is None:
            raise KLFlowError("switch_entropy=data calibrates on validation data, and none was given")
        chosen = list(batches())
        value = entropy_on_data(model, path, chosen, t_star, banned_ids, generator, device)
        where = f"{sum(len(ids) for ids, _ in chosen)} validation sequences"
    else:
        value = entropy_along_ode(model, path, ODE_CALIBRATION_SAMPLES, seq_len, steps, t_star, banned_ids, generator,
                                  device, options.integrator, options.grid, learned_warp, options.self_condition)
        where = f"{ODE_CALIBRATION_SAMPLES} ODE trajectories of {steps} steps"
    calibrated = dataclasses.replace(options, t_star=None, switch_entropy=value)
    return calibrated, f"{value:.4f} nats, the mean posterior entropy of {where} at t_star={t_star}"
