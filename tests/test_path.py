import math

import pytest
import torch

from klflow.errors import KLFlowError
from klflow.flow.path import (
    KLPath,
    argmax_probability,
    calibrate_t_max,
    posterior_from_exponential,
    single_token_log_evidence,
    single_token_posterior,
    x_t_from_exponential,
)
from klflow.sampling import NOISE_BLOCK, clamp_one_hot, exponential_noise


@pytest.fixture
def path():
    return KLPath(vocab_size=11, beta=0.01, t_max=0.4)


def test_target_logits_are_log_of_smoothed_one_hot(path):
    ids = torch.tensor([[3, 0]])
    l1 = path.target_logits(ids)
    expected = torch.full((11,), 0.01 / 11)
    expected[3] += 0.99
    assert torch.allclose(l1[0, 0], expected.log(), atol=1e-6)
    assert torch.allclose(l1.exp().sum(-1), torch.ones(1, 2), atol=1e-6)


def test_x_t_lies_on_the_simplex(path):
    ids = torch.randint(0, 11, (4, 5))
    x = path.sample_x_t(ids, torch.rand(4) * path.t_max)
    assert x.dtype == torch.float32
    assert (x >= 0).all()
    assert torch.allclose(x.sum(-1), torch.ones(4, 5), atol=1e-5)


def test_t_zero_gives_the_source_and_l_t_is_linear_in_t(path):
    ids = torch.randint(0, 11, (2, 3))
    g = torch.Generator().manual_seed(0)
    l0 = path.sample_source_logits((2, 3, 11), torch.Generator().manual_seed(0))
    l1 = path.target_logits(ids)
    assert torch.allclose(path.noisy_logits(ids, torch.zeros(2), g), l0)
    # dirichlet(1) source: log E normalised is the log of a simplex point
    assert torch.allclose(torch.softmax(l0, -1).sum(-1), torch.ones(2, 3), atol=1e-6)
    ts = [0.0, 0.1, 0.25, 0.4]
    lines = [path.interpolate_logits(l0, l1, torch.full((2,), t)) for t in ts]
    for t, l_t in zip(ts, lines):
        assert torch.allclose(l_t, l0 + t * (l1 - l0), atol=1e-5)
    slope = (lines[-1] - lines[0]) / 0.4
    assert torch.allclose(slope, l1 - l0, atol=1e-4)
    # the in-place sampler is the same line
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    t = torch.tensor([0.1, 0.3])
    src = path.sample_source_logits((2, 3, 11), g1)
    assert torch.allclose(path.noisy_logits(ids, t, g2), path.interpolate_logits(src, l1, t), atol=1e-5)


def test_exponential_noise_is_exp1_and_reproducible_from_the_generator():
    g = torch.Generator().manual_seed(7)
    e = exponential_noise((400, 1000), g)
    assert e.dtype == torch.float32 and e.shape == (400, 1000)
    e = e.double()
    # Exp(1): mean 1, variance 1, P(E > 3) = e^-3; 4e5 draws put each within ~5 standard errors
    assert abs(e.mean().item() - 1.0) < 0.01
    assert abs(e.var().item() - 1.0) < 0.02
    assert abs((e > 3).double().mean().item() - math.exp(-3)) < 0.002
    assert e.min() >= 0
    again = exponential_noise((400, 1000), torch.Generator().manual_seed(7)).double()
    assert torch.equal(e, again)
    assert not torch.equal(exponential_noise((400, 1000), g).double(), e)  # the generator advanced


def test_exponential_noise_blocks_are_distinct_streams_whatever_the_thread_count():
    threads = torch.get_num_threads()
    try:
        draws = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            draws[n] = exponential_noise((3, NOISE_BLOCK + 5), torch.Generator().manual_seed(8))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(draws[1], draws[2]) and torch.equal(draws[1], draws[3])
    flat = draws[1].reshape(-1)
    blocks = [flat[i * NOISE_BLOCK:(i + 1) * NOISE_BLOCK][:1000] for i in range(3)]
    assert not torch.equal(blocks[0], blocks[1]) and not torch.equal(blocks[1], blocks[2])
    assert abs(flat.double().mean().item() - 1.0) < 0.005


@pytest.mark.parametrize("compiled", [False, True])
def test_x_t_is_the_softmax_of_the_line_from_the_same_draws(compiled):
    path = KLPath(vocab_size=4096, beta=0.01)
    if compiled:
        path.compile()
    ids = torch.randint(0, 4096, (3, 7))
    t = torch.tensor([0.0, 0.15, path.t_max])
    x = path.sample_x_t(ids, t, torch.Generator().manual_seed(3))
    reference = torch.softmax(path.noisy_logits(ids, t, torch.Generator().manual_seed(3)).double(), -1)
    assert torch.allclose(x.double(), reference, rtol=1e-5, atol=1e-9)


def test_a_beta_whose_target_factor_overflows_float32_is_refused():
    with pytest.raises(KLFlowError, match="too small"):
        KLPath(vocab_size=4096, beta=1e-40, t_max=0.9)


def test_expected_target_logits_is_posterior_weighted_average(path):
    p = torch.softmax(torch.randn(3, 11, dtype=torch.float64), -1)
    all_targets = path.target_logits(torch.arange(11), dtype=torch.float64)  # [V(token), V]
    assert torch.allclose(path.expected_target_logits(p), p @ all_targets)
    one_hot = torch.eye(11, dtype=torch.float64)[4]
    assert torch.allclose(path.expected_target_logits(one_hot), all_targets[4])


def test_tau_grid_is_uniform_in_tau_and_ends_at_t_max(path):
    t = path.tau_grid(8)
    assert t.shape == (9,)
    assert t[0] == 0.0 and t[-1] == pytest.approx(path.t_max, abs=0)
    tau = -torch.log1p(-t)
    assert torch.allclose(tau.diff(), torch.full((8,), path.tau_max / 8, dtype=torch.float64))
    with pytest.raises(KLFlowError):
        path.tau_grid(0)


def test_calibration_matches_paper_table_and_monte_carlo():
    # PAPER.md 1.5: V = 50258, beta = 0.01 gives 0.975 at t = 0.28 and 0.985 at t = 0.30
    assert argmax_probability(50258, 0.01, 0.28) == pytest.approx(0.975, abs=0.003)
    assert argmax_probability(50258, 0.01, 0.30) == pytest.approx(0.985, abs=0.003)
    t_max = calibrate_t_max(50258, 0.01)
    assert 0.28 < t_max < 0.30
    assert argmax_probability(50258, 0.01, t_max) >= 0.98 > argmax_probability(50258, 0.01, t_max - 2e-4)
    # the closed form against a seeded Monte-Carlo at V = 1000
    path = KLPath(1000, beta=0.01, t_max=0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, 4000), generator=g)
    for t in (0.1, 0.2, 0.3):
        hit = (path.noisy_logits(ids, torch.tensor([t]), g).argmax(-1) == ids).double().mean().item()
        assert hit == pytest.approx(argmax_probability(1000, 0.01, t), abs=0.025)


def test_calibrated_path_and_default_t_star():
    path = KLPath(4096)
    assert path.t_max_calibrated and path.t_max == calibrate_t_max(4096, 0.01)
    assert path.default_t_star == pytest.approx(path.t_max * 0.28 / 0.3, rel=1e-5)
    assert KLPath(50258, t_max=0.3).default_t_star == pytest.approx(0.28)


@pytest.mark.parametrize("kwargs", [dict(beta=0.0), dict(beta=1.0), dict(t_max=1.0), dict(t_max=0.0), dict(vocab_size=1)])
def test_impossible_values_are_rejected(kwargs):
    args = dict(vocab_size=10, beta=0.01, t_max=0.3) | kwargs
    with pytest.raises(KLFlowError):
        KLPath(**args)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_single_token_posterior_is_the_softmax_of_the_log_evidence(dtype, atol):
    path = KLPath(4096, beta=0.01)
    t = torch.tensor([0.0, 0.05, 0.2, path.t_max])
    x = path.sample_x_t(torch.randint(0, 4096, (4, 6)), t, torch.Generator().manual_seed(2)).double()
    reference = torch.softmax(single_token_log_evidence(x.log(), t.double(), 4096, path.logit_gap), -1)
    q = single_token_posterior(x.to(dtype), t.to(dtype), 4096, path.logit_gap)
    assert q.dtype == dtype
    torch.testing.assert_close(q.double(), reference, rtol=0, atol=atol)
    assert reference[3].max() > 0.9  # near t_max the posterior is sharp, the case the power must keep


@pytest.mark.parametrize("vocab_size, compiled", [(13, False), (4096, False), (4096, True)])
def test_sample_posterior_is_the_posterior_of_the_x_t_drawn_from_the_same_noise(vocab_size, compiled):
    path = KLPath(vocab_size, beta=0.01)
    if compiled:
        path.compile()
    ids = torch.randint(0, vocab_size, (5, 6))
    t = torch.tensor([0.0, 0.03, 0.1, 0.2, path.t_max])
    q = path.sample_posterior(ids, t, torch.Generator().manual_seed(4))
    x = path.sample_x_t(ids, t, torch.Generator().manual_seed(4))
    reference = torch.softmax(single_token_log_evidence(x.double().log(), t.double(), vocab_size, path.logit_gap), -1)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q.double(), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(q, single_token_posterior(x, t, vocab_size, path.logit_gap), rtol=0, atol=1e-5)
    assert reference[-1].max() > 0.9


@pytest.mark.parametrize("t_max", [0.7, 0.8, 0.95])
def test_posteriors_stay_finite_and_exact_where_y_is_nearly_one_hot(t_max):
    """c = t (a - b) / (1 - t) from 30 to 245: 1 - y_i (1 - e^-c) rounds to 0 in float32 there.
    At t = 0.7 float64's log-evidence still holds; beyond, the posterior is the target's one-hot."""
    path = KLPath(4096, beta=0.01, t_max=t_max)
    ids = torch.randint(0, 4096, (2, 64))
    t = torch.tensor([0.7, t_max])
    q = path.sample_posterior(ids, t, torch.Generator().manual_seed(5))
    x = path.sample_x_t(ids, t, torch.Generator().manual_seed(5))
    from_x = single_token_posterior(x, t, 4096, path.logit_gap)
    assert torch.isfinite(q).all() and torch.isfinite(from_x).all()
    reference = torch.softmax(single_token_log_evidence(x.double().log(), torch.tensor([0.7]).double(), 4096,
                                                        path.logit_gap), -1)[:1]
    torch.testing.assert_close(q[:1].double(), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(from_x[:1].double(), reference, rtol=0, atol=1e-5)
    one_hot = torch.nn.functional.one_hot(ids[1:], 4096).float()
    torch.testing.assert_close(q[1:], one_hot, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_x[1:], one_hot, rtol=0, atol=1e-6)


def test_a_zero_draw_at_the_target_gives_it_no_weight():
    """The CPU noise is exactly 0 when its 24-bit uniform is (once in 2^24 draws): x_t's target entry is then 0."""
    path = KLPath(50, beta=0.01)
    e = exponential_noise((1, 3, 50), torch.Generator().manual_seed(6))
    ids = torch.tensor([[4, 9, 17]])
    e[0, :, :].scatter_(-1, ids[0].unsqueeze(-1), 0.0)
    t = torch.full((1, 1, 1), path.t_max)
    q = posterior_from_exponential(e.clone(), ids, t, path.logit_gap)
    x = x_t_from_exponential(e.clone(), ids, t, path.logit_gap)
    assert torch.isfinite(q).all() and (x.gather(-1, ids.unsqueeze(-1)) == 0).all()
    reference = torch.softmax(single_token_log_evidence(x.double().log(), t.double().view(1), 50, path.logit_gap), -1)
    torch.testing.assert_close(q.double(), reference, rtol=0, atol=1e-5)


def test_the_evidence_loss_feeds_the_posterior_with_the_same_noise():
    path = KLPath(17, beta=0.01)
    ids = torch.randint(0, 17, (3, 5))
    cond = torch.zeros(3, 5, dtype=torch.bool)
    cond[:, 0] = True
    t = torch.tensor([0.05, 0.15, path.t_max])
    seen = {}

    def model(x, t, **options):
        seen.update(x=x.clone(), options=options)
        return x.log()  # the cross-entropy of a model that returns its input's log

    model.input = "evidence"
    ce = path.position_losses(model, ids, t, cond, torch.Generator().manual_seed(7))
    x = path.sample_x_t(ids, t, torch.Generator().manual_seed(7))
    q = clamp_one_hot(single_token_posterior(x, t, 17, path.logit_gap), ids, cond)
    assert seen["options"] == {"posterior": True}
    torch.testing.assert_close(seen["x"], q, rtol=0, atol=1e-5)
    torch.testing.assert_close(ce, -q.gather(-1, ids.unsqueeze(-1)).squeeze(-1).log(), rtol=1e-4, atol=1e-5)
    assert (ce[:, 0] == 0).all()  # given positions are fed their exact one-hot


def test_log_evidence_is_the_single_token_posterior():
    # Monte-Carlo: sample tokens uniformly, bin by the closed-form posterior's argmax confidence
    V = 5
    path = KLPath(V, beta=0.05, t_max=0.5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (1, 60000), generator=g)
    t = torch.tensor([0.2])
    l_t = path.noisy_logits(ids, t, g)
    post = torch.softmax(path.log_evidence(l_t, t), -1)[0]
    conf, guess = post.max(-1)
    right = (guess == ids[0]).double()
    for lo, hi in ((0.25, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0)):
        sel = (conf >= lo) & (conf < hi)
        assert sel.sum() > 500
        assert right[sel].mean().item() == pytest.approx(conf[sel].mean().item(), abs=0.02)
    assert torch.allclose(path.log_evidence(l_t, torch.zeros(1)), torch.zeros(1, dtype=torch.float64))


def test_loss_clamps_conditioned_positions_to_exact_one_hot():
    path = KLPath(7, t_max=0.3)
    ids = torch.randint(0, 7, (2, 5))
    cond = torch.zeros(2, 5, dtype=torch.bool)
    cond[:, :2] = True
    seen = {}

    def model(x, t):
        seen["x"], seen["t"] = x.clone(), t
        return torch.zeros(*x.shape)

    loss = path.loss(model, ids, cond)
    assert torch.equal(seen["x"][:, :2], torch.nn.functional.one_hot(ids[:, :2], 7).float())
    assert not torch.equal(seen["x"][:, 2:], torch.nn.functional.one_hot(ids[:, 2:], 7).float())
    assert ((seen["t"] >= 0) & (seen["t"] <= 0.3)).all()
    assert loss.item() == pytest.approx(math.log(7), rel=1e-5)


def test_clamp_one_hot_only_touches_masked_positions():
    x = torch.full((1, 3, 4), 0.25)
    out = clamp_one_hot(x.clone(), torch.tensor([[2, 1, 0]]), torch.tensor([[False, True, False]]))
    assert torch.equal(out[0, 1], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.equal(out[0, [0, 2]], x[0, [0, 2]])
