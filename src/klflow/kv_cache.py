"""The key/value cache of a causal network: what incremental decoding carries from call to call.

A plain container, below both the network that fills it (klflow.model.Denoiser) and the
autoregressive sampler that creates one per generation (klflow.methods.autoregressive).
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Rotated keys and values [B, H, S, h] of every layer for the tokens a causal Denoiser has seen.

    Filled by `Denoiser.forward(x, cache=cache)`: x then holds only the new tokens, which sit at
    positions length .. length + S_new - 1, attend to the cached tokens and themselves, and are
    appended.  Keys are stored after RoPE, so they never need re-rotating.
    """

    def __init__(self) -> None:
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    @property
    def length(self) -> int:
        """Number of tokens already seen."""
        return self.keys[0].shape[2] if self.keys else 0

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append a layer's new keys/values; return all of that layer's keys and values."""
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]
