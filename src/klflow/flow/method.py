"""KL-geodesic flow matching as a Method: KLPath's cross-entropy and the ODE/randomized/hybrid samplers."""

from __future__ import annotations

from typing import Any, Callable

import torch

from klflow.methods.base import Model, SpecialTokens, generate_defaults, register
from klflow.path import KLPath
from klflow.sampling import Observer, default_select, default_temperature, generate, nfe
from klflow.time_sampling import TimeSampling
from klflow.validation import banded_validation


class KLFlow:
    name = "klflow"
    causal = False

    def __init__(self, path: KLPath, banned_ids: tuple[int, ...] = (), time_sampling: TimeSampling | None = None) -> None:
        self.path = path
        self.banned_ids = banned_ids
        self.time_sampling = time_sampling or TimeSampling(path.t_max)

    def loss(self, model: Model, ids: torch.Tensor, cond_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The path's cross-entropy at t drawn by time_sampling, importance-weighted to the uniform-t objective."""
        t, weight = self.time_sampling.sample(ids.shape[0], generator, ids.device)
        return self.path.loss(model, ids, cond_mask, generator, t=t, weight=weight)

    def validation_scores(self, model: Model, batches: list, device: torch.device, seed: int) -> dict[str, float]:
        """Uniform-t validation loss, overall and per band of t / t_max (klflow.validation)."""
        return banded_validation(model, self.path, batches, device, seed)

    def generate(self, model: Model, num_samples: int, seq_len: int, steps: int,
                 prompt: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 sampler: str = "randomized", t_star: float | None = None, select: str | None = None,
                 readout: str = "argmax", temperature: float | None = None, top_p: float = 1.0, integrator: str = "euler",
                 switch_entropy: float | None = None, top_k: int = 0,
                 progress: Callable[[int], None] | None = None, observe: Observer | None = None) -> torch.Tensor:
        """klflow.sampling.generate with this method's path and banned ids."""
        return generate(model, self.path, num_samples, seq_len, sampler=sampler, steps=steps, t_star=t_star,
                        select=select, readout=readout, prompt=prompt, cond_mask=cond_mask, generator=generator,
                        banned_ids=self.banned_ids, device=device, progress=progress, temperature=temperature,
                        top_p=top_p, integrator=integrator, switch_entropy=switch_entropy, top_k=top_k,
                        observe=observe)

    def nfe(self, steps: int, seq_len: int) -> int:
        return nfe(steps)

    def sample_settings(self, **options: Any) -> dict[str, Any]:
        settings = generate_defaults(self, options)
        if settings["select"] is None:  # recorded as used
            settings["select"] = default_select(settings["sampler"])
        top_k = settings.pop("top_k")  # recorded in the selection it makes: sample with top_k K is top_k:K
        if top_k and settings["select"] == "sample":
            settings["select"] = f"top_k:{top_k}"
        if settings["temperature"] is None:
            settings["temperature"] = default_temperature(settings["select"])
        if settings["t_star"] is None and settings["switch_entropy"] is None:
            settings["t_star"] = self.path.default_t_star
        if settings["sampler"] != "hybrid":
            settings["t_star"] = None  # only the hybrid switches samplers
        return settings

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "beta": self.path.beta, "t_max": self.path.t_max,
                "t_max_calibrated": self.path.t_max_calibrated, "default_t_star": self.path.default_t_star,
                "time_sampling": self.time_sampling.kind,
                **({"time_power": self.time_sampling.power} if self.time_sampling.kind == "power" else {})}


@register("klflow")
def build(config: Any, vocab_size: int, specials: SpecialTokens) -> KLFlow:
    path = KLPath(vocab_size, config.path.beta, config.path.t_max)
    if config.train.compile:
        path.compile()  # with the network: the source and softmax passes over [B, L, V] fuse into few
    power = config.path.time_power if config.path.time_sampling == "power" else 1.0
    # Padding and mask never occur as targets in the training data; never emit them.
    return KLFlow(path, banned_ids=(specials.pad, specials.mask),
                  time_sampling=TimeSampling(path.t_max, config.path.time_sampling, power))
