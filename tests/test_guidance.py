"""Classifier-free guidance for klflow: condition dropout in training (train.condition_dropout) and the
guided sampler (SamplerOptions.guidance, `--guidance W`)."""

import pytest
import torch

from klflow.cli import build_parser
from klflow.config import Config, load_config
from klflow.errors import KLFlowError
from klflow.flow import KLPath
from klflow.flow.sampler import KLFlowSampler, SamplerOptions, posterior_logits
from klflow.methods import SpecialTokens, absorbing, build_method
from klflow.methods.base import check_sample_options
from klflow.model import Denoiser
from klflow.sampling import guided_logits

V, L, B = 16, 8, 3
SPECIALS = SpecialTokens(eot=0, pad=1, mask=2)


def given_positions() -> tuple[torch.Tensor, torch.Tensor]:
    prompt = torch.randint(3, V, (B, L), generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(B, L, dtype=torch.bool)
    cond[:, :3] = True
    cond[:, 6] = True
    return prompt, cond


class Recorder:
    """A model that records every input and returns fixed logits: `given_logits` when the given positions
    hold one-hots, `hidden_logits` when they hold the simplex's centre."""

    def __init__(self, cond: torch.Tensor) -> None:
        self.cond = cond
        self.inputs: list[torch.Tensor] = []
        self.given_logits = torch.randn(B, L, V, generator=torch.Generator().manual_seed(1))
        self.hidden_logits = torch.randn(B, L, V, generator=torch.Generator().manual_seed(2))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        self.inputs.append(x.clone())
        return (self.hidden_logits if self.hidden(x) else self.given_logits).clone()

    def hidden(self, x: torch.Tensor) -> bool:
        return torch.allclose(x[self.cond], torch.full_like(x[self.cond], 1.0 / V))

    def hidden_calls(self) -> list[bool]:
        return [self.hidden(x) for x in self.inputs]


def tiny_network() -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(V, n_layer=1, n_head=2, d_model=16).eval()


@pytest.mark.parametrize("sampler", ["ode", "randomized", "hybrid"])
def test_zero_guidance_is_todays_sampler(sampler):
    method = build_method("klflow", Config(), V, SPECIALS)
    prompt, cond = given_positions()
    runs = [method.generate(tiny_network(), B, L, 4, prompt=prompt, cond_mask=cond,
                            generator=torch.Generator().manual_seed(3), sampler=sampler, **extra)
            for extra in ({}, {"guidance": 0.0})]
    assert torch.equal(runs[0], runs[1])
    assert method.last_nfe is None and method.nfe(4, L) == 5


def test_each_guided_step_makes_one_conditional_and_one_unconditional_call():
    method = build_method("klflow", Config(), V, SPECIALS)
    prompt, cond = given_positions()
    model = Recorder(cond)
    out = method.generate(model, B, L, 4, prompt=prompt, cond_mask=cond, generator=torch.Generator().manual_seed(3),
                          guidance=1.5)
    assert model.hidden_calls() == [False, True] * 5  # 4 steps and the read-out
    assert method.last_nfe == 10
    assert torch.equal(out[cond], prompt[cond])
    one_hots = torch.nn.functional.one_hot(prompt, V).float()
    assert torch.equal(model.inputs[0][cond], one_hots[cond])


def test_zero_guidance_makes_one_call_per_step():
    prompt, cond = given_positions()
    model = Recorder(cond)
    KLFlowSampler(KLPath(V), SamplerOptions()).sample(model, B, L, 4, prompt, cond, torch.Generator().manual_seed(3))
    assert model.hidden_calls() == [False] * 5


@pytest.mark.parametrize("weight", [1.0, -0.5, 3.0])
def test_guided_logits_follow_the_formula(weight):
    prompt, cond = given_positions()
    model = Recorder(cond)
    path = KLPath(V)
    l = path.sample_source_logits((B, L, V), torch.Generator().manual_seed(4))
    logits = posterior_logits(model, path, l, 0.1, prompt, cond, (), guidance=weight)
    expected = model.given_logits + weight * (model.given_logits - model.hidden_logits)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.equal(guided_logits(torch.ones(2), torch.zeros(2), 0.0), torch.ones(2))


@pytest.mark.parametrize("evidence", [False, True])
@pytest.mark.parametrize("rate, hidden", [(1.0, True), (0.0, False)])
def test_condition_dropout_hides_given_positions_in_training(rate, hidden, evidence):
    prompt, cond = given_positions()
    model = Recorder(cond)
    model.input = "evidence" if evidence else "simplex"
    path = KLPath(V)
    t = torch.full((B,), 0.1)
    path.position_losses(model, prompt, t, cond, torch.Generator().manual_seed(5), condition_dropout=rate)
    (x,) = model.inputs
    uniform = torch.full_like(x[cond], 1.0 / V)
    assert torch.allclose(x[cond], uniform) is hidden
    if not hidden:
        assert torch.equal(x[cond], torch.nn.functional.one_hot(prompt, V).float()[cond])


def test_zero_condition_dropout_is_todays_loss():
    prompt, cond = given_positions()
    path = KLPath(V)
    t = torch.full((B,), 0.1)
    losses = [path.position_losses(tiny_network(), prompt, t, cond, torch.Generator().manual_seed(5), **extra)
              for extra in ({}, {"condition_dropout": 0.0})]
    assert torch.equal(losses[0], losses[1])


def test_condition_dropout_reaches_the_method_from_the_config():
    config = load_config(None, ["data.layout=pairs", "train.condition_dropout=0.2"])
    method = build_method("klflow", config, V, SPECIALS)
    assert method.condition_dropout == 0.2
    assert build_method("klflow", Config(), V, SPECIALS).condition_dropout == 0.0


def test_guidance_is_recorded_only_when_set():
    method = build_method("klflow", Config(), V, SPECIALS)
    assert "guidance" not in method.sample_settings()
    assert method.sample_settings(guidance=2.0)["guidance"] == 2.0


@pytest.mark.parametrize("overrides, message", [
    (["train.condition_dropout=0.1"], "data.layout among pairs, infill"),
    (["data.layout=pairs", "train.condition_dropout=1.5"], "must lie in [0, 1]"),
    (["data.layout=pairs", "method.name=sedd", "train.condition_dropout=0.1"], "needs method.name among klflow, mdlm, dfm"),
])
def test_bad_condition_dropout_is_refused(overrides, message):
    with pytest.raises(KLFlowError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, overrides)


def test_bad_guidance_is_refused():
    method = build_method("klflow", Config(), V, SPECIALS)
    with pytest.raises(KLFlowError, match="--guidance needs given positions"):
        method.generate(tiny_network(), B, L, 2, guidance=1.0)
    with pytest.raises(KLFlowError, match="guidance must be a finite number"):
        SamplerOptions(guidance=float("nan"))


class MaskRecorder(Recorder):
    """A token model that records its inputs and returns fixed logits, one set when the given positions show
    their tokens and another when they show the mask."""

    def hidden(self, x: torch.Tensor) -> bool:
        return bool((x[self.cond] == SPECIALS.mask).all())


@pytest.mark.parametrize("name", ["mdlm", "dfm"])
def test_masked_methods_zero_guidance_is_todays_sampler(name):
    method = build_method(name, Config(), V, SPECIALS)
    prompt, cond = given_positions()
    runs = [method.generate(tiny_network(), B, L, 4, prompt=prompt, cond_mask=cond,
                            generator=torch.Generator().manual_seed(3), **extra) for extra in ({}, {"guidance": 0.0})]
    assert torch.equal(runs[0], runs[1])
    assert "guidance" not in method.sample_settings()
    assert method.sample_settings(guidance=2.0)["guidance"] == 2.0


@pytest.mark.parametrize("name", ["mdlm", "dfm"])
def test_masked_methods_guided_calls_and_formula(name):
    method = build_method(name, Config(), V, SPECIALS)
    prompt, cond = given_positions()
    model = MaskRecorder(cond)
    out = method.generate(model, B, L, 4, prompt=prompt, cond_mask=cond, generator=torch.Generator().manual_seed(3),
                          guidance=2.0, **({"cache": False} if name == "mdlm" else {}))
    hidden = [model.hidden(x) for x in model.inputs]
    assert hidden == [False, True] * (len(hidden) // 2) and len(hidden) == method.last_nfe
    assert torch.equal(out[cond], prompt[cond])
    logits = absorbing.call_model(model, model.inputs[0], 0.5, (), cond, SPECIALS.mask, 2.0)
    assert torch.allclose(logits, model.given_logits + 2.0 * (model.given_logits - model.hidden_logits), atol=1e-5)


@pytest.mark.parametrize("rate, hidden", [(1.0, True), (0.0, False)])
def test_masked_condition_dropout_hides_given_positions(rate, hidden):
    prompt, cond = given_positions()
    x_t, masked = absorbing.corrupt(prompt, torch.full((B,), 0.5), cond, SPECIALS.mask,
                                    torch.Generator().manual_seed(0), rate)
    assert bool((x_t[cond] == SPECIALS.mask).all()) is hidden
    assert not masked[cond].any()
    if not hidden:
        assert torch.equal(x_t[cond], prompt[cond])


def test_masked_methods_refuse_guidance_without_a_prompt():
    with pytest.raises(KLFlowError, match="--guidance needs given positions"):
        build_method("mdlm", Config(), V, SPECIALS).generate(tiny_network(), B, L, 2, guidance=1.0)


def test_ar_refuses_guidance():
    with pytest.raises(KLFlowError, match="method 'ar' does not take the sampling option.s. guidance"):
        check_sample_options(build_method("ar", Config(), V, SPECIALS), {"guidance": 1.0})


@pytest.mark.parametrize("command", [["sample", "runs/x", "--prompt", "Hi"], ["infill", "runs/x", "a <|hole:2|> b"]])
def test_cli_takes_the_guidance_flag(command):
    assert build_parser().parse_args([*command, "--guidance", "1.5"]).guidance == 1.5
    assert build_parser().parse_args(command).guidance is None  # unset: the method's default
