"""What the absorbing-state methods (mdlm, dfm, sedd) share: the corruption, the all-mask start,
the per-position reverse step and the reverse loop.

Each position of x [B, L] is a token id or the mask token; the forward process replaces tokens by
the mask, and the reverse process unmasks positions, never changing an unmasked one.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from klflow.errors import KLFlowError
from klflow.methods.base import Model
from klflow.sampling import (
    Frame,
    Observer,
    ban_,
    dropped_condition,
    expand_prompt,
    guided_logits,
    sample_categorical,
    sampling_mode,
    top_tokens,
)

T_MIN = 1e-3  # keeps the 1/t NELBO weight finite (MDLM's sampling_eps)


def stratified_times(batch: int, t_min: float, generator: torch.Generator | None,
                     device: torch.device) -> torch.Tensor:
    """t_b = t_min + (1 - t_min) ((u + b / B) mod 1), u ~ U[0, 1): each t_b is uniform, the batch evenly spread.

    The low-discrepancy draw of MDLM: same expectation as i.i.d. times, lower variance.
    """
    u = torch.rand((), generator=generator, device=device, dtype=torch.float64)
    spread = (u + torch.arange(batch, device=device, dtype=torch.float64) / batch) % 1.0
    return (t_min + (1.0 - t_min) * spread).float()


def corrupt(ids: torch.Tensor, mask_prob: torch.Tensor, cond_mask: torch.Tensor | None, mask_id: int,
            generator: torch.Generator | None, condition_dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, masked): each position not given by cond_mask becomes mask_id with probability mask_prob[b].

    condition_dropout: the fraction of sequences (klflow.sampling.dropped_condition, drawn after the
    corruption) whose given positions are shown as mask_id too, the absorbing state that carries no
    information, so that one network learns the conditional and the unconditional posterior of
    classifier-free guidance. Here, where every absorbing method corrupts its input, so that each gets it
    alike; `masked` still leaves them out, so they stay out of the loss as given positions are."""
    u = torch.rand(ids.shape, generator=generator, device=ids.device, dtype=torch.float64)
    masked = u < mask_prob.double()[:, None]
    if cond_mask is None:
        return ids.masked_fill(masked, mask_id), masked
    masked &= ~cond_mask
    x_t = ids.masked_fill(masked, mask_id)
    hidden = dropped_condition(cond_mask, condition_dropout, generator)
    return (x_t, masked) if hidden is None else (x_t.masked_fill_(hidden, mask_id), masked)


def generated_positions(ids: torch.Tensor, cond_mask: torch.Tensor | None) -> torch.Tensor:
    """How many positions the model must generate (not given by cond_mask), at least 1: the per-token divisor."""
    given = 0 if cond_mask is None else int(cond_mask.sum())
    return torch.tensor(max(ids.numel() - given, 1), device=ids.device)


def masked_start(num_samples: int, seq_len: int, prompt: torch.Tensor | None, cond_mask: torch.Tensor | None,
                 mask_id: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """The all-mask state [B, L] with the prompt at its positions.

    Reverse steps only change masked positions, so the prompt stays clamped at every step.
    """
    prompt, cond_mask = expand_prompt(prompt, cond_mask, num_samples, seq_len, vocab_size, device)
    x = torch.full((num_samples, seq_len), mask_id, dtype=torch.long, device=device)
    if cond_mask is None:
        return x
    if bool((prompt[cond_mask] == mask_id).any()):
        raise KLFlowError("the prompt contains the mask token, which masked methods read as 'to generate'")
    return torch.where(cond_mask, prompt, x)


def call_model(model: Model, x: torch.Tensor, t: float, banned: Sequence[int], cond_mask: torch.Tensor | None = None,
               mask_id: int = -1, guidance: float = 0.0) -> torch.Tensor:
    """Float32 logits of model(x, t) [B, L, V] with banned ids at -inf.

    guidance W != 0 (with cond_mask): a second call with the given positions shown as mask_id (as
    corrupt's condition dropout shows them in training), combined as cond + W (cond - uncond)
    (klflow.sampling.guided_logits) before the ban, so that no -inf meets another."""
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    logits = model(x, t_batch).to(torch.float32, copy=True)
    if guidance and cond_mask is not None:
        logits = guided_logits(logits, model(x.masked_fill(cond_mask, mask_id), t_batch).float(), guidance)
    return ban_(logits, banned)


def unguided_record(settings: dict[str, Any]) -> dict[str, Any]:
    """Sample settings with guidance recorded only when set, so that an unguided record stays as it was."""
    return {k: v for k, v in settings.items() if k != "guidance" or v}


def unmask_step(x: torch.Tensor, log_w: torch.Tensor, move: float, mask_id: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """One reverse step of an absorbing process, at the masked positions of x [B, L].

    With token weights w = exp(log_w) [B, L, V] (banned ids at -inf; the mask's entry is ignored), a masked
    position becomes token y with probability move * w_y and stays masked with probability
    max(0, 1 - move * sum(w)); move >= 1 unmasks every position (the final denoising step).
    For a normalised w this is "unmask with probability move, then draw y ~ w". The draw is
    one categorical in float64 (normalised, in case sum(w) > 1 / move).
    """
    masked = x == mask_id
    logits = log_w[masked].double() + math.log(move)  # a copy: only masked positions draw
    logits[:, mask_id] = float("-inf")
    if move < 1.0:
        unmask = logits.logsumexp(dim=-1).exp().clamp(max=1.0)
        logits[:, mask_id] = torch.log1p(-unmask)
    out = x.clone()
    out[masked] = sample_categorical(logits, generator)
    return out


def unmask_loop(model: Model, x: torch.Tensor, steps: int, mask_id: int,
                step: Callable[[int, torch.Tensor], tuple[torch.Tensor, bool, torch.Tensor]],
                progress: Callable[[int], None] | None, observe: Observer | None = None,
                time: Callable[[int], float] = float) -> tuple[torch.Tensor, int]:
    """The reverse loop of the absorbing-state samplers: x <- step(n, x) for n = 0..steps-1 until no
    position of x [B, L] is masked; step also says whether it called the network, and returns the token
    weights log_w [B, L, V] it drew from. Returns (x, calls).

    observe gets a Frame after every step at the model time time(n): a masked position shows the top
    token of softmax(log_w) and its probability, an unmasked one its token with probability 1."""
    calls = 0
    with sampling_mode(model):
        for n in range(steps):
            if not bool((x == mask_id).any()):
                break
            x, called, log_w = step(n, x)
            calls += called
            if observe is not None:
                observe(Frame(n, time(n), calls, *top_tokens(ban_(log_w.clone(), (mask_id,)), x, x != mask_id)))
            if progress is not None:
                progress(n)
    return x, calls


def reverse_move(steps: int, n: int) -> float:
    """(alpha_s - alpha_t) / (1 - alpha_t) for alpha = 1 - t from t = 1 - n/steps to s = t - 1/steps.

    = (t - s) / t = 1 / (steps - n), exact in rationals; 1 at the last step (s = 0).
    """
    return 1.0 / (steps - n)
