"""The training loop: optimizer, schedule, mixed precision, validation, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from klflow import distributed
from klflow.checkpoint import (LATEST, STEP_DIR, load_checkpoint, load_trainer_state, resolve_checkpoint_dir, run_lock,
                               save_checkpoint)
from klflow.config import Config, TrainConfig
from klflow.data import Batch, BatchStream, PreparedData, TextTokenizer, make_batches, prepare, validation_batches
from klflow.data.indexed import index_seed
from klflow.data.registry import CORPORA
from klflow.data.shards import is_prepared_folder
from klflow.data.tokenizer import tokenizer_file
from klflow.distributed import Processes
from klflow.errors import KLFlowError
from klflow.methods import Method, build_method
from klflow.metrics import METRICS_EVERY, MetricsLog
from klflow.model import Denoiser
from klflow.progress import progress_bar
from klflow.runtime import Network, autocast_dtype, build_model, build_optimizers, network_forward, special_tokens

MAX_CONSECUTIVE_NONFINITE = 20
VALIDATION_SEED = 1234  # the same noise at every evaluation, so that validation losses compare
_TIMED_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n}/{total}s [{elapsed}<{remaining}{postfix}]"


@dataclass
class TrainResult:
    """What a training run did, with the figures a user asks for first."""

    run_dir: Path
    checkpoint: Path
    steps: int
    tokens: int
    train_seconds: float
    tokens_per_second: float
    val_loss: float | None
    skipped_steps: int
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunState:
    """The counters a run checkpoints and resumes from: optimizer steps, tokens, training seconds,
    skipped (non-finite) steps, the validation history and what the method learned from it (Method.learn)."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    skipped: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    learned: dict[str, Any] = field(default_factory=dict)

    @property
    def val_loss(self) -> float | None:
        """The latest validation loss, None before the first validation."""
        return self.history[-1]["val_loss"] if self.history else None


@dataclass
class Run:
    """A run set up: its processes, data, method, network and optimizers, and where it writes.

    network is the model inside its DistributedDataParallel / torch.compile wrappers and forward
    its Network; warmup_steps is the schedule's (see _warmup_steps); log prints on the main process only.
    """

    config: Config
    run_dir: Path
    procs: Processes
    device: torch.device
    dtype: torch.dtype | None
    micro: int
    accum: int
    tokenizer: TextTokenizer
    method: Method
    model: Denoiser
    network: torch.nn.Module
    forward: Network
    optimizers: list[torch.optim.Optimizer]
    stream: BatchStream
    validation: list[Batch]
    warmup_steps: int
    record: dict[str, Any]
    log: Callable[[str], None]

    @property
    def budget(self) -> float | None:
        """The time budget in seconds, None without train.max_minutes."""
        minutes = self.config.train.max_minutes
        return minutes * 60.0 if minutes else None

    def finished(self, state: RunState) -> bool:
        """Whether the run has made train.max_steps steps or spent its time budget."""
        budget = self.budget
        return state.step >= self.config.train.max_steps or bool(budget and state.train_seconds >= budget)


@dataclass(frozen=True)
class StepOutcome:
    """One optimizer step as every process agrees on it: the mean loss, the seconds it took, whether a
    stop was requested on any process, whether loss and gradient were finite, and the LR scale."""

    mean_loss: float
    seconds: float
    stopping: bool
    finite: bool
    lr_scale: float


def lr_scale(step: int, progress: float, warmup_steps: int, schedule: str, warmdown_fraction: float) -> float:
    """Linear warmup over steps, then constant, then (warmdown) linear decay to 0 over the last fraction.

    `progress` in [0, 1] is the larger of steps done / max_steps and time spent / time budget.
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "warmdown" and warmdown_fraction > 0 and progress > 1.0 - warmdown_fraction:
        return warm * max(0.0, (1.0 - progress) / warmdown_fraction)
    return warm


def load_data(config: Config, progress: bool = True) -> PreparedData:
    if config.data.dir:
        return PreparedData.load(Path(config.data.dir))
    if is_prepared_folder(config.data.source):  # what `klflow prepare` printed: the data, not a corpus of it
        return PreparedData.load(Path(config.data.source).expanduser())
    return prepare(config.data.source, None, config.data.vocab_size, config.data.val_fraction, config.data.seed,
                   progress=progress, tokenizer=config.data.tokenizer)


def train(config: Config, run_dir: Path, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train the configured method, writing checkpoints under run_dir.

    Single process, or one of N under torchrun (DistributedDataParallel; only rank 0 writes).
    A step draws `train.batch_size` sequences in total: micro-batches of `micro_batch_size` per
    process, accumulated. Micro-batch i (windows and path noise) depends only on (seed, i), so the
    same run gives the same batches on any number of processes and resumes from its step count.
    The main process holds run_dir's lock (klflow.checkpoint.run_lock) for the whole run.
    """
    with run_lock(run_dir) if distributed.is_main_process() else nullcontext():
        return _train(config, run_dir, resume, progress, log)


def _train(config: Config, run_dir: Path, resume: bool, progress: bool, log: Callable[[str], None]) -> TrainResult:
    config = with_absolute_paths(config)
    resume_from = _existing_checkpoint(run_dir)
    if resume_from is not None and not resume:
        raise KLFlowError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    run, state = _set_up(config, run_dir, resume_from, progress, log)
    stopped_by = _loop(run, state, resume_from, progress and run.procs.is_main)
    if stopped_by:
        run.log(f"stopped by {stopped_by} at step {state.step}; writing a final checkpoint")
    final = _save(run, state)
    if run.procs.distributed:
        run.log(f"parameters identical across {run.procs.world_size} processes: "
                f"{_parameters_in_sync(run.model, run.procs.world_size, run.device)}")
    distributed.stop()
    return TrainResult(run_dir, final, state.step, state.tokens, state.train_seconds,
                       state.tokens / max(state.train_seconds, 1e-9), state.val_loss, state.skipped, state.history)


def _set_up(config: Config, run_dir: Path, resume_from: Path | None, progress: bool,
            log: Callable[[str], None]) -> tuple[Run, RunState]:
    """Processes, data, method, model and optimizers, restored from resume_from if given, then wrapped
    for DistributedDataParallel / torch.compile (after the restore, so that every process starts from it)."""
    tc = config.train
    procs, device = distributed.start(tc.device)
    micro, accum = micro_batching(tc.batch_size, tc.micro_batch_size, procs.world_size)
    _seed_everything(tc.seed + procs.rank)
    log = log if procs.is_main else (lambda _: None)
    data = load_data(config, progress and procs.is_main)
    tokenizer = data.tokenizer()
    method = build_method(config.method.name, config, tokenizer.vocab_size, special_tokens(tokenizer))
    model = build_model(config, tokenizer.vocab_size, method.causal).to(device)
    optimizers = build_optimizers(model, tc.lr, tc.muon_lr, tc.betas, tc.weight_decay, tc.optimizer)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    layout_options = config.data.layout_options()
    stream = make_batches(data, "train", config.data.layout, tc.seq_len, micro, seed=tc.seed, **layout_options)
    validation = validation_batches(data, config.data.layout, tc.seq_len, tc.eval_windows, micro, **layout_options)
    state = RunState()
    if resume_from is not None:
        state = _restore(resume_from, model, optimizers, tokenizer)
        method.restore(state.learned)
        if state.step > tc.max_steps:
            raise KLFlowError(f"{run_dir} is at step {state.step}, past the target train.max_steps={tc.max_steps}; "
                              f"resume with --steps above {state.step}")
        log(f"resumed from {resume_from} at step {state.step}")
    network: torch.nn.Module = model
    if procs.distributed:
        # A self-conditioned model's estimate projection has no gradient on the batches without a first pass.
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=model.self_conditioning)
    if tc.compile:
        network = torch.compile(network)
    dtype = autocast_dtype(tc.precision, device)
    record = {"experiment": config.to_dict(), "method": method.describe(), "data_dir": str(data.dir.resolve())}
    run = Run(config, run_dir, procs, device, dtype, micro, accum, tokenizer, method, model, network,
              network_forward(network, dtype, device), optimizers, stream, validation, _warmup_steps(tc, log), record,
              log)
    _log_settings(run)
    return run, state


def _warmup_steps(tc: TrainConfig, log: Callable[[str], None]) -> int:
    """train.warmup_steps, or a tenth of the run when the warmup is not shorter than the run."""
    if tc.warmup_steps < tc.max_steps:
        return tc.warmup_steps
    # A warmup as long as the run never reaches the peak LR; a tenth of the run is the presets' ratio.
    warmup_steps = tc.max_steps // 10
    log(f"warning: train.warmup_steps={tc.warmup_steps} is not shorter than the run's {tc.max_steps} steps; "
        f"warming up over {warmup_steps} steps instead")
    return warmup_steps


def _log_settings(run: Run) -> None:
    """One line of what is trained, and how: size, vocabulary, method settings, device, precision, batch split."""
    tc = run.config.train
    settings = ", ".join(f"{k}={v}" for k, v in run.method.describe().items())
    run.log(f"{run.model.num_parameters() / 1e6:.2f}M parameters, V={run.tokenizer.vocab_size}, input={run.model.input}, "
            f"{settings}, device={run.device}, precision={'bf16' if run.dtype else 'fp32'}, optimizer={tc.optimizer}, "
            f"batch {tc.batch_size} = {run.procs.world_size} process(es) x {run.accum} x {run.micro}"
            + (", compiled" if tc.compile else ""))


def _loop(run: Run, state: RunState, last_saved: Path | None, progress: bool) -> str | None:
    """Optimizer steps until the run is finished or a stop is requested; returns the stop signal's name, if any.

    A step with a non-finite loss or gradient is skipped; MAX_CONSECUTIVE_NONFINITE of them in a row end the run.
    Validation every train.eval_interval steps and at the end, a checkpoint every train.checkpoint_interval
    steps before the end (the caller writes the final one).
    """
    tc = run.config.train
    report = TrainingReport(run, state, progress)
    consecutive_bad = 0
    run.model.train()
    with _stop_requests() as stop:
        while not run.finished(state):
            outcome = _optimizer_step(run, state, stop)
            if not outcome.finite:
                state.skipped += 1
                consecutive_bad += 1
                report.skipped(state)
                if consecutive_bad >= MAX_CONSECUTIVE_NONFINITE:
                    raise KLFlowError(f"{consecutive_bad} non-finite steps in a row at step {state.step}; the last good "
                                      f"checkpoint is {last_saved or 'none (no checkpoint yet)'}; try a lower train.lr")
                if outcome.stopping:
                    break
                continue
            consecutive_bad = 0
            state.step += 1
            state.tokens += tc.batch_size * tc.seq_len
            state.train_seconds += outcome.seconds
            report.stepped(state, outcome.mean_loss)
            done = run.finished(state) or outcome.stopping
            _validate_and_log(run, state, report, outcome.lr_scale, state.step % tc.eval_interval == 0 or done)
            if outcome.stopping:
                break
            if state.step % tc.checkpoint_interval == 0 and not done:
                last_saved = _save(run, state)
    report.close()
    return stop.requested


def _optimizer_step(run: Run, state: RunState, stop: _StopFlag) -> StepOutcome:
    """Set the scheduled learning rate, accumulate the step's gradients, clip them and, when loss and
    gradient are finite, update the parameters; the gradients are cleared either way.

    One reduction agrees on the mean loss, the time spent and any stop request across processes.
    """
    tc = run.config.train
    started = time.perf_counter()
    budget = run.budget
    fraction = max(state.step / tc.max_steps, state.train_seconds / budget if budget else 0.0)
    scale = lr_scale(state.step, fraction, run.warmup_steps, tc.schedule, tc.warmdown_fraction)
    for opt in run.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * scale
    loss_sum = _accumulate_gradients(run, (state.step + state.skipped) * run.procs.world_size * run.accum
                                     + run.procs.rank * run.accum)
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), tc.grad_clip or float("inf"))
    shared = distributed.all_reduce_sum(torch.tensor(
        [loss_sum / run.accum, time.perf_counter() - started, 1.0 if stop.requested else 0.0],
        dtype=torch.float64, device=run.device)).cpu() / run.procs.world_size
    mean_loss, seconds, stopping = shared.tolist()
    finite = math.isfinite(mean_loss) and bool(torch.isfinite(norm))
    for opt in run.optimizers:
        if finite:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return StepOutcome(mean_loss, seconds, bool(stopping), finite, scale)


def _accumulate_gradients(run: Run, first_index: int) -> float:
    """Backpropagate loss / accum over this process's micro-batches first_index, first_index + 1, ...;
    returns the sum of their losses.

    Micro-batch i's windows and path noise depend only on (train.seed, i). Gradients are averaged over
    processes only on the last micro-batch.
    """
    seed = run.config.train.seed
    loss_sum = torch.zeros((), device=run.device)
    for a in range(run.accum):
        ids, cond_mask = run.stream.batch(first_index + a, run.micro)
        ids = ids.to(run.device, non_blocking=True)
        cond_mask = cond_mask.to(run.device) if cond_mask is not None else None
        noise = torch.Generator(device=run.device).manual_seed(index_seed(seed, first_index + a))
        sync = a == run.accum - 1 or not run.procs.distributed
        with nullcontext() if sync else run.network.no_sync():
            loss = run.method.loss(run.forward, ids, cond_mask, generator=noise)
            (loss / run.accum).backward()
        loss_sum += loss.detach()
    return loss_sum.item()


def _validate_and_log(run: Run, state: RunState, report: TrainingReport, scale: float, validating: bool) -> None:
    """Validate on the main process (the unwrapped model, the method's validation_scores) and append to
    the history; every process's method learns from the scores (Method.learn); write a metrics row when
    validating and every METRICS_EVERY steps."""
    if validating:
        scores = None
        if run.procs.is_main:
            run.model.eval()
            scores = run.method.validation_scores(network_forward(run.model, run.dtype, run.device), run.validation,
                                                  run.device, VALIDATION_SEED)
            run.model.train()
            state.history.append({"step": state.step, "tokens": state.tokens, "train_loss": report.smoothed,
                                  **scores, "lr_scale": scale, "train_seconds": round(state.train_seconds, 2)})
        state.learned = run.method.learn(distributed.broadcast_from_main(scores))
        distributed.barrier()
    if run.procs.is_main and (validating or state.step % METRICS_EVERY == 0):
        report.write_metrics(state, scale, state.history[-1] if validating else {})


def _save(run: Run, state: RunState) -> Path | None:
    """Checkpoint the run at its step on the main process (its path; None elsewhere), then wait for all."""
    path = None
    if run.procs.is_main:
        counters = {"tokens": state.tokens, "train_seconds": state.train_seconds, "skipped_steps": state.skipped,
                    "val_loss": state.val_loss, "history": state.history, "world_size": run.procs.world_size,
                    "learned": state.learned}
        trainer = {"optimizers": [o.state_dict() for o in run.optimizers], "torch_rng": torch.get_rng_state(),
                   "numpy_rng": _numpy_rng_state(), "python_rng": _python_rng_state()}
        path = save_checkpoint(run.run_dir, state.step, run.model, run.record, run.tokenizer, counters, trainer,
                               keep=run.config.train.keep_checkpoints)
    distributed.barrier()
    return path


class TrainingReport:
    """What a run shows while it trains: the progress bar, the metrics file (metrics.jsonl and
    TensorBoard) and the training loss, smoothed for the bar and averaged over each metrics row."""

    def __init__(self, run: Run, state: RunState, progress: bool) -> None:
        self.budget = run.budget
        self.is_main = run.procs.is_main
        max_steps = run.config.train.max_steps
        # Under a time budget the bar counts seconds, so its ETA is the budget's, not max_steps'.
        self.bar = (progress_bar(round(self.budget), "train", "s", not progress,
                                 min(round(state.train_seconds), round(self.budget)), bar_format=_TIMED_BAR,
                                 dynamic_ncols=True) if self.budget else
                    progress_bar(max_steps, "train", "step", not progress, state.step, dynamic_ncols=True))
        self.metrics = MetricsLog(run.run_dir, tensorboard=self.is_main)
        self.smoothed: float | None = None
        self.window: list[float] = []  # training losses since the last metrics row

    def skipped(self, state: RunState) -> None:
        """Report a skipped non-finite step."""
        if self.is_main:
            self.bar.write(f"step {state.step}: non-finite loss or gradient, step skipped ({state.skipped} so far)")
            self.metrics.write({"step": state.step, "skipped_nonfinite": state.skipped})

    def stepped(self, state: RunState, loss: float) -> None:
        """Count a step of training loss `loss`: smoothed = 0.95 smoothed + 0.05 loss, and the bar moves."""
        self.smoothed = loss if self.smoothed is None else 0.95 * self.smoothed + 0.05 * loss
        self.window.append(loss)
        self.bar.update(min(round(state.train_seconds), round(self.budget)) - self.bar.n if self.budget else 1)
        val_loss = state.val_loss
        self.bar.set_postfix(step=state.step, loss=f"{self.smoothed:.3f}", val=f"{val_loss:.3f}" if val_loss else "-",
                             tok_s=f"{state.tokens / max(state.train_seconds, 1e-9):.0f}")

    def write_metrics(self, state: RunState, scale: float, validation: dict[str, Any]) -> None:
        """A metrics row: counters, the mean training loss since the last row, and the validation row if any."""
        self.metrics.write({"step": state.step, "tokens": state.tokens, "train_seconds": round(state.train_seconds, 2),
                            "loss": sum(self.window) / len(self.window),
                            "tokens_per_second": round(state.tokens / state.train_seconds, 1), "lr_scale": scale,
                            **validation})
        self.window.clear()

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()


def with_absolute_paths(config: Config) -> Config:
    """config with a local data.source, data.dir and tokenizer file made absolute, so that the run's
    record still finds them from another working directory (--resume, klflow eval)."""
    data = config.data

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    source = data.source
    if source not in CORPORA and Path(source).expanduser().exists():
        source = absolute(source)
    tokenizer = absolute(data.tokenizer) if tokenizer_file(data.tokenizer) is not None else data.tokenizer
    directory = absolute(data.dir) if data.dir else data.dir
    return dataclasses.replace(config, data=dataclasses.replace(data, source=source, dir=directory, tokenizer=tokenizer))


def micro_batching(batch_size: int, micro_batch_size: int | None, world_size: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) that make up a global batch of batch_size."""
    micro = micro_batch_size or batch_size // world_size
    if micro < 1 or batch_size % (micro * world_size):
        raise KLFlowError(f"train.batch_size={batch_size} must be a multiple of micro_batch_size x processes "
                          f"= {micro_batch_size or 'auto'} x {world_size}")
    return micro, batch_size // (micro * world_size)


def _parameters_in_sync(model: torch.nn.Module, world_size: int, device: torch.device) -> bool:
    """Whether every process holds the same parameters (their checksums equal the mean checksum)."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    checksum = torch.stack([flat.sum(), (flat * flat).sum(), flat.abs().max()]).to(device)
    mean = distributed.all_reduce_sum(checksum.clone()) / world_size
    return bool(torch.allclose(mean, checksum, rtol=1e-12, atol=0))


def _existing_checkpoint(run_dir: Path) -> Path | None:
    if (run_dir / LATEST).exists() or any(STEP_DIR.fullmatch(p.name) for p in run_dir.glob("step-*")):
        return resolve_checkpoint_dir(run_dir)
    return None


def _restore(directory: Path, model: Denoiser, optimizers: list[torch.optim.Optimizer],
             tokenizer: TextTokenizer) -> RunState:
    """Load a checkpoint's weights, optimizer and RNG states into this run; return its counters."""
    ckpt = load_checkpoint(directory)
    if ckpt.tokenizer.fingerprint != tokenizer.fingerprint:
        raise KLFlowError(f"{directory} was trained with a different tokenizer than the data in use")
    try:
        model.load_state_dict(ckpt.model.state_dict())
    except RuntimeError:
        raise KLFlowError(f"{directory}: the model config differs from the checkpoint's; resume with the same config") from None
    trainer = load_trainer_state(directory)
    if len(trainer["optimizers"]) != len(optimizers):
        raise KLFlowError(f"{directory} was trained with a different optimizer; resume with the same train.optimizer")
    for opt, state in zip(optimizers, trainer["optimizers"]):
        opt.load_state_dict(state)
    torch.set_rng_state(trainer["torch_rng"])
    _set_numpy_rng_state(trainer["numpy_rng"])
    _set_python_rng_state(trainer["python_rng"])
    state = ckpt.state
    return RunState(state["step"], state["tokens"], state["train_seconds"], state["skipped_steps"], list(state["history"]),
                    dict(state.get("learned", {})))


# RNG states go into trainer.pt, which is read with weights_only=True: tensors and plain values only.
def _numpy_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
            "cached": cached}


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["kind"], keys, state["pos"], state["has_gauss"], state["cached"]))


def _python_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _set_python_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["version"], tuple(state["internal"].tolist()), state["gauss"]))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _StopFlag:
    requested: str | None = None


@contextmanager
def _stop_requests() -> Iterator[_StopFlag]:
    """Turn SIGINT/SIGTERM into a flag so the loop ends after the current step and checkpoints."""
    flag = _StopFlag()
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        flag.requested = signal.Signals(signum).name

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: signals stay with the caller
        previous = {}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
