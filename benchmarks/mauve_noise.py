"""How noisy MAUVE is on real text: held-out windows against other held-out windows, and against the
same windows with their words shuffled, under the bench's protocol (SmolLM2 features, mauve-text).

    KLFLOW_HOME=/tmp/home klflow prepare chitchat
    OMP_NUM_THREADS=1 python benchmarks/mauve_noise.py /tmp/home/data/chitchat-bpe4096 [--pool 512] [--seeds 5]

Scores `pool` validation windows of 128 tokens, and the second half of them with their words
shuffled, once (features cached in --cache). Prints, for n = pool / 4 and pool / 2 texts per side,
MAUVE with its mean and min-max over the k-means seeds for:
- data vs data: the first n windows of each half (disjoint texts), and the same under `splits` random
  partitions of the pool into two halves (their spread is the sampling noise the seeds do not see);
- data vs shuffled: the first half's windows against the second half's, words shuffled.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import klflow  # noqa: F401  before torch, as in the CLI
import numpy as np
import torch

from klflow.data import PreparedData
from klflow.evaluation import load_evaluator, mauve, score_texts, validation_texts


def features(texts: list[str], file: Path) -> np.ndarray:
    if file.is_file():
        return np.load(file)
    scores = score_texts(load_evaluator("smollm2", torch.device("cpu")), texts, batch_size=16, progress=True)
    file.parent.mkdir(parents=True, exist_ok=True)
    np.save(file, scores.features)
    return scores.features


def line(name: str, p: np.ndarray, q: np.ndarray, seeds: int) -> float:
    result = mauve(p, q, seeds)
    print(f"| {name} | {len(p)} | {result.score:.3f} | {result.low:.3f}-{result.high:.3f} | "
          f"{' '.join(f'{s:.3f}' for s in result.per_seed)} |")
    return result.score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a prepared data folder (klflow prepare)")
    parser.add_argument("--pool", type=int, default=512, help="validation windows scored (default 512)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=5, help="k-means seeds per MAUVE (default 5)")
    parser.add_argument("--splits", type=int, default=5, help="random partitions of the pool (default 5)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/klflow-mauve-noise"))
    args = parser.parse_args()
    data = PreparedData.load(args.data)
    texts = validation_texts(data, args.pool, args.seq_len)
    half = len(texts) // 2
    rng = random.Random(0)
    shuffled = [" ".join(rng.sample(t.split(), len(t.split()))) for t in texts[half:]]
    stem = f"{Path(args.data).name}-pool{len(texts)}-len{args.seq_len}"
    real = features(texts, args.cache / f"{stem}-real.npy")
    fake = features(shuffled, args.cache / f"{stem}-shuffled.npy")
    first, second = real[:half], real[half:]
    print("| comparison | texts per side | MAUVE mean | min-max over seeds | per seed |")
    print("|---|---|---|---|---|")
    for n in (half // 2, half):
        line("data vs data (first n of each half)", first[:n], second[:n], args.seeds)
        split_means = []
        for split in range(args.splits):
            order = np.random.default_rng(split).permutation(len(real))
            split_means.append(line(f"data vs data, random partition {split}", real[order[:n]], real[order[half:half + n]],
                                    args.seeds))
        print(f"| data vs data: the {args.splits} partitions' means | {n} | {np.mean(split_means):.3f} | "
              f"{min(split_means):.3f}-{max(split_means):.3f} | std {np.std(split_means, ddof=1):.3f} |")
        line("data vs words-shuffled data", first[:n], fake[:n], args.seeds)


if __name__ == "__main__":
    main()
