"""The bench's side-by-side training-speed measurement: every method's optimizer step on one batch.

Reported as ratios measured in one interleaved loop (klflow / ar tokens/s on the same backbone
and batch) and as klflow's model FLOP utilisation against the matmul peak measured in the same
run, in the training's autocast dtype.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from klflow.bench.preset import BenchPreset
from klflow.bench.store import read_json, write_json
from klflow.bench.timing import (FLOPS_PER_TOKEN_PER_PARAMETER, default_matmul_size, matmul_peak,
                                 model_flop_utilisation, training_step_seconds)
from klflow.data import PreparedData, make_batches
from klflow.methods import SpecialTokens
from klflow.runtime import autocast_dtype
from klflow.train import micro_batching


def measure_training_speed(preset: BenchPreset, data: PreparedData, specials: SpecialTokens, device: torch.device,
                           out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Seconds and tokens/s of one optimizer step of each method (cached in performance.json)."""
    config = preset.experiment
    tc = config.train
    micro, _ = micro_batching(tc.batch_size, tc.micro_batch_size, 1)
    dtype = autocast_dtype(tc.precision, device)
    size = preset.sections.performance.matmul_size or default_matmul_size(device)
    spec = {"experiment": config.to_dict(), "methods": preset.bench.methods, "micro_batch": micro,
            "repeats": preset.sections.performance.repeats, "matmul_size": size, "device": str(device)}
    file = out / "performance.json"
    cached = read_json(file)
    if cached is not None and cached["spec"] == spec:
        return cached
    log(f"training speed: one optimizer step of {', '.join(preset.bench.methods)}, interleaved")
    ids, cond_mask = make_batches(data, "train", config.data.layout, tc.seq_len, micro, seed=tc.seed,
                                  **config.data.layout_options()).batch(0, micro)
    ids = ids.to(device)
    cond_mask = cond_mask.to(device) if cond_mask is not None else None
    vocab_size = data.tokenizer().vocab_size
    seconds, parameters = training_step_seconds(config, preset.bench.methods, ids, cond_mask, vocab_size, specials,
                                                device, dtype, preset.sections.performance.repeats)
    peak = matmul_peak(dtype or torch.float32, device, size)
    tokens = ids.numel()
    methods = {}
    for name, step in seconds.items():
        rate = tokens / step
        methods[name] = {"seconds_per_step": step, "tokens_per_second": rate, "parameters": parameters[name],
                         "mfu": model_flop_utilisation(parameters[name], rate, peak)}
    reference = methods.get("klflow")
    for row in methods.values():
        row["tokens_per_second_over_klflow"] = row["tokens_per_second"] / reference["tokens_per_second"] if reference else None
    record = {
        "spec": spec,
        "tokens_per_step": tokens,
        "dtype": str(dtype or torch.float32).replace("torch.", ""),
        "matmul_peak_flops": peak,
        "methods": methods,
        "klflow_over_ar_tokens_per_second": (reference["tokens_per_second"] / methods["ar"]["tokens_per_second"]
                                             if reference and "ar" in methods else None),
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "how": (f"median of {preset.sections.performance.repeats} interleaved optimizer steps per method (loss under "
                f"autocast, backward, clipping, {tc.optimizer}) on the same micro-batch of {micro} x {tc.seq_len} "
                f"training tokens, fresh weights; MFU = {FLOPS_PER_TOKEN_PER_PARAMETER} x parameters x tokens/s / "
                f"the median {size}^3 matmul rate in the same dtype, measured right after"),
    }
    write_json(file, record)
    return record
