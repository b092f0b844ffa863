"""MAUVE (Pillutla et al., NeurIPS 2021): how close the distribution of generated text is to real text.

Written from the paper's definition:

1. L2-normalize the features of the n_p texts of P (generated) and n_q texts of Q (reference),
   reduce their union by PCA to the components explaining `explained_variance` of the variance.
2. Cluster the union with k-means into k = max(2, round(min(n_p, n_q) / 10)) clusters; P and Q
   become histograms over the clusters.
3. For mixtures R_l = l P + (1 - l) Q, l in [0, 1], the divergence curve is the set of points
   (exp(-c KL(Q || R_l)), exp(-c KL(P || R_l))) with scaling c = 5.
4. MAUVE = area under that curve, closed by (0, 1) and (1, 0): 1 when P = Q, near 0 when
   the clusters of P and Q are disjoint.

The score depends on k, the feature model and the sample count, so it is comparable only between
runs that share them. Here the grid over l is 101 points including the ends (where a KL may be
infinite and its point sits on an axis); mauve-text uses 25 interior points, which changes the
area slightly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klflow.errors import KLFlowError
from klflow.evaluation.evaluator import INSTALL_HINT

SCALING = 5.0
EXPLAINED_VARIANCE = 0.9
GRID_SIZE = 101
MIN_TEXTS = 10  # below this k-means has 2 clusters of a handful of points: noise, not a score


@dataclass(frozen=True)
class MauveResult:
    score: float
    n_p: int
    n_q: int
    n_clusters: int
    n_components: int

    def to_dict(self) -> dict:
        return {"score": self.score, "n_p": self.n_p, "n_q": self.n_q, "n_clusters": self.n_clusters,
                "pca_components": self.n_components, "pca_explained_variance": EXPLAINED_VARIANCE,
                "scaling": SCALING, "mixture_grid": GRID_SIZE}


def mauve(p_features: np.ndarray, q_features: np.ndarray, n_clusters: int | None = None, seed: int = 0) -> MauveResult:
    """MAUVE between the texts behind `p_features` [n_p, d] and `q_features` [n_q, d]."""
    try:
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA
    except ImportError:
        raise KLFlowError(f"MAUVE needs scikit-learn: {INSTALL_HINT}") from None
    n_p, n_q = len(p_features), len(q_features)
    check_sizes(n_p, n_q)
    k = n_clusters or max(2, round(min(n_p, n_q) / 10))
    union = np.concatenate([p_features, q_features]).astype(np.float64)
    union /= np.maximum(np.linalg.norm(union, axis=1, keepdims=True), 1e-12)
    pca = PCA(n_components=EXPLAINED_VARIANCE, svd_solver="full", random_state=seed)
    reduced = pca.fit_transform(union)
    labels = KMeans(n_clusters=k, n_init=5, max_iter=500, random_state=seed).fit_predict(reduced)
    p_hist = np.bincount(labels[:n_p], minlength=k) / n_p
    q_hist = np.bincount(labels[n_p:], minlength=k) / n_q
    return MauveResult(area_under_divergence_curve(p_hist, q_hist), n_p, n_q, k, int(pca.n_components_))


def check_sizes(n_p: int, n_q: int) -> None:
    """Refuse sample sizes too small for any clustering to mean something."""
    if min(n_p, n_q) < MIN_TEXTS:
        raise KLFlowError(f"MAUVE needs at least {MIN_TEXTS} texts on each side, got {n_p} and {n_q} (or turn it off)")


def area_under_divergence_curve(p: np.ndarray, q: np.ndarray, scaling: float = SCALING) -> float:
    """Area under {(exp(-c KL(q||r)), exp(-c KL(p||r))) : r = l p + (1-l) q} for histograms p, q."""
    points = [(0.0, 1.0), (1.0, 0.0)]
    for weight in np.linspace(0.0, 1.0, GRID_SIZE):
        mixture = weight * p + (1.0 - weight) * q
        points.append((np.exp(-scaling * kl_divergence(q, mixture)), np.exp(-scaling * kl_divergence(p, mixture))))
    # Along the curve x falls as y rises; among equal x the higher point comes first.
    xs, ys = np.array(sorted(points, key=lambda point: (point[0], -point[1]))).T
    area = np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2)
    return float(min(area, 1.0))  # P = Q sums to 1 up to round-off, which may land just above


def kl_divergence(a: np.ndarray, b: np.ndarray) -> float:
    """KL(a || b) = sum_i a_i log(a_i / b_i) in nats; infinite where b_i = 0 < a_i."""
    support = a > 0
    if np.any(b[support] == 0):
        return float("inf")
    return float(np.sum(a[support] * np.log(a[support] / b[support])))
