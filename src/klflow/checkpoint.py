"""Checkpoints as directories, written atomically, loaded without unpickling user files.

A run directory holds `step-XXXXXXX/` checkpoints and a `latest` file naming the newest one,
replaced last. Each checkpoint holds model.safetensors, config.json (the experiment config and
the model's constructor arguments as "architecture"), tokenizer.json, state.json (counters, data-stream state,
the weights' sha256) and trainer.pt (optimizer and RNG states, read with weights_only=True).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from klflow.config import Config
from klflow.data import TextTokenizer
from klflow.errors import KLFlowError
from klflow.model import Denoiser
from klflow.outputs import check_output_folder, write_atomic

FORMAT_VERSION = 1
LATEST = "latest"
LOCK = ".lock"
STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its configs, tokenizer and training state."""

    dir: Path
    model: Denoiser
    config: dict[str, Any]
    tokenizer: TextTokenizer
    state: dict[str, Any]

    def experiment(self) -> Config:
        """The experiment config the model was trained with."""
        try:
            experiment = self.config["experiment"]
        except KeyError:
            raise KLFlowError(f"{self.dir}/config.json has no experiment section") from None
        # The weights' own record decides (an unset model.input or model.time_conditioning follows
        # defaults that may change); checkpoints from before those keys existed were all trained on
        # the paper's simplex input with the plain output and no self-conditioning, and every bidirectional one read t.
        # An unset path.time_sampling is the one the method recorded it trained with, for the same reason.
        architecture = self.config["architecture"]
        model = {**experiment.get("model", {}), "input": architecture.get("input", "simplex"),
                 "time_conditioning": architecture.get("time_conditioning", True),
                 "output": architecture.get("output", "plain"),
                 "self_conditioning": architecture.get("self_conditioning", False)}
        path = dict(experiment.get("path", {}))
        if path.get("time_sampling") is None and "time_sampling" in self.config.get("method", {}):
            path["time_sampling"] = self.config["method"]["time_sampling"]
        return Config.from_dict({**experiment, "model": model, "path": path})


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    config: dict[str, Any],
    tokenizer: TextTokenizer,
    state: dict[str, Any],
    trainer_state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write run_dir/step-XXXXXXX atomically, point `latest` at it, keep the newest `keep` up to `step`.

    Folders of later steps belong to another history (a run resumed from an earlier checkpoint)
    and are never what rotation removes.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    final = run_dir / name
    # A killed writer leaves its temp directory behind; one writer per run, so any found is stale.
    for stale in run_dir.glob(".*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        write_model_files(tmp, model, config, tokenizer, {**state, "step": step})
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer.pt")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(run_dir / LATEST, name + "\n")
    history = sorted((int(match.group(1)), p) for p in run_dir.glob("step-*")
                     if p.is_dir() and (match := STEP_DIR.fullmatch(p.name)) and int(match.group(1)) <= step)
    for _, old in history[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an advisory lock on run_dir (created if missing) for one writer's whole run.

    A second writer gets a one-line error naming the holder's pid. A run folder this call created
    is removed again when the run fails before writing anything into it.
    """
    check_output_folder(run_dir, "--out")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_file = run_dir / LOCK
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise KLFlowError(f"{run_dir} is in use by another training (pid {holder}); wait for it to finish "
                              "or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        except BaseException:
            if created and {p.name for p in run_dir.iterdir()} <= {LOCK}:
                lock_file.unlink(missing_ok=True)
                run_dir.rmdir()
            raise


def write_model_files(directory: Path, model: Denoiser, config: dict[str, Any], tokenizer: TextTokenizer,
                      state: dict[str, Any]) -> None:
    """What load_checkpoint reads: model.safetensors, config.json (config with the format version and the
    model's "architecture"), tokenizer.json and state.json (state with the weights' sha256)."""
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(directory / "model.safetensors"))
    _write_json(directory / "config.json", {**config, "format_version": FORMAT_VERSION, "architecture": model.config()})
    tokenizer.save(directory / "tokenizer.json")
    _write_json(directory / "state.json", {**state, "model_sha256": _sha256(directory / "model.safetensors")})


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory whose `latest` names one."""
    path = Path(path)
    if not path.exists():
        raise KLFlowError(f"checkpoint not found: {path}")
    if (path / LATEST).is_file():
        name = (path / LATEST).read_text().strip()
        # An absolute path or ../ would serve another run's model under this run's name.
        if not STEP_DIR.fullmatch(name):
            raise KLFlowError(f"{path}/latest must name a step-NNNNNNN folder of this run, got {name!r}")
        path = path / name
        if not path.is_dir():
            raise KLFlowError(f"{path.parent}/latest names {name!r}, which does not exist")
    elif path.is_dir() and any(STEP_DIR.fullmatch(p.name) for p in path.glob("step-*")):
        raise KLFlowError(f"{path} holds step-* checkpoints but no 'latest' file naming the newest; write its name "
                          f"into {path}/latest to resume it, or choose another --out")
    if not (path / "model.safetensors").is_file():
        raise KLFlowError(f"{path} is not a klflow checkpoint (no model.safetensors, no 'latest' file)")
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint; any damage is a one-line KLFlowError."""
    directory = resolve_checkpoint_dir(path)
    config = _read_json(directory / "config.json")
    state = _read_json(directory / "state.json")
    if config.get("format_version") != FORMAT_VERSION:
        raise KLFlowError(f"{directory}: unsupported checkpoint format {config.get('format_version')!r}")
    expected = state.get("model_sha256")
    if expected != _sha256(directory / "model.safetensors"):
        raise KLFlowError(f"{directory}/model.safetensors is damaged (checksum mismatch)")
    tokenizer = TextTokenizer.from_file(directory / "tokenizer.json")
    try:
        model = Denoiser(**config["architecture"])
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
    except (KeyError, TypeError, RuntimeError) as err:
        raise KLFlowError(f"{directory}: weights do not match the recorded model config ({str(err).splitlines()[0]})") from None
    if tokenizer.vocab_size != config["architecture"]["vocab_size"]:
        raise KLFlowError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but the model expects {config['architecture']['vocab_size']}")
    model.to(device).eval()
    return Checkpoint(directory, model, config, tokenizer, state)


def load_trainer_state(directory: Path) -> dict[str, Any]:
    file = directory / "trainer.pt"
    if not file.is_file():
        raise KLFlowError(f"{directory} has no trainer state (trainer.pt); it cannot be resumed")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise KLFlowError(f"{file} is unreadable ({type(err).__name__})") from None


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text())
    except FileNotFoundError:
        raise KLFlowError(f"{file} is missing; not a complete klflow checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KLFlowError(f"{file} is not valid JSON (damaged checkpoint?)") from None
    if not isinstance(value, dict):
        raise KLFlowError(f"{file} must hold a JSON object")
    return value


def _write_json(file: Path, value: dict[str, Any]) -> None:
    file.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _fsync_dir(directory: Path) -> None:
    for file in directory.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
