"""Samplers for the KL path: the ODE, the randomized denoise-and-renoise scheme, and their hybrid.

Time runs on the tau grid (tau = -ln(1 - t) uniform, h = tau_max / steps). One model call per
step (`steps` = NFE of the loop) plus one final read-out call at t_max: NFE = steps + 1.

- ODE step (Euler in tau of dl/dtau = E[l1 | x_t] - l):  l <- l + h (E[l1 | x_t] - l).
- Randomized step: pick x1 from p(x1 | x_t) (argmax, a full draw, or a top-k draw), draw a fresh
  Dirichlet source and jump to the path point at the next time: l <- (1 - t') log E + t' l1(x1).
- Hybrid: ODE steps while t < t_star, randomized steps after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from klflow.errors import KLFlowError
from klflow.path import KLPath, Model, clamp_one_hot

SAMPLERS = ("ode", "randomized", "hybrid")
READOUTS = ("argmax", "sample")


@dataclass(frozen=True)
class Selection:
    """How x1 is picked from the posterior: argmax, a draw from it, or a draw from its top k."""

    kind: str
    k: int = 0

    @classmethod
    def parse(cls, text: str) -> "Selection":
        if text in ("argmax", "sample"):
            return cls(text)
        if text.startswith("top_k:"):
            value = text.split(":", 1)[1]
            if value.isdigit() and int(value) >= 1:
                return cls("top_k", int(value))
        raise KLFlowError(f"select must be 'argmax', 'sample' or 'top_k:K' with K >= 1, got {text!r}")

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Token ids [...] from logits [..., V]."""
        if self.kind == "argmax":
            return logits.argmax(dim=-1)
        if self.kind == "top_k":
            top = logits.topk(min(self.k, logits.shape[-1]), dim=-1)
            return top.indices.gather(-1, sample_categorical(top.values, generator).unsqueeze(-1)).squeeze(-1)
        return sample_categorical(logits, generator)


def sample_categorical(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of logits [..., V], by inverting the float64 CDF.

    float32 draws over large V silently lower the effective temperature (Zheng et al. 2024).
    The CDF search is ~20x faster than torch.multinomial on CPU at V = 4096. searchsorted with
    right=True returns the first index whose CDF exceeds u, so zero-probability ids are never drawn.
    """
    cdf = torch.softmax(logits.double(), dim=-1).cumsum_(dim=-1)
    flat = cdf.reshape(-1, cdf.shape[-1])
    u = torch.rand(flat.shape[0], 1, dtype=torch.float64, device=flat.device, generator=generator) * flat[:, -1:]
    ids = torch.searchsorted(flat, u, right=True).clamp_(max=flat.shape[-1] - 1)
    return ids.view(cdf.shape[:-1])


def nfe(steps: int) -> int:
    """Network evaluations of one generate() call: the loop's steps plus the read-out at t_max."""
    return steps + 1


@torch.inference_mode()
def generate(
    model: Model,
    path: KLPath,
    num_samples: int,
    seq_len: int,
    sampler: str = "hybrid",
    steps: int = 256,
    t_star: float | None = None,
    select: str = "argmax",
    readout: str = "argmax",
    prompt: torch.Tensor | None = None,
    cond_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    banned_ids: Sequence[int] = (),
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Generate token ids [num_samples, seq_len] with the KL-flow samplers.

    Args:
        model: callable model(x_t [B, L, V], t [B]) -> logits of p(x1 | x_t) [B, L, V].
        path: the KLPath the model was trained on.
        sampler: "ode", "randomized" or "hybrid".
        steps: loop steps (= NFE of the loop; the read-out adds one call).
        t_star: hybrid switch time in [0, t_max]; None uses path.default_t_star.
        select: x1 choice in randomized steps: "argmax", "sample" or "top_k:K".
        readout: final choice at t_max: "argmax" or "sample".
        prompt: ids [B or 1, L] with cond_mask [B or 1, L], or a prefix [B or 1, P] (cond_mask None).
            Given positions are fed as exact one-hots at every step and returned unchanged.
        generator: torch.Generator; the same seed gives the same output.
        banned_ids: ids never produced (e.g. padding); they get zero posterior mass.
        progress: called with the step index after every loop step.
    """
    sampler, t_star, selection = _check_arguments(path, num_samples, seq_len, sampler, steps, t_star, select, readout)
    device = torch.device(device) if device is not None else _model_device(model)
    prompt, cond_mask = _expand_prompt(prompt, cond_mask, num_samples, seq_len, path.vocab_size, device)

    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        times = path.tau_grid(steps).tolist()
        h = path.tau_max / steps
        shape = (num_samples, seq_len, path.vocab_size)
        l = path.sample_source_logits(shape, generator, device)
        for n in range(steps):
            logits = _posterior_logits(model, l, times[n], prompt, cond_mask, banned_ids)
            ode_step = sampler == "ode" or (sampler == "hybrid" and times[n] < t_star)
            if ode_step:
                v = path.expected_target_logits(torch.softmax(logits, dim=-1))
                l.add_(v.sub_(l), alpha=h)
            else:
                x1 = selection(logits, generator)
                t_next = torch.full((num_samples,), times[n + 1], device=device)
                l = path.noisy_logits(x1, t_next, generator)
            if progress is not None:
                progress(n)
        logits = _posterior_logits(model, l, path.t_max, prompt, cond_mask, banned_ids)
        out = read_out(logits, readout, generator, prompt, cond_mask)
    finally:
        if was_training:
            model.train()
    return out


def read_out(logits: torch.Tensor, readout: str, generator: torch.Generator | None,
             prompt: torch.Tensor | None, cond_mask: torch.Tensor | None) -> torch.Tensor:
    """The final ids: argmax or a float64 draw of the posterior, with given positions kept."""
    out = logits.argmax(dim=-1) if readout == "argmax" else sample_categorical(logits, generator)
    return out if cond_mask is None else torch.where(cond_mask, prompt, out)


def _posterior_logits(
    model: Model,
    l: torch.Tensor,
    t: float,
    prompt: torch.Tensor | None,
    cond_mask: torch.Tensor | None,
    banned_ids: Sequence[int],
) -> torch.Tensor:
    x = torch.softmax(l, dim=-1)
    if cond_mask is not None:
        x = clamp_one_hot(x, prompt, cond_mask)
    t_batch = torch.full((l.shape[0],), t, device=l.device, dtype=torch.float32)
    logits = model(x, t_batch).float()
    if banned_ids:
        logits[..., list(banned_ids)] = float("-inf")
    return logits


def _check_arguments(
    path: KLPath,
    num_samples: int,
    seq_len: int,
    sampler: str,
    steps: int,
    t_star: float | None,
    select: str,
    readout: str,
) -> tuple[str, float, Selection]:
    if sampler not in SAMPLERS:
        raise KLFlowError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if readout not in READOUTS:
        raise KLFlowError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
    if not isinstance(steps, int) or steps < 1:
        raise KLFlowError(f"steps must be a positive integer, got {steps!r}")
    if num_samples < 1 or seq_len < 1:
        raise KLFlowError(f"num_samples and seq_len must be >= 1, got {num_samples} and {seq_len}")
    t_star = path.default_t_star if t_star is None else float(t_star)
    if not 0.0 <= t_star <= path.t_max:
        raise KLFlowError(f"t_star must lie in [0, t_max={path.t_max}], got {t_star}")
    return sampler, t_star, Selection.parse(select)


def _expand_prompt(
    prompt: torch.Tensor | None,
    cond_mask: torch.Tensor | None,
    num_samples: int,
    seq_len: int,
    vocab_size: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Bring a prompt to ids [B, L] and cond_mask [B, L] on the device, or (None, None)."""
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


def _model_device(model: Model) -> torch.device:
    parameters = getattr(model, "parameters", None)
    if parameters is not None:
        for p in parameters():
            return p.device
    return torch.device("cpu")
