import math

import pytest
import torch

from klflow.errors import KLFlowError
from klflow.flow.method import KLFlow
from klflow.flow.path import KLPath
from klflow.flow.time_sampling import TimeSampling

T_MAX = 0.32


def per_t_loss(t):
    """A fixed loss curve shaped like a denoiser's: large and flat-ish at small t, falling to ~0 at t_max."""
    return 6.0 * torch.exp(-12.0 * t) + 0.5 * torch.cos(20.0 * t)


def exact_uniform_mean():
    # (1/T) int_0^T 6 e^{-12 t} + 0.5 cos(20 t) dt
    return (6.0 / 12.0 * (1 - math.exp(-12.0 * T_MAX)) + 0.5 / 20.0 * math.sin(20.0 * T_MAX)) / T_MAX


@pytest.mark.parametrize("power", [2.0, 3.0, 0.75])
def test_weighted_estimator_is_unbiased_for_the_uniform_t_loss(power):
    n = 400_000
    g = torch.Generator().manual_seed(0)
    t_u, w_u = TimeSampling(T_MAX).sample(n, g)
    t_p, w_p = TimeSampling(T_MAX, "power", power).sample(n, g)
    assert torch.equal(w_u, torch.ones(n))
    uniform, weighted = per_t_loss(t_u).double(), (w_p * per_t_loss(t_p)).double()
    for values in (uniform, weighted):
        standard_error = values.std().item() / math.sqrt(n)
        assert values.mean().item() == pytest.approx(exact_uniform_mean(), abs=4 * standard_error)


def test_power_density_and_weights_are_u_over_p():
    n, power = 200_000, 2.0
    t, w = TimeSampling(T_MAX, "power", power).sample(n, torch.Generator().manual_seed(1))
    s = t / T_MAX
    assert ((t >= 0) & (t <= T_MAX)).all()
    # P(s < 1/2) = (1/2)^(1/gamma): 71% of the draws in the lower half of [0, t_max]
    assert (s < 0.5).double().mean().item() == pytest.approx(0.5 ** (1 / power), abs=0.005)
    density = s.pow(1 / power - 1) / (power * T_MAX)
    torch.testing.assert_close(w, (1 / T_MAX) / density, rtol=1e-4, atol=1e-6)
    assert w.max().item() <= power


def test_klflow_loss_with_power_time_is_unbiased_and_uniform_is_unchanged():
    """Through the real loss: a model whose posterior depends on t only, so its cross-entropy for
    token 0 is a fixed function of t (0.45 nats at t = 0, 6.5 at t_max); the weighted power-t
    loss must estimate the uniform-t loss, which the unweighted one misses by ~0.85 nats."""
    V = 5
    path = KLPath(V, beta=0.01, t_max=T_MAX)
    ids = torch.zeros(60_000, 1, dtype=torch.long)
    scores = torch.tensor([3.0, 1.0, 0.0, -1.0, 2.0])

    def model(x, t):
        return (scores * (1.0 - 8.0 * t[:, None, None])).expand(*x.shape)

    uniform = KLFlow(path)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert uniform.loss(model, ids, generator=g1).item() == path.loss(model, ids, generator=g2).item()
    many = [uniform.loss(model, ids, generator=torch.Generator().manual_seed(10 + i)).item() for i in range(4)]
    power = KLFlow(path, time_sampling=TimeSampling(T_MAX, "power", 2.0))
    weighted = [power.loss(model, ids, generator=torch.Generator().manual_seed(20 + i)).item() for i in range(4)]
    assert sum(weighted) / 4 == pytest.approx(sum(many) / 4, abs=0.03)
    t, _ = power.time_sampling.sample(len(ids), torch.Generator().manual_seed(30))
    assert path.loss(model, ids, t=t).item() < sum(many) / 4 - 0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="logit_normal"), "time sampling must be one of"),
    (dict(kind="power", power=0.5), "power must be > 0.5"),
])
def test_bad_time_sampling_is_a_clear_error(kwargs, message):
    with pytest.raises(KLFlowError, match=message):
        TimeSampling(T_MAX, **kwargs)
