"""Generation for templates (klflow.infill): k samples of each, rows batched, every hole read back.

The rows of several templates share one generate() call (each repeated k times, up to max_rows
rows), since every method clamps a per-row cond_mask; a causal (AR) method decodes one hole
layout for the whole batch, so only templates with the same cond_mask share its calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from klflow.checkpoint import Checkpoint
from klflow.errors import KLFlowError
from klflow.infill import Template, Tokenizer
from klflow.methods import Method, build_method, check_sample_options
from klflow.methods.base import Model
from klflow.runtime import autocast_dtype, network_forward, special_tokens
from klflow.sampling import check_sizes


@dataclass(frozen=True)
class Filled:
    """One sample of a template: the filled text, each hole's text, the generated row and its NFE."""

    text: str
    fills: tuple[str, ...]
    ids: tuple[int, ...]
    nfe: int


@dataclass
class CheckpointSampler:
    """A checkpoint's method and model call, ready to generate with fixed sampler options.

    info records what generated the samples: the method's settings, the effective sampler
    options, the window and the checkpoint.
    """

    method: Method
    forward: Model
    tokenizer: Tokenizer
    seq_len: int
    device: torch.device
    options: dict[str, Any]
    info: dict[str, Any]

    @classmethod
    def load(cls, ckpt: Checkpoint, options: dict[str, Any], device: torch.device,
             seq_len: int | None = None, precision: str = "auto") -> CheckpointSampler:
        """options are generate() keywords of the checkpoint's method (checked); seq_len defaults to training's;
        precision is the network's autocast (auto: bf16 on a GPU that has it, else fp32)."""
        config = ckpt.experiment()
        seq_len = config.train.seq_len if seq_len is None else seq_len
        method = build_method(config.method.name, config, ckpt.tokenizer.vocab_size, special_tokens(ckpt.tokenizer))
        method.restore(ckpt.state.get("learned", {}))
        check_sample_options(method, options)
        dtype = autocast_dtype(precision, device)
        info = {**method.describe(), **method.sample_settings(**options), "seq_len": seq_len,
                "checkpoint": str(ckpt.dir.resolve())}
        return cls(method, network_forward(ckpt.model, dtype, device), ckpt.tokenizer, seq_len, device, options, info)

    def generate(self, num_samples: int, steps: int, seed: int,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """num_samples rows [num_samples, seq_len] from nothing, on the CPU, a generator seeded with `seed`;
        progress: the method's per-step (per-token for a causal method) callback."""
        check_sizes(num_samples, self.seq_len)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return self.method.generate(self.forward, num_samples, self.seq_len, steps, generator=generator,
                                    device=self.device, progress=progress, **self.options).cpu()

    def fill(self, templates: Sequence[Template], num_samples: int, steps: int, seed: int, max_rows: int = 64,
             progress: Callable[[int], None] | None = None) -> list[list[Filled]]:
        """fill_templates with this checkpoint, a generator seeded with `seed`."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return fill_templates(self.method, self.forward, templates, self.tokenizer, self.seq_len, num_samples, steps,
                              generator=generator, device=self.device, options=self.options, max_rows=max_rows,
                              progress=progress)


def fill_templates(method: Method, model: Model, templates: Sequence[Template], tokenizer: Tokenizer, seq_len: int,
                   num_samples: int, steps: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None, options: dict[str, Any] | None = None,
                   max_rows: int = 64, progress: Callable[[int], None] | None = None) -> list[list[Filled]]:
    """num_samples fillings of each template, in order; progress(n) after each call with its n templates.

    Every template's row is built (and checked against seq_len) before any generation starts.
    """
    check_sizes(num_samples, seq_len)
    if max_rows < 1:
        raise KLFlowError(f"max_rows must be >= 1, got {max_rows}")
    rows = [template.row(seq_len, tokenizer) for template in templates]
    results: list[list[Filled]] = []
    for group in _groups([mask for _, mask in rows], max(1, max_rows // num_samples), method.causal):
        prompt = torch.stack([rows[i][0] for i in group]).repeat_interleave(num_samples, dim=0)
        cond_mask = torch.stack([rows[i][1] for i in group]).repeat_interleave(num_samples, dim=0)
        ids = method.generate(model, len(prompt), seq_len, steps, prompt=prompt, cond_mask=cond_mask,
                              generator=generator, device=device, **(options or {})).cpu()
        calls = calls_made(method, steps, seq_len)
        for j, index in enumerate(group):
            template = templates[index]
            samples = []
            for row in ids[j * num_samples : (j + 1) * num_samples].tolist():
                samples.append(Filled(template.render(row, tokenizer), tuple(template.fills(row, tokenizer)),
                                      tuple(row), calls))
            results.append(samples)
        if progress is not None:
            progress(len(group))
    return results


def calls_made(method: Method, steps: int, seq_len: int) -> int:
    """Network calls of the method's last generate(): its last_nfe where it counts them, else its nfe()."""
    return method.nfe(steps, seq_len) if method.last_nfe is None else method.last_nfe


def _groups(masks: list[torch.Tensor], size: int, same_mask: bool) -> list[list[int]]:
    """Consecutive indices in groups of at most `size`, each of one cond_mask if same_mask."""
    groups: list[list[int]] = []
    for i, mask in enumerate(masks):
        if groups and len(groups[-1]) < size and not (same_mask and not torch.equal(masks[groups[-1][0]], mask)):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
