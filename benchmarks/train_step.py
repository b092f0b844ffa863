"""Side-by-side timings of one training step, reported as ratios measured in the same run.

    python benchmarks/train_step.py [--vocab 4096] [--batch 16] [--seq-len 128] [--repeats 5]

Prints: the KL-path work (source sampling, interpolation, softmax) against the full step; a klflow
step against an autoregressive step of the same backbone and batch (tokens/s ratio); fp32 against
bf16 autocast; and the model FLOP utilisation (MFU) against this machine's measured matmul peak.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from klflow.bench.timing import interleaved, matmul_peak, model_flop_utilisation, training_step_seconds
from klflow.model import Denoiser
from klflow.path import KLPath
from klflow.train import network_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--methods", action="store_true",
                        help="instead: one training step of every registered method, tokens/s relative to klflow")
    args = parser.parse_args()
    if args.methods:
        compare_methods(args)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    V, B, L = args.vocab, args.batch, args.seq_len
    path = KLPath(V)
    ids = torch.randint(0, V, (B, L), device=device)
    t = torch.rand(B, device=device) * path.t_max
    denoiser = Denoiser(V, n_layer=args.layers, n_head=4, d_model=args.width).to(device)
    causal = Denoiser(V, n_layer=args.layers, n_head=4, d_model=args.width, causal=True).to(device)
    n_params = denoiser.num_parameters()

    def kl_step(dtype):
        forward = network_forward(denoiser, dtype, device)
        return lambda: path.loss(forward, ids, generator=None).backward()

    def ar_step(dtype):
        forward = network_forward(causal, dtype, device)
        return lambda: F.cross_entropy(forward(ids[:, :-1], None).reshape(-1, V), ids[:, 1:].reshape(-1)).backward()

    def input_projection():
        x = torch.softmax(torch.randn(B, L, V, device=device), -1)
        return lambda: x @ denoiser.embed

    fns = {"path: source + interpolation + softmax (x_t)": lambda: path.sample_x_t(ids, t),
           "input projection x_t @ W (fp32, forward)": input_projection()}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        fns[f"klflow step {name}"] = kl_step(dtype)
        fns[f"ar step {name}"] = ar_step(dtype)
    rows = interleaved(fns, args.repeats, device)
    peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}

    print(f"device={device} threads={torch.get_num_threads()} V={V} B={B} L={L} params={n_params / 1e6:.2f}M")
    for name, seconds in rows.items():
        print(f"  {name:48s} {seconds * 1e3:8.1f} ms")
    tokens = B * L
    for name in ("fp32", "bf16"):
        kl, ar = rows[f"klflow step {name}"], rows[f"ar step {name}"]
        mfu = model_flop_utilisation(n_params, tokens / kl, peaks[name])
        print(f"  {name}: klflow {tokens / kl:,.0f} tok/s, ar {tokens / ar:,.0f} tok/s, klflow/ar throughput "
              f"{ar / kl:.2f}; matmul peak {peaks[name] / 1e9:.1f} GFLOP/s; klflow MFU {mfu:.1%}")
    print(f"  path share of the bf16 klflow step: {rows['path: source + interpolation + softmax (x_t)'] / rows['klflow step bf16']:.1%}")
    print(f"  bf16 speed-up over fp32: klflow {rows['klflow step fp32'] / rows['klflow step bf16']:.2f}x, "
          f"ar {rows['ar step fp32'] / rows['ar step bf16']:.2f}x")


def compare_methods(args: argparse.Namespace) -> None:
    """One optimizer step (loss, backward, clipping, AdamW) of each method on the same backbone and batch, interleaved."""
    from klflow.config import Config
    from klflow.methods import SpecialTokens, method_names

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    V, B, L = args.vocab, args.batch, args.seq_len
    ids = torch.randint(3, V, (B, L), device=device)
    config = Config()
    config.model.n_layer, config.model.d_model = args.layers, args.width
    rows, _ = training_step_seconds(config, method_names(), ids, None, V, SpecialTokens(eot=0, pad=1, mask=2), device,
                                    torch.bfloat16, args.repeats)
    print(f"device={device} threads={torch.get_num_threads()} V={V} B={B} L={L}, bf16 autocast, one optimizer step")
    for name, seconds in rows.items():
        print(f"  {name:16s} {seconds * 1e3:8.1f} ms  {B * L / seconds:9,.0f} tok/s  "
              f"{rows['klflow'] / seconds:5.2f}x klflow's tokens/s")


if __name__ == "__main__":
    main()
