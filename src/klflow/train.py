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
from klflow.config import Config
from klflow.data import Batch, PreparedData, make_batches, prepare, validation_batches
from klflow.data.indexed import index_seed
from klflow.data.registry import CORPORA
from klflow.data.shards import is_prepared_folder
from klflow.data.tokenizer import tokenizer_file
from klflow.errors import KLFlowError
from klflow.methods import Method, SpecialTokens, build_method
from klflow.metrics import METRICS_EVERY, MetricsLog
from klflow.model import Denoiser
from klflow.progress import progress_bar

MAX_CONSECUTIVE_NONFINITE = 20
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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for the network (never for the path math), or None for fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def network_forward(model: torch.nn.Module, dtype: torch.dtype | None, device: torch.device) -> Callable:
    """model(x_t, t) under autocast, returning float32 logits; the caller's tensors stay fp32.

    Keyword options (a causal model's KV `cache`, `posterior=True`) pass through; the closure's
    `input` is the Denoiser's inside any torch.compile / DistributedDataParallel wrapper, so that
    KLPath's losses see an evidence model (klflow.flow.path.Model).
    """

    def forward(x: torch.Tensor, t: torch.Tensor | None, **options: Any) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(x, t, **options).float()

    inner = getattr(model, "_orig_mod", model)
    forward.input = getattr(getattr(inner, "module", inner), "input", "simplex")
    return forward


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


def lr_scale(step: int, progress: float, warmup_steps: int, schedule: str, warmdown_fraction: float) -> float:
    """Linear warmup over steps, then constant, then (warmdown) linear decay to 0 over the last fraction.

    `progress` in [0, 1] is the larger of steps done / max_steps and time spent / time budget.
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "warmdown" and warmdown_fraction > 0 and progress > 1.0 - warmdown_fraction:
        return warm * max(0.0, (1.0 - progress) / warmdown_fraction)
    return warm


@torch.no_grad()
def evaluate(forward: Callable, method: Method, batches: list[Batch], device: torch.device,
             seed: int = 1234) -> dict[str, float]:
    """Mean validation loss over fixed batches with a fixed noise seed (comparable across evals).

    A method with its own `validation_scores` (klflow: the uniform-t loss, its value per band of
    t and, with given positions, `val_loss_free` over the generated ones; see klflow.flow.validation)
    computes them; otherwise the score is `method.loss` averaged over the sequences.
    """
    if hasattr(method, "validation_scores"):
        return method.validation_scores(forward, batches, device, seed)
    total, count = 0.0, 0
    for ids, cond_mask in batches:
        ids = ids.to(device)
        cond_mask = cond_mask.to(device) if cond_mask is not None else None
        generator = torch.Generator(device=device).manual_seed(seed + count)
        total += method.loss(forward, ids, cond_mask, generator=generator).item() * len(ids)
        count += len(ids)
    return {"val_loss": total / count}


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
    tc = config.train
    resume_from = _existing_checkpoint(run_dir)
    if resume_from is not None and not resume:
        raise KLFlowError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    procs, device = distributed.start(tc.device)
    micro, accum = micro_batching(tc.batch_size, tc.micro_batch_size, procs.world_size)
    dtype = autocast_dtype(tc.precision, device)
    _seed_everything(tc.seed + procs.rank)
    progress = progress and procs.is_main
    log = log if procs.is_main else (lambda _: None)

    data = load_data(config, progress)
    tokenizer = data.tokenizer()
    method = build_method(config.method.name, config, tokenizer.vocab_size, special_tokens(tokenizer))
    model = Denoiser(tokenizer.vocab_size, causal=method.causal, **model_kwargs(config)).to(device)
    optimizers = build_optimizers(model, tc.lr, tc.muon_lr, tc.betas, tc.weight_decay, tc.optimizer)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    layout_options = config.data.layout_options()
    stream = make_batches(data, "train", config.data.layout, tc.seq_len, micro, seed=tc.seed, **layout_options)
    val = validation_batches(data, config.data.layout, tc.seq_len, tc.eval_windows, micro, **layout_options)

    step, tokens, train_seconds, skipped = 0, 0, 0.0, 0
    history: list[dict[str, Any]] = []
    if resume_from is not None:
        step, tokens, train_seconds, skipped, history = _restore(resume_from, model, optimizers, tokenizer)
        if step > tc.max_steps:
            raise KLFlowError(f"{run_dir} is at step {step}, past the target train.max_steps={tc.max_steps}; "
                              f"resume with --steps above {step}")
        log(f"resumed from {resume_from} at step {step}")
    network = model
    if procs.distributed:
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        network = torch.compile(network)
    forward = network_forward(network, dtype, device)
    budget = tc.max_minutes * 60.0 if tc.max_minutes else None
    warmup_steps = tc.warmup_steps
    if warmup_steps >= tc.max_steps:
        # A warmup as long as the run never reaches the peak LR; a tenth of the run is the presets' ratio.
        warmup_steps = tc.max_steps // 10
        log(f"warning: train.warmup_steps={tc.warmup_steps} is not shorter than the run's {tc.max_steps} steps; "
            f"warming up over {warmup_steps} steps instead")
    record = {"experiment": config.to_dict(), "method": method.describe(), "data_dir": str(data.dir.resolve())}
    settings = ", ".join(f"{k}={v}" for k, v in method.describe().items())
    log(f"{model.num_parameters() / 1e6:.2f}M parameters, V={tokenizer.vocab_size}, input={model.input}, {settings}, device={device}, "
        f"precision={'bf16' if dtype else 'fp32'}, optimizer={tc.optimizer}, batch {tc.batch_size} = "
        f"{procs.world_size} process(es) x {accum} x {micro}" + (", compiled" if tc.compile else ""))

    def checkpoint(val_loss: float | None) -> Path | None:
        path = None
        if procs.is_main:
            state = {"tokens": tokens, "train_seconds": train_seconds, "skipped_steps": skipped,
                     "val_loss": val_loss, "history": history, "world_size": procs.world_size}
            trainer = {"optimizers": [o.state_dict() for o in optimizers], "torch_rng": torch.get_rng_state(),
                       "numpy_rng": _numpy_rng_state(), "python_rng": _python_rng_state()}
            path = save_checkpoint(run_dir, step, model, record, tokenizer, state, trainer, keep=tc.keep_checkpoints)
        distributed.barrier()
        return path

    val_loss = history[-1]["val_loss"] if history else None
    consecutive_bad = 0
    # Under a time budget the bar counts seconds, so its ETA is the budget's, not max_steps'.
    bar = (progress_bar(round(budget), "train", "s", not progress, min(round(train_seconds), round(budget)),
                        bar_format=_TIMED_BAR, dynamic_ncols=True) if budget else
           progress_bar(tc.max_steps, "train", "step", not progress, step, dynamic_ncols=True))
    smoothed = None
    window: list[float] = []  # training losses since the last metrics row
    metrics = MetricsLog(run_dir, tensorboard=procs.is_main)
    last_saved = resume_from
    model.train()
    with _stop_requests() as stop:
        while step < tc.max_steps and not (budget and train_seconds >= budget):
            started = time.perf_counter()
            fraction = max(step / tc.max_steps, train_seconds / budget if budget else 0.0)
            scale = lr_scale(step, fraction, warmup_steps, tc.schedule, tc.warmdown_fraction)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * scale
            first_index = (step + skipped) * procs.world_size * accum + procs.rank * accum
            loss_sum = torch.zeros((), device=device)
            for a in range(accum):
                ids, cond_mask = stream.batch(first_index + a, micro)
                ids = ids.to(device, non_blocking=True)
                cond_mask = cond_mask.to(device) if cond_mask is not None else None
                noise = torch.Generator(device=device).manual_seed(index_seed(tc.seed, first_index + a))
                # Gradients are averaged over processes only on the last micro-batch.
                sync = a == accum - 1 or not procs.distributed
                with nullcontext() if sync else network.no_sync():
                    loss = method.loss(forward, ids, cond_mask, generator=noise)
                    (loss / accum).backward()
                loss_sum += loss.detach()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
            # One reduction agrees on the mean loss, the time spent and any stop request across processes.
            shared = distributed.all_reduce_sum(torch.tensor(
                [loss_sum.item() / accum, time.perf_counter() - started, 1.0 if stop.requested else 0.0],
                dtype=torch.float64, device=device)).cpu() / procs.world_size
            mean_loss, seconds, stopping = shared.tolist()
            if not (math.isfinite(mean_loss) and bool(torch.isfinite(norm))):
                skipped += 1
                consecutive_bad += 1
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                if procs.is_main:
                    bar.write(f"step {step}: non-finite loss or gradient, step skipped ({skipped} so far)")
                    metrics.write({"step": step, "skipped_nonfinite": skipped})
                if consecutive_bad >= MAX_CONSECUTIVE_NONFINITE:
                    raise KLFlowError(f"{consecutive_bad} non-finite steps in a row at step {step}; the last good "
                                      f"checkpoint is {last_saved or 'none (no checkpoint yet)'}; try a lower train.lr")
                if stopping:
                    break
                continue
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            consecutive_bad = 0
            step += 1
            tokens += tc.batch_size * tc.seq_len
            train_seconds += seconds
            smoothed = mean_loss if smoothed is None else 0.95 * smoothed + 0.05 * mean_loss
            window.append(mean_loss)
            bar.update(min(round(train_seconds), round(budget)) - bar.n if budget else 1)
            bar.set_postfix(step=step, loss=f"{smoothed:.3f}", val=f"{val_loss:.3f}" if val_loss else "-",
                            tok_s=f"{tokens / max(train_seconds, 1e-9):.0f}")
            done = step >= tc.max_steps or bool(budget and train_seconds >= budget) or bool(stopping)
            validating = step % tc.eval_interval == 0 or done
            if validating:
                if procs.is_main:
                    model.eval()
                    scores = evaluate(network_forward(model, dtype, device), method, val, device)
                    val_loss = scores["val_loss"]
                    model.train()
                    history.append({"step": step, "tokens": tokens, "train_loss": smoothed, **scores,
                                    "lr_scale": scale, "train_seconds": round(train_seconds, 2)})
                distributed.barrier()
            if procs.is_main and (validating or step % METRICS_EVERY == 0):
                metrics.write({"step": step, "tokens": tokens, "train_seconds": round(train_seconds, 2),
                               "loss": sum(window) / len(window), "tokens_per_second": round(tokens / train_seconds, 1),
                               "lr_scale": scale, **(history[-1] if validating else {})})
                window.clear()
            if stopping:
                break
            if step % tc.checkpoint_interval == 0 and not done:
                last_saved = checkpoint(val_loss)
    bar.close()
    metrics.close()
    if stop.requested:
        log(f"stopped by {stop.requested} at step {step}; writing a final checkpoint")
    final = checkpoint(val_loss)
    if procs.distributed:
        log(f"parameters identical across {procs.world_size} processes: "
            f"{_parameters_in_sync(model, procs.world_size, device)}")
    distributed.stop()
    return TrainResult(run_dir, final, step, tokens, train_seconds, tokens / max(train_seconds, 1e-9), val_loss,
                       skipped, history)


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


def model_kwargs(config: Config) -> dict[str, Any]:
    """The Denoiser keywords of an experiment (the evidence input also takes the path's beta)."""
    m = config.model
    # klflow's evidence input computes the KL path's posterior, so it needs the path's beta; the simplex
    # flows feed their own path's posterior (SimplexFlow.single_token_posterior).
    beta = config.path.beta if config.method.name == "klflow" else None
    evidence = {"input": "evidence", "path_beta": beta} if config.denoiser_input == "evidence" else {}
    return dict(n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model, mlp_ratio=m.mlp_ratio, dropout=m.dropout,
                rope_base=m.rope_base, time_scale=m.time_scale, time_conditioning=config.time_conditioning, **evidence)


def _existing_checkpoint(run_dir: Path) -> Path | None:
    if (run_dir / LATEST).exists() or any(STEP_DIR.fullmatch(p.name) for p in run_dir.glob("step-*")):
        return resolve_checkpoint_dir(run_dir)
    return None


def _restore(directory: Path, model: Denoiser, optimizers: list[torch.optim.Optimizer],
             tokenizer: Any) -> tuple[int, int, float, int, list[dict[str, Any]]]:
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
    return state["step"], state["tokens"], state["train_seconds"], state["skipped_steps"], list(state["history"])


def special_tokens(tokenizer: Any) -> SpecialTokens:
    return SpecialTokens(eot=tokenizer.eot_id, pad=tokenizer.pad_id, mask=tokenizer.mask_id)


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
