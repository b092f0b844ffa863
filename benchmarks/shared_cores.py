"""Training and sampling throughput on an idle machine and beside one competing CPU-bound process,
under several thread policies, measured side by side in one run.

    python benchmarks/shared_cores.py [--rounds 2] [--steps 8]

Each measurement is a fresh process (OpenMP reads its environment when torch loads), so a policy
that is an environment variable is tried as it would be set before `import torch`:

- default: PyTorch's own choice (one thread per core, OpenMP's default wait policy);
- passive: OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning);
- one-thread: torch.set_num_threads(1);
- free-cores: torch.set_num_threads(cores - other runnable processes) when the process starts,
  klflow.threads.free_cores, which the CLI applies unless OMP_NUM_THREADS is set.

The competitor is a Python busy loop. Each child times a klflow training step (evidence input,
bf16 autocast, the quickstart's 4 x 256 backbone, batch 16 x 128, V = 4096) and an 8-step
randomized generation of 16 x 128 tokens, and reports tokens per second. Rounds alternate the
policies, so drift between rounds hits every policy alike; the table gives the median over rounds
and each policy's ratio to the default in the same load condition.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

POLICIES = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one-thread": {"KLFLOW_BENCH_THREADS": "1"},
    "free-cores": {"KLFLOW_BENCH_THREADS": "free"},
}


def child(steps: int) -> dict[str, float]:
    import klflow  # noqa: F401  before torch, as the CLI does
    import torch

    from klflow.config import load_config
    from klflow.flow.path import KLPath
    from klflow.runtime import build_model
    from klflow.threads import free_cores

    threads = os.environ.get("KLFLOW_BENCH_THREADS")
    if threads == "free":
        torch.set_num_threads(free_cores())
    elif threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    vocab, batch, seq_len = 4096, 16, 128
    config = load_config("quickstart", [])
    path = KLPath(vocab, config.path.beta)
    model = build_model(config, vocab, causal=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, vocab, (batch, seq_len))

    def train_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = path.loss(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        train_step()
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        klflow.generate(model, path, num_samples=16, seq_len=seq_len, steps=8,
                        generator=torch.Generator().manual_seed(0))
    sample_seconds = time.perf_counter() - start
    return {"threads": torch.get_num_threads(), "train_tokens_per_second": steps * batch * seq_len / train_seconds,
            "sample_tokens_per_second": 16 * seq_len / sample_seconds}


def measure(policy: str, loaded: bool, steps: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env |= POLICIES[policy]
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
    try:
        if competitor is not None:
            time.sleep(0.5)
        out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps)], env=env,
                             capture_output=True, text=True, check=True).stdout
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per measurement")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.steps)))
        return 0
    results: dict[tuple[str, bool], list[dict[str, float]]] = {}
    for round_index in range(args.rounds):
        for loaded in (False, True):
            for policy in POLICIES:
                row = measure(policy, loaded, args.steps)
                results.setdefault((policy, loaded), []).append(row)
                print(f"round {round_index + 1} {'loaded' if loaded else 'idle  '} {policy:10s} "
                      f"threads {row['threads']} train {row['train_tokens_per_second']:8.0f} tok/s, "
                      f"sample {row['sample_tokens_per_second']:7.0f} tok/s", file=sys.stderr, flush=True)
    print(f"{'condition':8s} {'policy':10s} {'train tok/s':>12s} {'vs default':>10s} {'sample tok/s':>13s} "
          f"{'vs default':>10s}")
    for loaded in (False, True):
        base = {key: statistics.median(r[key] for r in results[("default", loaded)])
                for key in ("train_tokens_per_second", "sample_tokens_per_second")}
        for policy in POLICIES:
            rows = results[(policy, loaded)]
            train = statistics.median(r["train_tokens_per_second"] for r in rows)
            sample = statistics.median(r["sample_tokens_per_second"] for r in rows)
            print(f"{'loaded' if loaded else 'idle':8s} {policy:10s} {train:12.0f} "
                  f"{train / base['train_tokens_per_second']:10.2f} {sample:13.0f} "
                  f"{sample / base['sample_tokens_per_second']:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
