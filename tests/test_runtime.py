"""klflow.runtime: the Network wrapper every method calls."""

import torch

from klflow.config import Config
from klflow.methods import SpecialTokens, build_method
from klflow.model import Denoiser
from klflow.runtime import network_forward

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
