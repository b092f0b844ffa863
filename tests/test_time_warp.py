"""Time warps: the maps themselves, the training draws through them, the sampler's grid, the learned
warp's fit and its round trip through a run."""

import json
import math
import shutil
from itertools import pairwise

import pytest
import torch
from conftest import TINY_OVERRIDES

from klflow.bench import load_bench_preset
from klflow.bench.plan import make_plan
from klflow.bench.preset import parse_setting
from klflow.cli import main
from klflow.config import load_config
from klflow.errors import KLFlowError
from klflow.flow.exact import ExactPosterior
from klflow.flow.method import KLFlow
from klflow.flow.path import KLPath, argmax_probability
from klflow.flow.sampler import KLFlowSampler, SamplerOptions, generate
from klflow.flow.switch import entropy_along_ode
from klflow.flow.time_sampling import TimeSampling
from klflow.flow.time_warp import WARPS, TimeWarp, alpha_warp, build_warp, learned_warp
from klflow.flow.validation import BAND_EDGES, band_key
from klflow.methods import SpecialTokens
from klflow.train import train

V_BIG, BETA = 4096, 0.01
# A per-band cross-entropy curve that falls fastest between the bands 0.2-0.4 and 0.4-0.6 of t / t_max.
FALLING = [6.6, 6.4, 2.0, 1.4, 1.2]


@pytest.fixture(scope="module")
def big_path():
    return KLPath(V_BIG, BETA)


def normalised_alpha(path, t):
    start, end = 1.0 / path.vocab_size, argmax_probability(path.vocab_size, path.beta, path.t_max)
    return torch.tensor([(argmax_probability(path.vocab_size, path.beta, x) - start) / (end - start)
                         for x in t.tolist()], dtype=torch.float64)


def ks_uniform(values):
    """Kolmogorov-Smirnov distance of values in [0, 1] from U(0, 1)."""
    x, _ = values.sort()
    n = len(x)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - x
    below = x - torch.arange(n, dtype=torch.float64) / n
    return max(above.max().item(), below.max().item())


def test_alpha_draws_are_uniform_in_alpha_and_uniform_draws_are_not(big_path):
    n = 20_000
    alpha = TimeSampling(big_path.t_max, "alpha", warp=alpha_warp(big_path))
    t, weight = alpha.sample(n, torch.Generator().manual_seed(0))
    assert torch.equal(weight, torch.ones(n)) and ((t >= 0) & (t <= big_path.t_max)).all()
    critical = 1.63 / math.sqrt(n)  # the KS test's 1% level
    assert ks_uniform(normalised_alpha(big_path, t)) < critical
    t_uniform, _ = TimeSampling(big_path.t_max).sample(n, torch.Generator().manual_seed(0))
    assert ks_uniform(normalised_alpha(big_path, t_uniform)) > 10 * critical


@pytest.mark.parametrize("kind", ["uniform", "tau", "alpha", "learned"])
def test_every_warp_is_monotone_onto_the_range_and_its_inverse_round_trips(big_path, kind):
    warp = build_warp(kind, big_path, learned_warp(big_path.t_max, BAND_EDGES, FALLING))
    s = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    t = warp.time(s)
    assert t[0].item() == pytest.approx(0.0, abs=1e-12) and t[-1].item() == pytest.approx(big_path.t_max, rel=1e-12)
    assert (t.diff() > 0).all()
    torch.testing.assert_close(warp.inverse(t), s, rtol=0, atol=1e-9)


def test_the_tau_warp_gives_todays_grid_exactly(big_path):
    for steps in (1, 7, 64, 256):
        times, sizes = TimeWarp("tau", big_path.t_max).grid(steps)
        assert torch.equal(torch.tensor(times, dtype=torch.float64), big_path.tau_grid(steps))
        assert sizes == [big_path.tau_max / steps] * steps


@pytest.mark.parametrize("sampler", ["ode", "randomized", "hybrid"])
def test_the_default_grid_is_tau_bit_for_bit(sampler):
    path = KLPath(13, t_max=0.35)
    weight = torch.randn(13, 13, generator=torch.Generator().manual_seed(0))

    def model(x, t):
        return x @ weight + t[:, None, None]

    runs = [generate(model, path, 4, 6, sampler=sampler, steps=9, generator=torch.Generator().manual_seed(1), **grid)
            for grid in ({}, {"grid": "tau"})]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("grid", ["alpha", "uniform"])
def test_each_step_advances_tau_by_its_own_size(grid):
    """One ODE step from a point with a constant posterior: the exponential integrator is exact, so
    l moves by e^{-h_n} towards v, with h_n = tau(t_{n+1}) - tau(t_n) of this grid."""
    path = KLPath(13, t_max=0.35)
    sampler = KLFlowSampler(path, SamplerOptions(sampler="ode", integrator="exponential", grid=grid))
    times, sizes = sampler.warp.grid(5)
    assert sizes == pytest.approx([-math.log1p(-b) + math.log1p(-a) for a, b in pairwise(times)], rel=1e-12)
    assert len({round(h, 9) for h in sizes}) > 1  # not uniform in tau


@pytest.fixture(scope="module")
def toy():
    path = KLPath(3, beta=0.01)
    joint = torch.tensor([[0.30, 0.02, 0.03], [0.05, 0.25, 0.0], [0.0, 0.05, 0.30]], dtype=torch.float64)
    return path, ExactPosterior(path, joint / joint.sum())


def histogram(ids):
    return torch.bincount(ids[:, 0] * 3 + ids[:, 1], minlength=9).double() / len(ids)


@pytest.mark.parametrize("grid", ["alpha", "uniform", "learned"])
def test_the_samplers_stay_exact_on_the_new_grids(toy, grid):
    """With the exact posterior, the ODE reproduces the joint and the randomized sampler the marginals
    on every grid (sampling noise alone is ~0.01 TV at 20k draws)."""
    path, model = toy
    learned = learned_warp(path.t_max, BAND_EDGES, FALLING)
    target = model.log_joint.exp()
    ode = KLFlowSampler(path, SamplerOptions(sampler="ode", readout="sample", grid=grid), learned_warp=learned)
    ids = ode.sample(model, 20_000, 2, 100, generator=torch.Generator().manual_seed(0))
    assert 0.5 * (histogram(ids) - target).abs().sum().item() < 0.03
    randomized = KLFlowSampler(path, SamplerOptions(readout="sample", select="sample", temperature=1.0, grid=grid),
                               learned_warp=learned)
    ids = randomized.sample(model, 20_000, 2, 30, generator=torch.Generator().manual_seed(1))
    for j in range(2):
        marginal = torch.bincount(ids[:, j], minlength=3).double() / len(ids)
        assert 0.5 * (marginal - model.marginals()[j]).abs().sum().item() < 0.03


def test_the_learned_warp_spends_its_grid_where_the_loss_falls_fastest():
    t_max, steps = 0.32, 64
    warp = learned_warp(t_max, BAND_EDGES, FALLING)
    times, _ = warp.grid(steps)
    s = torch.tensor(times[:-1]) / t_max
    # The loss falls by 4.4 of its 5.4 nats between the centres 0.3 and 0.5 of the bands 0.2-0.4 and 0.4-0.6.
    steepest = ((s >= 0.3) & (s < 0.5)).sum().item()
    assert steepest > steps * 0.7 and ((s >= 0.5) & (s < 0.7)).sum().item() < steepest / 4
    density = torch.tensor(warp.cdf).diff() / torch.tensor(warp.knots).diff()
    assert density.argmax().item() == 2  # the knot segment [0.3, 0.5)
    assert (density > 0).all() and density.min().item() >= 0.05 - 1e-12  # the floor: p(t) >= floor / t_max
    flat = learned_warp(t_max, BAND_EDGES, [2.0] * 5)
    torch.testing.assert_close(flat.time(torch.linspace(0, 1, 11, dtype=torch.float64)),
                               torch.linspace(0, t_max, 11, dtype=torch.float64))
    # A noisy rise between bands is read as flat (the loss does not grow with t), never as negative density.
    assert (torch.tensor(learned_warp(t_max, BAND_EDGES, [5.0, 5.2, 3.0, 1.0, 1.1]).cdf).diff() > 0).all()


def test_the_learned_warp_comes_from_validation_and_survives_the_record():
    path = KLPath(50, t_max=0.3)
    method = KLFlow(path, time_sampling=TimeSampling(path.t_max, "learned", warp=TimeWarp("uniform", path.t_max)))
    assert method.learn({"val_loss": 3.0}) == {}  # no bands, nothing to fit
    scores = {band_key(lo, hi): ce for (lo, hi), ce in zip(pairwise(BAND_EDGES), FALLING)}
    record = json.loads(json.dumps(method.learn(scores)))
    assert method.time_sampling.warp == method.learned_warp == learned_warp(path.t_max, BAND_EDGES, FALLING)
    t, weight = method.time_sampling.sample(50_000, torch.Generator().manual_seed(0))
    assert torch.equal(weight, torch.ones(50_000))
    in_band = ((t / path.t_max >= 0.2) & (t / path.t_max < 0.4)).double().mean().item()
    expected = method.learned_warp.inverse(torch.tensor([0.4 * path.t_max, 0.2 * path.t_max], dtype=torch.float64))
    assert in_band == pytest.approx((expected[0] - expected[1]).item(), abs=0.01)
    fresh = KLFlow(path, time_sampling=TimeSampling(path.t_max, "learned", warp=TimeWarp("uniform", path.t_max)))
    fresh.restore(record)
    assert fresh.learned_warp == method.learned_warp and fresh.time_sampling.warp == method.learned_warp


@pytest.mark.parametrize("make, message", [
    (lambda: SamplerOptions(grid="cosine"), "grid must be one of"),
    (lambda: KLFlowSampler(KLPath(13, t_max=0.3), SamplerOptions(grid="learned")), "grid='learned' needs the run's"),
    (lambda: TimeWarp("alpha", 0.3, (0.0, 0.5, 1.0), (0.0, 0.6, 0.6)), "strictly increasing"),
    (lambda: TimeWarp("sigmoid", 0.3), "time warp must be one of"),
    (lambda: learned_warp(0.3, BAND_EDGES, [1.0, 2.0]), "one loss each"),
    (lambda: learned_warp(0.3, BAND_EDGES, [1.0, math.nan, 1.0, 1.0, 1.0]), "finite band losses"),
    (lambda: TimeSampling(0.3, "alpha"), "takes a time warp of kind .alpha., got None"),
    (lambda: TimeSampling(0.3, "power", 2.0, TimeWarp("tau", 0.3)), "takes a time warp of kind None, got .tau."),
    (lambda: TimeWarp.from_record({"kind": "learned"}), "recorded time warp is malformed"),
    (lambda: load_config("quickstart", ['path.time_sampling="warped"']), "path.time_sampling must be one of"),
])
def test_bad_warp_values_are_one_line_errors(make, message):
    with pytest.raises(KLFlowError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_grid_options_reach_the_record_and_the_bench():
    method = KLFlow(KLPath(13, t_max=0.3))
    assert method.sample_settings()["grid"] == "tau"
    assert method.sample_settings(grid="alpha")["grid"] == "alpha"
    assert parse_setting("sampler=ode,grid=alpha") == {"sampler": "ode", "grid": "alpha"}
    assert set(WARPS) == {"uniform", "tau", "alpha", "learned"}
    # A preset compares grids as ablation settings, and training-time warps as variants.
    preset = load_bench_preset("cpu-ablation", ['ablation.settings=["grid=tau", "grid=alpha", "grid=learned"]',
                                                'ablation.variants=["alpha-time:path.time_sampling=alpha"]'])
    plan = make_plan(preset, 4096, SpecialTokens(eot=0, pad=1, mask=2))
    grids = {(c.model, c.settings["grid"]) for c in plan.cells if "ablation" in c.groups}
    assert {g for _, g in grids} == {"tau", "alpha", "learned"} and {m for m, _ in grids} >= {"klflow", "alpha-time"}
    assert next(m for m in plan.models if m.key == "alpha-time").config.path.time_sampling == "alpha"


def test_a_run_trained_with_learned_time_stores_its_warp_and_samples_on_it(tiny_corpus, tmp_path, capsys):
    config = load_config("quickstart", [f"data.source={json.dumps(str(tiny_corpus))}", *TINY_OVERRIDES,
                                        'path.time_sampling="learned"', "train.max_steps=5"])
    result = train(config, tmp_path / "run", progress=False, log=lambda _: None)
    state = json.loads((result.checkpoint / "state.json").read_text())
    warp = TimeWarp.from_record(state["learned"]["time_warp"])
    assert warp.kind == "learned" and warp.t_max == pytest.approx(json.loads(
        (result.checkpoint / "config.json").read_text())["method"]["t_max"])
    out = tmp_path / "samples.jsonl"
    assert main(["sample", str(tmp_path / "run"), "-n", "2", "--steps", "4", "--grid", "learned", "--sampler", "ode",
                 "--output", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and records[0]["grid"] == "learned"
    assert main(["sample", str(tmp_path / "run"), "-n", "1", "--steps", "4", "--option", "grid=alpha",
                 "--output", str(tmp_path / "alpha.jsonl"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "alpha.jsonl").read_text().splitlines()[0])["grid"] == "alpha"


def test_learned_grid_on_a_run_without_a_warp_is_a_one_line_error(tiny_run, tmp_path, capsys):
    """A checkpoint whose state has no learned warp (as written before warps existed) still loads and
    samples on the other grids; grid=learned is a one-line error naming the flag."""
    old = tmp_path / "old"
    shutil.copytree(tiny_run / (tiny_run / "latest").read_text().strip(), old)
    state = json.loads((old / "state.json").read_text())
    assert "time_warp" in state.pop("learned")
    (old / "state.json").write_text(json.dumps(state))
    assert main(["sample", str(old), "-n", "1", "--steps", "2", "--grid", "alpha", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["sample", str(old), "-n", "1", "--steps", "2", "--grid", "learned", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "grid='learned' needs the run's learned time warp" in err and len(err.strip().splitlines()) == 1


def test_the_ode_switch_calibration_runs_on_the_sampler_grid(toy):
    path, model = toy
    seen = []

    def watching(x, t):
        seen.append(t[0].item())
        return model(x, t)

    times, _ = alpha_warp(path).grid(5)
    entropy_along_ode(watching, path, 4, 2, 5, t_star=0.5 * (times[3] + times[4]), grid="alpha")
    assert seen == pytest.approx(times[:5], rel=1e-6)  # stopped at the first step past t_star
