"""Calibrating the data-driven switch rule of the hybrid sampler once, on validation data.

The fixed rule switches every sequence from ODE to randomized steps at t_star. The entropy
rule (generate(..., switch_entropy=H)) switches each sequence when the mean entropy of its
posterior p_theta(x1 | x_t) falls to H. Calibrated as the mean posterior entropy of validation
sequences noised to t_star, it switches on average where the fixed rule does, but earlier for
sequences the model is already sure of and later for the ones it is not.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from klflow.path import KLPath, Model
from klflow.sampling import mean_posterior_entropy, posterior_logits


@torch.inference_mode()
def calibrate_switch_entropy(
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
    out of the mean, as in the sampler. t_star None: path.default_t_star.
    """
    t_star = path.default_t_star if t_star is None else float(t_star)
    total, count = 0.0, 0
    for ids, cond_mask in batches:
        ids = ids.to(device)
        cond_mask = cond_mask.to(device) if cond_mask is not None else None
        l_t = path.noisy_logits(ids, torch.full((len(ids),), t_star, device=device), generator)
        logits = posterior_logits(model, l_t, t_star, ids, cond_mask, banned_ids)
        total += mean_posterior_entropy(logits, cond_mask).sum().item()
        count += len(ids)
    return total / count
