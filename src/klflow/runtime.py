"""What training, generation and the bench share to run a network: its precision, its call, its parts.

The autocast dtype, the network wrapper every method calls (`Network`, built by `network_forward`),
the special tokens of a tokenizer, and the builders of an experiment's Denoiser and optimizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from klflow.config import Config
from klflow.flow.path import reads_posterior, takes_self_condition
from klflow.kv_cache import KVCache
from klflow.methods import SpecialTokens
from klflow.model import Denoiser


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for the network (never for the path math), or None for fp32.

    "auto" is bf16 where the hardware computes it natively (a CUDA device with bf16, a CPU with AVX512-BF16 or
    AMX) and fp32 elsewhere: on a CPU without them bf16 autocast is slower than fp32 (docs/performance.md).
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX tiles), as torch detects them."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


@dataclass(frozen=True)
class Network:
    """module(x, t, **options) under autocast (dtype None: fp32), returning float32 logits.

    The caller's tensors stay fp32; keyword options (`posterior=True`) pass through, and so does a
    causal Denoiser's KV `cache`, named in the call so that the autoregressive sampler sees that it
    can decode incrementally. reads_posterior says whether the Denoiser inside takes q(x_t, t) with
    posterior=True instead of x_t (input "evidence"), which KLPath's losses and samplers read
    through klflow.flow.path.reads_posterior; self_conditioning says whether it takes a previous estimate
    as self_condition=probs (klflow.flow.path.takes_self_condition).
    """

    module: torch.nn.Module
    dtype: torch.dtype | None
    device: torch.device
    reads_posterior: bool
    self_conditioning: bool = False

    @property
    def input(self) -> str:
        """The Denoiser input it feeds, as Denoiser.input names it: "evidence" or "simplex"."""
        return "evidence" if self.reads_posterior else "simplex"

    def __call__(self, x: torch.Tensor, t: torch.Tensor | None, cache: KVCache | None = None,
                 **options: Any) -> torch.Tensor:
        if cache is not None:
            options["cache"] = cache
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.module(x, t, **options).float()


def network_forward(model: torch.nn.Module, dtype: torch.dtype | None, device: torch.device) -> Network:
    """The Network of model, which may be a Denoiser inside torch.compile and DistributedDataParallel
    wrappers: reads_posterior and self_conditioning are the Denoiser's, so KLPath's losses and samplers see them."""
    inner = getattr(model, "_orig_mod", model)
    denoiser = getattr(inner, "module", inner)
    return Network(model, dtype, device, reads_posterior(denoiser), takes_self_condition(denoiser))


def special_tokens(tokenizer: Any) -> SpecialTokens:
    """The end-of-text, padding and mask ids of a klflow tokenizer."""
    return SpecialTokens(eot=tokenizer.eot_id, pad=tokenizer.pad_id, mask=tokenizer.mask_id)


def build_model(config: Config, vocab_size: int, causal: bool) -> Denoiser:
    """The experiment's Denoiser for a vocabulary, causal for an autoregressive method.

    klflow's evidence input computes the KL path's posterior, so it takes the path's beta; the
    simplex flows feed their own path's posterior (SimplexFlow.single_token_posterior).
    """
    m = config.model
    beta = config.path.beta if config.method.name == "klflow" else None
    evidence = {"input": "evidence", "path_beta": beta} if config.denoiser_input == "evidence" else {}
    return Denoiser(vocab_size, n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model, mlp_ratio=m.mlp_ratio,
                    dropout=m.dropout, causal=causal, rope_base=m.rope_base, time_scale=m.time_scale,
                    time_conditioning=config.time_conditioning, output=config.denoiser_output,
                    self_conditioning=config.self_conditioned, **evidence)


def build_optimizers(model: Denoiser, lr: float, muon_lr: float, betas: list[float], weight_decay: float,
                     kind: str) -> list[torch.optim.Optimizer]:
    """AdamW for everything, or Muon for the 2-D weights inside blocks and AdamW for the rest."""
    block_ids = {id(p) for p in model.blocks.parameters() if p.ndim == 2}
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "muon":
        muon = [p for p in params if id(p) in block_ids]
        rest = [p for p in params if id(p) not in block_ids]
        return [
            torch.optim.Muon(muon, lr=muon_lr, weight_decay=weight_decay, momentum=0.95, nesterov=True),
            torch.optim.AdamW(rest, lr=lr, betas=tuple(betas), eps=1e-10, weight_decay=0.0),
        ]
    matrices = [p for p in params if p.ndim >= 2]
    others = [p for p in params if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay}]
    if others:
        groups.append({"params": others, "weight_decay": 0.0})
    return [torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))]
