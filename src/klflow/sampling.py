"""What every method's sampler shares: sizes, device, prompts, banned ids, Exp(1) noise, draws, read-out, observers.

Tensor helpers with no knowledge of any one method or of the network class; a model is any
callable model(x, t, ...) -> logits [B, L, V]. Categorical draws are float64 throughout: float32
draws over large V silently lower the effective temperature (Zheng et al. 2024).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from klflow.errors import KLFlowError

READOUTS = ("argmax", "sample")
# Outside it the float64 draws degenerate: logits / 1e-320 overflow to inf (NaN probabilities),
# and at 1e3 every draw is uniform noise over the vocabulary.
TEMPERATURE_RANGE = (1e-3, 1e3)
NOISE_BLOCK = 1 << 20  # Exp(1) draws per numpy stream (see exponential_noise)


def check_sizes(num_samples: int, seq_len: int, steps: int | None = None) -> None:
    """One-line errors for num_samples or seq_len below 1, or steps (when given) not a positive integer."""
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise KLFlowError(f"steps must be a positive integer, got {steps!r}")
    if num_samples < 1:
        raise KLFlowError(f"num_samples must be >= 1 (klflow sample: --num-samples), got {num_samples}")
    if seq_len < 1:
        raise KLFlowError(f"seq_len must be >= 1, got {seq_len}")


def check_readout(readout: str) -> None:
    """A one-line error for a read-out outside READOUTS."""
    if readout not in READOUTS:
        raise KLFlowError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")


def sampling_device(model: Callable[..., torch.Tensor], device: torch.device | str | None = None) -> torch.device:
    """The device to sample on: `device` if given, else that of the model's first parameter (CPU if it has none)."""
    if device is not None:
        return torch.device(device)
    parameters = getattr(model, "parameters", None)
    if parameters is not None:
        for p in parameters():
            return p.device
    return torch.device("cpu")


@contextmanager
def sampling_mode(model: Callable[..., torch.Tensor]) -> Iterator[None]:
    """torch.inference_mode, with an nn.Module in eval mode for the duration (its mode restored after)."""
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def expand_prompt(
    prompt: torch.Tensor | None,
    cond_mask: torch.Tensor | None,
    num_samples: int,
    seq_len: int,
    vocab_size: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A prompt as ids [num_samples, seq_len] and cond_mask [num_samples, seq_len] on the device, or (None, None).

    prompt is ids [B or 1, L] with cond_mask [B or 1, L], or a prefix [B or 1, P] (cond_mask None),
    which becomes the first P given positions.
    """
    if prompt is None:
        if cond_mask is not None:
            raise KLFlowError("cond_mask was given without a prompt")
        return None, None
    prompt = torch.as_tensor(prompt, dtype=torch.long)
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    if cond_mask is None:
        if prompt.shape[1] > seq_len:
            raise KLFlowError(f"prompt has {prompt.shape[1]} tokens; the sequence length is {seq_len}")
        cond_mask = torch.zeros(prompt.shape[0], seq_len, dtype=torch.bool)
        cond_mask[:, : prompt.shape[1]] = True
        prompt = torch.nn.functional.pad(prompt, (0, seq_len - prompt.shape[1]))
    cond_mask = torch.as_tensor(cond_mask, dtype=torch.bool)
    if cond_mask.dim() == 1:
        cond_mask = cond_mask.unsqueeze(0)
    if prompt.shape[-1] != seq_len or cond_mask.shape[-1] != seq_len:
        raise KLFlowError(f"prompt and cond_mask must have length {seq_len}, got {prompt.shape[-1]} and {cond_mask.shape[-1]}")
    if prompt.min() < 0 or prompt.max() >= vocab_size:
        raise KLFlowError(f"prompt ids must lie in [0, {vocab_size})")
    try:
        prompt = prompt.expand(num_samples, seq_len)
        cond_mask = cond_mask.expand(num_samples, seq_len)
    except RuntimeError:
        raise KLFlowError(f"prompt batch must be 1 or num_samples={num_samples}, got {prompt.shape[0]}") from None
    return prompt.to(device), cond_mask.to(device)


def clamp_one_hot(x: torch.Tensor, ids: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
    """Replace x at positions where cond_mask is True by the exact one-hot of ids (in place)."""
    keep = cond_mask.unsqueeze(-1)
    x.masked_fill_(keep, 0.0)
    return x.scatter_add_(-1, ids.unsqueeze(-1), keep.to(x.dtype))


def hide_given_(x: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
    """x [B, L, V] with every given position (cond_mask True) at the simplex's centre 1/V, in place.

    The centre is the point no token is nearer to than another, and the source's mean (a Dirichlet(1)
    draw's expectation), so it says nothing of the given token; for an evidence input it is q uniform,
    the posterior of an x_t that favours no token. Classifier-free guidance's unconditional input
    (training's condition dropout and the sampler's second call) is this.
    """
    return x.masked_fill_(cond_mask.unsqueeze(-1), 1.0 / x.shape[-1])


def dropped_condition(cond_mask: torch.Tensor, rate: float, generator: torch.Generator | None) -> torch.Tensor | None:
    """The given positions [B, L] of the sequences whose condition is dropped: each sequence with probability
    `rate`, drawn from `generator` (one uniform per sequence), so a seeded batch drops the same ones.
    None at rate 0, which draws nothing and so leaves the generator's later draws as they were."""
    if rate <= 0.0:
        return None
    drop = torch.rand(cond_mask.shape[0], generator=generator, device=cond_mask.device) < rate
    return cond_mask & drop.unsqueeze(-1)


def check_guidance(guidance: float) -> None:
    """A one-line error unless the guidance weight is a finite number."""
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance):
        raise KLFlowError(f"guidance must be a finite number, got {guidance!r}")


def guided_calls(guidance: float) -> int:
    """Network calls per step at this guidance weight: 1 unguided, 2 guided (conditional and unconditional)."""
    return 2 if guidance else 1


def guidance_calls(guidance: float, prompt: torch.Tensor | None) -> int:
    """guided_calls, with a one-line error for a guidance weight that is not a finite number or that has no
    given positions to guide by."""
    check_guidance(guidance)
    if guidance and prompt is None:
        raise KLFlowError("--guidance needs given positions: a prompt (pairs) or a text with holes (infill)")
    return guided_calls(guidance)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): cond + W (cond - uncond), in place on cond.

    As log-probabilities this is log p(x1 | x_t, c) + W log(p(x1 | x_t, c) / p(x1 | x_t)) up to a constant per
    position: the posterior tilted by p(c | x1, x_t)^W, which sharpens what the condition implies (W > 0)
    or softens it (-1 < W < 0); W = 0 is the conditional posterior.
    """
    return cond.add_(cond - uncond, alpha=guidance)


def ban_(logits: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """logits [..., V] with -inf at the token ids, in place, so that they get zero probability.

    In place so that a sampler's [B, L, V] logits are not copied; a caller that does not own logits
    (a model's output kept elsewhere, or one a loss back-propagates through) passes a copy.
    """
    if len(ids):
        logits.index_fill_(-1, torch.tensor(list(ids), dtype=torch.long, device=logits.device), float("-inf"))
    return logits


def batch_time(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """t ([B] or a scalar) in like's dtype and device, shaped to broadcast against like [B, ..., V]."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.dim() == 1:
        t = t.view(-1, *([1] * (like.dim() - 1)))
    return t


def exponential_noise(
    shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """E ~ Exp(1) i.i.d. in float32 [*shape], reproducible from `generator` (the default one if None).

    On CPU, E = -log1p(-U) for U ~ U[0, 1) drawn by numpy (PCG64, 24-bit floats) seeded from
    `generator`, the fastest CPU source of the ones compared in docs/performance.md. Blocks of
    NOISE_BLOCK draws have streams of their own, so torch's intra-op threads (numpy releases the
    GIL) fill them in parallel and the values do not depend on the thread count. The 24-bit U caps
    E at 16.6 (P(E > 16.6) = 6e-8).
    Other devices use torch's exponential_, one fused kernel.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, device=device).exponential_(generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    u = np.empty(shape, dtype=np.float32)
    flat = u.reshape(-1)
    blocks = range(0, flat.size, NOISE_BLOCK)

    def fill(starts: range) -> None:
        for start in starts:
            rng = np.random.default_rng([seed, start // NOISE_BLOCK])
            rng.random(dtype=np.float32, out=flat[start:start + NOISE_BLOCK])

    workers = min(torch.get_num_threads(), len(blocks))
    if workers > 1:
        list(_noise_pool(os.getpid(), workers).map(fill, (blocks[i::workers] for i in range(workers))))
    else:
        fill(blocks)
    return torch.from_numpy(u).neg_().log1p_().neg_()


@lru_cache(maxsize=4)
def _noise_pool(pid: int, workers: int) -> ThreadPoolExecutor:
    """A pool kept per process (a forked child's copy would have no threads): starting threads on
    every call cost most of what they saved."""
    return ThreadPoolExecutor(workers, thread_name_prefix="klflow-noise")


def check_draw_options(temperature: float, top_k: int, top_p: float) -> None:
    """One-line errors for draw settings outside temperature in [TEMPERATURE_RANGE], integer top_k >= 0,
    top_p in (0, 1]."""
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    low, high = TEMPERATURE_RANGE
    if not number(temperature) or not low <= temperature <= high:
        raise KLFlowError(f"temperature must be a number in [{low:g}, {high:g}], got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise KLFlowError(f"top_k must be an integer >= 0 (0: no limit), got {top_k!r}")
    if not number(top_p) or not 0.0 < top_p <= 1.0:
        raise KLFlowError(f"top_p must lie in (0, 1], got {top_p!r}")


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """float64 logits / temperature, restricted to the top_k tokens (0: all) and the top_p nucleus.

    The nucleus is the smallest set of most probable tokens whose mass reaches top_p (at least one).
    """
    logits = logits.to(torch.float64, copy=True).div_(temperature)  # one [..., V] float64 buffer, not two
    if 0 < top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # A token is outside the nucleus when the tokens before it already reach top_p.
        outside = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


def sample_categorical(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of logits [..., V], by inverting the float64 CDF.

    The CDF search is the draw that is fast on CPU at large V (torch.multinomial is much slower;
    docs/performance.md). searchsorted with right=True returns the first index whose CDF exceeds u,
    so zero-probability ids are never drawn.
    """
    cdf = torch.softmax(logits.double(), dim=-1).cumsum_(dim=-1)
    flat = cdf.reshape(-1, cdf.shape[-1])
    u = torch.rand(flat.shape[0], 1, dtype=torch.float64, device=flat.device, generator=generator) * flat[:, -1:]
    ids = torch.searchsorted(flat, u, right=True).clamp_(max=flat.shape[-1] - 1)
    return ids.view(cdf.shape[:-1])


def read_out(logits: torch.Tensor, readout: str, generator: torch.Generator | None,
             prompt: torch.Tensor | None, cond_mask: torch.Tensor | None) -> torch.Tensor:
    """The final ids: argmax or a float64 draw of the posterior, with given positions kept."""
    out = logits.argmax(dim=-1) if readout == "argmax" else sample_categorical(logits, generator)
    return out if cond_mask is None else torch.where(cond_mask, prompt, out)


def nfe(steps: int) -> int:
    """Network evaluations of a loop of `steps` model calls followed by one read-out call."""
    return steps + 1


@dataclass(frozen=True)
class Frame:
    """What an observer of a generation sees after each step: the time t the posterior was read at,
    the network calls so far, each position's top token [B, L] and its posterior probability [B, L]
    (a given or already decided position: its token, probability 1)."""

    step: int
    t: float
    nfe: int
    tokens: torch.Tensor
    probabilities: torch.Tensor


Observer = Callable[[Frame], None]


def top_tokens(logits: torch.Tensor, prompt: torch.Tensor | None = None,
               cond_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax ids [...], their probability under softmax(logits) [...]) from logits [..., V]; positions given
    by cond_mask get the prompt's token with probability 1."""
    top, ids = logits.float().max(dim=-1)
    probabilities = (top - logits.float().logsumexp(dim=-1)).exp()
    if cond_mask is None:
        return ids, probabilities
    return torch.where(cond_mask, prompt, ids), probabilities.masked_fill(cond_mask, 1.0)
