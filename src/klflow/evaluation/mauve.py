"""MAUVE (Pillutla et al., NeurIPS 2021) from the `mauve-text` package, with its spread over k-means seeds.

mauve-text is the field's implementation (MDLM, SEDD and DUO report it with its defaults):

1. L2-normalize the features of the n_p texts of P (generated) and n_q texts of Q (reference),
   reduce their union by PCA to the components explaining 90% of the variance.
2. Cluster the union with faiss k-means into k = max(2, round(min(n_p, n_q) / 10)) clusters
   (5 restarts, at most 500 iterations); P and Q become histograms over the clusters.
3. For mixtures R_l = l P + (1 - l) Q on 25 values of l in (0, 1), the divergence curve is the set
   of points (exp(-c KL(Q || R_l)), exp(-c KL(P || R_l))) with scaling c = 5.
4. MAUVE = area under that curve: 1 when P = Q, near 0 when the clusters are disjoint.

The clustering depends on its random seed, so the score is computed once per seed and reported as
the mean with its min-max range. Two scores whose ranges overlap are reported as no difference
(`mauve_tied`). The seeds only measure the clustering's noise; the finite sample adds more
(docs/evaluation.md). The score also depends on k, the feature model and the sample counts, so it is
comparable only between runs that share them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from statistics import fmean, stdev

import numpy as np

from klflow.errors import KLFlowError
from klflow.evaluation.evaluator import INSTALL_HINT

SCALING = 5.0
EXPLAINED_VARIANCE = 0.9
MIXTURE_GRID = 25
KMEANS_RESTARTS = 5
KMEANS_MAX_ITER = 500
DEFAULT_SEEDS = 5
MIN_SEEDS = 3  # fewer give no usable spread
MIN_TEXTS = 10  # below this k-means has 2 clusters of a handful of points: noise, not a score
SPREAD = "min-max over the k-means seeds"


@dataclass(frozen=True)
class MauveResult:
    """MAUVE under each k-means seed; `score` is their mean, (`low`, `high`) their range."""

    per_seed: tuple[float, ...]
    seeds: tuple[int, ...]
    n_p: int
    n_q: int
    n_clusters: int
    implementation: str

    @property
    def score(self) -> float:
        return fmean(self.per_seed)

    @property
    def low(self) -> float:
        return min(self.per_seed)

    @property
    def high(self) -> float:
        return max(self.per_seed)

    @property
    def range(self) -> tuple[float, float]:
        return self.low, self.high

    def to_dict(self) -> dict:
        return {"score": self.score, "min": self.low, "max": self.high, "std": stdev(self.per_seed),
                "spread": SPREAD + "; std: sample standard deviation over them", "per_seed": list(self.per_seed),
                "seeds": list(self.seeds), "n_p": self.n_p, "n_q": self.n_q, "n_clusters": self.n_clusters,
                "implementation": self.implementation, "pca_explained_variance": EXPLAINED_VARIANCE,
                "kmeans_restarts": KMEANS_RESTARTS, "kmeans_max_iter": KMEANS_MAX_ITER, "scaling": SCALING,
                "mixture_grid": MIXTURE_GRID}


def mauve_available() -> str | None:
    """None when mauve-text (with faiss) can be imported, else why not, in one line."""
    try:
        import mauve  # noqa: F401
    except ImportError as missing:
        return f"MAUVE needs mauve-text and faiss ({missing}): {INSTALL_HINT}"
    return None


def mauve(p_features: np.ndarray, q_features: np.ndarray, seeds: int | Sequence[int] = DEFAULT_SEEDS) -> MauveResult:
    """MAUVE between the texts behind `p_features` [n_p, d] and `q_features` [n_q, d], once per k-means seed
    (`seeds`: a count, meaning seeds 0 .. count - 1, or the seeds themselves)."""
    seeds = tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds)
    check_seeds(len(seeds))
    n_p, n_q = len(p_features), len(q_features)
    reason = too_few_texts(n_p, n_q) or mauve_available()
    if reason is not None:
        raise KLFlowError(reason)
    import faiss
    import mauve as mauve_text

    runs = [mauve_text.compute_mauve(p_features=np.asarray(p_features), q_features=np.asarray(q_features), seed=seed,
                                     kmeans_explained_var=EXPLAINED_VARIANCE, kmeans_num_redo=KMEANS_RESTARTS,
                                     kmeans_max_iter=KMEANS_MAX_ITER, mauve_scaling_factor=SCALING,
                                     divergence_curve_discretization_size=MIXTURE_GRID)
            for seed in seeds]
    return MauveResult(tuple(float(run.mauve) for run in runs), seeds, n_p, n_q, int(runs[0].num_buckets),
                       f"mauve-text {_version('mauve-text')}, faiss {faiss.__version__}")


def mauve_tied(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Two MAUVE (min, max) ranges over k-means seeds that overlap: reported as no difference."""
    return a[0] <= b[1] and b[0] <= a[1]


def too_few_texts(n_p: int, n_q: int) -> str | None:
    """Why sample sizes are too small for any clustering to mean something, or None."""
    if min(n_p, n_q) < MIN_TEXTS:
        return f"MAUVE needs at least {MIN_TEXTS} texts on each side, got {n_p} and {n_q} (or turn it off)"
    return None


def check_seeds(n: int) -> None:
    if n < MIN_SEEDS:
        raise KLFlowError(f"MAUVE needs at least {MIN_SEEDS} k-means seeds for its spread, got {n} (--mauve-seeds, "
                          "evaluation.mauve_seeds)")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown version"
