"""The KL geodesic between a Dirichlet(1) source and a beta-smoothed one-hot target.

Every position carries a point of the simplex. With a = log(1 - beta + beta/V) and
b = log(beta/V), the target of token i has logits l1 = b + (a - b) e_i, the source has
logits l0 = log E with E_j ~ Exp(1) (a Dirichlet(1) draw up to normalisation, which softmax
ignores), and the KL geodesic is the straight line l_t = (1 - t) l0 + t l1, x_t = softmax(l_t).

Pure tensor math: nothing here knows the network class.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

from klflow.errors import KLFlowError
from klflow.sampling import (
    batch_time,
    clamp_one_hot,
    dropped_condition,
    exponential_noise,
    hide_given_,
)

# model(x_t, t) -> logits [B, L, V]. A model that reads the posterior (see reads_posterior) is fed
# q(x_t, t) instead, as model(q, t, posterior=True); a self-conditioned one (see takes_self_condition) also
# gets its previous estimate, as self_condition=probs, once there is one.
Model = Callable[..., torch.Tensor]
INPUTS = ("simplex", "evidence")
SELF_CONDITION_RATE = 0.5  # the fraction of training batches with a first pass (Chen et al. 2022)


def reads_posterior(model: Model) -> bool:
    """Whether `model` takes q(x_t, t) with posterior=True instead of x_t.

    A network wrapper declares it (klflow.runtime.Network.reads_posterior); any other model, such
    as a Denoiser, does when its `input` is "evidence".
    """
    declared = getattr(model, "reads_posterior", None)
    return declared if isinstance(declared, bool) else getattr(model, "input", "simplex") == "evidence"


def takes_self_condition(model: Model) -> bool:
    """Whether `model` takes its previous estimate of p(x1 | x_t) as self_condition=probs [B, L, V].

    A network wrapper (klflow.runtime.Network) or a Denoiser declares it by self_conditioning=True;
    any other model (an exact posterior, a test's dummy) never gets the keyword.
    """
    return getattr(model, "self_conditioning", False) is True


def call_model(model: Model, x: torch.Tensor, t: torch.Tensor, evidence: bool,
               self_condition: torch.Tensor | None = None) -> torch.Tensor:
    """model(x, t) with posterior=True when x is the evidence q(x_t, t), and self_condition when there is one."""
    options: dict[str, object] = {"posterior": True} if evidence else {}
    if self_condition is not None:
        options["self_condition"] = self_condition
    return model(x, t, **options)


# The reference code trains up to t_max = 0.3 and switches samplers at 0.28 (V ~ 50k, beta 0.01).
PAPER_T_STAR_RATIO = 0.28 / 0.3
DEFAULT_CONFIDENCE = 0.98
MAX_TARGET_EXPONENT = 80.0  # e^80 ~ 5.5e34: the target factor and its row sum stay finite in float32
MAX_POSTERIOR_EXPONENT = 60.0  # see posterior_from_exponential
LOG_FLOAT32_TINY = -87.0  # e^-87 ~ 1.6e-38, just above float32's smallest normal number


def argmax_probability(vocab_size: int, beta: float, t: float) -> float:
    """P(argmax x_t = target token) at time t, in closed form.

    The target wins iff E_i e^c > max_{j != i} E_j with c = t (a - b) / (1 - t). Integrating
    over E_i gives s B(s, V) = Gamma(1 + s) Gamma(V) / Gamma(V + s) with s = e^{-c}.
    """
    if t <= 0.0:
        return 1.0 / vocab_size
    if t >= 1.0:
        return 1.0
    gap = logit_gap(vocab_size, beta)
    s = math.exp(-t * gap / (1.0 - t))
    return math.exp(math.lgamma(1.0 + s) + math.lgamma(vocab_size) - math.lgamma(vocab_size + s))


@lru_cache(maxsize=256)
def calibrate_t_max(vocab_size: int, beta: float, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """Smallest t (rounded up to 1e-4) at which the target is the argmax of x_t with prob >= confidence."""
    _validate(vocab_size, beta, None)
    if not 1.0 / vocab_size < confidence < 1.0:
        raise KLFlowError(f"confidence must lie in (1/V, 1), got {confidence}")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if argmax_probability(vocab_size, beta, mid) >= confidence:
            hi = mid
        else:
            lo = mid
    return math.ceil(hi * 1e4) / 1e4


def logit_gap(vocab_size: int, beta: float) -> float:
    """a - b = log((1 - beta + beta/V) / (beta/V)): the target logit's height above the others."""
    return math.log(vocab_size * (1.0 - beta) / beta + 1.0)


def _validate(vocab_size: int, beta: float, t_max: float | None) -> None:
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise KLFlowError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    if not 0.0 < beta < 1.0:
        raise KLFlowError(f"beta must lie in (0, 1), got {beta}")
    if t_max is not None and not 0.0 < t_max < 1.0:
        raise KLFlowError(f"t_max must lie in (0, 1), got {t_max}")


class KLPath:
    """The logit-linear (KL-geodesic) probability path and its cross-entropy loss.

    Args:
        vocab_size: V, the number of token ids (special tokens included).
        beta: smoothing of the one-hot target, x1 = (1 - beta) e_i + beta / V.
        t_max: end of the time range; None calibrates it from V and beta (see calibrate_t_max).
    """

    def __init__(self, vocab_size: int, beta: float = 0.01, t_max: float | None = None) -> None:
        _validate(vocab_size, beta, t_max)
        self.vocab_size = vocab_size
        self.beta = float(beta)
        self.t_max_calibrated = t_max is None
        self.t_max = calibrate_t_max(vocab_size, self.beta) if t_max is None else float(t_max)
        self.target_logit = math.log(1.0 - beta + beta / vocab_size)
        self.other_logit = math.log(beta / vocab_size)
        self._x_t_from_exponential = x_t_from_exponential
        self._posterior_from_exponential = posterior_from_exponential
        if self.t_max * self.logit_gap > MAX_TARGET_EXPONENT:
            raise KLFlowError(f"beta={beta} is too small for t_max={self.t_max}: e^(t (a - b)) would overflow "
                              f"float32; use beta >= {vocab_size * math.exp(-MAX_TARGET_EXPONENT / self.t_max):.1e}")

    def __repr__(self) -> str:
        how = "calibrated" if self.t_max_calibrated else "given"
        return f"KLPath(vocab_size={self.vocab_size}, beta={self.beta}, t_max={self.t_max} ({how}))"

    @property
    def logit_gap(self) -> float:
        """a - b, the height of the target logit above the others."""
        return self.target_logit - self.other_logit

    @property
    def tau_max(self) -> float:
        """tau = -ln(1 - t) at t_max."""
        return -math.log1p(-self.t_max)

    @property
    def default_t_star(self) -> float:
        """The hybrid sampler's switch time, at the paper's ratio 0.28 / 0.3 of t_max."""
        return round(PAPER_T_STAR_RATIO * self.t_max, 6)

    def switch_time(self, t_star: float | None) -> float:
        """The hybrid sampler's switch time t_star: as given (checked to lie in [0, t_max]), else default_t_star."""
        if t_star is None:
            return self.default_t_star
        if not 0.0 <= t_star <= self.t_max:
            raise KLFlowError(f"t_star must lie in [0, t_max={self.t_max}], got {t_star}")
        return float(t_star)

    def target_logits(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """l1 for token ids [...]: b everywhere, a at the token. Returns [..., V]."""
        l1 = torch.full((*ids.shape, self.vocab_size), self.other_logit, dtype=dtype, device=ids.device)
        return l1.scatter_(-1, ids.unsqueeze(-1), self.target_logit)

    def sample_source_logits(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """l0 = log E, E ~ Exp(1) i.i.d. (exponential_noise): the logits of a Dirichlet(1) draw up to
        a per-position shift. Returns float32 [*shape]."""
        e = exponential_noise(shape, generator, device)
        # E = 0 (probability ~2^-24 per entry) would give l0 = -inf and NaN in an Euler step.
        return e.clamp_min_(torch.finfo(e.dtype).tiny).log_()

    def interpolate_logits(self, l0: torch.Tensor, l1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """l_t = (1 - t) l0 + t l1, with t of shape [B] (or scalar) broadcast over [B, L, V]."""
        t = batch_time(t, l0)
        return torch.lerp(l0, l1, t)

    def noisy_logits(
        self, ids: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """l_t for clean ids [B, L] at times t [B], sampling the source; never builds l1.

        (1 - t) log E + t b + t (a - b) e_i, written in place on the source buffer.
        """
        l_t = self.sample_source_logits((*ids.shape, self.vocab_size), generator, ids.device)
        t = batch_time(t, l_t)
        l_t.mul_(1.0 - t).add_(t * self.other_logit)
        gap = (t * self.logit_gap).expand(*ids.shape, 1)
        return l_t.scatter_add_(-1, ids.unsqueeze(-1), gap.contiguous())

    def sample_x_t(
        self, ids: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x_t = softmax(l_t) in float32 for clean ids [B, L] at times t [B], in one [B, L, V] buffer.

        Draws the same noise as noisy_logits and gives the same point (see x_t_from_exponential).
        """
        e = exponential_noise((*ids.shape, self.vocab_size), generator, ids.device)
        return self._x_t_from_exponential(e, ids, batch_time(t, e), self.logit_gap)

    def sample_posterior(
        self, ids: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """q(x_t, t) = single_token_posterior of the x_t that sample_x_t draws from the same generator,
        straight from the noise (see posterior_from_exponential). Float32 [B, L, V]."""
        e = exponential_noise((*ids.shape, self.vocab_size), generator, ids.device)
        return self._posterior_from_exponential(e, ids, batch_time(t, e), self.logit_gap)

    def posterior_from_logits(self, l: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t, t) for x_t = softmax(l) [B, L, V] at times t [B] (see posterior_from_logits)."""
        return posterior_from_logits(l, t, self.vocab_size, self.logit_gap)

    def compile(self) -> KLPath:
        """Fuse the [B, L, V] passes of sample_x_t and sample_posterior with torch.compile (worth it on GPUs)."""
        self._x_t_from_exponential = torch.compile(x_t_from_exponential, dynamic=False)
        self._posterior_from_exponential = torch.compile(posterior_from_exponential, dynamic=False)
        return self

    def expected_target_logits(self, posterior: torch.Tensor) -> torch.Tensor:
        """E[l1 | x_t] = p a + (1 - p) b for a posterior p(x1 | x_t) of shape [..., V]."""
        return posterior.mul(self.logit_gap).add_(self.other_logit)

    def tau_grid(self, steps: int) -> torch.Tensor:
        """Times t_n = 1 - exp(-n h), n = 0..steps, h = tau_max / steps (uniform in tau); t_steps = t_max."""
        if steps < 1:
            raise KLFlowError(f"steps must be >= 1, got {steps}")
        return tau_times(self.t_max, steps)

    def log_evidence(self, log_x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Closed-form single-token log-likelihood log p(x_t | x1 = k) up to a constant in k, in float64.

        `log_x` may be log x_t or l_t (per-position shifts cancel). See single_token_log_evidence.
        """
        return single_token_log_evidence(log_x.double(), t, self.vocab_size, self.logit_gap)

    def position_losses(
        self,
        model: Model,
        ids: torch.Tensor,
        t: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        self_condition_rate: float = SELF_CONDITION_RATE,
        condition_dropout: float = 0.0,
    ) -> torch.Tensor:
        """Cross-entropy -log p_theta(x1_l = ids_l | x_t) [B, L] of model(x_t, t) at times t [B].

        An evidence-input model (see Model) is fed q(x_t, t) drawn from the same noise
        (sample_posterior, half the passes of x_t and then q). Positions where cond_mask is True
        are fed as exact one-hot vectors (clamped), as at sampling time.
        A self-conditioned model (takes_self_condition): with probability self_condition_rate, drawn
        once for the batch from `generator` before the noise, a first pass without gradients gives the
        estimate p = softmax(model(x_t, t)) that the second pass gets, detached (the sampler's previous
        step); otherwise the one pass gets none (the sampler's first step).
        condition_dropout: the fraction of sequences, drawn from `generator` after the noise
        (klflow.sampling.dropped_condition), whose given positions are fed as the simplex's centre 1/V
        instead of their one-hots (klflow.sampling.hide_given_), so that one network learns both
        p(x1 | x_t, condition) and p(x1 | x_t), the two calls of classifier-free guidance. It lives in the
        loss, where the given positions are clamped, so validation (rate 0) and sampling clamp as before.
        """
        evidence = reads_posterior(model)
        two_passes = (takes_self_condition(model)
                      and bool(torch.rand((), generator=generator, device=ids.device) < self_condition_rate))
        x = (self.sample_posterior if evidence else self.sample_x_t)(ids, t, generator)
        if cond_mask is not None:
            x = clamp_one_hot(x, ids, cond_mask)
            hidden = dropped_condition(cond_mask, condition_dropout, generator)
            if hidden is not None:
                x = hide_given_(x, hidden)
        estimate = None
        if two_passes:
            with torch.no_grad():
                estimate = torch.softmax(call_model(model, x, t, evidence).float(), dim=-1)
        logits = call_model(model, x, t, evidence, estimate)
        ce = F.cross_entropy(logits.float().reshape(-1, self.vocab_size), ids.reshape(-1), reduction="none")
        return ce.view(ids.shape)

    def loss(
        self,
        model: Model,
        ids: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        self_condition_rate: float = SELF_CONDITION_RATE,
        condition_dropout: float = 0.0,
    ) -> torch.Tensor:
        """Cross-entropy of model(x_t, t) against the clean ids, averaged over all B * L positions.

        t ~ U(0, t_max) per sequence unless given; `weight` [B] multiplies each sequence's terms
        (the importance weights of a non-uniform t, see klflow.flow.time_sampling). The paper trains on
        all positions, given ones included. self_condition_rate, condition_dropout: see position_losses.
        """
        if t is None:
            t = torch.rand(ids.shape[0], generator=generator, device=ids.device) * self.t_max
        ce = self.position_losses(model, ids, t, cond_mask, generator, self_condition_rate, condition_dropout)
        if weight is not None:
            ce = ce * weight.to(ce.dtype).unsqueeze(-1)
        return ce.mean()


def tau_times(t_max: float, steps: int) -> torch.Tensor:
    """Float64 times t_n = 1 - exp(-n h), n = 0..steps, h = tau_max / steps (uniform in tau); t_steps = t_max."""
    tau = torch.linspace(0.0, -math.log1p(-t_max), steps + 1, dtype=torch.float64)
    t = -torch.expm1(-tau)
    t[-1] = t_max
    return t


def single_token_log_evidence(log_x: torch.Tensor, t: torch.Tensor | float, vocab_size: int,
                               logit_gap: float) -> torch.Tensor:
    """log p(x_t | x1 = k) up to a constant in k, under the Dirichlet(1) source (PAPER.md appendix B).

    z_k = -V log1p(-y_k (1 - e^{-c})), y = softmax(log x_t / (1 - t)), c = t (a - b) / (1 - t).
    Computed in the dtype of log_x; t is [B] or a scalar.
    """
    t = batch_time(t, log_x)
    y = torch.softmax(log_x / (1.0 - t), dim=-1)
    c = t * logit_gap / (1.0 - t)
    return y.mul_(torch.expm1(-c)).log1p_().mul_(-vocab_size)


def single_token_posterior(x: torch.Tensor, t: torch.Tensor | float, vocab_size: int, logit_gap: float) -> torch.Tensor:
    """q = softmax(z) of single_token_log_evidence for points x [..., V] of the simplex, in x's dtype.

    The same formula in fewer passes over [..., V]: y proportional to (x / max x)^(1/(1-t)), then
    posterior_from_weights. x = 0 entries give y = 0.
    """
    t = batch_time(t, x)
    y = torch.div(x, x.amax(dim=-1, keepdim=True)).pow_(1.0 / (1.0 - t))
    return posterior_from_weights(y, t * logit_gap / (1.0 - t), vocab_size)


def posterior_from_logits(l: torch.Tensor, t: torch.Tensor | float, vocab_size: int, logit_gap: float) -> torch.Tensor:
    """single_token_posterior of x = softmax(l) [..., V], without forming x (l is left unchanged).

    y = softmax(l / (1 - t)) is exp((l - max l) / (1 - t)) normalised, one exp where x and then
    x^(1/(1-t)) take an exp and a pow; its entries are floored at e^-87 of the largest, as in
    posterior_from_weights, whose result they do not move in float32.
    """
    t = batch_time(t, l)
    y = torch.sub(l, l.amax(dim=-1, keepdim=True)).div_(1.0 - t).clamp_min_(LOG_FLOAT32_TINY).exp_()
    return posterior_from_weights(y, t * logit_gap / (1.0 - t), vocab_size)


def posterior_from_weights(w: torch.Tensor, c: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """q_k proportional to (1 - y_k (1 - e^{-c}))^(-V) for y = w / sum(w), w >= 0 [..., V]; in place on w.

    With S = sum(w) and m = max(w), each base times S is b_k = S - (1 - e^{-c}) w_k, smallest at
    the argmax, where it is b_min = (S - m) + e^{-c} m, so log q_k = -V log1p(u_k) + const with
    u_k = (1 - e^{-c}) (m - w_k) / b_min >= 0. Written this way nothing cancels: the direct
    1 - y_k (1 - e^{-c}) rounds to 0 in float32 when y is nearly one-hot (c > ~25, NaN before).
    log q is floored at -87 (q >= 1.6e-38 times the largest): below it q would be subnormal, which
    is slow to compute on CPUs (docs/performance.md), for entries that weigh nothing beside the argmax's 1.
    b_min is floored at 1e-30 m, where every q but the argmax's is at that floor anyway.
    """
    total = w.sum(dim=-1, keepdim=True)
    top = w.amax(dim=-1, keepdim=True)
    b_min = (total - top).add_(torch.exp(-c) * top).clamp_min_(1e-30 * top)
    log_q = w.sub_(top).mul_(torch.expm1(-c) / b_min).log1p_().mul_(-float(vocab_size))
    q = log_q.clamp_min_(LOG_FLOAT32_TINY).exp_()
    return q.div_(q.sum(dim=-1, keepdim=True))


def x_t_from_exponential(e: torch.Tensor, ids: torch.Tensor, t: torch.Tensor, logit_gap: float) -> torch.Tensor:
    """x_t from Exp(1) noise e [B, L, V] (overwritten), clean ids [B, L] and times t [B, 1, 1].

    softmax((1 - t) log E + t l1) equals E^(1 - t) with the target entry times e^{t (a - b)},
    normalised. No max-subtraction is needed, since float32 draws of E stay below ~25 and KLPath
    keeps t (a - b) < 80, so this takes four passes over [B, L, V] instead of twelve.
    """
    x = e.pow_(1.0 - t)
    index = ids.unsqueeze(-1)
    x.scatter_(-1, index, x.gather(-1, index) * torch.exp(t * logit_gap))
    return x.div_(x.sum(dim=-1, keepdim=True))


def posterior_from_exponential(e: torch.Tensor, ids: torch.Tensor, t: torch.Tensor, logit_gap: float) -> torch.Tensor:
    """q(x_t, t) from the Exp(1) noise e [B, L, V] (overwritten) of x_t, clean ids [B, L], times t [B, 1, 1].

    softmax(l_t / (1 - t)) is e with the target entry times e^c, c = t (a - b) / (1 - t), normalised,
    so single_token_posterior's x^(1/(1-t)) undoes x_t_from_exponential's pow: skip both.
    c is capped at 60: there every entry of q but the target's is already below 1e-30 of it, for any
    V >= 2 and any e_i > 0 (when e_i = 0 the target carries no weight either way), and e^c stays
    clear of overflow.
    """
    c = (t * logit_gap / (1.0 - t)).clamp_max_(MAX_POSTERIOR_EXPONENT)
    index = ids.unsqueeze(-1)
    e.scatter_(-1, index, e.gather(-1, index) * torch.exp(c))
    return posterior_from_weights(e, c, e.shape[-1])
