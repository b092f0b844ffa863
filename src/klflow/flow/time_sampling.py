"""Where in [0, t_max] training spends its samples.

The paper draws t ~ u = U(0, t_max). Two ways to draw otherwise:

- Importance weights keep the uniform-t objective: drawing t from p > 0 and weighting each
  sequence's loss by u(t) / p(t) gives the same expected loss and gradient,
  E_p[(u / p) l(t)] = E_u[l(t)]; only the estimator's variance changes.
  "power": s = t / t_max = U^gamma, U ~ U(0, 1), so p(s) = s^(1/gamma - 1) / gamma. gamma > 1
  puts more samples at small t, where the loss is largest and the denoiser must rely on the
  context (gamma = 2: 71% of draws in the lower half); the weight u / p = gamma U^(gamma - 1)
  lies in [0, gamma]. gamma < 1 favours large t; its weights are unbounded, with finite variance
  only for gamma > 1/2 (E[w^2] = gamma^2 / (2 gamma - 1)).
- A time warp changes the objective's weighting over t but not its optimum: t = warp(U)
  (klflow.flow.time_warp), weight 1. The cross-entropy E_{x1, x_t}[-log p_theta(x1 | x_t, t)] is
  minimised at each t separately by the posterior p(x1 | x_t), so any density p(t) > 0 on
  [0, t_max] has the same minimiser; p only decides where the network's capacity is spent.
  "alpha": uniform in alpha(t) = P(argmax x_t = x1); "learned": CDCD's p(t) ∝ -dCE/dt, refitted
  from the per-band validation losses at every validation (uniform in t before the first).

"uniform" is the paper, weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from klflow.errors import KLFlowError
from klflow.flow.time_warp import TimeWarp

TIME_SAMPLINGS = ("uniform", "power", "alpha", "learned")
# The time samplings that draw t = warp(U), weight 1, and the kinds of warp each takes ("learned" draws
# through the uniform warp until its first fit).
WARPED = {"alpha": ("alpha",), "learned": ("learned", "uniform")}


@dataclass(frozen=True)
class TimeSampling:
    """A training-time distribution on [0, t_max] and each draw's weight.

    warp: the time warp that "alpha" and "learned" draw through (klflow.flow.time_warp); its kind is theirs.
    """

    t_max: float
    kind: str = "uniform"
    power: float = 1.0
    warp: TimeWarp | None = None

    def __post_init__(self) -> None:
        if self.kind not in TIME_SAMPLINGS:
            raise KLFlowError(f"time sampling must be one of {', '.join(TIME_SAMPLINGS)}, got {self.kind!r}")
        if not self.power > 0.5:
            raise KLFlowError(f"the time-sampling power must be > 0.5 (finite-variance weights), got {self.power}")
        warp = None if self.warp is None else self.warp.kind
        if warp not in WARPED.get(self.kind, (None,)):
            raise KLFlowError(f"time sampling {self.kind!r} takes a time warp of kind "
                              f"{' or '.join(map(repr, WARPED.get(self.kind, (None,))))}, got {warp!r}")

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Times t [n] and weights [n]; "uniform" draws exactly what KLPath.loss draws."""
        u = torch.rand(n, generator=generator, device=device)
        if self.kind == "uniform":
            return u * self.t_max, torch.ones_like(u)
        if self.warp is not None:
            return self.warp.time(u.double()).float(), torch.ones_like(u)
        return u.pow(self.power) * self.t_max, self.power * u.pow(self.power - 1.0)
