"""Timings taken side by side: interleaved medians, the machine's matmul peak, training-step rates, MFU.

Every figure here is a ratio or a rate measured in one round-robin loop, so that a change of load
on the machine hits every contender alike; none is meant to be compared across runs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch

from klflow.config import Config
from klflow.methods import SpecialTokens, build_method
from klflow.runtime import build_model, build_optimizers, network_forward

# 6 N FLOPs per token for the forward and backward of N weights (attention scores excluded).
FLOPS_PER_TOKEN_PER_PARAMETER = 6


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall clock read after it measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Median seconds of each fn, measured round-robin after two warm-up calls each."""
    return {name: statistics.median(values) for name, values in interleaved_rounds(fns, repeats, device).items()}


def interleaved_rounds(fns: dict[str, Callable[[], object]], repeats: int,
                       device: torch.device = torch.device("cpu")) -> dict[str, list[float]]:
    """Seconds of each fn in each of `repeats` round-robin rounds, after two warm-up calls each."""
    for fn in fns.values():
        fn()
        fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def paired_ratio(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """(median, min, max) over rounds of numerator_i / denominator_i: a ratio of two fns timed side by
    side in each round, so that a machine slowing down between rounds (shared cores) cancels out."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def default_matmul_size(device: torch.device) -> int:
    """Square size at which a matmul runs near the hardware peak: 1024 on a CPU, 8192 on a GPU."""
    return 8192 if device.type == "cuda" else 1024


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int | None = None) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`: 2 n^3 / median seconds of 10 runs."""
    n = n or default_matmul_size(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = interleaved({"matmul": lambda: a @ b}, 10, device)["matmul"]
    return 2 * n**3 / seconds


def model_flop_utilisation(parameters: int, tokens_per_second: float, peak_flops: float) -> float:
    """MFU = 6 N tokens/s / peak FLOP/s (the weights' forward and backward only)."""
    return FLOPS_PER_TOKEN_PER_PARAMETER * parameters * tokens_per_second / peak_flops


def training_step_seconds(config: Config, methods: list[str], ids: torch.Tensor, cond_mask: torch.Tensor | None,
                          vocab_size: int, specials: SpecialTokens, device: torch.device, dtype: torch.dtype | None,
                          repeats: int) -> tuple[dict[str, float], dict[str, int]]:
    """Median seconds of one optimizer step of each method on the same backbone and batch, interleaved.

    A step is what train() does per micro-batch (see optimizer_step). Returns the seconds and the
    parameter count of each method's network.
    """
    steps: dict[str, Callable[[], object]] = {}
    parameters: dict[str, int] = {}
    for name in methods:
        own = dataclasses.replace(config, method=dataclasses.replace(config.method, name=name))  # its default input
        steps[name], parameters[name] = optimizer_step(own, ids, cond_mask, vocab_size, specials, device, dtype)
    return interleaved(steps, repeats, device), parameters


def optimizer_step(config: Config, ids: torch.Tensor, cond_mask: torch.Tensor | None, vocab_size: int,
                   specials: SpecialTokens, device: torch.device,
                   dtype: torch.dtype | None) -> tuple[Callable[[], None], int]:
    """One optimizer step of config's method and network on a batch, as a callable, and the network's
    parameter count.

    A step is what train() does per micro-batch: the loss under autocast, backward, gradient
    clipping and the optimizer update (config.train's optimizer and learning rates).
    """
    tc = config.train
    method = build_method(config.method.name, config, vocab_size, specials)
    model = build_model(config, vocab_size, method.causal).to(device).train()
    optimizers = build_optimizers(model, tc.lr, tc.muon_lr, tc.betas, tc.weight_decay, tc.optimizer)
    forward = network_forward(model, dtype, device)
    generator = torch.Generator(device=device).manual_seed(tc.seed)

    def step() -> None:
        loss = method.loss(forward, ids, cond_mask, generator=generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, model.num_parameters()
