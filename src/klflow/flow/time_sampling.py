"""Where in [0, t_max] training spends its samples, with weights that keep the objective.

The paper draws t ~ u = U(0, t_max). Drawing t from any density p > 0 on [0, t_max] and
weighting each sequence's loss by u(t) / p(t) gives the same expected loss and gradient,
E_p[(u / p) l(t)] = E_u[l(t)], hence the same optimum; only the estimator's variance changes,
and with it how fast training learns each band of t.

- "uniform": the paper, weight 1.
- "power": s = t / t_max = U^gamma, U ~ U(0, 1), so p(s) = s^(1/gamma - 1) / gamma. gamma > 1
  puts more samples at small t, where the loss is largest and the denoiser must rely on the
  context (gamma = 2: 71% of draws in the lower half); the weight u / p = gamma U^(gamma - 1)
  lies in [0, gamma]. gamma < 1 favours large t; its weights are unbounded, with finite variance
  only for gamma > 1/2 (E[w^2] = gamma^2 / (2 gamma - 1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from klflow.errors import KLFlowError

TIME_SAMPLINGS = ("uniform", "power")


@dataclass(frozen=True)
class TimeSampling:
    """A training-time distribution on [0, t_max] and its importance weights u(t) / p(t)."""

    t_max: float
    kind: str = "uniform"
    power: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in TIME_SAMPLINGS:
            raise KLFlowError(f"time sampling must be one of {', '.join(TIME_SAMPLINGS)}, got {self.kind!r}")
        if not self.power > 0.5:
            raise KLFlowError(f"the time-sampling power must be > 0.5 (finite-variance weights), got {self.power}")

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Times t [n] and weights u(t) / p(t) [n]; "uniform" draws exactly what KLPath.loss draws."""
        u = torch.rand(n, generator=generator, device=device)
        if self.kind == "uniform":
            return u * self.t_max, torch.ones_like(u)
        return u.pow(self.power) * self.t_max, self.power * u.pow(self.power - 1.0)
