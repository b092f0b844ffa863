import pytest
import torch

from klflow.errors import KLFlowError
from klflow.exact import ExactPosterior
from klflow.path import KLPath
from klflow.sampling import Selection, generate, nfe, sample_categorical

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
    assert torch.equal(run(sampler="hybrid", t_star=0.0), run(sampler="randomized"))


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
