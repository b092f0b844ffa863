"""MDLM (Sahoo et al. 2024): absorbing-mask diffusion with the SUBS parameterisation.

Forward process: each position is independently replaced by the mask token with probability
1 - alpha_t, log-linear schedule alpha_t = 1 - t, t in [0, 1]. SUBS: the denoiser puts zero mass
on the mask and copies unmasked positions, so only masked positions carry loss. The
Rao-Blackwellised continuous-time NELBO is

    NELBO(x) = E_{t ~ U[t_min, 1]} sum_{l masked in x_t} (-alpha'_t / (1 - alpha_t)) (-log p(x_l | x_t))
             = E_t sum_{l masked} (1 / t) (-log p(x_l | x_t)),

averaged here per generated token, so exp(loss) is the NELBO perplexity bound.

What the absorbing-state methods share is klflow.methods.absorbing.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from klflow.errors import KLFlowError
from klflow.methods.absorbing import (T_MIN, call_model, corrupt, generated_positions, masked_start, reverse_move,
                                     stratified_times, unguided_record, unmask_loop, unmask_step)
from klflow.methods.base import MethodDefaults, Model, SpecialTokens, generate_defaults, register
from klflow.sampling import Observer, ban_, check_sizes, guidance_calls, guided_calls, sampling_device

class MDLM(MethodDefaults):
    """Masked diffusion LM: SUBS denoiser, log-linear schedule, ancestral sampler with the no-change cache."""

    name = "mdlm"
    causal = False

    def __init__(self, vocab_size: int, specials: SpecialTokens, t_min: float = T_MIN,
                 condition_dropout: float = 0.0) -> None:
        self.vocab_size = vocab_size
        self.condition_dropout = condition_dropout  # classifier-free guidance's training (absorbing.corrupt)
        self.mask_id = specials.mask
        self.banned_ids = (specials.pad, specials.mask)
        self.t_min = t_min

    def loss(self, model: Model, ids: torch.Tensor, cond_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The NELBO per generated token: sum over masked l of (1/t)(-log p(x_l | x_t)), / #generated positions.

        t ~ U[t_min, 1] (stratified over the batch); mask probability 1 - alpha_t = t; SUBS puts
        -inf on the mask logit. Unmasked positions copy their input and add nothing; condition_dropout of
        the sequences see their given positions masked too (absorbing.corrupt).
        """
        t = stratified_times(ids.shape[0], self.t_min, generator, ids.device)
        x_t, masked = corrupt(ids, t, cond_mask, self.mask_id, generator, self.condition_dropout)
        logits = ban_(model(x_t, t).to(torch.float32, copy=True), (self.mask_id,))
        nll = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        weighted = torch.where(masked, nll / t[:, None], torch.zeros_like(nll))
        return weighted.sum() / generated_positions(ids, cond_mask)

    def generate(self, model: Model, num_samples: int, seq_len: int, steps: int,
                 prompt: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 cache: bool = True, progress: Callable[[int], None] | None = None,
                 observe: Observer | None = None, guidance: float = 0.0) -> torch.Tensor:
        """Ancestral sampling from t = 1 (all masked) to t = 0 over `steps` uniform steps.

        Step n goes from t = 1 - n/steps to s = t - 1/steps: a masked position unmasks with
        probability (alpha_s - alpha_t) / (1 - alpha_t) = (t - s)/t to y ~ p(x0 | x_t), float64.
        cache: reuse the last network output while no token has changed (MDLM's ddpm_cache);
        exact for the true posterior, which for an absorbing process does not depend on t.
        Calls actually made are in self.last_nfe (at most steps; twice that when guided).
        guidance W != 0: classifier-free guidance, two calls per network step (absorbing.call_model).
        """
        if not isinstance(cache, bool):
            raise KLFlowError(f"cache must be true or false, got {cache!r}")
        calls_per_step = guidance_calls(guidance, prompt)
        check_sizes(num_samples, seq_len, steps)
        device = sampling_device(model, device)
        x = masked_start(num_samples, seq_len, prompt, cond_mask, self.mask_id, self.vocab_size, device)
        given = x != self.mask_id
        log_p: torch.Tensor | None = None

        def step(n: int, x: torch.Tensor) -> tuple[torch.Tensor, bool, torch.Tensor]:
            nonlocal log_p
            called = log_p is None
            if called:
                log_p = call_model(model, x, 1.0 - n / steps, self.banned_ids, given, self.mask_id,
                                   guidance).log_softmax(dim=-1)
            used = log_p
            new = unmask_step(x, log_p, reverse_move(steps, n), self.mask_id, generator)
            if not cache or not torch.equal(new, x):
                log_p = None
            return new, called, used

        x, calls = unmask_loop(model, x, steps, self.mask_id, step, progress, observe, lambda n: 1.0 - n / steps)
        self.last_nfe = calls * calls_per_step
        return x

    def nfe(self, steps: int, seq_len: int, **options: Any) -> int:
        """The upper bound `steps` (twice that when guided); the no-change cache usually makes fewer calls (see
        last_nfe)."""
        return steps * guided_calls(options.get("guidance", 0.0))

    def sample_settings(self, **options: Any) -> dict[str, Any]:
        return unguided_record(generate_defaults(self, options))

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "schedule": "log-linear alpha_t = 1 - t", "parameterization": "subs",
                "t_min": self.t_min}


@register("mdlm")
def build(config: Any, vocab_size: int, specials: SpecialTokens) -> MDLM:
    return MDLM(vocab_size, specials, config.method.t_min, config.train.condition_dropout)
