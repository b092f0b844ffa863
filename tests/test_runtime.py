"""klflow.runtime: the Network wrapper every method calls."""

import torch

import klflow.model

from klflow.config import Config
from klflow.methods import SpecialTokens, build_method
from klflow.model import SOFT_INPUT_FLOOR, Denoiser, without_tiny
from klflow.runtime import autocast_dtype, cpu_has_native_bf16, network_forward

V, L = 24, 12


class CountingDenoiser(Denoiser):
    """A causal Denoiser that records the length of every input it is called on."""

    def __init__(self) -> None:
        super().__init__(V, n_layer=1, n_head=2, d_model=16, causal=True)
        self.lengths: list[int] = []

    def forward(self, x, t=None, cache=None, **options):
        self.lengths.append(x.shape[1])
        return super().forward(x, t, cache=cache, **options)


def test_ar_decodes_incrementally_through_the_network_wrapper():
    torch.manual_seed(0)
    net = CountingDenoiser().eval()
    ar = build_method("ar", Config(), V, SpecialTokens(eot=0, pad=1, mask=2))
    wrapped = network_forward(net, None, torch.device("cpu"))
    cached = ar.generate(wrapped, 3, L, L, generator=torch.Generator().manual_seed(4))
    assert net.lengths == [1] * L  # bos, then one new token a call: the KV cache is used
    net.lengths.clear()
    plain = ar.generate(lambda x, t: net(x, t), 3, L, L, generator=torch.Generator().manual_seed(4))
    assert net.lengths == list(range(1, L + 1))  # no cache: the whole prefix every call
    assert torch.equal(cached, plain)


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("bf16", cpu) is torch.bfloat16
    for avx512_bf16, amx, expected in [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                       (False, False, None)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda value=avx512_bf16: value)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda value=amx: value)
        assert cpu_has_native_bf16() is (expected is not None)
        assert autocast_dtype("auto", cpu) is expected


def test_soft_input_entries_below_the_floor_are_read_as_zero_and_the_rest_unchanged(monkeypatch):
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(2, L, V) * 3, dim=-1)
    tiny = q.clone()
    tiny[..., 1:] = tiny[..., 1:].clamp_max(1e-35)  # subnormal products with W without the floor
    cleaned = without_tiny(tiny)
    assert (cleaned[..., 1:] == 0).all() and torch.equal(cleaned[..., 0], tiny[..., 0])
    assert torch.equal(without_tiny(q), q.masked_fill(q < SOFT_INPUT_FLOOR, 0.0))
    seen = []
    monkeypatch.setattr(klflow.model, "without_tiny", lambda x: seen.append(x) or without_tiny(x))
    self_conditioned = Denoiser(V, n_layer=1, n_head=2, d_model=16, self_conditioning=True).eval()
    self_conditioned(q, torch.full((2,), 0.2), self_condition=tiny)
    assert len(seen) == 2 and seen[0] is q and seen[1] is tiny  # the input and the estimate, each once
