import math

import pytest
import torch

from klflow.errors import KLFlowError
from klflow.flow.exact import ExactPosterior
from klflow.flow.path import KLPath
from klflow.flow.sampler import (
    DEFAULT_TEMPERATURE,
    Selection,
    generate,
    mean_posterior_entropy,
    ode_step,
)
from klflow.flow.switch import entropy_along_ode, entropy_on_data
from klflow.sampling import nfe, sample_categorical

V, L = 3, 2


@pytest.fixture(scope="module")
def toy():
    """A correlated joint over V^L = 9 sequences: far from the product of its marginals."""
    path = KLPath(V, beta=0.01)
    joint = torch.tensor([[0.30, 0.02, 0.03], [0.05, 0.25, 0.0], [0.0, 0.05, 0.30]], dtype=torch.float64)
    return path, ExactPosterior(path, joint / joint.sum())


def histogram(ids):
    return torch.bincount(ids[:, 0] * V + ids[:, 1], minlength=V * V).double() / len(ids)


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


def test_exact_posterior_marginals_at_t_zero_are_the_prior(toy):
    path, model = toy
    x = torch.softmax(path.sample_source_logits((4, L, V)), -1)
    marg = model(x, torch.zeros(4)).exp()
    assert torch.allclose(marg, model.marginals().expand(4, L, V), atol=1e-6)


def test_ode_with_exact_posterior_reproduces_the_joint(toy):
    """The paper's central claim: the posterior gives the exact velocity, so the ODE transports
    Dirichlet noise to the data distribution, correlations included."""
    path, model = toy
    g = torch.Generator().manual_seed(0)
    ids = generate(model, path, 20000, L, sampler="ode", steps=100, readout="sample", generator=g)
    target = model.log_joint.exp()
    # sampling noise alone is ~0.01 TV at 20k draws; an independent-per-position sampler is at 0.52
    assert total_variation(histogram(ids), target) < 0.03
    product = torch.outer(model.marginals()[0], model.marginals()[1]).reshape(-1)
    assert total_variation(product, target) > 0.4


@pytest.mark.parametrize("sampler", ["randomized", "hybrid"])
def test_randomized_and_hybrid_reproduce_the_marginals(toy, sampler):
    path, model = toy
    g = torch.Generator().manual_seed(1)
    ids = generate(model, path, 20000, L, sampler=sampler, steps=60, select="sample", readout="sample", generator=g)
    marg = torch.stack([torch.bincount(ids[:, j], minlength=V).double() / len(ids) for j in range(L)])
    for j in range(L):
        assert total_variation(marg[j], model.marginals()[j]) < 0.03


def test_few_ode_steps_are_measurably_worse_than_many(toy):
    path, model = toy
    target = model.log_joint.exp()
    tv = {}
    for steps in (1, 100):
        g = torch.Generator().manual_seed(2)
        tv[steps] = total_variation(histogram(generate(model, path, 20000, L, sampler="ode", steps=steps, readout="sample", generator=g)), target)
    assert tv[1] > tv[100] + 0.05


class CountingModel:
    def __init__(self, vocab_size):
        self.calls, self.inputs, self.times = 0, [], []
        self.weight = torch.randn(vocab_size, vocab_size)

    def __call__(self, x, t):
        self.calls += 1
        self.inputs.append(x.clone())
        self.times.append(t.clone())
        return x @ self.weight + t[:, None, None]


@pytest.mark.parametrize("sampler", ["ode", "randomized", "hybrid"])
def test_each_sampler_returns_valid_ids_and_counts_nfe(sampler):
    path = KLPath(13, t_max=0.35)
    model = CountingModel(13)
    ids = generate(model, path, 3, 7, sampler=sampler, steps=5, select="top_k:3", generator=torch.Generator().manual_seed(0))
    assert ids.shape == (3, 7) and ids.dtype == torch.long
    assert ((ids >= 0) & (ids < 13)).all()
    assert model.calls == nfe(5) == 6
    assert torch.allclose(torch.stack([t[0] for t in model.times]), path.tau_grid(5).float())


@pytest.mark.parametrize("sampler", ["ode", "randomized", "hybrid"])
def test_prompt_positions_are_clamped_at_every_step(sampler):
    path = KLPath(13, t_max=0.35)
    model = CountingModel(13)
    prompt = torch.tensor([[4, 9, 0, 0, 0]])
    cond = torch.tensor([[True, True, False, False, True]])
    prompt[0, 4] = 12
    ids = generate(model, path, 2, 5, sampler=sampler, steps=4, prompt=prompt, cond_mask=cond, readout="sample")
    assert (ids[:, [0, 1, 4]] == torch.tensor([4, 9, 12])).all()
    for x in model.inputs:
        assert torch.equal(x[:, [0, 1, 4]], torch.nn.functional.one_hot(torch.tensor([4, 9, 12]), 13).float().expand(2, 3, 13))
    prefix = generate(model, path, 2, 5, sampler=sampler, steps=2, prompt=torch.tensor([7, 8]))
    assert (prefix[:, :2] == torch.tensor([7, 8])).all()


def test_same_generator_same_output_and_banned_ids_never_appear():
    path = KLPath(13, t_max=0.35)
    model = CountingModel(13)
    outs = [generate(model, path, 4, 6, sampler="randomized", steps=3, select="sample", readout="sample",
                     banned_ids=[0, 1], generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    assert (outs[0] > 1).all()
    other = generate(model, path, 4, 6, sampler="randomized", steps=3, select="sample", readout="sample",
                     generator=torch.Generator().manual_seed(10))
    assert not torch.equal(outs[0], other)


def test_pure_hybrid_extremes_match_the_pure_samplers():
    path = KLPath(13, t_max=0.35)
    model = CountingModel(13)
    run = lambda **kw: generate(model, path, 2, 4, steps=4, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(run(sampler="hybrid", t_star=path.t_max), run(sampler="ode"))
    for select in ("argmax", "sample"):  # each sampler's default draw differs; with the same one they agree
        assert torch.equal(run(sampler="hybrid", t_star=0.0, select=select), run(sampler="randomized", select=select))


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps"),
    (dict(t_star=0.5), "t_star"),
    (dict(t_star=-0.1), "t_star"),
    (dict(sampler="euler"), "sampler"),
    (dict(select="top_k:0"), "select"),
    (dict(select="nucleus"), "select"),
    (dict(readout="mode"), "readout"),
    (dict(prompt=torch.zeros(1, 9, dtype=torch.long)), "prompt"),
    (dict(prompt=torch.full((1, 2), 99)), "prompt ids"),
])
def test_bad_sampler_arguments_are_clear_errors(kwargs, message):
    path = KLPath(13, t_max=0.35)
    with pytest.raises(KLFlowError, match=message):
        generate(CountingModel(13), path, 2, 5, **({"steps": 2} | kwargs))


def test_selection_and_float64_draws():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    assert Selection.parse("argmax")(logits, None).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([Selection.parse("top_k:2")(logits, g) for _ in range(400)])
    assert set(draws.unique().tolist()) == {1, 3}
    many = sample_categorical(torch.log(torch.tensor([0.2, 0.8])).expand(20000, 2), g)
    assert many.float().mean().item() == pytest.approx(0.8, abs=0.015)


@pytest.mark.parametrize("integrator", ["euler", "exponential"])
def test_few_step_ode_degrades_gracefully_on_the_exact_toy(toy, integrator):
    """NFE 4 / 8 / 16: every step count gives valid ids, and the joint's error shrinks with NFE
    (measured with seed 2: euler 0.034 / 0.015 / 0.010, exponential 0.042 / 0.017 / 0.012; the
    20k-sample noise floor is ~0.01, one step is at 0.24-0.27)."""
    path, model = toy
    target = model.log_joint.exp()
    tv = []
    for total in (4, 8, 16):
        g = torch.Generator().manual_seed(2)
        ids = generate(model, path, 20000, L, sampler="ode", steps=total - 1, readout="sample", generator=g,
                       integrator=integrator)
        assert ((ids >= 0) & (ids < V)).all()
        tv.append(total_variation(histogram(ids), target))
    assert tv[0] < 0.06 and tv[1] < 0.03 and tv[2] < 0.02
    assert tv[0] > tv[1] > tv[2] - 0.005


@pytest.mark.parametrize("sampler", ["randomized", "hybrid"])
def test_few_step_randomized_and_hybrid_keep_the_marginals(toy, sampler):
    path, model = toy
    for total in (4, 8, 16):
        g = torch.Generator().manual_seed(1)
        ids = generate(model, path, 20000, L, sampler=sampler, steps=total - 1, select="sample", readout="sample",
                       generator=g, integrator="exponential")
        for j in range(L):
            assert total_variation(torch.bincount(ids[:, j], minlength=V).double() / len(ids), model.marginals()[j]) < 0.035


class ConstantPosterior:
    """A model whose posterior ignores x_t: v = E[l1 | x_t] is constant, so dl/dtau = v - l is solvable."""

    def __init__(self, logits):
        self.logits, self.inputs = logits, []

    def __call__(self, x, t):
        self.inputs.append(x.clone())
        return self.logits.expand(*x.shape)


@pytest.mark.parametrize("steps", [1, 4])
def test_exponential_integrator_is_exact_for_a_constant_velocity_where_euler_is_not(steps):
    path = KLPath(13, t_max=0.35)
    logits = torch.randn(13, generator=torch.Generator().manual_seed(0))
    v = path.expected_target_logits(torch.softmax(logits, -1))
    l0 = path.sample_source_logits((2, 5, 13), torch.Generator().manual_seed(4))
    exact = torch.softmax(v + (l0 - v) * math.exp(-path.tau_max), -1)  # l(tau) = v + (l0 - v) e^{-tau}
    error = {}
    for integrator in ("exponential", "euler"):
        model = ConstantPosterior(logits)
        generate(model, path, 2, 5, sampler="ode", steps=steps, integrator=integrator,
                 generator=torch.Generator().manual_seed(4))
        error[integrator] = (model.inputs[-1] - exact).abs().max().item()  # the read-out sees x at t_max
    assert error["exponential"] < 1e-5
    assert error["euler"] > 1e-3


def test_ode_step_formulas():
    l, v, h = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.5]), 0.3
    assert torch.allclose(ode_step(l.clone(), v.clone(), h, "euler"), l + h * (v - l))
    assert torch.allclose(ode_step(l.clone(), v.clone(), h, "exponential"), math.exp(-h) * l + (1 - math.exp(-h)) * v)


def test_temperature_and_top_p_shape_the_float64_draws():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    n = 40000

    def frequencies(selection):
        return torch.bincount(selection(logits.expand(n, 4), g), minlength=4).double() / n

    cold = torch.softmax(logits.double() / 0.5, -1)
    assert torch.allclose(frequencies(Selection.parse("sample", temperature=0.5)), cold, atol=0.01)
    nucleus = frequencies(Selection.parse("sample", temperature=1.0, top_p=0.8))  # {0.5, 0.3} reaches 0.8
    assert nucleus[2:].sum() == 0 and nucleus[0].item() == pytest.approx(0.5 / 0.8, abs=0.01)
    both = frequencies(Selection.parse("top_k:3", temperature=2.0, top_p=0.9))
    kept = torch.softmax(logits.double()[:3] / 2.0, -1)  # top 3 at T = 2: 0.38 + 0.30 < 0.9 keeps all three
    assert both[3] == 0 and torch.allclose(both[:3], kept, atol=0.01)
    # unset, the temperature is the default's for draws; argmax draws nothing
    assert Selection.parse("sample").temperature == DEFAULT_TEMPERATURE == 0.8
    assert Selection.parse("argmax").temperature == 1.0


def test_lower_temperature_lowers_the_entropy_of_randomized_samples(toy):
    path, model = toy

    def entropy(temperature):
        g = torch.Generator().manual_seed(5)
        ids = generate(model, path, 8000, L, sampler="randomized", steps=10, select="sample", temperature=temperature,
                       readout="sample", generator=g)
        p = histogram(ids)
        return -(p[p > 0] * p[p > 0].log()).sum().item()

    assert entropy(0.5) < entropy(1.0) - 0.05  # measured: 1.54 vs 1.64 nats


def test_entropy_switch_extremes_are_the_pure_samplers():
    path = KLPath(13, t_max=0.35)
    model = CountingModel(13)
    run = lambda **kw: generate(model, path, 3, 4, steps=4, select="sample", generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(run(sampler="hybrid", switch_entropy=0.0), run(sampler="ode"))
    assert torch.equal(run(sampler="hybrid", switch_entropy=100.0), run(sampler="randomized"))


def test_entropy_switch_is_per_sequence(monkeypatch):
    """A sequence whose posterior is sure switches to randomized steps; an unsure one keeps the ODE."""
    path = KLPath(5, t_max=0.35)
    sure = torch.tensor([20.0, 0, 0, 0, 0])

    def model(x, t):
        out = torch.zeros(*x.shape)
        out[0] = sure  # row 0: entropy ~ 0; row 1: uniform, entropy log 5
        return out

    jumps = []
    real = path.noisy_logits
    monkeypatch.setattr(path, "noisy_logits", lambda ids, t, g=None: jumps.append(len(ids)) or real(ids, t, g))
    generate(model, path, 2, 3, sampler="hybrid", steps=4, switch_entropy=1.0, generator=torch.Generator().manual_seed(0))
    assert jumps == [1, 1, 1, 1]


def test_entropy_switch_with_the_exact_posterior_keeps_the_marginals(toy):
    """Calibrated on toy data at the default t_star, the per-sequence rule is still a valid sampler."""
    path, model = toy
    data = model.sample(512, torch.Generator().manual_seed(0))
    threshold = entropy_on_data(model, path, [(data, None)], generator=torch.Generator().manual_seed(1))
    marginal_entropy = torch.special.entr(model.marginals()).sum(-1).mean().item()
    assert 0.0 < threshold < marginal_entropy
    g = torch.Generator().manual_seed(1)
    ids = generate(model, path, 20000, L, sampler="hybrid", steps=60, switch_entropy=threshold, select="sample",
                   readout="sample", generator=g)
    for j in range(L):
        assert total_variation(torch.bincount(ids[:, j], minlength=V).double() / len(ids), model.marginals()[j]) < 0.03


def test_calibration_at_t_zero_is_the_entropy_of_the_prior_marginals(toy):
    path, model = toy
    data = model.sample(64, torch.Generator().manual_seed(0))
    prior = torch.special.entr(model.marginals()).sum(-1).mean().item()
    assert entropy_on_data(model, path, [(data[:40], None), (data[40:], None)], t_star=0.0) == pytest.approx(prior, rel=1e-6)
    assert entropy_along_ode(model, path, 8, L, steps=5, t_star=0.0) == pytest.approx(prior, rel=1e-6)


def test_with_the_exact_posterior_ode_and_data_calibrations_agree(toy):
    """The ODE transports the path's marginals, so the posterior entropy along it at t_star has
    the same mean as on noised data (the two differ for an imperfect denoiser)."""
    path, model = toy
    t_star = path.tau_grid(100)[50].item()  # a grid time, where the sampler would switch (measured: 0.369 / 0.374)
    data = model.sample(20000, torch.Generator().manual_seed(0))
    on_data = entropy_on_data(model, path, [(data, None)], t_star, generator=torch.Generator().manual_seed(1))
    along_ode = entropy_along_ode(model, path, 20000, L, 100, t_star, generator=torch.Generator().manual_seed(2))
    assert along_ode == pytest.approx(on_data, rel=0.03)


def test_mean_posterior_entropy_skips_given_positions():
    logits = torch.stack([torch.zeros(4), torch.tensor([50.0, 0, 0, 0])]).unsqueeze(0)  # [1, 2, 4]
    assert mean_posterior_entropy(logits).item() == pytest.approx(math.log(4) / 2, rel=1e-6)
    assert mean_posterior_entropy(logits, torch.tensor([[True, False]])).item() == pytest.approx(0.0, abs=1e-12)
    banned = torch.tensor([[[0.0, 0.0, float("-inf"), float("-inf")]]])
    assert mean_posterior_entropy(banned).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("kwargs, message", [
    (dict(select="argmax", temperature=0.5), "select='argmax' draws nothing"),
    (dict(select="sample", temperature=0), "temperature must be a number in \\[0.001, 1000\\]"),
    (dict(select="sample", top_p=1.5), "top_p must lie in"),
    (dict(integrator="rk4"), "integrator must be one of"),
    (dict(sampler="ode", switch_entropy=1.0), "switch_entropy is the hybrid sampler's switch rule"),
    (dict(t_star=0.1, switch_entropy=1.0), "switch_entropy is the hybrid sampler's switch rule"),
    (dict(sampler="hybrid", switch_entropy=-1.0), "switch_entropy must be a finite number of nats >= 0"),
])
def test_bad_new_sampler_options_are_clear_errors(kwargs, message):
    with pytest.raises(KLFlowError, match=message):
        generate(CountingModel(13), KLPath(13, t_max=0.35), 2, 5, steps=2, **kwargs)


def test_defaults_draw_in_randomized_steps_and_keep_argmax_in_the_hybrid():
    from klflow.flow.method import KLFlow

    method = KLFlow(KLPath(13, t_max=0.35))
    plain = method.sample_settings()
    assert (plain["sampler"], plain["select"], plain["temperature"]) == ("randomized", "sample", DEFAULT_TEMPERATURE)
    hybrid = method.sample_settings(sampler="hybrid")
    assert (hybrid["select"], hybrid["temperature"], hybrid["t_star"]) == ("argmax", 1.0, method.path.default_t_star)
    assert method.sample_settings(sampler="hybrid", select="sample")["temperature"] == DEFAULT_TEMPERATURE


def test_an_evidence_model_is_fed_the_posterior_computed_from_the_sampler_logits():
    """posterior_logits hands an evidence Denoiser q(softmax(l), t) from l directly: the same logits
    as the Denoiser mapping softmax(l) itself (a wrapper without the `input` attribute)."""
    from klflow.flow.path import single_token_log_evidence
    from klflow.flow.sampler import posterior_logits
    from klflow.model import Denoiser

    path = KLPath(50, beta=0.01)
    torch.manual_seed(0)
    net = Denoiser(50, n_layer=1, n_head=2, d_model=16, input="evidence", path_beta=0.01).eval()
    l = path.noisy_logits(torch.randint(0, 50, (3, 7)), torch.full((3,), 0.2), torch.Generator().manual_seed(1))
    prompt, cond = torch.randint(0, 50, (3, 7)), torch.zeros(3, 7, dtype=torch.bool)
    cond[:, 0] = True
    with torch.inference_mode():
        direct = posterior_logits(net, path, l, 0.2, prompt, cond, (1,))
        via_x = posterior_logits(lambda x, t: net(x, t), path, l, 0.2, prompt, cond, (1,))
    torch.testing.assert_close(direct, via_x, rtol=1e-4, atol=1e-4)
    q = path.posterior_from_logits(l, torch.full((3,), 0.2))
    reference = torch.softmax(single_token_log_evidence(l.double(), torch.full((3,), 0.2).double(), 50, path.logit_gap), -1)
    torch.testing.assert_close(q.double(), reference, rtol=0, atol=1e-6)
    before = l.clone()
    path.posterior_from_logits(l, torch.full((3,), 0.2))
    assert torch.equal(l, before)
