"""The residual output: logits = log q(x_t, t) + the network's, so the network models what the context adds."""

import json

import pytest
import torch
from conftest import TINY_OVERRIDES, checkpoint_without, overfit

from klflow.checkpoint import load_checkpoint
from klflow.config import load_config
from klflow.errors import KLFlowError
from klflow.flow.path import KLPath
from klflow.model import Denoiser
from klflow.runtime import build_optimizers, network_forward
from klflow.sampling import clamp_one_hot
from klflow.train import train

V, B, L = 29, 3, 10


def residual(seed: int = 0, **kwargs) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(V, n_layer=2, n_head=2, d_model=32, input="evidence", path_beta=0.01, output="residual", **kwargs)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g), torch.rand(B, generator=g) * 0.3


def test_a_fresh_residual_model_returns_log_q_so_its_posterior_is_q():
    model = residual()
    assert torch.count_nonzero(model.lm_head.weight) == 0  # the residual starts at zero
    ids, t = batch()
    path = KLPath(V)
    q = path.sample_posterior(ids, t, torch.Generator().manual_seed(2))
    logits = model(q, t, posterior=True)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, q.clamp_min(torch.finfo(torch.float32).tiny).log())
    torch.testing.assert_close(torch.softmax(logits, dim=-1), q, rtol=1e-5, atol=1e-7)
    # x_t itself: the model computes the same q from it
    x = path.sample_x_t(ids, t, torch.Generator().manual_seed(2))
    torch.testing.assert_close(torch.softmax(model(x, t), dim=-1), q, rtol=1e-4, atol=1e-6)


def test_the_residual_is_added_to_log_q():
    model = residual()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.1)
    ids, t = batch()
    q = KLPath(V).sample_posterior(ids, t, torch.Generator().manual_seed(2))
    plain_head = model.lm_head(model.final_hidden(q, t, posterior=True))
    torch.testing.assert_close(model(q, t, posterior=True), plain_head + Denoiser.evidence_logits(q))


def test_gradients_are_finite_with_one_hot_given_positions():
    model = residual()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.1)
    ids, t = batch()
    cond_mask = torch.zeros(B, L, dtype=torch.bool)
    cond_mask[:, :4] = True
    path = KLPath(V)
    loss = path.loss(model, ids, cond_mask, torch.Generator().manual_seed(3), t=t)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the exact one-hots themselves: log 0 is floored, never -inf
    q = clamp_one_hot(path.sample_posterior(ids, t), ids, cond_mask)
    assert torch.isfinite(model(q, t, posterior=True)).all()


def test_under_bf16_autocast_the_residual_logits_are_fp32_and_finite():
    ids, t = batch()
    q = KLPath(V).sample_posterior(ids, t)
    forward = network_forward(residual(), torch.bfloat16, torch.device("cpu"))
    logits = forward(q, t, posterior=True)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_a_residual_model_learns_one_batch():
    path = KLPath(V, t_max=0.4)
    model = residual()
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(0))
    (opt,) = build_optimizers(model, 3e-3, 0.02, [0.9, 0.95], 0.0, "adamw")
    start, end = overfit(path, model, ids, opt, 100, eval_t=torch.full((4,), 0.35))
    assert end < 0.7 * start


@pytest.mark.parametrize("kwargs, message", [
    ({"input": "simplex"}, "output='residual' adds log q"),
    ({"output": "logits"}, "output must be one of plain, residual"),
])
def test_the_denoiser_refuses_what_the_residual_output_cannot_use(kwargs, message):
    settings = {"input": "evidence", "path_beta": 0.01, "output": "residual", **kwargs}
    with pytest.raises(ValueError, match=message):
        Denoiser(V, n_layer=1, n_head=2, d_model=16, **settings)
    with pytest.raises(ValueError, match="causal"):
        Denoiser(V, n_layer=1, n_head=2, d_model=16, causal=True, input="evidence", output="residual")
    with pytest.raises(ValueError, match="not token ids"):
        residual()(torch.zeros(B, L, dtype=torch.long), torch.zeros(B))


@pytest.mark.parametrize("overrides, message", [
    (['model.output="residual"', 'model.input="simplex"'], "set model.input='evidence'"),
    (['model.output="residual"', 'method.name="ar"'], "set model.input='evidence'"),
    (['model.output="residual"', 'method.name="mdlm"'], "set model.input='evidence'"),
    (['model.output="gated"'], "model.output must be one of plain, residual"),
])
def test_the_config_refuses_the_residual_output_where_it_cannot_apply(overrides, message):
    with pytest.raises(KLFlowError, match=message) as err:
        load_config("quickstart", overrides)
    assert "\n" not in str(err.value)


def test_the_residual_output_trains_records_and_reloads(tiny_corpus, tmp_path):
    config = load_config("quickstart", [f"data.source={json.dumps(str(tiny_corpus))}", *TINY_OVERRIDES,
                                        "train.max_steps=3", 'model.output="residual"'])
    result = train(config, tmp_path / "run", progress=False, log=lambda _: None)
    config_file = result.checkpoint / "config.json"
    recorded = json.loads(config_file.read_text())
    assert recorded["architecture"]["output"] == "residual" and recorded["experiment"]["model"]["output"] == "residual"
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.model.output == "residual" and ckpt.experiment().model.output == "residual"
    vocab = ckpt.tokenizer.vocab_size
    x = torch.softmax(torch.randn(2, 16, vocab), -1)
    t = torch.tensor([0.05, 0.2])
    fresh = Denoiser(**recorded["architecture"])
    fresh.load_state_dict(ckpt.model.state_dict())
    assert torch.equal(ckpt.model(x, t), fresh.eval()(x, t))


def test_a_checkpoint_from_before_the_option_loads_with_the_plain_output(tiny_run, tmp_path):
    ckpt = load_checkpoint(checkpoint_without(tiny_run, tmp_path, "output"))
    assert ckpt.model.output == "plain" and ckpt.experiment().model.output == "plain"
