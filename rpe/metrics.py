"""Metrics of value estimates against binary outcomes: AUROC (with bootstrap intervals), Brier, ECE, IoU."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score


def auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of ``scores`` for binary labels ``y`` (NaN when only one class is present)."""
    y = np.asarray(y) >= 0.5
    if y.all() or not y.any():
        return math.nan
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def bootstrap_auroc(
    y: np.ndarray, scores: np.ndarray, *, groups: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """AUROC and its 95% percentile-bootstrap interval.

    Args:
        groups: optional cluster ids (e.g. problem ids): resampling is over clusters, so samples of one problem
            move together.

    Returns:
        ``(auroc, low, high)``.
    """
    y, scores = np.asarray(y), np.asarray(scores)
    point = auroc(y, scores)
    rng = np.random.default_rng(seed)
    if groups is None:
        groups = np.arange(len(y))
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    stats = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[g] for g in pick])
        value = auroc(y[idx], scores[idx])
        if not math.isnan(value):
            stats.append(value)
    if not stats:
        return point, math.nan, math.nan
    low, high = np.percentile(stats, [2.5, 97.5])
    return point, float(low), float(high)


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared error of probabilities ``p`` against outcomes ``y``."""
    return float(np.mean((np.clip(p, 0, 1) - np.asarray(y)) ** 2))


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error with equal-width bins on [0, 1]."""
    y, p = np.asarray(y, dtype=float), np.clip(np.asarray(p, dtype=float), 0, 1)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            total += mask.mean() * abs(p[mask].mean() - y[mask].mean())
    return float(total)


def iou(a, b) -> float:
    """Intersection over union of two index sets."""
    a, b = set(int(x) for x in a), set(int(x) for x in b)
    return len(a & b) / len(a | b) if a | b else math.nan


def chance_iou(n: int, k1: int, k2: int) -> float:
    """Expected IoU of two uniformly random subsets of sizes ``k1``, ``k2`` of ``n`` items (approximate:
    E|A∩B| / (k1 + k2 - E|A∩B|))."""
    inter = k1 * k2 / n
    return inter / (k1 + k2 - inter)
