"""SEDD (Lou et al. 2024) on the absorbing graph: score entropy and the Tweedie tau-leaping sampler.

Forward CTMC: every token jumps to the mask at rate sigma(t); with total noise sigma_bar(t) a
position is still clean with probability alpha_t = exp(-sigma_bar(t)). Log-linear schedule:
sigma_bar(t) = -log(1 - t), i.e. alpha_t = 1 - t and sigma(t) = 1 / (1 - t). (SEDD writes
-log(1 - (1 - eps) t) to keep sigma_bar(1) finite for a network conditioned on sigma_bar; this
network is conditioned on t, so eps = 0 and the all-mask prior is exact.)

Score: s(x_t)_y ~ p_t(x_t with position l set to y) / p_t(x_t) for a masked position l and a
token y != mask. Parameterised the standard absorbing way (SEDD's scale_by_sigma), from the
network's raw logits f:

    log s_y = f_y - log N + log r(t),   r(t) = alpha_t / (1 - alpha_t) = 1 / (e^{sigma_bar} - 1),

N = V - 1 the non-mask tokens, so a network that outputs zeros starts with the right total
ratio r. Nothing forces sum_y e^{f_y - log N} = 1: SEDD learns unnormalised ratios; the true
score is r(t) p(x0_l = y | x_t). With g = f - log N:

Denoising score entropy (per masked position with clean token a, weight sigma(t) from Q):

    sigma(t) [ sum_{y != mask} s_y - r log s_a + r (log r - 1) ] = (1/t) [ sum_y e^{g_y} - g_a - 1 ],

using sigma(t) r(t) = 1/t. It is >= -log softmax(f)_a (equal when sum_y e^{g_y} = 1, where it is
MDLM's NELBO term); the loss is the per-generated-token mean, an upper bound on the NLL per token.

Tweedie tau-leaping from t to s < t (exact for an exact score; SEDD's "analytic" predictor): a
masked position becomes y with probability s_y (e^{sigma_bar(t) - sigma_bar(s)} - 1)
= e^{g_y} (alpha_s - alpha_t) / (1 - alpha_t) and stays masked with the remaining probability
(clipped at 0); the last step, to s = 0, unmasks every position (SEDD's final denoising step).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from klflow.methods.base import MethodDefaults, Model, SpecialTokens, generate_defaults, register
from klflow.methods.absorbing import (T_MIN, call_model, corrupt, generated_positions, masked_start, reverse_move,
                                     stratified_times, unmask_loop, unmask_step)
from klflow.sampling import Observer, ban_, check_sizes, sampling_device


class SEDD(MethodDefaults):
    """Absorbing score-entropy discrete diffusion with the log-linear schedule and Tweedie tau-leaping."""

    name = "sedd"
    causal = False

    def __init__(self, vocab_size: int, specials: SpecialTokens, t_min: float = T_MIN) -> None:
        self.vocab_size = vocab_size
        self.mask_id = specials.mask
        self.banned_ids = (specials.pad, specials.mask)
        self.t_min = t_min
        self.log_n = math.log(vocab_size - 1)  # the score's shift: the number of non-mask tokens

    def log_ratio(self, logits: torch.Tensor) -> torch.Tensor:
        """g = f - log N, the log score without its analytic factor r(t): log s_y = g_y + log r(t)."""
        return logits - self.log_n

    def loss(self, model: Model, ids: torch.Tensor, cond_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Score entropy per generated token: sum over masked l of (1/t)(sum_y e^{g_y} - g_a - 1), / #generated.

        t ~ U[t_min, 1] (stratified over the batch), masked with probability 1 - alpha_t = t.
        """
        t = stratified_times(ids.shape[0], self.t_min, generator, ids.device)
        x_t, masked = corrupt(ids, t, cond_mask, self.mask_id, generator)
        g = self.log_ratio(ban_(model(x_t, t).to(torch.float32, copy=True), (self.mask_id,)))[masked]
        # Only masked positions: e^g at an unmasked one could overflow, and a zero weight on an
        # infinite term still back-propagates 0 x inf = NaN.
        g_clean = g.gather(-1, ids[masked].unsqueeze(-1)).squeeze(-1)
        entropy = g.exp().sum(dim=-1) - g_clean - 1.0  # >= 0: e^{g_a} >= 1 + g_a
        weight = t[:, None].reciprocal().expand_as(masked)[masked]
        return (entropy * weight).sum() / generated_positions(ids, cond_mask)

    def generate(self, model: Model, num_samples: int, seq_len: int, steps: int,
                 prompt: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 progress: Callable[[int], None] | None = None, observe: Observer | None = None) -> torch.Tensor:
        """Tweedie tau-leaping from t = 1 (all masked) to t = 0 over `steps` uniform steps, float64 draws.

        Step n goes from t = 1 - n/steps to s = t - 1/steps, one network call each (fewer only if
        every position is unmasked early; see last_nfe).
        """
        check_sizes(num_samples, seq_len, steps)
        device = sampling_device(model, device)
        x = masked_start(num_samples, seq_len, prompt, cond_mask, self.mask_id, self.vocab_size, device)

        def step(n: int, x: torch.Tensor) -> tuple[torch.Tensor, bool, torch.Tensor]:
            g = self.log_ratio(call_model(model, x, 1.0 - n / steps, self.banned_ids))
            return unmask_step(x, g, reverse_move(steps, n), self.mask_id, generator), True, g

        x, calls = unmask_loop(model, x, steps, self.mask_id, step, progress, observe, lambda n: 1.0 - n / steps)
        self.last_nfe = calls
        return x

    def nfe(self, steps: int, seq_len: int, **options: Any) -> int:
        return steps

    def sample_settings(self, **options: Any) -> dict[str, Any]:
        return generate_defaults(self, options)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "graph": "absorb", "schedule": "log-linear sigma_bar(t) = -log(1 - t)",
                "score": "exp(f - log(V - 1)) * alpha_t / (1 - alpha_t)", "reverse_step": "tweedie tau-leaping",
                "t_min": self.t_min}


@register("sedd")
def build(config: Any, vocab_size: int, specials: SpecialTokens) -> SEDD:
    return SEDD(vocab_size, specials, config.method.t_min)
