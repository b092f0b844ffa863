"""Self-conditioning: the denoiser also reads its previous estimate of p(x1 | x_t) (Chen et al. 2022)."""

import json

import pytest
import torch
from conftest import TINY_ARGS, TINY_OVERRIDES, checkpoint_without

import klflow
from klflow.checkpoint import load_checkpoint
from klflow.cli import main
from klflow.config import load_config
from klflow.errors import KLFlowError
from klflow.flow.exact import ExactPosterior
from klflow.flow.method import KLFlow
from klflow.flow.path import KLPath, takes_self_condition
from klflow.flow.sampler import generate, mean_posterior_entropy
from klflow.flow.switch import entropy_along_ode, entropy_on_data
from klflow.flow.validation import banded_validation
from klflow.model import Denoiser
from klflow.runtime import network_forward
from klflow.train import train

V, B, L = 23, 3, 8


def denoiser(self_conditioning: bool, seed: int = 0, **kwargs) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(V, n_layer=2, n_head=2, d_model=32, self_conditioning=self_conditioning, **kwargs).eval()


def soft(seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(B, L, V, generator=torch.Generator().manual_seed(seed)) * 3, dim=-1)


class Recorder:
    """A self-conditioned model that records the estimate of each call and returns logits that depend on x."""

    self_conditioning = True

    def __init__(self, reads_posterior: bool = False) -> None:
        self.reads_posterior = reads_posterior
        self.weights = torch.randn(V, V, generator=torch.Generator().manual_seed(0))
        self.seen: list[torch.Tensor | None] = []
        self.inputs: list[torch.Tensor] = []
        self.returned: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, posterior: bool = False,
                 self_condition: torch.Tensor | None = None) -> torch.Tensor:
        assert posterior == self.reads_posterior
        self.seen.append(None if self_condition is None else self_condition.clone())
        self.inputs.append(x.clone())
        logits = x @ self.weights + t[:, None, None]
        self.returned.append(logits.clone())
        return logits


@pytest.mark.parametrize("layer", ["denoiser", "network"])
def test_the_estimate_changes_a_self_conditioned_denoiser_and_not_a_plain_one(layer):
    t = torch.full((B,), 0.1)
    x, estimate = soft(1), soft(2)
    for self_conditioning in (True, False):
        model = denoiser(self_conditioning)
        if layer == "network":
            model = network_forward(model, None, torch.device("cpu"))
            assert model.self_conditioning is self_conditioning
        assert takes_self_condition(model) is self_conditioning
        none = model(x, t)
        zeros = model(x, t, self_condition=torch.zeros_like(estimate))
        given = model(x, t, self_condition=estimate)
        torch.testing.assert_close(zeros, none, rtol=0, atol=0)  # no estimate is the estimate 0
        assert (not torch.allclose(given, zeros)) is self_conditioning


def test_self_conditioning_has_its_own_projection_of_the_shared_embedding():
    model = denoiser(True)
    estimate = soft(2)
    expected = model.self_condition_proj(estimate @ model.embed)
    t = torch.full((B,), 0.1)
    h = model.final_hidden(soft(1), t, self_condition=estimate)
    h_plain = model.final_hidden(soft(1), t)
    assert h.shape == h_plain.shape and expected.shape == (B, L, 32)
    assert model.config()["self_conditioning"] is True
    assert "self_condition_proj" not in dict(denoiser(False).named_modules())
    with pytest.raises(ValueError, match="self_condition must be float probabilities"):
        model(soft(1), t, self_condition=torch.zeros(B, L + 1, V))
    with pytest.raises(ValueError, match="bidirectional"):
        Denoiser(V, n_layer=1, n_head=2, d_model=16, causal=True, self_conditioning=True)


@pytest.mark.parametrize("reads_posterior", [False, True])
@pytest.mark.parametrize("options", [{"sampler": "ode"}, {"sampler": "randomized"},
                                     {"sampler": "hybrid", "t_star": 0.1}])
def test_previous_feeds_every_sampler_the_previous_posterior_at_no_extra_call(options, reads_posterior):
    model = Recorder(reads_posterior)
    path = KLPath(V, t_max=0.3)
    steps = 5
    cond_mask = torch.zeros(2, L, dtype=torch.bool)
    cond_mask[:, :2] = True
    prompt = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(3))
    generate(model, path, 2, L, steps=steps, prompt=prompt, cond_mask=cond_mask,
             generator=torch.Generator().manual_seed(0), self_condition="previous", **options)
    assert len(model.seen) == steps + 1  # NFE unchanged
    assert model.seen[0] is None
    for seen, previous in zip(model.seen[1:], model.returned[:-1], strict=True):
        torch.testing.assert_close(seen, torch.softmax(previous, dim=-1), rtol=0, atol=0)


@pytest.mark.parametrize("options", [{"sampler": "ode"}, {"sampler": "randomized"},
                                     {"sampler": "hybrid", "t_star": 0.1}])
def test_recompute_feeds_each_call_the_estimate_of_a_first_call_at_the_same_x_t(options):
    model = Recorder(reads_posterior=True)
    path = KLPath(V, t_max=0.3)
    steps = 4
    generate(model, path, 2, L, steps=steps, generator=torch.Generator().manual_seed(0),
             self_condition="recompute", **options)
    assert len(model.seen) == 2 * (steps + 1)
    for first in range(0, len(model.seen), 2):
        assert model.seen[first] is None
        torch.testing.assert_close(model.inputs[first + 1], model.inputs[first], rtol=0, atol=0)
        torch.testing.assert_close(model.seen[first + 1], torch.softmax(model.returned[first], dim=-1),
                                   rtol=0, atol=0)


def test_recompute_is_the_default_counts_its_calls_and_adds_none_to_a_model_without_self_conditioning():
    path = KLPath(V, t_max=0.3)
    method = KLFlow(path, self_conditioned=True)
    assert method.nfe(3, L) == 2 * 4 and method.nfe(3, L, self_condition="previous") == 4
    method.generate(Recorder(), 2, L, 3, generator=torch.Generator().manual_seed(0))
    assert method.last_nfe == 2 * 4
    method.generate(Recorder(), 2, L, 3, generator=torch.Generator().manual_seed(0), self_condition="previous")
    assert method.last_nfe is None
    assert method.sample_settings()["self_condition"] == "recompute"
    plain = KLFlow(path)
    assert plain.nfe(3, L) == 4 and "self_condition" not in plain.sample_settings()
    exact = ExactPosterior(path, torch.softmax(torch.randn(V), 0).log())
    plain.generate(exact, 2, 1, 2, generator=torch.Generator().manual_seed(0), self_condition="recompute")
    assert plain.last_nfe is None
    with pytest.raises(KLFlowError, match="self_condition must be one of previous, recompute"):
        generate(exact, path, 2, 1, steps=2, self_condition="fresh")


def test_a_model_without_the_flag_never_gets_the_keyword():
    path = KLPath(V, t_max=0.3)
    exact = ExactPosterior(path, torch.softmax(torch.randn(V), 0).log())
    assert not takes_self_condition(exact)
    out = generate(exact, path, 2, 1, steps=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1)


@pytest.mark.parametrize("rate, passes", [(1.0, 2), (0.0, 1)])
def test_the_loss_feeds_a_detached_first_pass_on_a_fraction_of_batches(rate, passes):
    model = Recorder()
    path = KLPath(V, t_max=0.3)
    ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    path.loss(model, ids, generator=torch.Generator().manual_seed(2), self_condition_rate=rate)
    assert len(model.seen) == passes and model.seen[0] is None
    if passes == 2:
        torch.testing.assert_close(model.seen[1], torch.softmax(model.returned[0], dim=-1), rtol=0, atol=0)


def test_the_second_pass_alone_carries_gradients_and_the_rate_is_a_fraction_of_batches():
    model = denoiser(True).train()
    path = KLPath(V, t_max=0.3)
    ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    loss = path.loss(model, ids, generator=torch.Generator().manual_seed(2), self_condition_rate=1.0)
    loss.backward()
    assert torch.isfinite(loss) and model.self_condition_proj.weight.grad.abs().sum() > 0
    counts = []
    for seed in range(40):
        recorder = Recorder()
        path.loss(recorder, ids, generator=torch.Generator().manual_seed(seed), self_condition_rate=0.5)
        counts.append(len(recorder.seen))
    assert set(counts) == {1, 2} and 10 <= counts.count(2) <= 30


def test_validation_draws_the_rule_from_its_seeded_noise():
    model = denoiser(True)
    path = KLPath(V, t_max=0.3)
    batches = [(torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(i)), None) for i in range(4)]
    first = banded_validation(model, path, batches, torch.device("cpu"), self_condition_rate=0.5)
    assert banded_validation(model, path, batches, torch.device("cpu"), self_condition_rate=0.5) == first
    assert banded_validation(model, path, batches, torch.device("cpu"), self_condition_rate=1.0) != first


@pytest.mark.parametrize("overrides, message", [
    (['method.name="mdlm"'], "model.self_conditioning needs method.name='klflow'"),
    (['method.name="ar"'], "model.self_conditioning needs method.name='klflow'"),
    (['method.name="dirichlet"'], "model.self_conditioning needs method.name='klflow'"),
    (["train.self_condition_rate=1.5"], "train.self_condition_rate must lie in \\[0, 1\\]"),
])
def test_methods_without_self_conditioning_refuse_it(overrides, message):
    with pytest.raises(KLFlowError, match=message) as err:
        load_config("quickstart", ["model.self_conditioning=true", *overrides])
    assert "\n" not in str(err.value)


def test_a_self_conditioned_run_trains_records_reloads_and_samples(tiny_corpus, tmp_path):
    config = load_config("quickstart", [f"data.source={json.dumps(str(tiny_corpus))}", *TINY_OVERRIDES,
                                        "train.max_steps=3", "model.self_conditioning=true",
                                        'model.output="residual"'])
    result = train(config, tmp_path / "run", progress=False, log=lambda _: None)
    assert result.val_loss is not None and torch.isfinite(torch.tensor(result.val_loss))
    recorded = json.loads((result.checkpoint / "config.json").read_text())
    assert recorded["architecture"]["self_conditioning"] is True
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.model.self_conditioning and ckpt.experiment().model.self_conditioning
    for sampler in ("ode", "randomized", "hybrid"):
        texts, ids, _ = klflow.load(tmp_path / "run").sample(2, 3, sampler=sampler)
        assert len(texts) == 2 and ids.shape == (2, 16)


def test_a_checkpoint_from_before_the_option_loads_without_self_conditioning(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_corpus), "--out", str(run), "--train-steps", "2", "--no-progress",
                 *TINY_ARGS, "--set", "model.self_conditioning=false"]) == 0
    ckpt = load_checkpoint(checkpoint_without(run, tmp_path, "self_conditioning"))
    assert ckpt.model.self_conditioning is False and ckpt.experiment().model.self_conditioning is False


def test_the_switch_calibrations_feed_a_self_conditioned_model_as_the_sampler_does():
    path = KLPath(V, t_max=0.3)
    model = Recorder()
    entropy_along_ode(model, path, 2, L, steps=6)
    assert model.seen[0] is None and len(model.seen) > 1
    torch.testing.assert_close(model.seen[1], torch.softmax(model.returned[0], dim=-1), rtol=0, atol=0)
    for self_condition in ("recompute", "previous"):
        # The entropy is the posterior the sampler reads at the switch: the call given an estimate, not a first pass.
        model = Recorder()
        value = entropy_along_ode(model, path, 2, L, steps=6, t_star=0.2, self_condition=self_condition)
        assert model.seen[-1] is not None
        assert value == pytest.approx(mean_posterior_entropy(model.returned[-1]).mean().item(), rel=1e-6)
    model = Recorder()
    ids = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(1))
    entropy_on_data(model, path, [(ids, None)], generator=torch.Generator().manual_seed(2))
    assert len(model.seen) == 2 and model.seen[0] is None
    torch.testing.assert_close(model.seen[1], torch.softmax(model.returned[0], dim=-1), rtol=0, atol=0)
