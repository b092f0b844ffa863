"""Samplers for the KL path: the ODE, the randomized denoise-and-renoise scheme, and their hybrid.

Time runs on the tau grid (tau = -ln(1 - t) uniform, h = tau_max / steps). One model call per
step (`steps` = NFE of the loop) plus one final read-out call at t_max: NFE = steps + 1.

- ODE step of dl/dtau = v - l, v = E[l1 | x_t] held for the step: Euler l <- l + h (v - l), or
  the exponential integrator l <- e^{-h} l + (1 - e^{-h}) v, exact when v is constant (the ODE
  is linear in l), so its only error is v's change within the step.
- Randomized step: pick x1 from p(x1 | x_t) (argmax, or a float64 draw at a temperature from
  the whole posterior, its top k or its top-p nucleus), draw a fresh Dirichlet source and jump
  to the path point at the next time: l <- (1 - t') log E + t' l1(x1).
- Hybrid: ODE steps while t < t_star, randomized steps after; or, with switch_entropy, each
  sequence switches for good once the mean entropy of its posterior falls to the threshold
  (calibrated at t_star by klflow.switching).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from klflow.errors import KLFlowError
from klflow.path import KLPath, Model, clamp_one_hot, reads_posterior

SAMPLERS = ("ode", "randomized", "hybrid")
READOUTS = ("argmax", "sample")
INTEGRATORS = ("euler", "exponential")
# The defaults (randomized steps, x1 drawn at temperature 0.8) won the cpu-ablation preset: the lowest
# gen-PPL within 0.2 nats of the data's entropy at NFE 16 and 64, with MAUVE 0.66 / 0.57 against the
# paper's hybrid at 0.03 (BENCHMARKS.md, cpu-ablation). The hybrid keeps argmax: with draws its few
# randomized steps after t* left the entropy 0.15 nats above the data's at 2.3-2.4x the argmax
# hybrid's gen-PPL (evidence input, NFE 16 and 64; BENCHMARKS.md).
DEFAULT_TEMPERATURE = 0.8
# Outside it the float64 draws degenerate: logits / 1e-320 overflow to inf (NaN probabilities),
# and at 1e3 every draw is uniform noise over the vocabulary.
TEMPERATURE_RANGE = (1e-3, 1e3)


def default_select(sampler: str) -> str:
    """The x1 choice a sampler uses unless told: draws for the randomized sampler, argmax otherwise."""
    return "sample" if sampler == "randomized" else "argmax"


def default_temperature(select: str) -> float:
    """The temperature of a selection unless told: DEFAULT_TEMPERATURE for draws; argmax draws nothing."""
    return 1.0 if select == "argmax" else DEFAULT_TEMPERATURE


@dataclass(frozen=True)
class Selection:
    """How x1 is picked from the posterior: argmax, or a float64 draw from softmax(logits / temperature)
    restricted to its top k (select "top_k:K", or "sample" with top_k K; k = 0: no limit) and its top_p nucleus."""

    kind: str
    k: int = 0
    temperature: float = 1.0
    top_p: float = 1.0

    @classmethod
    def parse(cls, text: str, temperature: float | None = None, top_p: float = 1.0, top_k: int = 0) -> "Selection":
        """temperature None: default_temperature(text); top_k K > 0 turns "sample" into "top_k:K"."""
        if temperature is None:
            temperature = default_temperature(text)
        check_draw_options(temperature, top_k, top_p)
        if text == "argmax":
            if temperature != 1.0 or top_p != 1.0 or top_k:
                raise KLFlowError("temperature, top_p and top_k shape the draws of select='sample' or 'top_k:K'; "
                                  "select='argmax' draws nothing")
            return cls(text)
        if text == "sample":
            return cls("top_k" if top_k else text, top_k, float(temperature), float(top_p))
        if text.startswith("top_k:"):
            value = text.split(":", 1)[1]
            if value.isdigit() and int(value) >= 1:
                if top_k and top_k != int(value):
                    raise KLFlowError(f"select={text!r} and top_k={top_k} disagree; give one of them")
                return cls("top_k", int(value), float(temperature), float(top_p))
        raise KLFlowError(f"select must be 'argmax', 'sample' or 'top_k:K' with K >= 1, got {text!r}")

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Token ids [...] from logits [..., V]."""
        if self.kind == "argmax":
            return logits.argmax(dim=-1)
        return sample_categorical(filter_logits(logits, self.temperature, self.k, self.top_p), generator)


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

    float32 draws over large V silently lower the effective temperature (Zheng et al. 2024).
    The CDF search is ~20x faster than torch.multinomial on CPU at V = 4096. searchsorted with
    right=True returns the first index whose CDF exceeds u, so zero-probability ids are never drawn.
    """
    cdf = torch.softmax(logits.double(), dim=-1).cumsum_(dim=-1)
    flat = cdf.reshape(-1, cdf.shape[-1])
    u = torch.rand(flat.shape[0], 1, dtype=torch.float64, device=flat.device, generator=generator) * flat[:, -1:]
    ids = torch.searchsorted(flat, u, right=True).clamp_(max=flat.shape[-1] - 1)
    return ids.view(cdf.shape[:-1])


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


def nfe(steps: int) -> int:
    """Network evaluations of one generate() call: the loop's steps plus the read-out at t_max."""
    return steps + 1


@torch.inference_mode()
def generate(
    model: Model,
    path: KLPath,
    num_samples: int,
    seq_len: int,
    sampler: str = "randomized",
    steps: int = 256,
    t_star: float | None = None,
    select: str | None = None,
    readout: str = "argmax",
    prompt: torch.Tensor | None = None,
    cond_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    banned_ids: Sequence[int] = (),
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
    temperature: float | None = None,
    top_p: float = 1.0,
    integrator: str = "euler",
    switch_entropy: float | None = None,
    top_k: int = 0,
    observe: Observer | None = None,
) -> torch.Tensor:
    """Generate token ids [num_samples, seq_len] with the KL-flow samplers.

    Args:
        model: callable model(x_t [B, L, V], t [B]) -> logits of p(x1 | x_t) [B, L, V].
        path: the KLPath the model was trained on.
        sampler: "ode", "randomized" or "hybrid".
        steps: loop steps (= NFE of the loop; the read-out adds one call).
        t_star: hybrid switch time in [0, t_max]; None uses path.default_t_star.
        select: x1 choice in randomized steps: "argmax", "sample" or "top_k:K"; None: default_select.
        readout: final choice at t_max: "argmax" or "sample".
        prompt: ids [B or 1, L] with cond_mask [B or 1, L], or a prefix [B or 1, P] (cond_mask None).
            Given positions are fed as exact one-hots at every step and returned unchanged.
        generator: torch.Generator; the same seed gives the same output.
        banned_ids: ids never produced (e.g. padding); they get zero posterior mass.
        progress: called with the step index after every loop step.
        temperature, top_p, top_k: shape the draws of select "sample" / "top_k:K" (1, 1, 0: the posterior;
            temperature None: DEFAULT_TEMPERATURE, 0.8); top_k K with "sample" is "top_k:K".
        integrator: ODE steps by "euler" or "exponential" (exact for a v constant over the step).
        switch_entropy: hybrid only, instead of t_star: a sequence switches to randomized steps
            once the mean entropy (nats) of its posterior over its free positions is <= this.
        observe: called with a Frame of the posterior at every step and at the read-out (step = steps,
            the ids returned); None costs nothing.
    """
    t_star, selection = _check_arguments(path, num_samples, seq_len, sampler, steps, t_star, select, readout,
                                         temperature, top_p, integrator, switch_entropy, top_k)
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
        switched = torch.zeros(num_samples, dtype=torch.bool, device=device)
        for n in range(steps):
            logits = posterior_logits(model, path, l, times[n], prompt, cond_mask, banned_ids)
            if switch_entropy is not None:
                switched |= mean_posterior_entropy(logits, cond_mask) <= switch_entropy
            else:
                switched.fill_(sampler == "randomized" or (sampler == "hybrid" and times[n] >= t_star))
            if observe is not None:
                observe(Frame(n, times[n], n + 1, *top_tokens(logits, prompt, cond_mask)))
            l = _step(path, l, logits, switched, h, integrator, times[n + 1], selection, generator)
            if progress is not None:
                progress(n)
        logits = posterior_logits(model, path, l, path.t_max, prompt, cond_mask, banned_ids)
        out = read_out(logits, readout, generator, prompt, cond_mask)
        if observe is not None:
            chosen = logits.log_softmax(dim=-1).gather(-1, out.unsqueeze(-1)).squeeze(-1).exp()
            observe(Frame(steps, path.t_max, steps + 1, out,
                          chosen if cond_mask is None else chosen.masked_fill(cond_mask, 1.0)))
    finally:
        if was_training:
            model.train()
    return out


def ode_step(l: torch.Tensor, v: torch.Tensor, h: float, integrator: str) -> torch.Tensor:
    """Advance dl/dtau = v - l by h with v held fixed, in place (v is overwritten).

    Euler: l + h (v - l). Exponential: l + (1 - e^{-h}) (v - l) = e^{-h} l + (1 - e^{-h}) v, the
    exact solution for a constant v; the two agree to first order in h.
    """
    return l.add_(v.sub_(l), alpha=h if integrator == "euler" else -math.expm1(-h))


def _step(path: KLPath, l: torch.Tensor, logits: torch.Tensor, randomized: torch.Tensor, h: float, integrator: str,
          t_next: float, selection: Selection, generator: torch.Generator | None) -> torch.Tensor:
    """One step of every sequence: randomized where `randomized` [B] is True, an ODE step elsewhere.

    Returns the new logits: l itself, stepped in place, unless every row was re-noised."""
    ode = ~randomized
    if ode.any():
        rows = _rows(ode)
        v = path.expected_target_logits(torch.softmax(logits[rows], dim=-1))
        stepped = ode_step(l[rows], v, h, integrator)
        if not isinstance(rows, slice):  # a slice is a view of all of l, already stepped
            l[rows] = stepped
    if randomized.any():
        rows = _rows(randomized)
        x1 = selection(logits[rows], generator)
        renoised = path.noisy_logits(x1, torch.full((x1.shape[0],), t_next, device=l.device), generator)
        if isinstance(rows, slice):
            return renoised
        l[rows] = renoised
    return l


def _rows(mask: torch.Tensor) -> torch.Tensor | slice:
    """Index of the rows where mask [B] is True: a slice (views, no copies) when it is True everywhere."""
    return slice(None) if bool(mask.all()) else mask


def mean_posterior_entropy(logits: torch.Tensor, cond_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over free positions (cond_mask False) of H(softmax(logits)) in nats: logits [B, L, V] -> [B]."""
    entropy = torch.special.entr(torch.softmax(logits.double(), dim=-1)).sum(dim=-1)
    if cond_mask is None:
        return entropy.mean(dim=-1)
    free = (~cond_mask).double()
    return (entropy * free).sum(dim=-1) / free.sum(dim=-1).clamp_min(1.0)


def read_out(logits: torch.Tensor, readout: str, generator: torch.Generator | None,
             prompt: torch.Tensor | None, cond_mask: torch.Tensor | None) -> torch.Tensor:
    """The final ids: argmax or a float64 draw of the posterior, with given positions kept."""
    out = logits.argmax(dim=-1) if readout == "argmax" else sample_categorical(logits, generator)
    return out if cond_mask is None else torch.where(cond_mask, prompt, out)


def posterior_logits(
    model: Model,
    path: KLPath,
    l: torch.Tensor,
    t: float,
    prompt: torch.Tensor | None,
    cond_mask: torch.Tensor | None,
    banned_ids: Sequence[int],
) -> torch.Tensor:
    """float32 logits of p_theta(x1 | x_t = softmax(l)) at time t, given positions clamped, banned ids at -inf.

    An evidence-input model (klflow.path.Model) is fed q(x_t, t) computed from l directly."""
    t_batch = torch.full((l.shape[0],), t, device=l.device, dtype=torch.float32)
    evidence = reads_posterior(model)
    x = path.posterior_from_logits(l, t_batch) if evidence else torch.softmax(l, dim=-1)
    if cond_mask is not None:
        x = clamp_one_hot(x, prompt, cond_mask)
    logits = (model(x, t_batch, posterior=True) if evidence else model(x, t_batch)).float()
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
    select: str | None,
    readout: str,
    temperature: float | None,
    top_p: float,
    integrator: str,
    switch_entropy: float | None,
    top_k: int,
) -> tuple[float, Selection]:
    if sampler not in SAMPLERS:
        raise KLFlowError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if readout not in READOUTS:
        raise KLFlowError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
    if integrator not in INTEGRATORS:
        raise KLFlowError(f"integrator must be one of {', '.join(INTEGRATORS)}, got {integrator!r}")
    if not isinstance(steps, int) or steps < 1:
        raise KLFlowError(f"steps must be a positive integer, got {steps!r}")
    if num_samples < 1 or seq_len < 1:
        raise KLFlowError(f"num_samples and seq_len must be >= 1, got {num_samples} and {seq_len}")
    if switch_entropy is not None:
        if sampler != "hybrid" or t_star is not None:
            raise KLFlowError("switch_entropy is the hybrid sampler's switch rule instead of t_star: "
                              f"use it with sampler='hybrid' and no t_star (got sampler={sampler!r}, t_star={t_star})")
        if (not isinstance(switch_entropy, (int, float)) or isinstance(switch_entropy, bool)
                or not 0 <= switch_entropy < math.inf):
            raise KLFlowError(f"switch_entropy must be a finite number of nats >= 0, got {switch_entropy!r}")
    t_star = path.default_t_star if t_star is None else float(t_star)
    if not 0.0 <= t_star <= path.t_max:
        raise KLFlowError(f"t_star must lie in [0, t_max={path.t_max}], got {t_star}")
    return t_star, Selection.parse(default_select(sampler) if select is None else select, temperature, top_p, top_k)


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
