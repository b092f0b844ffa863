"""Training each model of a bench: done once, resumed after an interruption, skipped when finished.

runs/KEY/ is the run directory (checkpoints, metrics.jsonl); runs/KEY.json is written when training
has reached train.max_steps, with what it cost.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from klflow.bench.memory import peak_memory
from klflow.bench.plan import ModelPlan
from klflow.bench.store import read_json, write_json
from klflow.checkpoint import LATEST, resolve_checkpoint_dir
from klflow.distributed import resolve_device
from klflow.errors import KLFlowError
from klflow.train import train


def run_dir(out: Path, model: ModelPlan) -> Path:
    return out / "runs" / model.key


def train_model(model: ModelPlan, out: Path, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The training record of `model`: read when finished, else made by training (resuming a partial run)."""
    record_file = out / "runs" / f"{model.key}.json"
    directory = run_dir(out, model)
    config = model.config.to_dict()
    record = read_json(record_file)
    if record is not None:
        _check_same(record["config"], config, record_file)
        return record
    resume = (directory / LATEST).is_file()
    if resume:
        saved = json.loads((resolve_checkpoint_dir(directory) / "config.json").read_text())
        _check_same(saved.get("experiment", {}), config, directory)
        log(f"{model.key}: resuming the interrupted training in {directory}")
    else:
        log(f"{model.key}: training {model.config.train.max_steps} steps -> {directory}")
    device = resolve_device(model.config.train.device)
    started = time.perf_counter()
    with peak_memory(device) as memory:
        result = train(model.config, directory, resume=resume, progress=progress, log=log)
    wall = time.perf_counter() - started
    if result.steps < model.config.train.max_steps:
        # train() stops early only when asked to (SIGINT/SIGTERM), after writing a checkpoint.
        raise KeyboardInterrupt
    record = {
        "model": model.key,
        "method": model.method,
        "beta": model.config.path.beta if model.method == "klflow" else None,
        "config": config,
        "steps": result.steps,
        "tokens": result.tokens,
        "train_seconds": result.train_seconds,
        "tokens_per_second": result.tokens_per_second,
        "val_loss": result.val_loss,
        "skipped_steps": result.skipped_steps,
        "history": result.history,
        "checkpoint": str(result.checkpoint),
        "wall_seconds_of_last_session": wall,
        "resumed": resume,
        "peak_memory": memory,
        "device": str(device),
        "how": "train_seconds sums the optimizer steps' wall time over all sessions (validation and checkpoints "
               "excluded); tokens_per_second = tokens / train_seconds; peak memory and wall time cover the last "
               "session only",
    }
    write_json(record_file, record)
    return record


def _check_same(saved: dict[str, Any], config: dict[str, Any], where: Path) -> None:
    if saved != config:
        differences = [f"{section}.{key}" for section in config for key in config[section]
                       if saved.get(section, {}).get(key) != config[section][key]]
        raise KLFlowError(f"{where} was trained with other settings ({', '.join(differences) or 'config'}); "
                          "use another --out for a changed preset")
