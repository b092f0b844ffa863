"""Time coordinates s in [0, 1] in which the KL path's information arrives evenly.

A warp is a monotone map s -> t = warp(s) from [0, 1] onto [0, t_max], with its inverse. The same
warp serves training (t = warp(U), U ~ U(0, 1), klflow.flow.time_sampling) and the sampler's grid
(t_n = warp(n / steps), klflow.flow.sampler), so where training spends its samples and where the
sampler spends its steps are one choice each.

- "uniform": t = s t_max, uniform in t (the paper's training distribution).
- "tau": tau = -ln(1 - t) = s tau_max, uniform in tau (the samplers' grid, KLPath.tau_grid).
- "alpha": uniform in alpha(t) = P(argmax x_t = x1) (klflow.flow.path.argmax_probability): s is
  (alpha(t) - alpha(0)) / (alpha(t_max) - alpha(0)), alpha(0) = 1/V, tabulated in float64 on a fine
  grid of t and inverted by linear interpolation.
- "learned": CDCD's time warping (Dieleman et al. 2022): the density of t proportional to how fast
  the cross-entropy falls, p(t) ∝ -dCE/dt, so s = F(t) = (CE(0) - CE(t)) / (CE(0) - CE(t_max)),
  mixed with a floor of uniform density so that no region of t gets none (see learned_warp).

"alpha" and "learned" are piecewise-linear maps through knots (t_k / t_max, F_k), both strictly
increasing from (0, 0) to (1, 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from itertools import pairwise
from typing import Any

import torch

from klflow.errors import KLFlowError
from klflow.flow.path import KLPath, argmax_probability, tau_times

WARPS = ("uniform", "tau", "alpha", "learned")
ALPHA_KNOTS = 4097  # of the alpha table: its interpolation error is far below what a sampler or a draw resolves
LEARNED_FLOOR = 0.05  # the share of the learned warp's mass spread uniformly over t


@dataclass(frozen=True)
class TimeWarp:
    """A monotone map s in [0, 1] -> t in [0, t_max] and its inverse.

    Args:
        kind: one of WARPS.
        t_max: the end of the time range.
        knots: "alpha" and "learned": the knots t_k / t_max, strictly increasing from 0 to 1.
        cdf: their s = F(t_k), strictly increasing from 0 to 1.
    """

    kind: str
    t_max: float
    knots: tuple[float, ...] = ()
    cdf: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in WARPS:
            raise KLFlowError(f"time warp must be one of {', '.join(WARPS)}, got {self.kind!r}")
        if not 0.0 < self.t_max < 1.0:
            raise KLFlowError(f"t_max must lie in (0, 1), got {self.t_max}")
        if self.kind in ("alpha", "learned"):
            check_knots(self.knots, self.cdf)

    @property
    def tau_max(self) -> float:
        return -math.log1p(-self.t_max)

    def time(self, s: torch.Tensor) -> torch.Tensor:
        """t = warp(s) for s [...] in [0, 1], in s's dtype."""
        if self.kind == "uniform":
            return s * self.t_max
        if self.kind == "tau":
            return -torch.expm1(-s * self.tau_max)
        knots, cdf = self._tables(s)
        return interpolate(s, cdf, knots) * self.t_max

    def inverse(self, t: torch.Tensor) -> torch.Tensor:
        """s = warp^{-1}(t) for t [...] in [0, t_max], in t's dtype."""
        if self.kind == "uniform":
            return t / self.t_max
        if self.kind == "tau":
            return -torch.log1p(-t) / self.tau_max
        knots, cdf = self._tables(t)
        return interpolate(t / self.t_max, knots, cdf)

    @cached_property
    def _table(self) -> torch.Tensor:
        """[2, K] float64: the knots and their cdf, built once."""
        return torch.tensor([self.knots, self.cdf], dtype=torch.float64)

    def _tables(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        knots, cdf = self._table.to(like.device, like.dtype)
        return knots, cdf

    def grid(self, steps: int) -> tuple[list[float], list[float]]:
        """The sampler's times t_0 = 0 < ... < t_steps = t_max at s_n = n / steps, and each step's size in
        tau, h_n = tau(t_{n+1}) - tau(t_n). "tau" gives KLPath.tau_grid's times and h = tau_max / steps exactly."""
        if steps < 1:
            raise KLFlowError(f"steps must be >= 1, got {steps}")
        if self.kind == "tau":
            return tau_times(self.t_max, steps).tolist(), [self.tau_max / steps] * steps
        t = self.time(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64))
        t[0], t[-1] = 0.0, self.t_max
        return t.tolist(), torch.log1p(-t).neg_().diff().tolist()

    def record(self) -> dict[str, Any]:
        """The warp as plain values, for a checkpoint (from_record reads it back)."""
        return {"kind": self.kind, "t_max": self.t_max, "knots": list(self.knots), "cdf": list(self.cdf)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TimeWarp:
        try:
            return cls(record["kind"], float(record["t_max"]), tuple(record["knots"]), tuple(record["cdf"]))
        except (KeyError, TypeError, ValueError) as err:
            raise KLFlowError(f"the recorded time warp is malformed ({type(err).__name__}: {err})") from None


def check_knots(knots: Sequence[float], cdf: Sequence[float]) -> None:
    """A one-line error unless knots and cdf are equally long, strictly increasing, from 0 to 1."""
    ok = (len(knots) == len(cdf) >= 2 and knots[0] == cdf[0] == 0.0 and knots[-1] == cdf[-1] == 1.0
          and all(b > a for a, b in pairwise(knots)) and all(b > a for a, b in pairwise(cdf)))
    if not ok:
        raise KLFlowError("a piecewise-linear time warp needs knots and cdf of equal length >= 2, strictly increasing "
                          "from 0 to 1")


def interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """The piecewise-linear function through (xp_k, fp_k) at x [...] (xp strictly increasing), clamped to its ends."""
    index = torch.searchsorted(xp, x.clamp(xp[0], xp[-1]).contiguous(), right=True).clamp_(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[index - 1], xp[index], fp[index - 1], fp[index]
    return f0 + (f1 - f0) * ((x - x0) / (x1 - x0)).clamp_(0.0, 1.0)


def alpha_warp(path: KLPath) -> TimeWarp:
    """The warp uniform in alpha(t) = P(argmax x_t = x1) on `path`."""
    knots, cdf = _alpha_table(path.vocab_size, path.beta, path.t_max)
    return TimeWarp("alpha", path.t_max, knots, cdf)


@lru_cache(maxsize=16)
def _alpha_table(vocab_size: int, beta: float, t_max: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ALPHA_KNOTS knots t_k / t_max, uniform in t, and their normalised alpha; knots where alpha does not rise
    in float64 are dropped, so the table stays strictly increasing."""
    knots, alphas = [0.0], [1.0 / vocab_size]
    end = argmax_probability(vocab_size, beta, t_max)
    for k in range(1, ALPHA_KNOTS - 1):
        x = k / (ALPHA_KNOTS - 1)
        alpha = argmax_probability(vocab_size, beta, x * t_max)
        if alphas[-1] < alpha < end:
            knots.append(x)
            alphas.append(alpha)
    knots.append(1.0)
    alphas.append(end)
    span = end - alphas[0]
    cdf = [(a - alphas[0]) / span for a in alphas]
    cdf[-1] = 1.0
    return tuple(knots), tuple(cdf)


def learned_warp(t_max: float, edges: Sequence[float], band_losses: Sequence[float],
                 floor: float = LEARNED_FLOOR) -> TimeWarp:
    """CDCD's warp from per-band cross-entropies: bands [edges_b, edges_{b+1}) of t / t_max, loss CE_b each.

    CE is placed at the band centres c_b, made non-increasing in t (running minimum: the posterior only
    sharpens as t grows), and extended linearly to t = 0 and t = t_max from the two nearest centres
    (clamped to stay monotone and >= 0). Then F(x) = (CE(0) - CE(x)) / (CE(0) - CE(1)) is piecewise linear
    through the knots, mixed with the uniform: s = (1 - floor) F(x) + floor x, so p(t) >= floor / t_max
    everywhere. A curve that does not fall (CE(0) = CE(1)) gives the uniform warp.
    """
    if not 0.0 < floor <= 1.0:
        raise KLFlowError(f"the learned warp's floor must lie in (0, 1], got {floor}")
    if len(edges) != len(band_losses) + 1 or len(band_losses) < 2:
        raise KLFlowError(f"a learned warp needs >= 2 bands and one loss each, got {len(band_losses)} losses "
                          f"for {len(edges) - 1} bands")
    if not all(math.isfinite(v) for v in band_losses):
        raise KLFlowError(f"a learned warp needs finite band losses, got {list(band_losses)}")
    centres = [0.5 * (lo + hi) for lo, hi in pairwise(edges)]
    ce = torch.tensor(band_losses, dtype=torch.float64).cummin(dim=0).values.tolist()
    start = max(ce[0], ce[0] + (ce[0] - ce[1]) * centres[0] / (centres[1] - centres[0]))
    end = min(ce[-1], max(0.0, ce[-1] - (ce[-2] - ce[-1]) * (1.0 - centres[-1]) / (centres[-1] - centres[-2])))
    knots = [0.0, *centres, 1.0]
    curve = [start, *ce, end]
    drop = start - end
    fall = [(start - v) / drop if drop > 0 else x for v, x in zip(curve, knots)]
    cdf = [(1.0 - floor) * f + floor * x for f, x in zip(fall, knots)]
    cdf[0], cdf[-1] = 0.0, 1.0
    return TimeWarp("learned", t_max, tuple(knots), tuple(cdf))


def build_warp(kind: str, path: KLPath, learned: TimeWarp | None = None) -> TimeWarp:
    """The sampler's grid warp `kind` on `path`; "learned" is the run's own (`learned`), an error without one."""
    if kind == "alpha":
        return alpha_warp(path)
    if kind == "learned":
        if learned is None:
            raise KLFlowError("grid='learned' needs the run's learned time warp, and this run has none (it is "
                              "fitted at each validation of a run trained by this version)")
        return learned
    return TimeWarp(kind, path.t_max)
