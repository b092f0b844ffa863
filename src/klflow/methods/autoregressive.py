"""The autoregressive baseline: the same transformer in causal mode, next-token cross-entropy.

Generation starts from the end-of-text token as a beginning-of-sequence marker (documents are
joined by it in the training stream, so it is what precedes a document start), followed by the
prompt if any, and appends one token per network call: NFE = the number of generated tokens.
With a KV cache each call processes only the new token. Infilling (given positions that are not a
prefix) uses the rearranged format of the paper's GPT baseline: the holes moved to the end.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F

from klflow.errors import KLFlowError
from klflow.kv_cache import KVCache
from klflow.methods.base import MethodDefaults, Model, SpecialTokens, generate_defaults, register
from klflow.sampling import (ban_, check_draw_options, check_sizes, expand_prompt, filter_logits, sample_categorical,
                             sampling_device, sampling_mode)


def takes_cache(model: Model) -> bool:
    """Whether model(ids, None, cache=KVCache) is supported: its call (an nn.Module's forward) names `cache`."""
    try:
        params = inspect.signature(getattr(model, "forward", model)).parameters
    except (TypeError, ValueError):
        return False
    return "cache" in params


class Autoregressive(MethodDefaults):
    """Left-to-right LM: causal Denoiser, next-token cross-entropy, KV-cached ancestral sampling."""

    name = "ar"
    causal = True

    def __init__(self, vocab_size: int, specials: SpecialTokens) -> None:
        self.vocab_size = vocab_size
        self.bos_id = specials.eot
        self.specials = specials
        self.banned_ids = (specials.pad, specials.mask)

    def loss(self, model: Model, ids: torch.Tensor, cond_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean of -log p(next token | the tokens before it) over the generated targets.

        Without cond_mask every x_{l+1}, l = 0 .. L-2, is a target. A row whose cond_mask is a
        prefix (a prompt) is scored on the tokens after it; any other row is scored in the
        rearranged infilling format (see `rearrange`), on its hole tokens. Deterministic:
        generator is unused.
        """
        scored = torch.ones_like(ids, dtype=torch.bool) if cond_mask is None else ~cond_mask
        if cond_mask is not None and not bool(is_prefix(cond_mask).all()):
            ids, scored = rearrange(ids, cond_mask, self.specials)
        logits = model(ids[:, :-1], None).float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        scored = scored[:, 1:]
        if cond_mask is None:
            return nll.mean()
        return (nll * scored).sum() / scored.sum().clamp_min(1)

    def generate(self, model: Model, num_samples: int, seq_len: int, steps: int,
                 prompt: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Sample every position not given by the prompt, one network call per generated token.

        A prefix prompt (P tokens) is continued: seq_len - P tokens after [bos, prompt]. Any other
        cond_mask (the same in every row) is infilled in the rearranged format the loss trains:
        the context with a sentinel at each hole position, then for each hole the separator and
        its tokens, drawn left to right and put back in place (see `rearrange`).
        steps is ignored. Each token is drawn in float64 from softmax(logits / temperature)
        restricted to the top_k tokens (0: no limit) and the top_p nucleus (1: no limit);
        top_k=1 is greedy decoding. Padding and the mask are never drawn. A model whose call
        takes a `cache` keyword (a causal klflow Denoiser does) decodes with a KV cache; any
        other model is re-run on the whole sequence for each token (same result).
        """
        check_draw_options(temperature, top_k, top_p)
        check_sizes(num_samples, seq_len)
        device = sampling_device(model, device)
        prompt, cond_mask = expand_prompt(prompt, cond_mask, num_samples, seq_len, self.vocab_size, device)
        if prompt is None:
            prompt = torch.zeros(num_samples, seq_len, dtype=torch.long, device=device)
            cond_mask = torch.zeros(num_samples, seq_len, dtype=torch.bool, device=device)
        if not bool((cond_mask == cond_mask[:1]).all()):
            raise KLFlowError("the AR baseline needs the same prompt positions (cond_mask) in every row")
        holes = _runs(~cond_mask[0])
        if bool(is_prefix(cond_mask[:1]).all()):
            length = int(cond_mask[0].sum())
            bos = torch.full((num_samples, 1), self.bos_id, dtype=torch.long, device=device)
            plan = [(torch.cat([bos, prompt[:, :length]], dim=1), seq_len - length)]
        else:
            context = prompt.masked_fill(~cond_mask, self.specials.mask)
            separator = torch.full((num_samples, 1), self.specials.eot, dtype=torch.long, device=device)
            plan = [(torch.cat([context, separator], dim=1) if i == 0 else separator, size)
                    for i, (_, size) in enumerate(holes)]
        with sampling_mode(model):
            drawn = self._decode(model, plan, generator, temperature, top_k, top_p, progress)
        out = prompt.clone()
        out[:, ~cond_mask[0]] = drawn  # holes in order, left to right: the order they were drawn in
        return out

    def _decode(self, model: Model, plan: list[tuple[torch.Tensor, int]], generator: torch.Generator | None,
                temperature: float, top_k: int, top_p: float,
                progress: Callable[[int], None] | None) -> torch.Tensor:
        """For each (given tokens [B, k], count) of the plan: append the given tokens, then draw
        count tokens one call each. Returns the drawn tokens [B, total count] in order."""
        cache = KVCache() if takes_cache(model) else None
        tokens = plan[0][0][:, :0]
        fed = 0  # tokens the cache has processed
        drawn: list[torch.Tensor] = []
        for given, count in plan:
            tokens = torch.cat([tokens, given], dim=1)
            for _ in range(count):
                logits = model(tokens[:, fed:], None, cache=cache) if cache is not None else model(tokens, None)
                if cache is not None:
                    fed = tokens.shape[1]
                logits = filter_logits(ban_(logits[:, -1].clone(), self.banned_ids), temperature, top_k, top_p)
                new = sample_categorical(logits, generator).unsqueeze(1)
                tokens = torch.cat([tokens, new], dim=1)
                drawn.append(new)
                if progress is not None:
                    progress(len(drawn) - 1)
        self.last_nfe = len(drawn)
        return torch.cat(drawn, dim=1) if drawn else tokens[:, :0]

    def nfe(self, steps: int, seq_len: int, **options: Any) -> int:
        """seq_len: one call per generated token without a prompt (P given tokens save P calls)."""
        return seq_len

    def sample_settings(self, **options: Any) -> dict[str, Any]:
        return generate_defaults(self, options)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "objective": "next-token cross-entropy", "bos": "eot",
                "infilling": "rearranged: context with a mask sentinel per hole position, then eot + each hole"}


def is_prefix(cond_mask: torch.Tensor) -> torch.Tensor:
    """bool [B]: whether each row's given positions are a prefix (True* False*), i.e. a prompt."""
    return (cond_mask[:, 1:] <= cond_mask[:, :-1]).all(dim=1)


def rearrange(ids: torch.Tensor, cond_mask: torch.Tensor, specials: SpecialTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """The AR infilling format of each row: (sequences [B, S], scored [B, S]), padded with specials.pad.

    A row whose cond_mask is a prefix stays as it is, scored after its prompt. Any other row
    becomes the context (its L tokens, each hole position shown as the mask token, so the holes'
    places and sizes are in view) followed, for each hole (a run of positions not given) left to
    right, by end-of-text as a separator and the hole's tokens; only the hole tokens are scored:

        a b [c d] e [f]  ->  a b <mask> <mask> e <mask> <eot> c d <eot> f
    """
    rows, scored = [], []
    for row, given in zip(ids, cond_mask):
        if bool(is_prefix(given[None])[0]):
            rows.append(row)
            scored.append(~given)
            continue
        parts, marks = [row.masked_fill(~given, specials.mask)], [torch.zeros_like(given)]
        for start, size in _runs(~given):
            parts += [row.new_tensor([specials.eot]), row[start : start + size]]
            marks += [given.new_zeros(1), given.new_ones(size)]
        rows.append(torch.cat(parts))
        scored.append(torch.cat(marks))
    width = max(len(row) for row in rows)
    return (torch.stack([F.pad(r, (0, width - len(r)), value=specials.pad) for r in rows]),
            torch.stack([F.pad(m, (0, width - len(m)), value=False) for m in scored]))


@register("ar")
def build(config: Any, vocab_size: int, specials: SpecialTokens) -> Autoregressive:
    return Autoregressive(vocab_size, specials)


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of True in a 1-D bool tensor, left to right."""
    edges = torch.diff(F.pad(mask.int(), (1, 1))).tolist()
    starts = [i for i, e in enumerate(edges) if e == 1]
    ends = [i for i, e in enumerate(edges) if e == -1]
    return [(a, b - a) for a, b in zip(starts, ends)]
