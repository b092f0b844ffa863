"""KL-geodesic flow matching as a Method: KLPath's cross-entropy and the ODE/randomized/hybrid samplers."""

from __future__ import annotations

from typing import Any, Callable

import torch

from klflow.methods.base import Model, SpecialTokens, generate_defaults, register
from klflow.path import KLPath
from klflow.sampling import generate, nfe


class KLFlow:
    name = "klflow"
    causal = False

    def __init__(self, path: KLPath, banned_ids: tuple[int, ...] = ()) -> None:
        self.path = path
        self.banned_ids = banned_ids

    def loss(self, model: Model, ids: torch.Tensor, cond_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, free_only: bool = False) -> torch.Tensor:
        return self.path.loss(model, ids, cond_mask, generator, free_only=free_only)

    def generate(self, model: Model, num_samples: int, seq_len: int, steps: int,
                 prompt: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 sampler: str = "hybrid", t_star: float | None = None, select: str = "argmax",
                 readout: str = "argmax", progress: Callable[[int], None] | None = None) -> torch.Tensor:
        return generate(model, self.path, num_samples, seq_len, sampler=sampler, steps=steps, t_star=t_star,
                        select=select, readout=readout, prompt=prompt, cond_mask=cond_mask, generator=generator,
                        banned_ids=self.banned_ids, device=device, progress=progress)

    def nfe(self, steps: int, seq_len: int) -> int:
        return nfe(steps)

    def sample_settings(self, **options: Any) -> dict[str, Any]:
        settings = generate_defaults(self, options)
        if settings["t_star"] is None:
            settings["t_star"] = self.path.default_t_star
        if settings["sampler"] != "hybrid":
            settings["t_star"] = None  # only the hybrid switches samplers
        return settings

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "beta": self.path.beta, "t_max": self.path.t_max,
                "t_max_calibrated": self.path.t_max_calibrated, "default_t_star": self.path.default_t_star}


@register("klflow")
def build(config: Any, vocab_size: int, specials: SpecialTokens) -> KLFlow:
    path = KLPath(vocab_size, config.path.beta, config.path.t_max)
    if config.train.compile:
        path.compile()  # with the network: the source and softmax passes over [B, L, V] fuse into few
    # Padding and mask never occur as targets in the training data; never emit them.
    return KLFlow(path, banned_ids=(specials.pad, specials.mask))
