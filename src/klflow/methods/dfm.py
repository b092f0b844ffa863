"""Discrete flow matching (Gat et al. 2024): the mixture path from an all-mask source.

Path: per position, x_t = x1 with probability kappa(t) and the mask token otherwise, with the
scheduler kappa(t) = 1 - (1 - t)^p, p = 2 (the reference's; method.kappa_power), t in [0, 1]. The denoiser p(x1 | x_t) is
trained by cross-entropy against the clean tokens at every generated position (as the reference
code does: unmasked positions teach the model to copy its input).

Sampler (the Euler jump process of the reference): on t_n = n h, h = 1/steps, each position still
masked jumps with probability c_n = clip(kappa'(t_n) h / (1 - kappa(t_n)), 0, 1) = min(1, p / (steps - n))
to a draw from p(x1 | x_t). c_n first reaches 1 at n = max(0, ceil(steps - p)) (steps - 2 for p = 2):
at that step every position still masked jumps, by a draw as at every other step (as the reference
does), after which nothing is masked. readout="argmax" instead takes the argmax of p(x1 | x_t) there:
a mode-seeking variant, not the reference. Prompt positions are never masked, so they are clamped at every step
(the reference clamps them only at the read-out).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from klflow.errors import KLFlowError
from klflow.methods.base import MethodDefaults, Model, SpecialTokens, generate_defaults, register
from klflow.methods.absorbing import (call_model, corrupt, generated_positions, masked_start, stratified_times,
                                     unguided_record, unmask_loop, unmask_step)
from klflow.sampling import Observer, check_readout, check_sizes, guidance_calls, guided_calls, sampling_device

DEFAULT_KAPPA_POWER = 2.0  # the reference's quadratic scheduler


def kappa(t: torch.Tensor, power: float = DEFAULT_KAPPA_POWER) -> torch.Tensor:
    """The scheduler kappa(t) = 1 - (1 - t)^power: the probability that a position already shows x1."""
    return 1.0 - (1.0 - t) ** power


def jump_probability(steps: int, n: int, power: float = DEFAULT_KAPPA_POWER) -> float:
    """clip(kappa'(t) h / (1 - kappa(t)), 0, 1) at t = n h, h = 1/steps: = min(1, power / (steps - n)), exact."""
    return min(1.0, power / (steps - n))


class DFM(MethodDefaults):
    """Discrete flow matching with the mask source, the quadratic scheduler and the Euler jump sampler."""

    name = "dfm"
    causal = False

    def __init__(self, vocab_size: int, specials: SpecialTokens, kappa_power: float = DEFAULT_KAPPA_POWER,
                 condition_dropout: float = 0.0) -> None:
        if not kappa_power >= 1.0:
            raise KLFlowError(f"kappa_power must be >= 1 (the last step must unmask every position), got {kappa_power}")
        self.kappa_power = float(kappa_power)
        self.condition_dropout = condition_dropout  # classifier-free guidance's training (absorbing.corrupt)
        self.vocab_size = vocab_size
        self.mask_id = specials.mask
        self.banned_ids = (specials.pad, specials.mask)

    def loss(self, model: Model, ids: torch.Tensor, cond_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean cross-entropy -log p(x1_l | x_t) over the generated positions, t ~ U[0, 1) (stratified);
        condition_dropout of the sequences see their given positions masked (absorbing.corrupt)."""
        t = stratified_times(ids.shape[0], 0.0, generator, ids.device)
        x_t, _ = corrupt(ids, 1.0 - kappa(t, self.kappa_power), cond_mask, self.mask_id, generator,
                         self.condition_dropout)
        ce = F.cross_entropy(model(x_t, t).float().transpose(1, 2), ids, reduction="none")
        if cond_mask is not None:
            ce = ce.masked_fill(cond_mask, 0.0)
        return ce.sum() / generated_positions(ids, cond_mask)

    def generate(self, model: Model, num_samples: int, seq_len: int, steps: int,
                 prompt: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 readout: str = "sample", progress: Callable[[int], None] | None = None,
                 observe: Observer | None = None, guidance: float = 0.0) -> torch.Tensor:
        """Euler jump sampling from the all-mask source (see the module docstring).

        readout: how the positions still masked when the jump probability reaches 1 pick x1:
        "sample" (a float64 draw, the reference) or "argmax" (the mode). Jumps before it are
        float64 draws. guidance W != 0: classifier-free guidance, two calls per step (absorbing.call_model).
        """
        check_readout(readout)
        calls_per_step = guidance_calls(guidance, prompt)
        check_sizes(num_samples, seq_len, steps)
        device = sampling_device(model, device)
        x = masked_start(num_samples, seq_len, prompt, cond_mask, self.mask_id, self.vocab_size, device)
        given = x != self.mask_id

        def step(n: int, x: torch.Tensor) -> tuple[torch.Tensor, bool, torch.Tensor]:
            logits = call_model(model, x, n / steps, self.banned_ids, given, self.mask_id, guidance)
            c = jump_probability(steps, n, self.kappa_power)
            if c == 1.0 and readout == "argmax":
                return torch.where(x == self.mask_id, logits.argmax(dim=-1), x), True, logits
            return unmask_step(x, logits.log_softmax(dim=-1), c, self.mask_id, generator), True, logits

        x, calls = unmask_loop(model, x, steps, self.mask_id, step, progress, observe, lambda n: n / steps)
        self.last_nfe = calls * calls_per_step
        return x

    def nfe(self, steps: int, seq_len: int, **options: Any) -> int:
        """The calls up to the first step whose jump probability is 1, which empties the mask: steps - 1 for p = 2
        (twice that when guided)."""
        return min(steps, max(0, math.ceil(steps - self.kappa_power)) + 1) * guided_calls(options.get("guidance", 0.0))

    def sample_settings(self, **options: Any) -> dict[str, Any]:
        return unguided_record(generate_defaults(self, options))

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "source": "mask", "scheduler": f"kappa(t) = 1 - (1 - t)^{self.kappa_power:g}",
                "reverse_step": "euler jump, clip(kappa' h / (1 - kappa), 0, 1)"}


@register("dfm")
def build(config: Any, vocab_size: int, specials: SpecialTokens) -> DFM:
    return DFM(vocab_size, specials, config.method.kappa_power, config.train.condition_dropout)
