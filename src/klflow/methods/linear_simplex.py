"""Linear interpolation on the simplex (the simplex flows' machinery is klflow.methods.simplex).

Linear path (t in [0, t_max], t_max < 1):
    x_t = (1 - t) x0 + t e_k,   u_k(x, t) = (e_k - x) / (1 - t),   v = (E[x1 | x_t] - x) / (1 - t).
An Euler step from t to t' is x <- x + (t' - t) v = lerp(x, p, (t' - t) / (1 - t)): a convex
combination, so x stays on the simplex, and with a point-mass posterior it is exact.
Exact posterior (x0 uniform, and x0 -> x_t an affine map with the same Jacobian (1 - t)^(V-1) for
every k): p(x_t | k) is constant on {x : x_k >= t} and 0 elsewhere, so p(k | x_t) ∝ pi_k [x_k >= t].
For the evidence input q is uniform over {k : x_k >= t}, so for t > 1/2 it is the target's one-hot.
"""

from __future__ import annotations

from typing import Any

import torch

from klflow.methods.base import SpecialTokens, register
from klflow.methods.simplex import (
    DEFAULT_T_MAX,
    SimplexFlow,
    check_t_max,
    dirichlet_source,
)
from klflow.sampling import batch_time


class LinearSimplex(SimplexFlow):
    """x_t = (1 - t) x0 + t e_k with x0 ~ Dirichlet(1), t ~ U(0, t_max); Euler steps uniform in t."""

    name = "linear-simplex"

    def __init__(self, vocab_size: int, t_max: float = DEFAULT_T_MAX, banned_ids: tuple[int, ...] = ()) -> None:
        super().__init__(vocab_size, check_t_max(t_max), banned_ids)

    def sample_x_t(self, ids: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = dirichlet_source((*ids.shape, self.vocab_size), generator, ids.device)
        t = batch_time(t, x)
        return x.mul_(1.0 - t).scatter_add_(-1, ids.unsqueeze(-1), t.expand(*ids.shape, 1).contiguous())

    def support_floor(self, t: torch.Tensor) -> torch.Tensor:
        """t: x_t = (1 - t) x0 + t e_k has x_k >= t."""
        return t

    def euler_step(self, x: torch.Tensor, posterior: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        """x + (t' - t) (p - x) / (1 - t), written as the convex combination lerp(x, p, (t' - t) / (1 - t))."""
        return torch.lerp(x, posterior.to(x.dtype), (t_next - t) / (1.0 - t))

    def log_evidence(self, log_x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """0 where x_k >= t (x_t is reachable from e_k), -inf elsewhere; t [B], log_x [B, L, V], in log_x's dtype."""
        inside = log_x >= batch_time(t, log_x).log()
        return torch.zeros_like(log_x).masked_fill_(~inside, float("-inf"))

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "t_max": self.t_end, "source": "dirichlet(1)", "target": "one-hot",
                "time_grid": "uniform in t"}


@register("linear-simplex")
def build(config: Any, vocab_size: int, specials: SpecialTokens) -> LinearSimplex:
    # Padding and mask never occur as targets in the training data; never emit them.
    return LinearSimplex(vocab_size, config.method.simplex_t_max, banned_ids=(specials.pad, specials.mask))
