"""One protocol for every generative method: a path, a loss on it, and a sampler.

A method never looks inside the network: it calls `model(x, t) -> logits [B, L, V]`, where x is
a simplex point [B, L, V] or token ids [B, L] depending on the method, and t is [B] (ignored by a
causal model). `causal` tells the trainer to build the backbone in causal (autoregressive) mode.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Protocol, Sequence

import torch

from klflow.data.batches import Batch
from klflow.errors import KLFlowError

Model = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class SpecialTokens:
    """The ids a method must know: end-of-text, padding and the mask (absorbing) token."""

    eot: int
    pad: int
    mask: int


class Method(Protocol):
    """A generative method: every hook the trainer, the samplers and the bench call.

    last_nfe: the network calls the last generate() made, for a method whose calls depend on the
    draws (ar's given tokens, the absorbing methods' no-change cache); None where nfe() is exact.
    """

    name: ClassVar[str]
    causal: ClassVar[bool]
    last_nfe: int | None

    def loss(self, model: Model, ids: torch.Tensor, cond_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """A scalar training loss for clean ids [B, L]; cond_mask marks given (clamped) positions."""

    def validation_scores(self, model: Model, batches: Sequence[Batch], device: torch.device,
                          seed: int) -> dict[str, float]:
        """Validation scores in nats/token, "val_loss" among them, over fixed (ids, cond_mask) batches.

        The noise of batch i is seeded with seed + (sequences before it), so scores compare across evaluations.
        """

    def generate(self, model: Model, num_samples: int, seq_len: int, steps: int,
                 prompt: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 **options: Any) -> torch.Tensor:
        """Token ids [num_samples, seq_len]; prompt positions (cond_mask True) are returned unchanged.

        prompt is ids [B or 1, L] with cond_mask [B or 1, L], or a prefix [B or 1, P] with cond_mask
        None. Method-specific options are keyword arguments with defaults, or **options that are the
        fields of a dataclass the method names as its `options_type` (the CLI passes them as
        `--option key=value`); categorical draws are made in float64.
        """

    def nfe(self, steps: int, seq_len: int, **options: Any) -> int:
        """Network evaluations one generate() call with `steps` and these sampler options makes for sequences of
        seq_len (options that add calls per step, such as guidance, count)."""

    def describe(self) -> dict[str, Any]:
        """The method's settings, recorded next to every sample and result."""

    def sample_settings(self, **options: Any) -> dict[str, Any]:
        """The effective sampler settings for these options (defaults filled in), for the record."""

    def learn(self, scores: dict[str, float]) -> dict[str, Any]:
        """Refit what the method learns from validation_scores (besides the weights); returns its record,
        stored with the run's checkpoint and given back to restore() when the run is loaded."""

    def restore(self, state: dict[str, Any]) -> None:
        """Take back a record of learn() ({}: nothing learned, the method stays as built)."""


class MethodDefaults:
    """The hooks of Method that methods share unless they define their own: no call count of their
    own (last_nfe None), validation by the training loss, and nothing learned from it."""

    last_nfe: int | None = None

    def learn(self, scores: dict[str, float]) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        return None

    @torch.no_grad()
    def validation_scores(self: Method, model: Model, batches: Sequence[Batch], device: torch.device,
                          seed: int) -> dict[str, float]:
        """{"val_loss": sum_b loss(b) |b| / sum_b |b|}, the method's loss averaged over the sequences."""
        total, count = 0.0, 0
        for ids, cond_mask in batches:
            ids = ids.to(device)
            cond_mask = cond_mask.to(device) if cond_mask is not None else None
            generator = torch.Generator(device=device).manual_seed(seed + count)
            total += self.loss(model, ids, cond_mask, generator=generator).item() * len(ids)
            count += len(ids)
        return {"val_loss": total / count}


Factory = Callable[[Any, int, SpecialTokens], Method]
_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Register `factory(config, vocab_size, specials) -> Method` under `name`."""

    def decorate(factory: Factory) -> Factory:
        _REGISTRY[name] = factory
        return factory

    return decorate


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def build_method(name: str, config: Any, vocab_size: int, specials: SpecialTokens) -> Method:
    """The method `name` for an experiment config (klflow.config.Config) and a vocabulary."""
    if name not in _REGISTRY:
        raise KLFlowError(f"unknown method {name!r}; methods: {', '.join(method_names())}")
    return _REGISTRY[name](config, vocab_size, specials)


_NOT_SETTINGS = {"self", "model", "num_samples", "seq_len", "steps", "prompt", "cond_mask", "generator", "device", "progress",
                 "observe"}


def option_defaults(method: Method) -> dict[str, Any]:
    """The sampling options method.generate() takes, with their defaults: the fields of the method's
    `options_type` dataclass where generate() takes its options as **options, else generate()'s own
    keyword parameters beyond the protocol's."""
    options_type = getattr(method, "options_type", None)
    if options_type is not None:
        return {f.name: f.default for f in fields(options_type)}
    params = inspect.signature(method.generate).parameters
    return {k: p.default for k, p in params.items() if k not in _NOT_SETTINGS and p.default is not p.empty}


def check_sample_options(method: Method, options: dict[str, Any]) -> None:
    """Reject sampler options that this method's generate() does not take, naming them."""
    accepted = set(option_defaults(method))
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise KLFlowError(f"method {method.name!r} does not take the sampling option(s) {', '.join(unknown)}"
                          f" (it takes: {', '.join(sorted(accepted)) or 'none'})")


def generate_defaults(method: Method, options: dict[str, Any]) -> dict[str, Any]:
    """generate()'s option defaults (option_defaults), updated with the given options."""
    return option_defaults(method) | options
