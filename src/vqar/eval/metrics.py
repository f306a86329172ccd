"""Sample-quality statistics on feature vectors, independent of the network that produced them.

* Fréchet distance between Gaussians fitted to two feature sets (FID: Heusel et al., NeurIPS 2017). The trace of
  sqrt(S1 S2) is computed from two symmetric eigendecompositions in float64, tr sqrt(A S2 A) with A = sqrt(S1),
  which equals it and is several times faster than a general matrix square root (scipy's `sqrtm`).
* Inception Score over class probabilities, in 10 splits (Salimans et al., NeurIPS 2016), of the rows in a fixed
  random order (`in_fixed_random_order`).
* Precision and recall with k-NN manifolds, k = 3 (Kynkäänniemi et al., NeurIPS 2019): precision is the share of
  generated samples inside the real manifold (the union of balls reaching each real sample's k-th neighbour),
  recall the share of real samples inside the generated one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class GaussianStats:
    """Mean and covariance of a feature set (ADM's `mu` / `sigma`), with the features when kept."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features: np.ndarray | None = None

    @classmethod
    def of(cls, features: np.ndarray, keep_features: bool = False) -> GaussianStats:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"need at least 2 feature vectors (N, dim), got shape {features.shape}")
        return cls(
            mu=features.mean(0),
            sigma=np.cov(features, rowvar=False),
            count=len(features),
            features=features.astype(np.float32) if keep_features else None,
        )


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 @ sigma2) for covariance matrices, in float64."""
    s1, s2 = torch.from_numpy(np.asarray(sigma1, np.float64)), torch.from_numpy(np.asarray(sigma2, np.float64))
    root = _sqrt_psd((s1 + s1.T) / 2)
    inner = root @ s2 @ root
    return float(torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum())


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]} (different networks?)")
    diff = a.mu - b.mu
    value = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt_product(a.sigma, b.sigma)
    return float(max(value, 0.0))


IS_SPLITS = 10  # the convention of the Inception Score's paper and of every published figure
IS_ORDER_SEED = 2020  # torch-fidelity shuffles its rows with this seed before splitting them too


def in_fixed_random_order(rows: np.ndarray) -> np.ndarray:
    """`rows` in a pseudo-random order fixed by `IS_ORDER_SEED`, for the Inception Score's splits. A split of
    consecutive rows of a class-sorted set (`vqar sample` writes its samples class by class, and the bundled digits
    come so) holds a few classes, and its score is capped by their number: 200 digits scored 1.39 in class order
    and 3.56 shuffled. The published pipelines score rows in random order (random class ids, or files packed in
    the order a folder lists them)."""
    return rows[np.random.default_rng(IS_ORDER_SEED).permutation(len(rows))]


def inception_score(probs: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std) over `splits` of exp(E_x KL(p(y|x) || p(y))), of the rows in a fixed random order."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) < splits:
        raise ValueError(f"need at least {splits} probability rows (N, classes), got shape {probs.shape}")
    scores = []
    for part in np.array_split(in_fixed_random_order(probs), splits):
        marginal = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(features: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for start in range(0, len(features), chunk):
        d = torch.cdist(features[start : start + chunk], features)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 0th neighbour is the point itself
    return torch.cat(radii)


def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    inside = []
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start : start + chunk], centres)
        inside.append((d <= radii[None]).any(1))
    return torch.cat(inside)


PR_NEIGHBOURS = 3  # k of the k-NN manifolds: each set needs more than k samples


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS, chunk: int = 1024
) -> tuple[float, float]:
    """(precision, recall) of `fake` features against `real` ones with k-NN manifolds."""
    real_t, fake_t = torch.as_tensor(real, dtype=torch.float32), torch.as_tensor(fake, dtype=torch.float32)
    if min(len(real_t), len(fake_t)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set, and one has "
                         f"{min(len(real), len(fake))} (--no-pr leaves it out)")  # fmt: skip
    real_radii = _kth_neighbour_radii(real_t, k, chunk)
    fake_radii = _kth_neighbour_radii(fake_t, k, chunk)
    precision = _inside_manifold(fake_t, real_t, real_radii, chunk).float().mean()
    recall = _inside_manifold(real_t, fake_t, fake_radii, chunk).float().mean()
    return float(precision), float(recall)
