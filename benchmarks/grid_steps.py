"""How the sampler's grids spend their steps: of N steps, how many start where x_t has barely begun to
reveal the target (alpha(t) < 0.05) and how many where it is already decided (alpha(t) > 0.95), with
alpha(t) = P(argmax x_t = x1) in closed form. A pure computation, no model.

    python benchmarks/grid_steps.py --vocab 4096 --beta 0.01 --steps 64
"""

import argparse

from klflow.flow.path import KLPath, argmax_probability
from klflow.flow.time_warp import WARPS, TimeWarp, build_warp, learned_warp
from klflow.flow.validation import BAND_EDGES

# The per-band validation cross-entropies (bands of t / t_max) of the cpu-ablation evidence model, BENCHMARKS.md.
BAND_LOSSES = (6.57, 5.63, 2.89, 1.06, 0.23)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    path = KLPath(args.vocab, args.beta)
    learned: TimeWarp = learned_warp(path.t_max, BAND_EDGES, BAND_LOSSES)
    print(f"V = {args.vocab}, beta = {args.beta}, t_max = {path.t_max:.4f}, {args.steps} steps (by their start time)")
    print("| grid | steps below alpha 0.05 | steps above alpha 0.95 |\n|---|---|---|")
    for kind in WARPS:
        times, _ = build_warp(kind, path, learned).grid(args.steps)
        alphas = [argmax_probability(args.vocab, args.beta, t) for t in times[:-1]]
        print(f"| {kind} | {sum(a < 0.05 for a in alphas)} | {sum(a > 0.95 for a in alphas)} |")


if __name__ == "__main__":
    main()
