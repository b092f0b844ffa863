"""The machinery every simplex-flow baseline shares (linear-simplex, fisher-rao, dirichlet).

The simplex flows move one point of the simplex per position from a Dirichlet(1) source towards
the vertex e_k of the clean token k. They share everything but the path (the paper's Table 1
ablation): the denoiser p(x1 | x_t) is trained by cross-entropy on the clean ids over all B * L
positions, with prompt positions fed as exact one-hots, and the sampler takes Euler steps of the
posterior-averaged conditional velocity v(x, t) = sum_k p(x1 = k | x_t) u_k(x, t) on a grid
t_0 = 0 < ... < t_steps = t_end, then reads out argmax (or a float64 draw) of p(x1 | x_{t_end}):
NFE = steps + 1.

Evidence input (model.input = "evidence", the analogue of klflow's): every path here has a closed-form
single-token likelihood p(x_t | x1 = k) (log_evidence), so the network can be fed the single-token
posterior q(x_t, t) = softmax_k log p(x_t | k) under a uniform prior instead of x_t. See
SimplexFlow.single_token_posterior.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from klflow.errors import KLFlowError
from klflow.flow.path import reads_posterior
from klflow.methods.base import MethodDefaults, Model, generate_defaults
from klflow.sampling import (
    ban_,
    check_readout,
    check_sizes,
    clamp_one_hot,
    expand_prompt,
    exponential_noise,
    nfe,
    read_out,
    sampling_device,
    sampling_mode,
)

DEFAULT_T_MAX = 0.99  # the reference's end time for its sphere path; the same for the linear one


def dirichlet_source(shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """x0 ~ Dirichlet(1) over the last dim, float32: E / sum(E) with E_j ~ Exp(1) (exponential_noise)."""
    e = exponential_noise(shape, generator, device)
    # E can be exactly 0 in float32; keep every coordinate strictly positive.
    e.clamp_min_(torch.finfo(e.dtype).tiny)
    return e.div_(e.sum(-1, keepdim=True))


def check_t_max(t_max: float) -> float:
    """t_max in (0, 1): the velocities carry 1 / (1 - t)."""
    if not 0.0 < t_max < 1.0:
        raise KLFlowError(f"t_max must lie in (0, 1), got {t_max}")
    return t_max


class SimplexFlow(MethodDefaults, ABC):
    """Loss and Euler sampler shared by the simplex flows; a subclass defines its path.

    Every hook takes the time t the network sees; log_evidence lets tests build the exact
    posterior of a toy distribution (klflow.flow.exact.ExactPosterior) for any of these paths.
    """

    name: ClassVar[str]
    causal: ClassVar[bool] = False

    def __init__(self, vocab_size: int, t_end: float, banned_ids: tuple[int, ...] = ()) -> None:
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise KLFlowError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.t_end = float(t_end)
        self.banned_ids = banned_ids

    # -- the path ------------------------------------------------------------------------------
    def sample_time(self, batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Training times t [B] (the time the network sees): U(0, t_end) unless a path says otherwise."""
        return torch.rand(batch, generator=generator, device=device) * self.t_end

    def time_grid(self, steps: int) -> list[float]:
        """steps + 1 sampler times, uniform from 0 to the read-out time t_end."""
        return torch.linspace(0.0, self.t_end, steps + 1, dtype=torch.float64).tolist()

    @abstractmethod
    def sample_x_t(self, ids: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t [B, L, V] drawn from p(x_t | x1) for clean ids [B, L] at times t [B]."""

    @abstractmethod
    def euler_step(self, x: torch.Tensor, posterior: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        """x at t_next from x at t [B, L, V] and the posterior p(x1 | x_t) [B, L, V]."""

    @abstractmethod
    def log_evidence(self, log_x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p(x_t | x1 = k) [B, L, V] up to a constant in k, from log x_t [B, L, V] and t [B]."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The method's name and hyperparameters."""

    def continued_log_evidence(self, log_x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log_evidence, continued by the nearest vertex where no token's likelihood is positive.

        The linear and sphere likelihoods vanish outside moving supports ({x_k >= t}, {x_k > sin^2(t pi / 2)}),
        which a finite Euler step can cross (with the exact posterior with probability O(h) per trajectory),
        and the posterior is 0/0 there. The nearest vertex (the largest x_k) is the last token whose support
        x left, where the posterior was its one-hot: there the continuation is 0 at it and -inf elsewhere.
        """
        z = self.log_evidence(log_x, t)
        nearest = torch.where(log_x == log_x.amax(dim=-1, keepdim=True), 0.0, float("-inf")).to(z.dtype)
        return torch.where(torch.isinf(z).all(dim=-1, keepdim=True), nearest, z)

    @abstractmethod
    def support_floor(self, t: torch.Tensor) -> torch.Tensor:
        """s(t) [B]: p(x_t | x1 = k) > 0 only where x_k >= s(t) (0: everywhere)."""

    def single_token_posterior(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t, t) = p(x1 = k | x_t) at each position alone under a uniform prior, in x's dtype:
        softmax_k of continued_log_evidence. The evidence input of the network; x [B, L, V], t [B].

        Computed on the entries inside support_floor only (for most t a few per position), the rest
        being 0; rows whose largest entry is not above the floor (off every support, or given exact
        one-hots) are the one-hot of their nearest vertex.
        """
        vocab = x.shape[-1]
        floor = self.support_floor(t).to(x.dtype).view(-1, 1, 1)
        top, nearest = x.max(dim=-1, keepdim=True)
        q = torch.zeros_like(x)
        vertex = (top <= floor) | (top == 1.0)
        q.scatter_(-1, nearest, vertex.to(x.dtype))
        index = ((x >= floor) & ~vertex).view(-1).nonzero().squeeze(-1)
        if index.numel():
            row = torch.div(index, vocab, rounding_mode="floor")
            times = t.to(x.dtype).repeat_interleave(x.shape[1] * vocab)[index]
            z = self.log_evidence(x.view(-1)[index].log().view(-1, 1, 1), times).view(-1)
            rows = x.numel() // vocab
            peak = torch.full((rows,), float("-inf"), dtype=x.dtype, device=x.device).scatter_reduce_(0, row, z, "amax")
            w = torch.exp(z - peak[row])
            total = torch.zeros(rows, dtype=x.dtype, device=x.device).index_add_(0, row, w)
            q.view(-1)[index] = w / total[row]
        return q

    def network_logits(self, model: Model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """model(x_t, t), or model(q(x_t, t), t, posterior=True) for an evidence-input model."""
        if reads_posterior(model):
            return model(self.single_token_posterior(x, t), t, posterior=True)
        return model(x, t)

    # -- the Method protocol -----------------------------------------------------------------
    def loss(self, model: Model, ids: torch.Tensor, cond_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Cross-entropy of model(x_t, t) against the clean ids, averaged over all B * L positions."""
        t = self.sample_time(ids.shape[0], generator, ids.device)
        x_t = self.sample_x_t(ids, t, generator)
        if cond_mask is not None:
            x_t = clamp_one_hot(x_t, ids, cond_mask)
        logits = self.network_logits(model, x_t, t)
        return F.cross_entropy(logits.float().reshape(-1, self.vocab_size), ids.reshape(-1))

    def generate(self, model: Model, num_samples: int, seq_len: int, steps: int,
                 prompt: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 readout: str = "argmax", progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Token ids [num_samples, seq_len]: Euler steps of v on time_grid(steps), then a read-out.

        readout: the final choice from p(x1 | x_{t_end}): "argmax" or "sample" (a float64 draw).
        Prompt positions (cond_mask True) are exact one-hots at every model call and come back unchanged.
        """
        check_readout(readout)
        check_sizes(num_samples, seq_len, steps)
        device = sampling_device(model, device)
        prompt, cond_mask = expand_prompt(prompt, cond_mask, num_samples, seq_len, self.vocab_size, device)
        with sampling_mode(model):
            times = self.time_grid(steps)
            x = dirichlet_source((num_samples, seq_len, self.vocab_size), generator, device)
            for n in range(steps):
                logits = self._posterior_logits(model, x, times[n], prompt, cond_mask)
                x = self.euler_step(x, torch.softmax(logits, dim=-1), times[n], times[n + 1])
                if progress is not None:
                    progress(n)
            logits = self._posterior_logits(model, x, times[-1], prompt, cond_mask)
            return read_out(logits, readout, generator, prompt, cond_mask)

    def nfe(self, steps: int, seq_len: int, **options: Any) -> int:
        return nfe(steps)

    def sample_settings(self, **options: Any) -> dict[str, Any]:
        return generate_defaults(self, options)

    def _posterior_logits(self, model: Model, x: torch.Tensor, t: float, prompt: torch.Tensor | None,
                          cond_mask: torch.Tensor | None) -> torch.Tensor:
        if cond_mask is not None:
            clamp_one_hot(x, prompt, cond_mask)  # the state itself: its prompt rows stay one-hot
        logits = self.network_logits(model, x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)).float()
        return ban_(logits, self.banned_ids)
