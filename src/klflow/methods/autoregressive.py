"""The autoregressive baseline: the same transformer in causal mode, next-token cross-entropy.

Generation starts from the end-of-text token as a beginning-of-sequence marker (documents are
joined by it in the training stream, so it is what precedes a document start), followed by the
prompt if any, and appends one token per network call: NFE = the number of generated tokens.
With a KV cache each call processes only the new token.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F

from klflow.errors import KLFlowError
from klflow.methods.base import Model, SpecialTokens, generate_defaults, register
from klflow.methods.masked import ban, sampling_device, sampling_mode
from klflow.model import KVCache
from klflow.sampling import _expand_prompt, check_draw_options, filter_logits, sample_categorical


def takes_cache(model: Model) -> bool:
    """Whether model(ids, None, cache=KVCache) is supported: its call (an nn.Module's forward) names `cache`."""
    try:
        params = inspect.signature(getattr(model, "forward", model)).parameters
    except (TypeError, ValueError):
        return False
    return "cache" in params


class Autoregressive:
    """Left-to-right LM: causal Denoiser, next-token cross-entropy, KV-cached ancestral sampling."""

    name = "ar"
    causal = True

    def __init__(self, vocab_size: int, specials: SpecialTokens) -> None:
        self.vocab_size = vocab_size
        self.bos_id = specials.eot
        self.banned_ids = (specials.pad, specials.mask)
        self.last_nfe: int | None = None  # network calls of the last generate()

    def loss(self, model: Model, ids: torch.Tensor, cond_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean of -log p(x_{l+1} | x_{<=l}) over l = 0 .. L-2, skipping targets given by cond_mask.

        Deterministic: generator is unused.
        """
        logits = model(ids[:, :-1], None).float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        if cond_mask is None:
            return nll.mean()
        scored = ~cond_mask[:, 1:]
        return (nll * scored).sum() / scored.sum().clamp_min(1)

    def generate(self, model: Model, num_samples: int, seq_len: int, steps: int,
                 prompt: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Sample seq_len - P tokens after [bos, prompt (P tokens)], one network call each.

        steps is ignored: an AR model makes one call per generated token. Each token is drawn in
        float64 from softmax(logits / temperature) restricted to the top_k tokens (0: no limit)
        and the top_p nucleus (1: no limit); top_k=1 is greedy decoding. Padding and the mask are
        never drawn. The prompt must be a prefix (a prefix cond_mask, the same length in every
        row); infilling needs the rearranged (fill-in-the-middle) format, not supported yet.
        A model whose call takes a `cache` keyword (a causal klflow Denoiser does) decodes with a
        KV cache; any other model is re-run on the whole prefix for each token (same result).
        """
        check_draw_options(temperature, top_k, top_p)
        if num_samples < 1 or seq_len < 1:
            raise KLFlowError(f"num_samples and seq_len must be >= 1, got {num_samples} and {seq_len}")
        device = sampling_device(model, device)
        prefix = _prefix(prompt, cond_mask, num_samples, seq_len, self.vocab_size, device)
        bos = torch.full((num_samples, 1), self.bos_id, dtype=torch.long, device=device)
        tokens = torch.cat([bos, prefix], dim=1)
        cache = KVCache() if takes_cache(model) else None
        new = tokens  # what the next call has to process: everything the first time, then the last token
        calls = 0
        with sampling_mode(model):
            for i in range(seq_len - prefix.shape[1]):
                logits = model(new, None, cache=cache) if cache is not None else model(tokens, None)
                calls += 1
                logits = filter_logits(ban(logits[:, -1], self.banned_ids), temperature, top_k, top_p)
                new = sample_categorical(logits, generator).unsqueeze(1)
                tokens = torch.cat([tokens, new], dim=1)
                if progress is not None:
                    progress(i)
        self.last_nfe = calls
        return tokens[:, 1:]

    def nfe(self, steps: int, seq_len: int) -> int:
        """seq_len: one call per generated token without a prompt (a P-token prompt saves P calls)."""
        return seq_len

    def sample_settings(self, **options: Any) -> dict[str, Any]:
        return generate_defaults(self, options)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "objective": "next-token cross-entropy", "bos": "eot"}


@register("ar")
def build(config: Any, vocab_size: int, specials: SpecialTokens) -> Autoregressive:
    return Autoregressive(vocab_size, specials)


def _prefix(prompt: torch.Tensor | None, cond_mask: torch.Tensor | None, num_samples: int, seq_len: int,
            vocab_size: int, device: torch.device) -> torch.Tensor:
    """The prompt as a prefix [B, P] (P = 0 without a prompt); a non-prefix cond_mask is an error."""
    prompt, cond_mask = _expand_prompt(prompt, cond_mask, num_samples, seq_len, vocab_size, device)
    if prompt is None:
        return torch.empty(num_samples, 0, dtype=torch.long, device=device)
    length = int(cond_mask[0].sum())
    expected = torch.arange(seq_len, device=device) < length
    if not bool((cond_mask == expected).all()):
        raise KLFlowError("the AR baseline continues a prefix prompt only (the same length in every row); "
                          "infilling needs the rearranged fill-in-the-middle format, not supported yet")
    return prompt[:, :length]
