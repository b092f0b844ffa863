"""Fisher-Rao flow (sphere path): geodesics of the Fisher-Rao metric between Dirichlet noise and the token.

The map q = sqrt(x) sends the simplex onto the positive orthant of the unit sphere and the
Fisher-Rao metric to (4 times) the round metric, so Fisher-Rao geodesics are great circles. With
x0 ~ Dirichlet(1), the one-hot target q1 = e_k (no smoothing: unlike log x, sqrt x is finite at a
vertex) and theta = arccos <q0, e_k> = arccos sqrt(x0_k), the constant-speed geodesic (slerp) is

    q_t = [sin((1 - t) theta) q0 + sin(t theta) e_k] / sin theta,

and squaring it, with phi = (1 - t) theta the angle still to go,

    x_t = cos^2(phi) e_k + sin^2(phi) / (1 - x0_k) * x0 (off the target coordinate):

the target coordinate follows the angle, the others keep their ratios. (The reference's tau-form
[(1 + rho) q1 + 2 e^-tau (q0 - rho q1) + (rho - 1) q1 e^-2tau] / [1 + rho + (1 - rho) e^-2tau] lies
on the same great circle but is not the slerp: along it tan(phi / 2) = (1 - t) tan(theta / 2).)

Velocity: the target-conditioned velocity at q is Log_q(e_k) / (1 - t), with
Log_q(e_k) = phi_k / sin(phi_k) (e_k - q_k q), phi_k = arccos q_k; the marginal velocity is its
average over p(x1 | x_t):  v = [w - <w, q> q] / (1 - t),  w_k = p_k phi_k / sin(phi_k).
Sampler: Riemannian Euler steps q <- Exp_q(h v) = cos(|h v|) q + sin(|h v|) h v / |h v| on a grid
uniform in t over [0, t_max] (the slerp has constant speed theta in t), then x = q^2 renormalised
(so a step that crossed a coordinate plane is reflected back into the orthant). With a point-mass
posterior each step lands exactly on the geodesic.

Exact posterior (for tests): x0_k ~ Beta(1, V - 1), so theta has CDF sin^(2(V-1)) theta; the path maps
x0_k to x_k = cos^2((1 - t) theta) and keeps the normalised rest (uniform, independent of x0_k).
Changing variables,
    log p(x_t | k) = (2V - 3) log(sin theta / sin phi) + log(cos theta / cos phi) + const,
with phi = arccos sqrt(x_k), theta = phi / (1 - t), and p = 0 where theta >= pi/2 (x_k < sin^2(t pi/2)).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from klflow.methods.base import SpecialTokens, register
from klflow.methods.simplex import DEFAULT_T_MAX, SimplexFlow, check_t_max, dirichlet_source
from klflow.sampling import batch_time


def _angle_to_vertex(x: torch.Tensor, one_minus_x: torch.Tensor) -> torch.Tensor:
    """phi = arccos sqrt(x), the sphere angle between sqrt(x) and the vertex, as a stable atan2."""
    return torch.atan2(one_minus_x.clamp_min(0.0).sqrt(), x.sqrt())


def _sin_ratio(angle: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """sin(scale * angle) / sin(angle), finite at angle = 0 (where it is scale)."""
    return scale * torch.sinc(scale * angle / math.pi) / torch.sinc(angle / math.pi)


class FisherRao(SimplexFlow):
    """The sphere path with t ~ U(0, t_max) and Riemannian Euler steps uniform in t."""

    name = "fisher-rao"

    def __init__(self, vocab_size: int, t_max: float = DEFAULT_T_MAX, banned_ids: tuple[int, ...] = ()) -> None:
        super().__init__(vocab_size, check_t_max(t_max), banned_ids)

    def sample_x_t(self, ids: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t = cos^2(phi) e_k + (sin phi / sin theta)^2 x0 off k, phi = (1 - t) theta (module docstring)."""
        x = dirichlet_source((*ids.shape, self.vocab_size), generator, ids.device)
        index = ids.unsqueeze(-1)
        x0_k = x.gather(-1, index)
        theta = _angle_to_vertex(x0_k, 1.0 - x0_k)
        remaining = batch_time(1.0 - t, x)
        x.mul_(_sin_ratio(theta, remaining).square())
        return x.scatter_(-1, index, torch.cos(remaining * theta).square())

    def support_floor(self, t: torch.Tensor) -> torch.Tensor:
        """sin^2(t pi / 2): below it theta = phi / (1 - t) >= pi / 2 (see the module docstring)."""
        return torch.sin(t * (math.pi / 2)).square()

    def euler_step(self, x: torch.Tensor, posterior: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        """x = q^2 with q <- Exp_q(h v), v = [w - <w, q> q] / (1 - t), w_k = p_k phi_k / sin(phi_k)."""
        q = x.sqrt()
        phi = _angle_to_vertex(x, 1.0 - x)
        w = posterior.to(x.dtype) / torch.sinc(phi / math.pi)
        step = (w - (w * q).sum(-1, keepdim=True) * q).mul_((t_next - t) / (1.0 - t))
        eta = torch.linalg.vector_norm(step, dim=-1, keepdim=True)
        q = torch.cos(eta) * q + torch.sinc(eta / math.pi) * step
        x = q.square_()
        return x.div_(x.sum(-1, keepdim=True))

    def log_evidence(self, log_x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(2V - 3) log(sin theta / sin phi) + log(cos theta / cos phi), -inf where theta >= pi/2; in log_x's dtype."""
        remaining = batch_time(1.0 - t, log_x)
        phi = _angle_to_vertex(log_x.exp(), -torch.expm1(log_x))
        theta = phi / remaining
        # sin theta / sin phi = sinc(theta) / (sinc(phi) (1 - t)); the 1 / (1 - t) is the same for every k.
        z = (2 * self.vocab_size - 3) * torch.log(torch.sinc(theta / math.pi) / torch.sinc(phi / math.pi))
        z += torch.log(torch.cos(theta)) - torch.log(torch.cos(phi))
        return z.masked_fill_(theta >= math.pi / 2, float("-inf"))

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "t_max": self.t_end, "source": "dirichlet(1)", "target": "one-hot",
                "geodesic": "slerp of sqrt(x)", "time_grid": "uniform in t"}


@register("fisher-rao")
def build(config: Any, vocab_size: int, specials: SpecialTokens) -> FisherRao:
    # Padding and mask never occur as targets in the training data; never emit them.
    return FisherRao(vocab_size, config.method.simplex_t_max, banned_ids=(specials.pad, specials.mask))
