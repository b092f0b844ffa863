"""Side-by-side timings of one training step, reported as ratios measured in the same run.

    python benchmarks/train_step.py [--vocab 4096] [--batch 16] [--seq-len 128] [--repeats 7]
    python benchmarks/train_step.py --preset gpt2-small-150m --batch 16 --dtypes bf16 --compile   # a GPU
    python benchmarks/train_step.py --self-conditioning [--rate 0.5]   # the cost of self-conditioning
    python benchmarks/train_step.py --subnormals   # the soft-input floor (klflow.model.SOFT_INPUT_FLOOR) on and off

Prints: the KL-path work of each denoiser input (the paper's simplex input: source sampling,
interpolation, softmax into x_t; klflow's default evidence input: source sampling into the
posterior q(x_t, t)) against the full step; a klflow step (forward + backward) with each input
against an autoregressive step of the same backbone and batch (the median over rounds of the ratio
of the two steps timed side by side in each round, so that shared cores slowing down between rounds
cancel out, and its range); fp32 against bf16
autocast; the model FLOP utilisation (MFU) against this machine's measured matmul peak; and the peak
memory of each step (CUDA: the allocator's high-water mark; CPU: the rise of the resident-set
high-water mark, each step measured alone in a fresh process).

--self-conditioning instead: one klflow optimizer step without self-conditioning and one with a first pass
(a batch that gets the estimate), interleaved on the same batch, their ratio, and the mean ratio at
train.self_condition_rate r, 1 + r (ratio - 1), since the other batches cost what a plain step costs.

--subnormals instead: a klflow training step and a sampler's network call (evidence input, q of x_t at
0.2 / 0.5 / 0.9 t_max), each with the soft input's entries below klflow.model.SOFT_INPUT_FLOOR read as 0 (as
klflow runs) and with the floor at 0 (every entry kept, so that x @ W computes their subnormal products),
interleaved; their ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from typing import Callable

import klflow  # noqa: F401  before torch, as in the CLI: it sets PyTorch's huge-page allocation (klflow/__init__.py)
import torch
import torch.nn.functional as F

from klflow.bench.memory import peak_memory as stage_peak_memory
from klflow.bench.timing import (
    interleaved_rounds,
    matmul_peak,
    optimizer_step,
    paired_ratio,
    synchronize,
    training_step_seconds,
)
from klflow.config import load_config
from klflow.flow.path import INPUTS, SELF_CONDITION_RATE, KLPath
from klflow.model import Denoiser
from klflow.runtime import network_forward

GPT2_VOCAB = 50259  # GPT-2's 50257 tokens plus klflow's pad and mask
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
PATH_ROWS = {"simplex": "path: source + interpolation + softmax (x_t)", "evidence": "path: source + posterior q(x_t, t)"}


def kl_row(input: str, dtype: str) -> str:
    return f"klflow step {dtype}, {input} input"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="take the backbone, sequence length and vocabulary from a klflow preset")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument("--inputs", default=",".join(INPUTS), help="klflow denoiser inputs to time, of simplex,evidence")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--methods", action="store_true",
                        help="instead: one training step of every registered method, tokens/s relative to klflow")
    parser.add_argument("--self-conditioning", action="store_true",
                        help="instead: a klflow optimizer step with a self-conditioning first pass against one without")
    parser.add_argument("--rate", type=float, default=SELF_CONDITION_RATE,
                        help="with --self-conditioning: the train.self_condition_rate the mean cost is given at")
    parser.add_argument("--subnormals", action="store_true",
                        help="instead: a klflow step and a sampling call with the soft-input floor and without it")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # child process: peak memory of one step
    args = parser.parse_args(argv)
    if args.preset:
        config = load_config(args.preset)
        args.layers, args.width, args.heads = config.model.n_layer, config.model.d_model, config.model.n_head
        args.seq_len = config.train.seq_len
        args.vocab = GPT2_VOCAB if config.data.tokenizer == "gpt2" else config.data.vocab_size
    args.dtypes = [name.strip() for name in args.dtypes.split(",")]
    unknown = [name for name in args.dtypes if name not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    args.inputs = [name.strip() for name in args.inputs.split(",")]
    unknown = [name for name in args.inputs if name not in INPUTS]
    if unknown:
        parser.error(f"unknown input {unknown[0]!r}; choose from {', '.join(INPUTS)}")
    return args


class Steps:
    """The timed pieces: the path alone, the input projection alone, klflow (per input) and ar steps per dtype."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        torch.manual_seed(0)
        V, B, L = args.vocab, args.batch, args.seq_len
        self.path = KLPath(V)
        self.eager_path = self.path
        if args.compile:
            self.path = KLPath(V).compile()
        self.ids = torch.randint(0, V, (B, L), device=device)
        self.t = torch.rand(B, device=device) * self.path.t_max
        shape = dict(n_layer=args.layers, n_head=args.heads, d_model=args.width)
        self.denoiser = Denoiser(V, **shape).to(device)
        self.networks = {"simplex": self.denoiser, "ar": Denoiser(V, **shape, causal=True).to(device)}
        if "evidence" in args.inputs:
            self.networks["evidence"] = Denoiser(V, **shape, input="evidence", path_beta=self.path.beta).to(device)
        if args.compile:
            self.networks = {name: torch.compile(net) for name, net in self.networks.items()}
        self.device, self.V = device, V
        # Builders, so that a peak-memory child process allocates only the step it measures.
        self.builders: dict[str, Callable[[], Callable[[], object]]] = {}
        for input in args.inputs:
            self.builders[PATH_ROWS[input]] = lambda input=input: self._path_work(input, self.path)
            if args.compile:
                self.builders[PATH_ROWS[input] + ", eager"] = lambda input=input: self._path_work(input, self.eager_path)
        self.builders["input projection x_t @ W (fp32, forward)"] = self._input_projection
        for name in args.dtypes:
            for input in args.inputs:
                self.builders[kl_row(input, name)] = lambda dtype=DTYPES[name], input=input: self._kl_step(input, dtype)
                if args.compile:
                    self.builders[kl_row(input, name) + ", eager path"] = (
                        lambda dtype=DTYPES[name], input=input: self._kl_step(input, dtype, self.eager_path))
            self.builders[f"ar step {name}"] = lambda dtype=DTYPES[name]: self._ar_step(dtype)

    def build(self, names: list[str] | None = None) -> dict[str, Callable[[], object]]:
        return {name: build() for name, build in self.builders.items() if names is None or name in names}

    def _path_work(self, input: str, path: KLPath) -> Callable[[], torch.Tensor]:
        sample = path.sample_posterior if input == "evidence" else path.sample_x_t
        return lambda: sample(self.ids, self.t)

    def _input_projection(self) -> Callable[[], torch.Tensor]:
        x = torch.softmax(torch.randn(*self.ids.shape, self.V, device=self.device), -1)
        return lambda: x @ self.denoiser.embed

    def _kl_step(self, input: str, dtype: torch.dtype | None, path: KLPath | None = None) -> Callable[[], None]:
        forward = network_forward(self.networks[input], dtype, self.device)
        path = path or self.path
        return lambda: path.loss(forward, self.ids, generator=None).backward()

    def _ar_step(self, dtype: torch.dtype | None) -> Callable[[], None]:
        forward = network_forward(self.networks["ar"], dtype, self.device)
        ids, V = self.ids, self.V
        return lambda: F.cross_entropy(forward(ids[:, :-1], None).reshape(-1, V), ids[:, 1:].reshape(-1)).backward()

    def flops_per_token(self) -> tuple[float, float]:
        """Weight FLOPs per token of a forward + backward: (klflow, ar).

        6 per weight (forward, input and weight gradients), except the input projection: klflow's
        x_t @ W needs no input gradient (4 per weight), ar's embedding is a lookup (0). Attention
        scores are excluded, as in the usual 6N count.
        """
        embed = self.denoiser.embed.numel()
        time_mlp = sum(p.numel() for name, p in self.denoiser.named_parameters() if name.startswith("time"))
        body = self.denoiser.num_parameters() - embed - time_mlp
        return 6 * body + 4 * embed, 6 * body


def peak_memory(steps: Steps, fns: dict[str, Callable[[], object]], name: str) -> float:
    """Bytes a step adds at its peak over what the models and inputs already hold."""
    if steps.device.type == "cuda":
        fns[name]()
        synchronize(steps.device)
        torch.cuda.reset_peak_memory_stats(steps.device)
        base = torch.cuda.memory_allocated(steps.device)
        fns[name]()
        synchronize(steps.device)
        return torch.cuda.max_memory_allocated(steps.device) - base
    # CPU: the allocator keeps no statistics; a fresh process per step isolates its high-water mark.
    argv = [a for a in sys.argv[1:] if a != "--no-memory"] + ["--only", name]
    out = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def child_peak_memory(args: argparse.Namespace) -> None:
    """Run one step once in this fresh process; print the rise of the peak resident set, in bytes."""
    step = Steps(args, torch.device("cpu")).build([args.only])[args.only]
    with stage_peak_memory(torch.device("cpu")) as record:
        step()
    print(record["peak_bytes"] - record.get("rss_at_start_bytes", 0))


def main() -> None:
    args = parse_args()
    if args.only:
        child_peak_memory(args)
        return
    if args.methods:
        compare_methods(args)
        return
    if args.self_conditioning:
        compare_self_conditioning(args)
        return
    if args.subnormals:
        compare_subnormals(args)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    steps = Steps(args, device)
    fns = steps.build()
    B, L, V = args.batch, args.seq_len, args.vocab
    rounds = interleaved_rounds(fns, args.repeats, device)
    rows = {name: statistics.median(seconds) for name, seconds in rounds.items()}
    peaks = {name: matmul_peak(dtype or torch.float32, device) for name, dtype in DTYPES.items() if name in args.dtypes}
    kl_flops, ar_flops = steps.flops_per_token()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device={name} torch={torch.__version__} V={V} B={B} L={L} "
          f"backbone={args.layers}x{args.width} params={steps.denoiser.num_parameters() / 1e6:.1f}M"
          + (" compiled" if args.compile else ""))
    memory = {} if args.no_memory else {row: peak_memory(steps, fns, row) for row in fns if "step" in row}
    for row, seconds in rows.items():
        extra = f"  peak +{memory[row] / 2**20:8.0f} MiB" if row in memory else ""
        print(f"  {row:48s} {seconds * 1e3:9.2f} ms{extra}")
    tokens = B * L
    for dtype in args.dtypes:
        ar = rows[f"ar step {dtype}"]
        print(f"  {dtype}: ar {tokens / ar:,.0f} tok/s, MFU {ar_flops * tokens / ar / peaks[dtype]:.1%} of the measured "
              f"matmul peak {peaks[dtype] / 1e12:.3f} TFLOP/s")
        for input in args.inputs:
            kl = rows[kl_row(input, dtype)]
            ratio, low, high = paired_ratio(rounds[kl_row(input, dtype)], rounds[f"ar step {dtype}"])
            print(f"  {dtype}, {input} input: klflow {tokens / kl:,.0f} tok/s, klflow/ar step time {ratio:.2f} "
                  f"({low:.2f}-{high:.2f} over {args.repeats} rounds), "
                  f"MFU {kl_flops * tokens / kl / peaks[dtype]:.1%}, path share {rows[PATH_ROWS[input]] / kl:.1%}")
            eager = rows.get(kl_row(input, dtype) + ", eager path")
            if eager is not None:
                eager_ratio = paired_ratio(rounds[kl_row(input, dtype) + ", eager path"], rounds[f"ar step {dtype}"])[0]
                print(f"    with the eager (unfused) path: klflow/ar step time {eager_ratio:.2f}, "
                      f"path share {rows[PATH_ROWS[input] + ', eager'] / eager:.1%}")
    if set(DTYPES) <= set(args.dtypes):
        print("  bf16 speed-up over fp32: " + ", ".join(
            f"klflow {input} {rows[kl_row(input, 'fp32')] / rows[kl_row(input, 'bf16')]:.2f}x" for input in args.inputs)
            + f", ar {rows['ar step fp32'] / rows['ar step bf16']:.2f}x")


def compare_methods(args: argparse.Namespace) -> None:
    """One optimizer step (loss, backward, clipping, AdamW) of each method on the same backbone and batch, interleaved."""
    from klflow.config import Config
    from klflow.methods import SpecialTokens, method_names

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    V, B, L = args.vocab, args.batch, args.seq_len
    ids = torch.randint(3, V, (B, L), device=device)
    config = Config()
    config.model.n_layer, config.model.d_model, config.model.n_head = args.layers, args.width, args.heads
    rows, _ = training_step_seconds(config, method_names(), ids, None, V, SpecialTokens(eot=0, pad=1, mask=2), device,
                                    torch.bfloat16, args.repeats)
    print(f"device={device} threads={torch.get_num_threads()} V={V} B={B} L={L}, bf16 autocast, one optimizer step")
    for name, seconds in rows.items():
        print(f"  {name:16s} {seconds * 1e3:8.1f} ms  {B * L / seconds:9,.0f} tok/s  "
              f"{rows['klflow'] / seconds:5.2f}x klflow's tokens/s")


def compare_self_conditioning(args: argparse.Namespace) -> None:
    """A klflow optimizer step with a self-conditioning first pass and one without, interleaved on one batch."""
    from klflow.config import Config
    from klflow.methods import SpecialTokens

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    V, B, L = args.vocab, args.batch, args.seq_len
    ids = torch.randint(3, V, (B, L), device=device)
    dtype = DTYPES[args.dtypes[0]]
    specials = SpecialTokens(eot=0, pad=1, mask=2)
    steps = {}
    for name, self_conditioning in (("plain", False), ("self-conditioned", True)):
        config = Config()
        config.model.n_layer, config.model.d_model, config.model.n_head = args.layers, args.width, args.heads
        config.model.self_conditioning = self_conditioning
        config.train.self_condition_rate = 1.0  # every timed step of the self-conditioned model has the first pass
        steps[name], _ = optimizer_step(config.validate(), ids, None, V, specials, device, dtype)
    rounds = interleaved_rounds(steps, args.repeats, device)
    ratio, low, high = paired_ratio(rounds["self-conditioned"], rounds["plain"])
    print(f"device={device} threads={torch.get_num_threads()} V={V} B={B} L={L} backbone={args.layers}x{args.width} "
          f"{args.dtypes[0]}, one klflow optimizer step (evidence input)")
    for name, seconds in rounds.items():
        print(f"  {name:18s} {statistics.median(seconds) * 1e3:8.1f} ms")
    print(f"  with the first pass / without: {ratio:.2f} ({low:.2f}-{high:.2f} over {args.repeats} rounds); "
          f"mean at self_condition_rate {args.rate:g}: {1 + args.rate * (ratio - 1):.2f}")


def compare_subnormals(args: argparse.Namespace) -> None:
    """A klflow training step and sampling calls with klflow.model.SOFT_INPUT_FLOOR as set and at 0, interleaved."""
    import klflow.model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    V, B, L = args.vocab, args.batch, args.seq_len
    dtype = DTYPES[args.dtypes[0]]
    path = KLPath(V)
    network = Denoiser(V, n_layer=args.layers, n_head=args.heads, d_model=args.width, input="evidence",
                       path_beta=path.beta).to(device)
    forward = network_forward(network, dtype, device)
    ids = torch.randint(0, V, (B, L), device=device)
    t = torch.rand(B, device=device) * path.t_max
    pieces: dict[str, Callable[[], object]] = {"training step": lambda: path.loss(forward, ids).backward()}
    for fraction in (0.2, 0.5, 0.9):
        t_call = torch.full((B,), fraction * path.t_max, device=device)
        q = path.posterior_from_logits(path.noisy_logits(ids, t_call), t_call)

        def call(q: torch.Tensor = q, t_call: torch.Tensor = t_call) -> torch.Tensor:
            with torch.inference_mode():
                return forward(q, t_call, posterior=True)

        pieces[f"sampling call at {fraction:g} t_max"] = call
    floor = klflow.model.SOFT_INPUT_FLOOR

    def unfloored(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            klflow.model.SOFT_INPUT_FLOOR = 0.0
            try:
                return fn()
            finally:
                klflow.model.SOFT_INPUT_FLOOR = floor
        return run

    fns = {}
    for name, fn in pieces.items():
        fns[name + ", floored"] = fn
        fns[name + ", unfloored"] = unfloored(fn)
    rounds = interleaved_rounds(fns, args.repeats, device)
    print(f"device={device} threads={torch.get_num_threads()} V={V} B={B} L={L} backbone={args.layers}x{args.width} "
          f"{args.dtypes[0]}, evidence input, SOFT_INPUT_FLOOR={floor:g}")
    for name in pieces:
        ratio, low, high = paired_ratio(rounds[name + ", unfloored"], rounds[name + ", floored"])
        print(f"  {name:28s} floored {statistics.median(rounds[name + ', floored']) * 1e3:8.1f} ms, unfloored "
              f"{statistics.median(rounds[name + ', unfloored']) * 1e3:8.1f} ms: unfloored / floored {ratio:.2f} "
              f"({low:.2f}-{high:.2f} over {args.repeats} rounds)")


if __name__ == "__main__":
    main()
