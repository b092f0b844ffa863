import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import klflow.model as model_mod
from klflow.flow.exact import ExactPosterior
from klflow.flow.path import KLPath
from klflow.kv_cache import KVCache
from klflow.model import Denoiser, apply_rope, rope_tables, timestep_features

V, D, LAYERS, HEADS, B, L = 37, 32, 2, 2, 3, 9


def make(causal: bool = False, seed: int = 0, **kwargs) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(V, n_layer=LAYERS, n_head=HEADS, d_model=D, causal=causal, **kwargs)


def activate(model: Denoiser, std: float = 0.2) -> Denoiser:
    """Give the zero-initialised residual outputs weights, so positions and time interact."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.out.weight.normal_(0.0, std)
            block.mlp.down.weight.normal_(0.0, std)
    return model


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def times(seed: int = 2) -> torch.Tensor:
    return torch.rand(B, generator=torch.Generator().manual_seed(seed)) * 0.3


def soft(seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(B, L, V, generator=g), dim=-1)


@pytest.mark.parametrize("causal", [False, True])
def test_logits_shape_for_soft_and_id_input(causal: bool) -> None:
    m = make(causal)
    t = None if causal else times()
    assert m(soft(), t).shape == (B, L, V)
    assert m(ids(), t).shape == (B, L, V)


@pytest.mark.parametrize("causal", [False, True])
def test_one_hot_soft_input_equals_ids(causal: bool) -> None:
    m = activate(make(causal)).eval()
    x = ids()
    t = None if causal else times()
    one_hot = F.one_hot(x, V).float()
    torch.testing.assert_close(m(one_hot, t), m(x, t), rtol=1e-5, atol=1e-5)


def test_soft_input_is_probability_weighted_embedding() -> None:
    m = make()
    p = soft()
    expected = torch.einsum("blv,vd->bld", p, m.embed)
    torch.testing.assert_close(m._embed_tokens(p), expected)


def test_bidirectional_depends_on_time() -> None:
    m = activate(make()).eval()
    x = ids()
    a, b = m(x, torch.full((B,), 0.1)), m(x, torch.full((B,), 0.2))
    assert (a - b).abs().max() > 1e-3


def test_bidirectional_is_not_permutation_equivariant(monkeypatch: pytest.MonkeyPatch) -> None:
    m = activate(make()).eval()
    x, t = ids(), times()
    perm = torch.arange(L)
    perm[[1, 5]] = perm[[5, 1]]
    others = [k for k in range(L) if k not in (1, 5)]

    out, out_swapped = m(x, t), m(x[:, perm], t)
    assert (out_swapped[:, others] - out[:, perm][:, others]).abs().max() > 1e-3

    # Control: without RoPE attention is a set operation, so the same check finds equivariance.
    monkeypatch.setattr(model_mod, "apply_rope", lambda x, cos, sin: x)
    out, out_swapped = m(x, t), m(x[:, perm], t)
    torch.testing.assert_close(out_swapped, out[:, perm], rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)
    cos, sin = rope_tables(20, 8, 10000.0, torch.device("cpu"))
    rq = apply_rope(q.expand(1, 1, 20, 8), cos, sin)[0, 0]
    rk = apply_rope(k.expand(1, 1, 20, 8), cos, sin)[0, 0]
    torch.testing.assert_close(rq[3] @ rk[1], rq[15] @ rk[13])
    torch.testing.assert_close(rq[0], q)  # position 0 is not rotated
    torch.testing.assert_close(rq[7].norm(), q.norm())
    assert not torch.allclose(rq[3] @ rk[1], rq[3] @ rk[2])


def test_qk_norm_makes_attention_scale_invariant() -> None:
    m = activate(make()).eval()
    x, t = ids(), times()
    ref = m(x, t)
    with torch.no_grad():
        for block in m.blocks:
            block.attn.q.weight.mul_(7.0)
            block.attn.k.weight.mul_(3.0)
    torch.testing.assert_close(m(x, t), ref, rtol=0, atol=2e-4)


def test_mlp_is_relu_squared() -> None:
    mlp = activate(make()).blocks[0].mlp
    h = torch.randn(B, L, D)
    expected = F.relu(h @ mlp.up.weight.T).square() @ mlp.down.weight.T
    torch.testing.assert_close(mlp(h), expected)


def test_bidirectional_later_token_changes_earlier_logits() -> None:
    m = activate(make()).eval()
    x, t = ids(), times()
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % V
    assert (m(x, t)[:, 0] - m(y, t)[:, 0]).abs().max() > 1e-3


def test_causal_mask_and_no_time_needed() -> None:
    m = activate(make(causal=True)).eval()
    x = ids()
    j = 4
    y = x.clone()
    y[:, j] = (y[:, j] + 1) % V
    out_x, out_y = m(x), m(y)
    torch.testing.assert_close(out_x[:, :j], out_y[:, :j], rtol=0, atol=1e-6)
    assert (out_x[:, j:] - out_y[:, j:]).abs().amax(dim=-1).min() > 1e-4
    torch.testing.assert_close(m(x, times()), out_x)
    assert not hasattr(m, "time_mlp")


@pytest.mark.parametrize("causal", [False, True])
def test_zero_init_is_identity_residual_stream(causal: bool) -> None:
    m = make(causal)
    for block in m.blocks:
        assert torch.count_nonzero(block.attn.out.weight) == 0
        assert torch.count_nonzero(block.mlp.down.weight) == 0
        assert block.attn.q.weight.std().item() == pytest.approx(0.02, rel=0.2)
        assert block.mlp.up.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert m.embed.std().item() == pytest.approx(0.02, rel=0.2)
    assert m.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.2)

    x = ids()
    expected = m.lm_head(F.rms_norm(m.embed[x], (D,), eps=model_mod.NORM_EPS))
    torch.testing.assert_close(m(x, None if causal else times()), expected)


def test_gradients_reach_every_parameter_after_one_step() -> None:
    m = make()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x, t = soft(), times()
    target = ids(5)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(m(x, t).flatten(0, 1), target.flatten()).backward()
        opt.step()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) > 0, name


@pytest.mark.parametrize("causal", [False, True])
def test_config_rebuilds_identical_model(causal: bool) -> None:
    extra = {} if causal else {"input": "evidence", "path_beta": 0.05}
    m = activate(make(causal, mlp_ratio=3, rope_base=500.0, time_scale=10.0, **extra)).eval()
    cfg = m.config()
    assert set(cfg) == set(inspect.signature(Denoiser).parameters)
    clone = Denoiser(**cfg).eval()
    clone.load_state_dict(m.state_dict(), strict=True)
    t = None if causal else times()
    torch.testing.assert_close(clone(ids(), t), m(ids(), t), rtol=0, atol=0)
    if not causal:
        torch.testing.assert_close(clone(soft(), t), m(soft(), t), rtol=0, atol=0)


@pytest.mark.parametrize("d_model, n_head", [(30, 4), (12, 4)])
def test_bad_head_split_raises(d_model: int, n_head: int) -> None:
    with pytest.raises(ValueError, match="d_model|head dim"):
        Denoiser(V, n_layer=1, n_head=n_head, d_model=d_model)


def test_bad_time_raises() -> None:
    m = make()
    with pytest.raises(ValueError, match="needs a time"):
        m(ids())
    with pytest.raises(ValueError, match="shape"):
        m(ids(), torch.rand(B, 1))
    with pytest.raises(ValueError, match="shape"):
        m(ids(), torch.rand(B + 1))


def test_bad_input_shape_raises() -> None:
    m = make()
    with pytest.raises(ValueError, match="soft input"):
        m(torch.rand(B, L, V + 1), times())
    with pytest.raises(ValueError, match="token ids"):
        m(ids()[:, :, None], times())


def test_dropout_only_in_training() -> None:
    m = activate(make(dropout=0.5))
    x, t = ids(), times()
    m.eval()
    torch.testing.assert_close(m(x, t), m(x, t), rtol=0, atol=0)
    m.train()
    assert (m(x, t) - m(x, t)).abs().max() > 1e-4


def test_timestep_features_formula() -> None:
    s = torch.tensor([0.0, 3.0, 250.0])
    feats = timestep_features(s)
    assert feats.shape == (3, 256)
    for i in (0, 1, 64, 127):
        f = math.exp(-math.log(10000.0) * i / 128)
        torch.testing.assert_close(feats[:, i], torch.cos(s * f))
        torch.testing.assert_close(feats[:, 128 + i], torch.sin(s * f))


def test_time_scale_multiplies_t() -> None:
    t = times()
    a = make(time_scale=1000.0)
    b = make(time_scale=1.0)
    torch.testing.assert_close(a._embed_time(t, B), b._embed_time(t * 1000.0, B))


def test_num_parameters() -> None:
    m = make()
    r = m.mlp_ratio
    blocks = LAYERS * (4 * D * D + 2 * r * D * D)
    time_mlp = 256 * D + D + D * D + D
    assert m.num_parameters() == 2 * V * D + time_mlp + blocks
    assert m.num_parameters(exclude_embeddings=True) == V * D + time_mlp + blocks
    assert make(causal=True).num_parameters() == 2 * V * D + blocks


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_autocast_runs_finite(causal: bool) -> None:
    m = activate(make(causal))
    t = None if causal else times()
    ref = m(soft(), t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_soft = m(soft(), t)
        out_ids = m(ids(), t)
    assert torch.isfinite(out_soft).all() and torch.isfinite(out_ids).all()
    assert out_soft.shape == out_ids.shape == (B, L, V)
    torch.testing.assert_close(out_soft.float(), ref, rtol=0.1, atol=0.1)
    out_soft.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_model_cast_to_bf16_runs() -> None:
    m = activate(make()).to(torch.bfloat16)
    out = m(soft(), times())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("chunks", [[1] * L, [3, 1, 1, 4], [L], [2, 5, 2]])
def test_kv_cache_decoding_equals_full_causal_forward(chunks: list[int]) -> None:
    m = activate(make(causal=True)).eval()
    x = ids()
    full = m(x)
    cache, outs, start = KVCache(), [], 0
    for size in chunks:
        outs.append(m(x[:, start : start + size], cache=cache))
        start += size
        assert cache.length == start
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)
    assert len(cache.keys) == LAYERS and cache.keys[0].shape == (B, HEADS, L, D // HEADS)


def test_kv_cache_survives_checkpoint_rebuild() -> None:
    m = activate(make(causal=True)).eval()
    clone = Denoiser(**m.config()).eval()
    clone.load_state_dict(m.state_dict(), strict=True)
    x = ids()
    cache = KVCache()
    clone(x[:, :4], cache=cache)
    torch.testing.assert_close(clone(x[:, 4:5], cache=cache)[:, 0], m(x)[:, 4], rtol=1e-5, atol=1e-5)


def test_kv_cache_under_bf16_autocast_is_close() -> None:
    m = activate(make(causal=True)).eval()
    x = ids()
    cache = KVCache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.cat([m(x[:, :5], cache=cache), m(x[:, 5:6], cache=cache), m(x[:, 6:], cache=cache)], dim=1)
    assert cache.keys[0].dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), m(x), rtol=0.1, atol=0.1)


def test_kv_cache_needs_causal_model() -> None:
    with pytest.raises(ValueError, match="causal"):
        make()(ids(), times(), cache=KVCache())


def evidence_model(vocab_size: int = V, beta: float = 0.01) -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(vocab_size, n_layer=1, n_head=HEADS, d_model=D, input="evidence", path_beta=beta)


def test_evidence_input_is_the_closed_form_single_token_posterior() -> None:
    path = KLPath(V, beta=0.01, t_max=0.4)
    t = torch.tensor([0.05, 0.2, 0.38])
    x_t = path.sample_x_t(ids(), t, torch.Generator().manual_seed(0))
    q = evidence_model().evidence(x_t, t)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q.double(), torch.softmax(path.log_evidence(x_t.log(), t), -1), rtol=0, atol=2e-5)
    # the same numbers as the exactness toy's posterior for a single position under a uniform prior
    exact = ExactPosterior(path, torch.full((V,), 1.0 / V, dtype=torch.float64))
    torch.testing.assert_close(q[:, :1].double(), exact(x_t[:, :1], t).exp(), rtol=0, atol=2e-5)


def test_evidence_matches_brute_force_posterior_for_two_tokens() -> None:
    """V = 2: the logit difference d = (1 - t)(log E_0 - log E_1) +- t (a - b) has a logistic
    noise term, so p(k | d) follows from the logistic density, independently of appendix B."""
    beta, t = 0.2, 0.3
    path = KLPath(2, beta=beta, t_max=0.5)
    d = torch.linspace(-3.0, 3.0, 13, dtype=torch.float64)
    x = torch.stack([torch.sigmoid(d), torch.sigmoid(-d)], -1).unsqueeze(0)  # [1, 13, 2] with log x0 - log x1 = d

    def logistic_density(z):
        return torch.exp(-z) / (1 + torch.exp(-z)) ** 2

    shift = t * path.logit_gap
    like = torch.stack([logistic_density((d - shift) / (1 - t)), logistic_density((d + shift) / (1 - t))], -1)
    q = evidence_model(2, beta).evidence(x.float(), torch.tensor([t]))
    torch.testing.assert_close(q[0].double(), like / like.sum(-1, keepdim=True), rtol=0, atol=1e-5)


def test_evidence_passes_given_one_hots_and_is_uninformative_at_t_zero() -> None:
    m = evidence_model()
    x = soft()
    x[:, 2] = F.one_hot(torch.tensor(5), V).float()
    q = m.evidence(x, torch.zeros(B))
    assert torch.equal(q[:, 2], x[:, 2])
    torch.testing.assert_close(q[:, 3], torch.full((B, V), 1.0 / V))


def test_evidence_is_fp32_under_bf16_autocast_and_feeds_the_embedding() -> None:
    m = activate(evidence_model())
    x, t = soft(), times()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = m.evidence(x, t)
        logits = m(x, t)
    assert q.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.testing.assert_close(q, m.evidence(x, t))
    torch.testing.assert_close(m._embed_tokens(x, t), m.evidence(x, t) @ m.embed)
    simplex = Denoiser(**(m.config() | {"input": "simplex", "path_beta": None}))
    simplex.load_state_dict(m.state_dict())
    assert not torch.allclose(simplex(x, t), m(x, t))


def test_a_posterior_given_skips_the_transform_and_only_an_evidence_model_takes_one() -> None:
    m = activate(evidence_model())
    x, t = soft(), times()
    torch.testing.assert_close(m(m.evidence(x, t), t, posterior=True), m(x, t))
    with pytest.raises(ValueError, match="posterior=True needs soft input to a Denoiser with input='evidence'"):
        make()(x, t, posterior=True)
    with pytest.raises(ValueError, match="posterior=True needs soft input"):
        m(ids(), t, posterior=True)


def test_evidence_needs_path_beta_and_a_bidirectional_model() -> None:
    with pytest.raises(ValueError, match="input must be one of"):
        Denoiser(V, input="logits")
    with pytest.raises(ValueError, match="path_beta"):
        Denoiser(V, input="evidence", path_beta=1.5)
    # Without path_beta (a simplex flow computes its own path's q) it takes q only.
    m = Denoiser(V, n_layer=1, n_head=HEADS, d_model=D, input="evidence")
    x, t = torch.softmax(torch.randn(2, 3, V), -1), torch.rand(2)
    assert m(x, t, posterior=True).shape == (2, 3, V)
    with pytest.raises(ValueError, match="no path_beta: pass q"):
        m(x, t)
    with pytest.raises(ValueError, match="bidirectional"):
        Denoiser(V, input="evidence", path_beta=0.01, causal=True)


@pytest.mark.parametrize("code, env, expected", [
    ("import klflow", {}, "1"),
    ("import klflow", {"THP_MEM_ALLOC_ENABLE": "0"}, "0"),
    ("import torch, klflow", {}, None),
])
def test_klflow_asks_torch_for_huge_pages_only_when_it_loads_torch_and_the_user_has_not_chosen(code, env, expected):
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", f"{code}; import os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"],
                         env={**base, **env}, capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(expected)
