"""The simplex-flow baselines (linear-simplex, fisher-rao, dirichlet): paths, velocities, samplers.

The key tests mirror the KL exactness test of test_sampling.py: each path's exact posterior of a
toy distribution (Bayes with the path's likelihood log_evidence, through klflow.flow.exact.ExactPosterior)
is fed as the model, and the Euler sampler must reproduce the toy's marginals (factorised toy), its
joint (correlated toy) and the path's mixture at an intermediate time. log_evidence itself is
checked against histograms of the path, the Dirichlet c-factor against scipy and mpmath.
"""

import json
import math
from itertools import pairwise

import pytest
import torch

from conftest import TINY_OVERRIDES
from klflow.cli import main
from klflow.config import Config, load_config
from klflow.errors import KLFlowError
from klflow.flow.exact import ExactPosterior
from klflow.methods import SpecialTokens, build_method, check_sample_options
from klflow.methods.dirichlet import Dirichlet, c_factor, sample_gamma
from klflow.methods.fisher_rao import FisherRao
from klflow.methods.linear_simplex import LinearSimplex
from klflow.methods.simplex import dirichlet_source
from klflow.train import train

V, L = 4, 2
METHODS = {"linear-simplex": LinearSimplex, "fisher-rao": FisherRao, "dirichlet": Dirichlet}


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def one_hot(ids, vocab_size):
    return torch.nn.functional.one_hot(ids, vocab_size).float()


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


# -- paths ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_x_t_stays_on_the_simplex(name):
    method = METHODS[name](50)
    ids = torch.randint(0, 50, (64, 7), generator=seeded(0))
    t = method.sample_time(64, seeded(1), "cpu")
    x = method.sample_x_t(ids, t, seeded(2))
    assert x.shape == (64, 7, 50) and (x > 0).all()
    assert torch.allclose(x.sum(-1), torch.ones(64, 7), atol=1e-5)


@pytest.mark.parametrize("name", ["linear-simplex", "fisher-rao"])
def test_endpoints_are_the_source_and_the_vertex(name):
    method = METHODS[name](V)
    ids = torch.randint(0, V, (32, 5), generator=seeded(0))
    source = dirichlet_source((32, 5, V), seeded(3))
    assert torch.allclose(method.sample_x_t(ids, torch.zeros(32), seeded(3)), source, atol=1e-6)
    assert torch.allclose(method.sample_x_t(ids, torch.ones(32), seeded(3)), one_hot(ids, V), atol=1e-6)
    near = method.sample_x_t(ids, torch.full((32,), method.t_end), seeded(3))
    assert (near.gather(-1, ids.unsqueeze(-1)) > 0.99).all()


def test_linear_interpolant_is_the_straight_line():
    method = LinearSimplex(V)
    ids = torch.randint(0, V, (16, 3), generator=seeded(0))
    t = torch.rand(16, generator=seeded(1))
    x0 = dirichlet_source((16, 3, V), seeded(2))
    direct = (1 - t)[:, None, None] * x0 + t[:, None, None] * one_hot(ids, V)
    assert torch.allclose(method.sample_x_t(ids, t, seeded(2)), direct, atol=1e-6)


def test_sphere_interpolant_is_the_constant_speed_slerp():
    method = FisherRao(V)
    ids = torch.randint(0, V, (16, 3), generator=seeded(0))
    t = torch.rand(16, generator=seeded(1)).double()[:, None, None]
    q0, q1 = dirichlet_source((16, 3, V), seeded(2)).double().sqrt(), one_hot(ids, V).double()
    theta = torch.arccos((q0 * q1).sum(-1, keepdim=True))
    slerp = (torch.sin((1 - t) * theta) * q0 + torch.sin(t * theta) * q1) / torch.sin(theta)
    x_t = method.sample_x_t(ids, t.view(-1).float(), seeded(2)).double()
    assert torch.allclose(x_t, slerp.square(), atol=1e-6)
    # constant speed: the angle left to the target is (1 - t) theta
    assert torch.allclose(torch.arccos((x_t.sqrt() * q1).sum(-1, keepdim=True).clamp(max=1)), (1 - t) * theta, atol=1e-3)
    # the reference's tau-form is on the same great circle but is not this slerp
    rho, e = theta.cos(), (1 - t).square()
    tau_form = ((1 + rho) * q1 + 2 * (1 - t) * (q0 - rho * q1) + (rho - 1) * q1 * e) / (1 + rho + (1 - rho) * e)
    assert torch.allclose(tau_form.norm(dim=-1), torch.ones(16, 3, dtype=torch.float64))
    assert not torch.allclose(tau_form.square(), slerp.square(), atol=1e-2)


def test_dirichlet_path_has_the_dirichlet_moments():
    method = Dirichlet(V, alpha_max=8.0)
    ids = torch.zeros(4000, 2, dtype=torch.long)
    for t in (0.0, 0.5, 1.0):
        alpha = 8.0 * t
        x = method.sample_x_t(ids, torch.full((4000,), t), seeded(int(10 * t))).double()
        mean = (1 + alpha) / (V + alpha)  # x_k ~ Beta(1 + alpha, V - 1)
        var = mean * (1 - mean) / (V + alpha + 1)
        assert x[..., 0].mean().item() == pytest.approx(mean, abs=4 * math.sqrt(var / 8000))
        assert x[..., 0].var().item() == pytest.approx(var, rel=0.1)


def test_gamma_draws_follow_the_generator_and_the_law():
    shape = torch.tensor([1.0, 2.5, 21.0]).repeat(20000)
    draws = sample_gamma(shape, seeded(0)).view(-1, 3)
    assert torch.equal(draws.view(-1), sample_gamma(shape, seeded(0)))
    assert torch.allclose(draws.mean(0), torch.tensor([1.0, 2.5, 21.0]), rtol=0.03)
    assert torch.allclose(draws.var(0), torch.tensor([1.0, 2.5, 21.0]), rtol=0.06)


def test_dirichlet_training_alphas_are_truncated_exponential():
    method = Dirichlet(V, alpha_max=20.0, alpha_scale=5.0)
    alpha = 20.0 * method.sample_time(100000, seeded(0), "cpu")
    assert alpha.min() >= 0 and alpha.max() <= 20.0
    # mean of Exp(5) truncated at 20: 5 - 20 e^-4 / (1 - e^-4)
    assert alpha.mean().item() == pytest.approx(5 - 20 * math.exp(-4) / (1 - math.exp(-4)), rel=0.02)


# -- the Dirichlet c-factor ---------------------------------------------------------------------

def reference_c(x, alpha, k):
    """-B(a, b) d/da I_x(a, b) / (x^(a-1) (1 - x)^b) by central differences of scipy's betainc."""
    special = pytest.importorskip("scipy.special")
    import numpy as np

    a, b = alpha + 1.0, k - 1.0
    h = 1e-6 * a  # truncation error ~ (h ln x)^2 / 6, rounding ~ 1e-16 / h
    if x < a / (a + b):
        di = (special.betainc(a + h, b, x) - special.betainc(a - h, b, x)) / (2 * h)
    else:  # I_x(a, b) = 1 - I_(1-x)(b, a): differentiate the small tail, not a number near 1
        di = -(special.betainc(b, a + h, 1 - x) - special.betainc(b, a - h, 1 - x)) / (2 * h)
    log_scale = special.betaln(a, b) - (a - 1) * np.log(x) - b * np.log1p(-x)
    return -di * np.exp(log_scale)


SMALL_K_X = (1e-6, 3e-4, 0.01, 0.2, 0.6, 0.95, 0.999)
# For large K, (1 - x)^(K-1) leaves float64 beyond x ~ 0.1: the scipy reference stops there (mpmath goes on below).
LARGE_K_X = (1e-6, 3e-4, 2e-3, 0.01, 0.05, 0.1)


@pytest.mark.parametrize("k, alpha, xs", [(2, 0.0, SMALL_K_X), (3, 0.5, SMALL_K_X), (4, 20.0, SMALL_K_X),
                                          (50, 3.0, SMALL_K_X), (300, 0.0, LARGE_K_X), (4096, 5.0, LARGE_K_X),
                                          (4096, 20.0, LARGE_K_X)])
def test_c_factor_matches_finite_differences_of_the_incomplete_beta(k, alpha, xs):
    x = torch.tensor(xs, dtype=torch.float64)
    got = c_factor(x, alpha, k)
    ref = torch.tensor([reference_c(v, alpha, k) for v in xs], dtype=torch.float64)
    assert torch.allclose(got, ref, rtol=2e-6), (got, ref)
    assert torch.allclose(c_factor(x.float(), alpha, k).double(), got, rtol=2e-5)


def test_c_factor_matches_high_precision_values():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40

    def exact(x, alpha, k):
        a, b, x = mpmath.mpf(alpha) + 1, mpmath.mpf(k - 1), mpmath.mpf(x)
        if x < a / (a + b):
            di = mpmath.diff(lambda s: mpmath.betainc(s, b, 0, x, regularized=True), a)
        else:
            di = -mpmath.diff(lambda s: mpmath.betainc(b, s, 0, 1 - x, regularized=True), a)
        return float(-di * mpmath.beta(a, b) / (x ** (a - 1) * (1 - x) ** b))

    # one point in each regime: lower series, upper series, Laguerre quadrature, near x = 1
    for k, alpha, x in [(4096, 5.0, 1e-4), (4096, 20.0, 0.5), (4096, 0.0, 3e-3), (4096, 20.0, 0.02), (3, 20.0, 0.9),
                        (2, 20.0, 0.999)]:
        got = c_factor(torch.tensor([x], dtype=torch.float64), alpha, k).item()
        assert got == pytest.approx(exact(x, alpha, k), rel=1e-12)


def test_c_factor_limits():
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a, b = 6.0, 9.0
    c = (torch.special.digamma(torch.tensor(a)) - torch.special.digamma(torch.tensor(a + b))).item()
    # C(0) = 0 and C(1) = (psi(a + b) - psi(a)) / b
    assert torch.allclose(c_factor(x, a - 1, 10), torch.tensor([0.0, -c / b], dtype=torch.float64))


# -- conditional velocities ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear-simplex", "fisher-rao"])
def test_conditional_velocity_integrates_to_the_path_point(name):
    """Euler with the true x1 as a point-mass posterior lands on the closed-form path (exactly here)."""
    method = METHODS[name](V)
    ids = torch.randint(0, V, (8, 3), generator=seeded(0))
    x = dirichlet_source((8, 3, V), seeded(1))
    times = torch.linspace(0, 0.9, 41).tolist()
    for t, t_next in pairwise(times):
        x = method.euler_step(x, one_hot(ids, V), t, t_next)
    assert torch.allclose(x, method.sample_x_t(ids, torch.full((8,), 0.9), seeded(1)), atol=1e-5)


def test_dirichlet_conditional_velocity_transports_the_beta_quantile():
    """The conditional flow maps x0_k to the Beta(1 + alpha, K - 1) quantile of its Beta(1, K - 1) level,
    keeping the other coordinates' ratios."""
    special = pytest.importorskip("scipy.special")
    k, alpha_end = 6, 5.0
    method = Dirichlet(k, alpha_max=alpha_end)
    ids = torch.randint(0, k, (4, 3), generator=seeded(0))
    x0 = dirichlet_source((4, 3, k), seeded(1)).double()
    x = x0.clone()
    times = torch.linspace(0, 1, 2001).tolist()
    for t, t_next in pairwise(times):
        x = method.euler_step(x, one_hot(ids, k).double(), t, t_next)
    level = 1 - (1 - x0.gather(-1, ids.unsqueeze(-1))) ** (k - 1)
    target = torch.as_tensor(special.betaincinv(1 + alpha_end, k - 1, level.numpy()))
    assert torch.allclose(x.gather(-1, ids.unsqueeze(-1)), target, rtol=2e-3)
    ratio = x / x0
    off = ~one_hot(ids, k).bool()
    assert torch.allclose(ratio[off].view(4, 3, k - 1), ratio[off].view(4, 3, k - 1)[..., :1].expand(4, 3, k - 1), rtol=1e-9)


# -- exact posteriors ---------------------------------------------------------------------------

class NearestVertex:
    """A path's evidence, continued to the nearest vertex where an Euler step left every token's support
    (SimplexFlow.continued_log_evidence), as the likelihood of klflow.flow.exact.ExactPosterior."""

    def __init__(self, path):
        self.log_evidence, self.vocab_size = path.continued_log_evidence, path.vocab_size


MARGINALS = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
CORRELATED = torch.tensor([[30, 2, 3, 1], [5, 25, 1, 2], [1, 5, 20, 1], [2, 1, 1, 4]], dtype=torch.float64) / 104


@pytest.mark.parametrize("name", METHODS)
def test_exact_posterior_at_time_zero_is_the_prior(name):
    method = METHODS[name](V)
    model = ExactPosterior(NearestVertex(method), CORRELATED)
    x = dirichlet_source((5, L, V), seeded(0))
    assert torch.allclose(model(x, torch.zeros(5)).exp(), model.marginals().expand(5, L, V), atol=1e-9)


@pytest.mark.parametrize("name, t", [("linear-simplex", 0.3), ("fisher-rao", 0.3), ("dirichlet", 0.3)])
def test_log_evidence_is_the_density_of_the_path(name, t):
    """Given x1 = k, the path keeps the normalised off-target coordinates uniform, so the density of
    x_t is f(x_k) / (1 - x_k)^(V-2) with f the density of x_k: a histogram of x_k drawn from the path
    must match exp(log_evidence) (1 - r)^(V-2)."""
    method = METHODS[name](V)
    r = method.sample_x_t(torch.zeros(200000, 1, dtype=torch.long), torch.full((200000,), t), seeded(0))[..., 0]
    empirical = torch.histc(r.double().view(-1), bins=20, min=0, max=1) / 200000
    grid = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    point = torch.cat([grid[:, None], ((1 - grid) / (V - 1))[:, None].expand(-1, V - 1)], dim=-1)
    log_density = method.log_evidence(point.log().unsqueeze(0), torch.tensor([t]))[0, :, 0] + (V - 2) * torch.log1p(-grid)
    density = torch.softmax(log_density, 0).view(20, 1000).sum(-1)
    assert total_variation(empirical, density) < 0.012  # sampling noise alone: ~0.004


@pytest.mark.parametrize("name, t_mid, steps", [("linear-simplex", 0.3, 60), ("fisher-rao", 0.3, 60), ("dirichlet", 0.5, 200)])
def test_sampler_with_exact_posterior_transports_the_path_marginal(name, t_mid, steps):
    """The flow-matching property at an intermediate time: Euler steps of the posterior-averaged
    velocity from Dirichlet noise give x_t distributed as the path's mixture sum_k pi_k p(x_t | k).
    Compared through the means of x, x^2 and max_j x_j (z-scores; Euler bias is ~1-2 sigma here,
    a C evaluated at 0.8 alpha or a wrong likelihood exponent gives 8-30 sigma)."""
    method = METHODS[name](V)
    prior = MARGINALS[0]
    model = ExactPosterior(NearestVertex(method), prior)  # a one-position "sequence"
    n = 20000
    x = dirichlet_source((n, 1, V), seeded(0))
    times = torch.linspace(0, t_mid, steps + 1).tolist()
    for t, t_next in pairwise(times):
        x = method.euler_step(x, model(x, torch.full((n,), t)).exp().float(), t, t_next)
    ids = torch.multinomial(prior, n, replacement=True, generator=seeded(1)).view(-1, 1)
    reference = method.sample_x_t(ids, torch.full((n,), t_mid), seeded(2))
    for statistic in (lambda y: y, torch.square, lambda y: y.max(-1, keepdim=True).values):
        a, b = statistic(x).double().view(n, -1), statistic(reference).double().view(n, -1)
        z = (a.mean(0) - b.mean(0)).abs() / ((a.var(0) + b.var(0)) / n).sqrt()
        assert (z < 4.5).all(), z


@pytest.mark.parametrize("name, steps", [("linear-simplex", 50), ("fisher-rao", 50), ("dirichlet", 200)])
@pytest.mark.parametrize("joint", ["factorised", "correlated"])
def test_sampler_with_exact_posterior_reproduces_the_distribution(name, steps, joint):
    """Flow matching with the exact posterior: Dirichlet noise is carried to the toy distribution.

    Factorised: the per-position marginals; correlated: the whole joint (the velocity only needs
    each position's marginal posterior given the whole x_t). 8000 draws: sampling noise alone is
    about 0.01 TV; the Euler error at these step counts is below that (dirichlet: ~0.01).
    """
    method = METHODS[name](V)
    target = torch.outer(*MARGINALS) if joint == "factorised" else CORRELATED
    model = ExactPosterior(NearestVertex(method), target)
    ids = method.generate(model, 8000, L, steps, readout="sample", generator=seeded(0))
    for j in range(L):
        assert total_variation(torch.bincount(ids[:, j], minlength=V).double() / 8000, model.marginals()[j]) < 0.03
    if joint == "correlated":
        histogram = torch.bincount(ids[:, 0] * V + ids[:, 1], minlength=V * V).double() / 8000
        assert total_variation(histogram, target.reshape(-1)) < 0.04
        product = torch.outer(*model.marginals()).reshape(-1)
        assert total_variation(product, target.reshape(-1)) > 0.3


# -- the evidence input --------------------------------------------------------------------------

@pytest.mark.parametrize("name, t, point", [
    ("linear-simplex", 0.3, (0.5, 0.35, 0.15)), ("linear-simplex", 0.2, (0.4, 0.35, 0.25)),
    ("fisher-rao", 0.4, (0.45, 0.4, 0.15)), ("fisher-rao", 0.4, (0.5, 0.35, 0.15)),
    ("dirichlet", 0.1, (0.5, 0.35, 0.15)),
])
def test_single_token_posterior_matches_a_monte_carlo_estimate(name, t, point):
    """q(x_t, t) against p(x1 = k | x_t near the point) counted over 2M draws of the path with k uniform
    (V = 3, a cube of half-width 0.01 around the point: 500-1700 draws fall in it)."""
    method = METHODS[name](3)
    n = 2_000_000
    ids = torch.randint(0, 3, (n, 1), generator=seeded(0))
    x = method.sample_x_t(ids, torch.full((n,), t), seeded(1))[:, 0]
    near = (x - torch.tensor(point)).abs().amax(-1) < 0.01
    count = int(near.sum())
    frequency = torch.bincount(ids[near, 0], minlength=3).double() / count
    q = method.single_token_posterior(torch.tensor(point, dtype=torch.float64).view(1, 1, 3), torch.tensor([t]))[0, 0]
    tolerance = 4.5 * (q * (1 - q) / count).sqrt() + 0.01  # sampling noise, and the cube's width
    assert count > 400 and (frequency - q).abs().le(tolerance).all(), (frequency, q)


@pytest.mark.parametrize("name, t", [("linear-simplex", 0.15), ("fisher-rao", 0.15), ("fisher-rao", 0.3), ("dirichlet", 0.2)])
def test_single_token_posterior_is_calibrated_on_the_path(name, t):
    """Among draws (k uniform, x_t from the path) with q_j(x_t) in a bin, x1 = j must occur at the bin's mean
    q_j: the defining property of p(x1 | x_t), over every draw (V = 5, 200k draws, 10 bins). A likelihood
    exponent off by one (fisher-rao's 2V - 3 as 2V - 2) gives |z| ~ 6, Dirichlet's alpha 10% too large ~ 20."""
    method = METHODS[name](5)
    n = 200_000
    ids = torch.randint(0, 5, (n, 1), generator=seeded(0))
    times = torch.full((n,), t)
    q = method.single_token_posterior(method.sample_x_t(ids, times, seeded(1)).double(), times.double()).view(-1)
    hit = one_hot(ids[:, 0], 5).double().view(-1)
    bins = (q * 10).clamp(max=9.999).long()
    for b in bins.unique():
        chosen = bins == b
        gap = (hit[chosen] - q[chosen]).mean()
        sigma = ((q[chosen] * (1 - q[chosen])).mean() / chosen.sum()).sqrt()
        assert gap.abs() <= 4.5 * sigma + 1e-9, (b, gap, sigma)


@pytest.mark.parametrize("name", METHODS)
def test_single_token_posterior_is_the_softmax_of_the_continued_log_evidence(name):
    """The sparse computation (entries above the support floor only) against the dense float64 formula."""
    method = METHODS[name](50)
    ids = torch.randint(0, 50, (64, 7), generator=seeded(0))
    t = torch.rand(64, generator=seeded(1)) * method.t_end
    x = method.sample_x_t(ids, t, seeded(2))
    x[:4] = dirichlet_source((4, 7, 50), seeded(3))  # off every support at most t
    reference = torch.softmax(method.continued_log_evidence(x.double().log(), t.double()), -1)
    assert torch.allclose(method.single_token_posterior(x, t).double(), reference, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_single_token_posterior_is_continued_off_the_support_and_passes_given_one_hots(name):
    method = METHODS[name](5)
    x = torch.tensor([[[0.3, 0.25, 0.2, 0.15, 0.1], [0.0, 0.0, 1.0, 0.0, 0.0]]])
    q = method.single_token_posterior(x, torch.tensor([0.9]))
    assert torch.isfinite(q).all() and torch.allclose(q.sum(-1), torch.ones(1, 2))
    if name != "dirichlet":  # no token's support holds the first row at t = 0.9: its nearest vertex
        assert torch.equal(q[0, 0], one_hot(torch.tensor(0), 5))
    assert torch.equal(q[0, 1], x[0, 1])
    assert torch.equal(method.single_token_posterior(x, torch.tensor([0.0]))[0, 1], x[0, 1])


class EvidenceSpy(torch.nn.Module):
    """A model that reads q(x_t, t) (input "evidence"), recording what it is fed."""

    input = "evidence"

    def __init__(self, vocab_size):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(vocab_size, vocab_size, generator=seeded(5)))
        self.calls = []

    def forward(self, x, t, posterior=False):
        self.calls.append((x.clone(), t.clone(), posterior))
        return x @ self.weight


@pytest.mark.parametrize("name", METHODS)
def test_an_evidence_model_is_fed_the_single_token_posterior_in_training_and_sampling(name):
    method = METHODS[name](13)
    spy = EvidenceSpy(13)
    ids = torch.randint(0, 13, (4, 6), generator=seeded(0))
    method.loss(spy, ids, generator=seeded(1)).backward()
    generator = seeded(1)
    t = method.sample_time(4, generator, "cpu")
    x_t = method.sample_x_t(ids, t, generator)
    q, t_fed, posterior = spy.calls[0]
    assert posterior and torch.equal(t_fed, t) and torch.equal(q, method.single_token_posterior(x_t, t))
    spy.calls.clear()
    prompt, cond = torch.tensor([[4, 9, 0]]), torch.tensor([[True, False, False]])
    method.generate(spy, 2, 3, 2, prompt=prompt, cond_mask=cond, generator=seeded(2))
    assert len(spy.calls) == 3 and all(posterior for _, _, posterior in spy.calls)
    for q, _, _ in spy.calls:
        assert torch.equal(q[:, 0], one_hot(torch.tensor([4, 4]), 13)) and torch.allclose(q.sum(-1), torch.ones(2, 3))


# -- sampler mechanics --------------------------------------------------------------------------

class CountingModel(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(vocab_size, vocab_size, generator=seeded(5)))
        self.inputs, self.times, self.modes = [], [], []

    def forward(self, x, t):
        self.inputs.append(x.clone())
        self.times.append(t.clone())
        self.modes.append(self.training)
        return x @ self.weight + t[:, None, None]


@pytest.mark.parametrize("name", METHODS)
def test_sampler_counts_nfe_clamps_prompts_and_bans_special_ids(name):
    method = METHODS[name](13, banned_ids=(0, 1))
    model = CountingModel(13)
    prompt = torch.tensor([[4, 9, 0, 0, 12]])
    cond = torch.tensor([[True, True, False, False, True]])
    ids = method.generate(model, 3, 5, 4, prompt=prompt, cond_mask=cond, readout="sample", generator=seeded(0))
    assert ids.shape == (3, 5) and ids.dtype == torch.long
    assert len(model.times) == method.nfe(4, 5) == 5
    assert torch.allclose(torch.stack([t[0] for t in model.times]).double(), torch.tensor(method.time_grid(4), dtype=torch.float64), atol=1e-7)
    assert (ids[:, [0, 1, 4]] == torch.tensor([4, 9, 12])).all() and (ids[:, [2, 3]] > 1).all()
    expected = one_hot(torch.tensor([4, 9, 12]), 13).expand(3, 3, 13)
    for x in model.inputs:
        assert torch.equal(x[:, [0, 1, 4]], expected)
        assert torch.allclose(x.sum(-1), torch.ones(3, 5), atol=1e-5) and (x >= 0).all()
    assert model.modes == [False] * 5 and model.training
    prefix = method.generate(model, 2, 5, 2, prompt=torch.tensor([7, 8]))
    assert (prefix[:, :2] == torch.tensor([7, 8])).all()


@pytest.mark.parametrize("name", METHODS)
def test_same_generator_same_samples(name):
    method = METHODS[name](13)
    run = lambda seed: method.generate(CountingModel(13), 4, 6, 3, readout="sample", generator=seeded(seed))
    assert torch.equal(run(9), run(9)) and not torch.equal(run(9), run(10))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps"),
    ({"readout": "mode"}, "readout"),
    ({"prompt": torch.zeros(1, 9, dtype=torch.long)}, "prompt"),
    ({"prompt": torch.full((1, 2), 99)}, "prompt ids"),
])
def test_bad_sampler_arguments_are_clear_errors(name, kwargs, message):
    with pytest.raises(KLFlowError, match=message):
        METHODS[name](13).generate(CountingModel(13), 2, 5, **({"steps": 2} | kwargs))


@pytest.mark.parametrize("make, message", [
    (lambda: LinearSimplex(13, t_max=1.0), "t_max"),
    (lambda: FisherRao(13, t_max=0.0), "t_max"),
    (lambda: Dirichlet(13, alpha_max=0.0), "alpha_max"),
    (lambda: LinearSimplex(1), "vocab_size"),
])
def test_bad_hyperparameters_are_clear_errors(make, message):
    with pytest.raises(KLFlowError, match=message):
        make()


@pytest.mark.parametrize("name", METHODS)
def test_registry_settings_and_description(name):
    method = build_method(name, Config(), 300, SpecialTokens(eot=0, pad=1, mask=2))
    assert method.name == name and method.banned_ids == (1, 2) and not method.causal
    assert method.sample_settings() == {"readout": "argmax"}
    assert method.sample_settings(readout="sample") == {"readout": "sample"}
    assert method.describe()["method"] == name
    with pytest.raises(KLFlowError, match="does not take"):
        check_sample_options(method, {"t_star": 0.2})


# -- end to end ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, denoiser_input", [(name, "simplex") for name in METHODS] + [("fisher-rao", "evidence")])
def test_training_and_cli_sampling_end_to_end(name, denoiser_input, tiny_corpus, tmp_path, capsys):
    config = load_config("quickstart", [f"data.source={json.dumps(str(tiny_corpus))}", *TINY_OVERRIDES,
                                        "train.max_steps=6", f"method.name={name}", f"model.input={denoiser_input}"])
    result = train(config, tmp_path / "run", progress=False, log=lambda _: None)
    assert result.steps == 6 and math.isfinite(result.val_loss)
    output = tmp_path / "s.jsonl"
    code = main(["sample", str(tmp_path / "run"), "--steps", "3", "-n", "2", "--readout", "sample",
                 "--prompt", "The cat", "--output", str(output)])
    out, _ = capsys.readouterr()
    assert code == 0 and f"({name}, NFE 4)" in out
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 2 and all(r["method"] == name and r["nfe"] == 4 and r["readout"] == "sample" for r in rows)
    assert all(len(r["ids"]) == 16 and r["text"].startswith("The cat") for r in rows)
    code = main(["sample", str(tmp_path / "run"), "--steps", "2", "--option", "temperature=0.5"])
    assert code == 2 and "does not take" in capsys.readouterr().err
