"""The discrete baselines (ar, mdlm, dfm, sedd), checked against exact toy posteriors and hand-computed losses.

For a factorised toy distribution (independent positions) the exact p(x0 | x_t) at a masked
position is that position's marginal, whatever t and the other positions: a perfect "model" needs
no network, and every absorbing sampler must reproduce the marginals exactly. Any unmasking
schedule does that, so the schedules are checked on a correlated toy (Correlated): there a step that
unmasks several positions draws them independently, and the sampler's law at a few steps depends
on how many it unmasks when; it is computed exactly by enumeration (sampler_law) from each method's
forward process.
"""
import itertools

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_OVERRIDES
from klflow.cli import main
from klflow.config import Config, load_config
from klflow.errors import KLFlowError
from klflow.methods import SpecialTokens, build_method
from klflow.methods.autoregressive import filter_logits, rearrange
from klflow.methods.absorbing import T_MIN
from klflow.model import Denoiser
from klflow.train import train

V, L = 8, 4
SPECIALS = SpecialTokens(eot=5, pad=6, mask=7)  # ids 0..5 can be emitted
MASKED_METHODS = ("mdlm", "dfm", "sedd")
TV_TOLERANCE = 0.04  # 4000 samples over 6 tokens: expected TV ~0.014, sd ~0.005


def marginals(seed: int = 0) -> torch.Tensor:
    """Per-position distributions [L, V] over the emittable ids, zero on pad and mask."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(L, V, generator=g, dtype=torch.float64) ** 2
    p[:, [SPECIALS.pad, SPECIALS.mask]] = 0.0
    return p / p.sum(-1, keepdim=True)


class Factorised:
    """model(x, t) -> log p(x0 | x_t) of independent positions: the marginals, for any x_t and t.

    Records every call; `shift` is added to the logits (SEDD's exact score needs + log(V - 1)).
    """

    def __init__(self, probs: torch.Tensor, shift: float = 0.0) -> None:
        self.logits = probs.log().float() + shift
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.inputs.append((x.clone(), t.clone()))
        return self.logits[: x.shape[1]].expand(x.shape[0], -1, -1).clone()


def exact_model(name: str, probs: torch.Tensor) -> Factorised:
    return Factorised(probs, math.log(V - 1) if name == "sedd" else 0.0)


def method(name: str):
    return build_method(name, Config(), V, SPECIALS)


def total_variation(samples: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Per-position TV distance [L] between the empirical distribution of samples [N, L] and probs [L, V]."""
    counts = F.one_hot(samples, V).double().mean(0)
    return 0.5 * (counts - probs).abs().sum(-1)


# Exact posteriors -> exact marginals

@pytest.mark.parametrize("name, steps, options", [
    ("mdlm", 3, {}), ("mdlm", 16, {}), ("mdlm", 16, {"cache": False}),
    ("dfm", 1, {}), ("dfm", 2, {}), ("dfm", 4, {}), ("dfm", 8, {}),
    ("sedd", 3, {}), ("sedd", 16, {}),
])
def test_exact_posterior_reproduces_marginals(name, steps, options):
    # Any number of steps is exact here: the positions are independent, so each one ends as a
    # draw from its exact posterior, the marginal.
    probs = marginals()
    out = method(name).generate(exact_model(name, probs), 4000, L, steps, generator=torch.Generator().manual_seed(0),
                                **options)
    assert out.shape == (4000, L)
    assert total_variation(out, probs).max() < TV_TOLERANCE


# Correlated toy: the joint, through the exact finite-step law of each sampler

TOKENS = 3  # the toy's sequences use ids 0..2 only
TOY_LEN = 3
SEQUENCES = torch.tensor(list(itertools.product(range(TOKENS), repeat=TOY_LEN)))  # [27, 3], row-major
# Mostly constant sequences: the positions are strongly dependent (a product of marginals is far off).
TOY_JOINT = torch.tensor([8.0 if len(set(s.tolist())) == 1 else 0.3 for s in SEQUENCES], dtype=torch.float64)
TOY_JOINT /= TOY_JOINT.sum()


class Correlated:
    """model(x, t) -> log p(x0_l | x_t) [B, L, V] of TOY_JOINT by enumeration: the joint restricted to the
    sequences that agree with x_t's unmasked positions, marginalised per position (independent of t:
    masking is independent of the tokens). `shift` as in Factorised."""

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = shift

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.posterior(x).clamp_min(1e-30).log().float() + self.shift

    @staticmethod
    def posterior(x: torch.Tensor) -> torch.Tensor:
        agrees = ((x[:, None, :] == SPECIALS.mask) | (x[:, None, :] == SEQUENCES[None])).all(-1)  # [B, 27]
        weights = agrees * TOY_JOINT
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros(x.shape[0], TOY_LEN, V, dtype=torch.float64)
        for j in range(TOY_LEN):
            out[:, j].index_add_(1, SEQUENCES[:, j], weights)
        return out


def sampler_law(moves: list[float]) -> torch.Tensor:
    """The exact law [27] (over SEQUENCES) of an absorbing sampler with the exact posterior of TOY_JOINT:
    at step n each masked position unmasks with probability moves[n], independently, to a draw from
    its posterior given the state before the step. By enumeration over the 4^3 states."""
    states = {(SPECIALS.mask,) * TOY_LEN: 1.0}
    for move in moves:
        after: dict[tuple[int, ...], float] = {}
        for state, mass in states.items():
            posterior = Correlated.posterior(torch.tensor([state]))[0]
            masked = [j for j in range(TOY_LEN) if state[j] == SPECIALS.mask]
            choices = [[(SPECIALS.mask, 1.0 - move)] + [(y, move * float(posterior[j, y])) for y in range(TOKENS)]
                       if j in masked else [(state[j], 1.0)] for j in range(TOY_LEN)]
            for combination in itertools.product(*choices):
                p = mass * math.prod(q for _, q in combination)
                if p > 0:
                    key = tuple(y for y, _ in combination)
                    after[key] = after.get(key, 0.0) + p
        states = after
    assert all(SPECIALS.mask not in state for state in states)
    index = {tuple(s.tolist()): i for i, s in enumerate(SEQUENCES)}
    law = torch.zeros(len(SEQUENCES), dtype=torch.float64)
    for state, mass in states.items():
        law[index[state]] += mass
    return law


def reverse_moves(steps: int) -> list[float]:
    """mdlm / sedd: (alpha_s - alpha_t) / (1 - alpha_t) with alpha_t = 1 - t, t = 1 - n / steps, s = t - 1 / steps."""
    alpha = lambda t: 1.0 - t
    return [(alpha(1 - (n + 1) / steps) - alpha(1 - n / steps)) / (1.0 - alpha(1 - n / steps)) for n in range(steps)]


def jump_moves(steps: int) -> list[float]:
    """dfm: the Euler jump min(1, kappa'(t) h / (1 - kappa(t))), kappa(t) = 1 - (1 - t)^2, t = n / steps."""
    h = 1.0 / steps
    return [min(1.0, (2 - 2 * n * h) * h / (1 - n * h) ** 2) for n in range(steps)]


@pytest.mark.parametrize("name, steps, options", [
    ("mdlm", 2, {}), ("mdlm", 4, {}), ("mdlm", 4, {"cache": False}), ("dfm", 3, {"readout": "sample"}),
    ("dfm", 5, {"readout": "sample"}), ("sedd", 2, {}), ("sedd", 4, {}),
])
def test_exact_posterior_of_a_correlated_toy_gives_the_samplers_exact_joint(name, steps, options):
    """20000 samples against the enumerated law of the method's schedule (sampling noise ~0.02 TV); the
    law differs from the joint, from its product of marginals and from the other family's schedule."""
    moves = jump_moves(steps) if name == "dfm" else reverse_moves(steps)
    law = sampler_law(moves)
    out = method(name).generate(Correlated(math.log(V - 1) if name == "sedd" else 0.0), 20000, TOY_LEN, steps,
                                generator=torch.Generator().manual_seed(0), **options)
    assert (out < TOKENS).all()
    empirical = torch.bincount((out * torch.tensor([TOKENS ** 2, TOKENS, 1])).sum(-1), minlength=len(SEQUENCES)) / 20000
    assert 0.5 * (empirical - law).abs().sum() < 0.035
    marginals = [torch.zeros(TOKENS, dtype=torch.float64).index_add_(0, SEQUENCES[:, j], TOY_JOINT) for j in range(TOY_LEN)]
    product = math.prod(marginals[j][SEQUENCES[:, j]] for j in range(TOY_LEN))
    other = sampler_law(reverse_moves(steps) if name == "dfm" else jump_moves(steps))
    for far in (TOY_JOINT, product, other):
        assert 0.5 * (law - far).abs().sum() > 0.1


def test_dfm_argmax_readout_takes_the_mode():
    probs = marginals()
    dfm = method("dfm")
    # steps=2: the jump probability is min(1, 2/(steps - n)) = 1 at n = 0, so the read-out is the only step.
    out = dfm.generate(exact_model("dfm", probs), 50, L, 2, generator=torch.Generator().manual_seed(0),
                       readout="argmax")
    assert (out == probs.argmax(-1)).all() and dfm.last_nfe == 1 == dfm.nfe(2, L)
    # Many steps: almost every position jumps by a draw before the read-out, so marginals hold.
    out = dfm.generate(exact_model("dfm", probs), 4000, L, 64, generator=torch.Generator().manual_seed(1),
                       readout="argmax")
    assert total_variation(out, probs).max() < TV_TOLERANCE and dfm.last_nfe <= dfm.nfe(64, L) == 63


def test_mdlm_cache_skips_calls_without_changing_samples():
    probs, mdlm = marginals(), method("mdlm")
    cached, plain = exact_model("mdlm", probs), exact_model("mdlm", probs)
    a = mdlm.generate(cached, 6, L, 64, generator=torch.Generator().manual_seed(5))
    nfe_cached = mdlm.last_nfe
    b = mdlm.generate(plain, 6, L, 64, generator=torch.Generator().manual_seed(5), cache=False)
    # The exact posterior does not depend on t, so reusing it is exact and the draws coincide.
    assert torch.equal(a, b)
    # One call, then one after each step that changed a token and left some mask: at most 6 * L.
    assert nfe_cached == len(cached.inputs) <= 6 * L < 64 and mdlm.nfe(64, L) == 64
    assert mdlm.last_nfe == len(plain.inputs) > nfe_cached
    assert all(not torch.equal(x1, x2) for (x1, _), (x2, _) in zip(cached.inputs, cached.inputs[1:]))


def noisy_denoiser(time_conditioning: bool) -> Denoiser:
    """A tiny bidirectional Denoiser with every parameter drawn at random (its init zeroes the blocks' outputs)."""
    torch.manual_seed(0)
    model = Denoiser(V, n_layer=1, n_head=2, d_model=16, time_conditioning=time_conditioning)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def test_time_independent_denoiser_ignores_t_and_makes_mdlm_cache_exact():
    ids = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(0))
    t0, t1 = torch.full((3,), 0.1), torch.full((3,), 0.9)
    reads_t, ignores_t = noisy_denoiser(True), noisy_denoiser(False)
    assert not torch.allclose(reads_t(ids, t0), reads_t(ids, t1))
    torch.testing.assert_close(ignores_t(ids, t0), ignores_t(ids, t1), rtol=0, atol=0)

    def draw(model, cache):
        # One sequence per call: the cache only skips a call when no token of the batch changed.
        return torch.cat([method("mdlm").generate(model, 1, L, 64, generator=torch.Generator().manual_seed(seed),
                                                  cache=cache) for seed in range(40)])

    assert torch.equal(draw(ignores_t, True), draw(ignores_t, False))
    # A denoiser that reads t is what the cache silently changes: the same seeds then differ.
    assert not torch.equal(draw(reads_t, True), draw(reads_t, False))


def test_mdlm_defaults_to_the_time_independent_denoiser(tmp_path):
    assert load_config("quickstart", ['method.name="mdlm"']).time_conditioning is False
    assert load_config("quickstart", ['method.name="mdlm"', "model.time_conditioning=true"]).time_conditioning
    assert all(load_config("quickstart", [f'method.name="{name}"']).time_conditioning
               for name in ("klflow", "dfm", "sedd", "ar"))


def test_sedd_gradient_is_finite_with_a_huge_logit_at_an_unmasked_position():
    sedd = method("sedd")
    ids = torch.randint(0, 5, (4, L), generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(4, L, dtype=torch.bool)
    cond[:, 0] = True  # position 0 is given, so never masked
    logits = torch.zeros(4, L, V)
    logits[:, 0, 1] = 100.0  # e^(100 - log 7) overflows float32
    logits.requires_grad_(True)
    loss = sedd.loss(lambda x, t: logits, ids, cond, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logits.grad).all()
    assert (logits.grad[:, 0] == 0).all()


def test_sedd_unnormalised_score_still_ends_unmasked():
    probs, sedd = marginals(), method("sedd")
    # Too little score mass slows unmasking, but the final denoising step unmasks everything; the
    # relative token probabilities are right, so the marginals still are.
    low = Factorised(probs, math.log(V - 1) - 3.0)
    out = sedd.generate(low, 4000, L, 4, generator=torch.Generator().manual_seed(0))
    assert sedd.last_nfe == 4 and total_variation(out, probs).max() < TV_TOLERANCE
    assert (low.inputs[-1][0] == SPECIALS.mask).float().mean() > 0.8  # most positions wait for the last step
    # Too much mass (unmask probability > 1) unmasks everything at once, normalised, not an error.
    high = Factorised(probs, math.log(V - 1) + 3.0)
    out = sedd.generate(high, 4000, L, 4, generator=torch.Generator().manual_seed(0))
    assert sedd.last_nfe == 1 and total_variation(out, probs).max() < TV_TOLERANCE


# Prompts, determinism, banned ids, modes, options

@pytest.mark.parametrize("name", MASKED_METHODS)
def test_prompt_positions_are_clamped_at_every_step(name):
    probs = marginals()
    model = exact_model(name, probs)
    prompt = torch.tensor([[3, 0, 1, 0]])
    cond = torch.tensor([[True, False, True, False]])
    out = method(name).generate(model, 2000, L, 6, prompt=prompt, cond_mask=cond,
                                generator=torch.Generator().manual_seed(0))
    assert (out[:, [0, 2]] == torch.tensor([3, 1])).all()
    assert model.inputs and all((x[:, [0, 2]] == torch.tensor([3, 1])).all() for x, _ in model.inputs)
    assert total_variation(out[:, [1, 3]], probs[[1, 3]]).max() < 0.05


@pytest.mark.parametrize("name", MASKED_METHODS)
def test_prefix_prompt_and_bad_prompts(name):
    model = exact_model(name, marginals())
    out = method(name).generate(model, 3, L, 4, prompt=torch.tensor([2, 4]))
    assert (out[:, :2] == torch.tensor([2, 4])).all()
    with pytest.raises(KLFlowError, match="mask token"):
        method(name).generate(model, 3, L, 4, prompt=torch.tensor([SPECIALS.mask]))
    with pytest.raises(KLFlowError, match="length"):
        method(name).generate(model, 3, L, 4, prompt=torch.zeros(1, L + 1, dtype=torch.long))
    with pytest.raises(KLFlowError, match="steps"):
        method(name).generate(model, 3, L, 0)


@pytest.mark.parametrize("name", ["ar", *MASKED_METHODS])
def test_same_generator_same_output_and_no_special_ids(name):
    torch.manual_seed(0)
    net = Denoiser(V, n_layer=1, n_head=2, d_model=16, causal=name == "ar")
    tempting = torch.zeros(V).index_fill(0, torch.tensor([SPECIALS.pad, SPECIALS.mask]), 5.0)
    m = method(name)

    def run(seed):
        return m.generate(lambda x, t: net(x, t) + tempting, 64, 12, 6, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.isin(a, torch.tensor([SPECIALS.pad, SPECIALS.mask])).any()


@pytest.mark.parametrize("name", ["ar", *MASKED_METHODS])
def test_sampling_runs_in_eval_and_inference_mode(name):
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x, t):
            seen.append((self.training, torch.is_inference_mode_enabled()))
            return torch.zeros(*x.shape, V)

    probe = Probe().train()
    method(name).generate(probe, 2, L, 3)
    assert seen and all(mode == (False, True) for mode in seen) and probe.training


@pytest.mark.parametrize("name, bad, message", [
    ("mdlm", {"cache": "yes"}, "cache must be"),
    ("dfm", {"readout": "top"}, "readout must be"),
    ("ar", {"temperature": 0}, "temperature"),
    ("ar", {"temperature": "hot"}, "temperature"),
    ("ar", {"top_k": -1}, "top_k"),
    ("ar", {"top_k": 1.5}, "top_k"),
    ("ar", {"top_p": 0.0}, "top_p"),
    ("ar", {"top_p": 1.5}, "top_p"),
])
def test_invalid_options_are_one_line_errors(name, bad, message):
    with pytest.raises(KLFlowError, match=message) as error:
        method(name).generate(exact_model(name, marginals()), 2, L, 2, **bad)
    assert "\n" not in str(error.value)


def test_settings_and_descriptions():
    for name in ("ar", *MASKED_METHODS):
        m = method(name)
        assert m.describe()["method"] == name and m.causal == (name == "ar")
        json.dumps(m.describe())
    assert method("ar").sample_settings(top_k=5) == {"temperature": 1.0, "top_k": 5, "top_p": 1.0}
    assert method("mdlm").sample_settings() == {"cache": True}
    assert method("dfm").sample_settings() == {"readout": "sample"}
    assert method("dfm").sample_settings(readout="argmax") == {"readout": "argmax"}
    assert method("sedd").sample_settings() == {}
    assert method("ar").nfe(64, 32) == 32 and method("sedd").nfe(64, 32) == 64


# Losses against hand computation

def recorded_loss(name, cond_mask=None, seed=0, shape=(64, L)):
    """The method's loss with a fixed random logits table, plus the (x_t, t) the model saw."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(shape[1], V, generator=g)
    ids = torch.randint(0, 6, shape, generator=g)
    model = Factorised(table.softmax(-1).double())
    model.logits = table  # raw logits, not normalised
    loss = method(name).loss(model, ids, cond_mask, generator=torch.Generator().manual_seed(seed + 1))
    (x_t, t), = model.inputs
    return loss, ids, table, x_t, t


@pytest.mark.parametrize("name", MASKED_METHODS)
def test_corruption_respects_cond_mask(name):
    cond = torch.zeros(64, L, dtype=torch.bool)
    cond[:, 0] = True
    _, ids, _, x_t, t = recorded_loss(name, cond)
    masked = x_t == SPECIALS.mask
    assert not masked[:, 0].any() and masked.any()
    assert torch.equal(x_t[~masked], ids[~masked])
    low = 0.0 if name == "dfm" else T_MIN
    assert ((t >= low) & (t <= 1)).all() and t.shape == (64,)
    # Stratified times: one per 1/B-wide slot of [low, 1].
    slots = ((t - low) / (1 - low) * 64).floor().long().clamp(max=63)
    assert sorted(slots.tolist()) == list(range(64))


def test_mdlm_loss_is_weighted_masked_cross_entropy():
    cond = torch.zeros(64, L, dtype=torch.bool)
    cond[:5, :2] = True
    loss, ids, table, x_t, t = recorded_loss("mdlm", cond)
    subs = table.clone()
    subs[:, SPECIALS.mask] = -math.inf
    log_p = subs.log_softmax(-1)
    expected = sum(-log_p[l, ids[b, l]] / t[b] for b in range(64) for l in range(L) if x_t[b, l] == SPECIALS.mask)
    torch.testing.assert_close(loss, expected / (64 * L - 10))


def test_sedd_loss_is_score_entropy():
    loss, ids, table, x_t, t = recorded_loss("sedd")
    g = table - math.log(V - 1)
    expected = 0.0
    for b in range(64):
        for l in range(L):
            if x_t[b, l] == SPECIALS.mask:
                positive = sum(g[l, y].exp() for y in range(V) if y != SPECIALS.mask)
                expected += (positive - g[l, ids[b, l]] - 1) / t[b]
    torch.testing.assert_close(loss, expected / (64 * L))


def test_dfm_loss_is_cross_entropy_on_generated_positions():
    cond = torch.zeros(64, L, dtype=torch.bool)
    cond[:, 3] = True
    loss, ids, table, x_t, t = recorded_loss("dfm", cond)
    log_p = table.log_softmax(-1)
    expected = sum(-log_p[l, ids[b, l]] for b in range(64) for l in range(3))
    torch.testing.assert_close(loss, expected / (64 * 3))
    # The mixture path masks with probability 1 - kappa(t) = (1 - t)^2.
    big = recorded_loss("dfm", shape=(2000, 64))
    mask_rate = (big[3] == SPECIALS.mask).double().mean(1)
    torch.testing.assert_close(mask_rate.mean(), ((1 - big[4].double()) ** 2).mean(), atol=0.01, rtol=0)


def test_sedd_equals_mdlm_for_a_normalised_score_and_bounds_it_otherwise():
    ids = torch.randint(0, 6, (32, 6), generator=torch.Generator().manual_seed(0))
    raw = torch.randn(6, V, generator=torch.Generator().manual_seed(1)) * 2

    def const(logits):
        return lambda x, t: logits.expand(x.shape[0], -1, -1)

    def losses(sedd_logits):
        mdlm = method("mdlm").loss(const(raw), ids, generator=torch.Generator().manual_seed(2))
        sedd = method("sedd").loss(const(sedd_logits), ids, generator=torch.Generator().manual_seed(2))
        return mdlm, sedd

    subs = raw.clone()
    subs[:, SPECIALS.mask] = -math.inf
    mdlm, sedd = losses(subs.log_softmax(-1) + math.log(V - 1))  # sum_y e^{g_y} = 1
    torch.testing.assert_close(sedd, mdlm)
    mdlm, sedd = losses(raw)
    assert sedd > mdlm


@pytest.mark.parametrize("name", ["mdlm", "sedd"])
def test_nelbo_is_zero_for_a_perfect_model_and_log_v_for_a_uniform_one(name):
    sequence = torch.tensor([0, 3, 1, 4, 2, 5, 0, 1])
    ids = sequence.expand(4000, -1)
    perfect = torch.full((8, V), -1e4)
    perfect[torch.arange(8), sequence] = math.log(V - 1) if name == "sedd" else 0.0
    g = torch.Generator().manual_seed(0)
    zero = method(name).loss(lambda x, t: perfect.expand(x.shape[0], -1, -1), ids, generator=g)
    assert zero.item() == pytest.approx(0.0, abs=1e-6)
    uniform = method(name).loss(lambda x, t: torch.zeros(*x.shape, V), ids, generator=g)
    # E[#masked / t] = L for every t, so the expectation is exactly log(V - 1) (V - 1 non-mask tokens).
    assert uniform.item() == pytest.approx(math.log(V - 1), rel=0.06)


def test_ar_loss_is_next_token_cross_entropy():
    g = torch.Generator().manual_seed(0)
    bigram = torch.randn(V, V, generator=g)
    ids = torch.randint(0, 6, (5, 7), generator=g)
    model = lambda x, t: bigram[x]  # noqa: E731 (next-token logits depend on the current token)
    expected = torch.stack([-bigram[ids[b, l]].log_softmax(-1)[ids[b, l + 1]] for b in range(5) for l in range(6)])
    torch.testing.assert_close(method("ar").loss(model, ids), expected.mean())
    cond = torch.zeros(5, 7, dtype=torch.bool)
    cond[:, :3] = True  # targets 1, 2 are given: only 3..6 are scored
    scored = expected.view(5, 6)[:, 2:]
    torch.testing.assert_close(method("ar").loss(model, ids, cond), scored.mean())


# AR decoding

def causal_net(seed=0, vocab=V):
    torch.manual_seed(seed)
    net = Denoiser(vocab, n_layer=2, n_head=2, d_model=32, causal=True)
    with torch.no_grad():
        for block in net.blocks:
            block.attn.out.weight.normal_(0.0, 0.2)
            block.mlp.down.weight.normal_(0.0, 0.2)
    return net.eval()


def test_ar_cached_equals_uncached_and_greedy():
    net, ar = causal_net(), method("ar")
    prompt = torch.tensor([1, 2, 3])
    cached = ar.generate(net, 4, 10, 1, prompt=prompt, top_k=1)
    assert ar.last_nfe == 7
    uncached = ar.generate(lambda x, t: net(x, t), 4, 10, 1, prompt=prompt, top_k=1)  # no `cache` keyword
    tokens = torch.tensor([[SPECIALS.eot, 1, 2, 3]])
    with torch.no_grad():
        for _ in range(7):
            logits = net(tokens)[:, -1]
            logits[:, [SPECIALS.pad, SPECIALS.mask]] = -math.inf
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, uncached) and torch.equal(cached, tokens[:, 1:].expand(4, -1))
    # Sampled decoding: the same draws whichever path computes the (identical) logits.
    net = net.double()
    a = ar.generate(net, 16, 12, 1, generator=torch.Generator().manual_seed(3), temperature=1.3)
    b = ar.generate(lambda x, t: net(x, t), 16, 12, 1, generator=torch.Generator().manual_seed(3), temperature=1.3)
    assert torch.equal(a, b)


def test_ar_prompt_rules():
    net, ar = causal_net(), method("ar")
    full = torch.tensor([[4, 3, 2, 1, 0, 1]])
    assert torch.equal(ar.generate(net, 2, 6, 1, prompt=full), full.expand(2, -1)) and ar.last_nfe == 0
    cond = torch.tensor([[True, True, False, False, False, False]])
    out = ar.generate(net, 2, 6, 1, prompt=full, cond_mask=cond)
    assert (out[:, :2] == torch.tensor([4, 3])).all()
    with pytest.raises(KLFlowError, match="the same prompt positions"):
        ar.generate(net, 2, 6, 1, prompt=full.expand(2, -1), cond_mask=torch.tensor([[True, False, True, False, False, False],
                                                                                      [True, True, False, False, False, False]]))


def test_ar_rearranged_format_moves_the_holes_to_the_end():
    ids = torch.tensor([[0, 1, 2, 3, 4, 0], [4, 3, 2, 1, 0, 1]])
    cond = torch.tensor([[True, True, False, False, True, False], [True, True, True, False, False, False]])
    seqs, scored = rearrange(ids, cond, SPECIALS)
    m, e, p = SPECIALS.mask, SPECIALS.eot, SPECIALS.pad
    assert seqs.tolist() == [[0, 1, m, m, 4, m, e, 2, 3, e, 0], [4, 3, 2, 1, 0, 1, p, p, p, p, p]]  # a prompt row stays
    assert scored.tolist() == [[False] * 7 + [True, True, False, True], [False] * 3 + [True] * 3 + [False] * 5]


def test_ar_loss_scores_the_holes_of_the_rearranged_format():
    g = torch.Generator().manual_seed(0)
    bigram = torch.randn(V, V, generator=g)
    model = lambda x, t: bigram[x]  # noqa: E731
    ids = torch.tensor([[0, 1, 2, 3, 4, 0]])
    cond = torch.tensor([[True, True, False, False, True, False]])
    seq = [0, 1, SPECIALS.mask, SPECIALS.mask, 4, SPECIALS.mask, SPECIALS.eot, 2, 3, SPECIALS.eot, 0]
    targets = [7, 8, 10]  # the hole tokens 2, 3 and 0, each after its separator or hole neighbour
    expected = torch.stack([-bigram[seq[i - 1]].log_softmax(-1)[seq[i]] for i in targets]).mean()
    torch.testing.assert_close(method("ar").loss(model, ids, cond), expected)


def test_ar_infills_in_the_rearranged_format_with_and_without_cache():
    net, ar = causal_net(), method("ar")
    prompt = torch.tensor([[1, 2, 0, 0, 3, 0, 0, 4]])
    cond = torch.tensor([[True, True, False, False, True, False, False, True]])
    cached = ar.generate(net, 3, 8, 1, prompt=prompt, cond_mask=cond, top_k=1)
    assert ar.last_nfe == 4
    uncached = ar.generate(lambda x, t: net(x, t), 3, 8, 1, prompt=prompt, cond_mask=cond, top_k=1)
    m, e = SPECIALS.mask, SPECIALS.eot
    tokens = torch.tensor([[1, 2, m, m, 3, m, m, 4, e]])
    filled = []
    with torch.no_grad():
        for step in range(4):
            if step == 2:
                tokens = torch.cat([tokens, torch.tensor([[e]])], dim=1)
            logits = net(tokens)[:, -1]
            logits[:, [SPECIALS.pad, SPECIALS.mask]] = -math.inf
            filled.append(int(logits.argmax()))
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    expected = torch.tensor([[1, 2, filled[0], filled[1], 3, filled[2], filled[3], 4]])
    assert torch.equal(cached, uncached) and torch.equal(cached, expected.expand(3, -1))


def test_filter_logits_temperature_top_k_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    torch.testing.assert_close(filter_logits(logits, 2.0, 0, 1.0), logits.double() / 2)
    kept = filter_logits(logits, 1.0, 2, 1.0).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert filter_logits(probs, 1.0, 0, 0.8).isfinite().tolist() == [[True, True, False, False]]
    assert filter_logits(probs, 1.0, 0, 0.81).isfinite().tolist() == [[True, True, True, False]]
    assert filter_logits(probs, 1.0, 0, 0.01).isfinite().tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("options, expected", [
    ({"temperature": 0.5}, lambda l: (l / 0.5).softmax(-1)),
    ({"top_k": 2}, lambda l: torch.tensor([0.0, 0, 0, 0.5, 0.5, 0, 0, 0]).double()),
    ({"top_p": 0.6}, lambda l: torch.tensor([0.0, 0, 0, 0.5, 0.5, 0, 0, 0]).double()),
    ({"top_k": 1}, lambda l: torch.tensor([0.0, 0, 0, 1, 0, 0, 0, 0]).double()),
])
def test_ar_draw_frequencies(options, expected):
    logits = torch.tensor([0.1, 0.2, 0.3, 2.0, 2.0 - 1e-9, 0.0, 5.0, 5.0], dtype=torch.float64)  # pad, mask banned
    model = lambda x, t: logits.expand(x.shape[0], x.shape[1], -1)  # noqa: E731
    out = method("ar").generate(model, 4000, 1, 1, generator=torch.Generator().manual_seed(0), **options)
    target = expected(logits.clone().index_fill(0, torch.tensor([6, 7]), -math.inf))
    counts = F.one_hot(out[:, 0], V).double().mean(0)
    assert 0.5 * (counts - target).abs().sum() < 0.04


# End to end: train on the tiny corpus, then `klflow sample`

@pytest.mark.parametrize("name, options", [
    ("ar", ["top_k=5", "temperature=0.8"]),
    ("mdlm", ["cache=false"]),
    ("dfm", ["readout=argmax"]),
    ("sedd", []),
])
def test_train_then_sample_through_the_cli(name, options, tiny_corpus, tmp_path, capsys):
    overrides = [f"data.source={json.dumps(str(tiny_corpus))}", *TINY_OVERRIDES, f"method.name={json.dumps(name)}",
                 "train.max_steps=20", "train.eval_interval=10"]
    config = load_config("quickstart", overrides)
    result = train(config, tmp_path / "run", progress=False, log=lambda _: None)
    losses = [h["val_loss"] for h in result.history]
    assert len(losses) == 2 and losses[-1] < losses[0] and all(math.isfinite(v) for v in losses)
    argv = ["sample", str(tmp_path / "run"), "--steps", "5", "-n", "3", "--prompt", "The cat",
            "--output", str(tmp_path / "s.jsonl"), "--device", "cpu"]
    for item in options:
        argv += ["--option", item]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    # actual network calls: AR decodes only the 11 tokens after the 5-token prompt
    expected_nfe = {"ar": 11, "mdlm": 5, "dfm": 4, "sedd": 5}[name]
    assert f"({name}, NFE {expected_nfe})" in printed
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["ids"]) == 16 and r["method"] == name for r in rows)
    assert all(r["text"].startswith("The cat") for r in rows)
    assert all(str(r[k.split("=")[0]]).lower() == k.split("=")[1] for r in rows for k in options)
