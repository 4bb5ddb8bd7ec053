"""Metrics of value estimates against binary outcomes: AUROC (cluster and paired bootstrap intervals, within
strata), risk-coverage and AURC of selective answering, Brier, ECE, IoU, Wilson intervals, Spearman correlations with problem-bootstrap intervals and
permutation p-values, and the words used for an interval against chance."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np


def auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of ``scores`` for binary labels ``y`` (NaN when only one class is present).

    Example:
        >>> auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    return float(auroc_columns(y, scores)[0])  # the Mann-Whitney rank sum: sklearn's roc_auc_score, without its checks


def auroc_columns(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of every column of ``scores`` (n, m) for binary labels ``y`` (n,) at once, by the Mann-Whitney
    rank sum (ties count one half, as :func:`auroc`): (m,) floats, all NaN when only one class is present. The
    fast path of bootstraps that rescore many scores on every resample.

    Example:
        >>> auroc_columns([0, 0, 1, 1], np.array([[0.1, 0.9], [0.4, 0.8], [0.35, 0.2], [0.8, 0.1]]))
        array([0.75, 0.  ])
    """
    from scipy.stats import rankdata

    pos = np.asarray(y) >= 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    if n_pos == 0 or n_neg == 0:
        return np.full(scores.shape[1], math.nan)
    ranks = rankdata(scores, axis=0)  # (n, m), average ranks for ties
    return (ranks[pos].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def cluster_resamples(groups: np.ndarray, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """``n_boot`` bootstrap resamples of sample indices that draw whole clusters (``groups``, e.g. problem ids)
    with replacement, so the samples of one cluster move together. Deterministic for ``seed``.

    Yields:
        (n_drawn,) int index arrays into the samples.
    """
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    members = [order[bounds[g] : bounds[g + 1]] for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])


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
    y, scores = np.asarray(y) >= 0.5, np.asarray(scores, dtype=np.float64)
    point = auroc(y, scores)
    stats = []
    for idx in cluster_resamples(np.arange(len(y)) if groups is None else groups, n_boot, seed):
        value = auroc_columns(y[idx], scores[idx])[0]  # the rank sum: sklearn's value, ~50x faster per resample
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


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    Example:
        >>> low, high = wilson_interval(20, 100)
        >>> round(low, 3), round(high, 3)
        (0.133, 0.289)
    """
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _pairs_auroc(y: np.ndarray, scores: np.ndarray, strata: np.ndarray | None) -> float:
    """AUROC from ranks (Mann-Whitney U, ties averaged); with ``strata`` only pairs within one stratum count:
    sum_k U_k / sum_k n1_k n0_k. NaN when no (positive, negative) pair exists."""
    from scipy.stats import rankdata

    u, pairs = 0.0, 0
    for m in ([slice(None)] if strata is None else [strata == k for k in np.unique(strata)]):
        yk = y[m]
        n1 = int(yk.sum())
        n0 = yk.size - n1
        if n1 and n0:
            r = rankdata(scores[m])
            u += r[yk].sum() - n1 * (n1 + 1) / 2
            pairs += n1 * n0
    return float(u / pairs) if pairs else math.nan


def stratified_auroc(y: np.ndarray, scores: np.ndarray, strata: np.ndarray) -> float:
    """AUROC counting only (positive, negative) pairs of the same stratum (e.g. the same difficulty): how well
    ``scores`` rank outcomes among problems of equal difficulty. The pair-weighted mean of per-stratum AUROCs."""
    return _pairs_auroc(np.asarray(y) >= 0.5, np.asarray(scores, dtype=np.float64), np.asarray(strata))


def paired_bootstrap_auroc(
    y: np.ndarray,
    scores: dict[str, np.ndarray],
    *,
    groups: np.ndarray,
    diffs: Sequence[tuple[str, str]] = (),
    strata: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """AUROC of several scores of the same samples, and of their differences, with one cluster bootstrap.

    Every bootstrap draw resamples whole clusters (``groups``, e.g. problem ids) once and scores every method
    on the same draw, so the interval of a difference reflects the pairing (much narrower than two separate
    intervals suggest).

    Args:
        y: (n,) binary outcomes.
        scores: name -> (n,) scores (higher = more likely correct).
        groups: (n,) cluster ids.
        diffs: pairs ``(a, b)``: report AUROC(a) - AUROC(b).
        strata: optional (n,) stratum ids: every AUROC counts only within-stratum pairs.

    Returns:
        ``{name: {"auroc", "low", "high"}, "a - b": {"diff", "low", "high"}}``, 95% percentile intervals.
    """
    yb = np.asarray(y) >= 0.5
    sc = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}
    for a, b in diffs:
        if a not in sc or b not in sc:
            raise ValueError(f"difference {a!r} - {b!r} names a score that is not given; scores: {sorted(sc)}")
    st = None if strata is None else np.asarray(strata)
    point = {k: _pairs_auroc(yb, v, st) for k, v in sc.items()}
    draws: dict[str, list[float]] = {k: [] for k in sc}
    for idx in cluster_resamples(groups, n_boot, seed):
        for k, v in sc.items():
            draws[k].append(_pairs_auroc(yb[idx], v[idx], None if st is None else st[idx]))
    out: dict[str, dict[str, float]] = {}

    def interval(values: np.ndarray) -> tuple[float, float]:
        values = values[~np.isnan(values)]
        if values.size < max(10, n_boot // 10):
            return math.nan, math.nan
        lo, hi = np.percentile(values, [2.5, 97.5])
        return float(lo), float(hi)

    arrays = {k: np.asarray(v) for k, v in draws.items()}
    for k in sc:
        lo, hi = interval(arrays[k])
        out[k] = {"auroc": point[k], "low": lo, "high": hi}
    for a, b in diffs:
        lo, hi = interval(arrays[a] - arrays[b])
        out[f"{a} - {b}"] = {"diff": point[a] - point[b], "low": lo, "high": hi}
    return out


def spearman_by_problem(a: np.ndarray, b: np.ndarray, problems: Sequence[str], n_boot: int = 1000,
                        seed: int = 0) -> dict[str, float]:
    """Spearman correlation of two per-step series with a 95% bootstrap interval over problems (the steps of one
    problem are resampled together).

    Returns:
        ``{"spearman", "low", "high", "n_steps"}``.
    """
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    with warnings.catch_warnings():  # a resample with a constant series has no correlation: dropped below
        warnings.simplefilter("ignore")
        rho = float(spearmanr(a, b).statistic)
        boots = [float(spearmanr(a[idx], b[idx]).statistic)
                 for idx in cluster_resamples(np.asarray(problems), n_boot, seed)]
    boots = [x for x in boots if np.isfinite(x)]
    low, high = (np.percentile(boots, [2.5, 97.5]) if boots else (np.nan, np.nan))
    return {"spearman": rho, "low": float(low), "high": float(high), "n_steps": int(len(a))}


def permutation_p_spearman(a: np.ndarray, b: np.ndarray, *, n_perm: int = 2000, seed: int = 0) -> float:
    """One-sided permutation p-value of a positive Spearman correlation between ``a`` and ``b``: the share of
    random pairings (``b`` shuffled) whose correlation is at least the observed one, counting the observed
    pairing, so the smallest possible value is 1 / (n_perm + 1).

    Example:
        >>> x = np.arange(50.0)
        >>> permutation_p_spearman(x, x, n_perm=199)
        0.005
    """
    from scipy.stats import rankdata

    ra, rb = rankdata(np.asarray(a, float)), rankdata(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    observed = float(ra @ rb)
    rng = np.random.default_rng(seed)
    hits = sum(float(ra @ rng.permutation(rb)) >= observed - 1e-12 for _ in range(n_perm))
    return (1 + hits) / (1 + n_perm)


def paired_difference(a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired samples (e.g. two methods' 0/1 scores on the same problems) with its 95%
    bootstrap interval over the pairs.

    Returns:
        ``(diff, low, high)``.

    Example:
        >>> paired_difference([1, 1, 1, 0] * 25, [0, 1, 1, 0] * 25)[0]
        0.25
    """
    d = np.asarray(a, float) - np.asarray(b, float)
    if not len(d):
        return math.nan, math.nan, math.nan
    low, high = np.percentile([d[idx].mean() for idx in cluster_resamples(np.arange(len(d)), n_boot, seed)],
                              [2.5, 97.5])
    return float(d.mean()), float(low), float(high)


def selective_accuracy(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Risk-coverage of answering only the most confident samples: coverage k/n and the accuracy of the k samples
    with the highest ``scores``, for k = 1..n. Tied scores are broken at random in expectation (inside a block of
    ties the expected number correct grows linearly), so a constant score gives the base rate at every coverage.

    Args:
        y: (n,) outcomes, 1 correct (values >= 0.5 count as correct).
        scores: (n,) confidence, higher = more confident.

    Returns:
        ``(coverage, accuracy)``, both (n,).

    Example:
        >>> selective_accuracy(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.8, 0.2]))[1].round(2).tolist()
        [1.0, 1.0, 0.67, 0.5]
    """
    y = (np.asarray(y) >= 0.5).astype(np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    ys, ss = y[order], scores[order]
    n = len(ys)
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])  # first index of each block of tied scores
    sizes = np.diff(np.r_[starts, n])
    block_correct = np.add.reduceat(ys, starts) if n else np.zeros(0)
    before = np.r_[0.0, np.cumsum(block_correct)[:-1]]
    block = np.repeat(np.arange(len(starts)), sizes)
    within = np.arange(n) - starts[block] + 1
    correct = before[block] + within * block_correct[block] / sizes[block]
    k = np.arange(1, n + 1)
    return k / n, correct / k


def aurc(y: np.ndarray, scores: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean error rate (1 - accuracy) of answering the k most confident
    samples, over k = 1..n (lower is better; a score that carries no information gives 1 - mean(y) in
    expectation, one that ranks every correct sample first the least possible). See :func:`selective_accuracy`."""
    if not len(y):
        return math.nan
    return float(np.mean(1.0 - selective_accuracy(y, scores)[1]))


def bootstrap_aurc(y: np.ndarray, scores: dict[str, np.ndarray], *, groups: np.ndarray, baseline: str | None = None,
                   n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """AURC of several confidence scores of the same samples with 95% intervals from one cluster bootstrap (whole
    ``groups``, e.g. problems, resampled), and with ``baseline`` named, each score's AURC minus the baseline's
    from the same resamples (negative = fewer errors at equal coverage than the baseline).

    Args:
        y: (n,) outcomes. scores: name -> (n,) confidence (higher = more confident; NaN not allowed).
        groups: (n,) cluster ids.

    Returns:
        name -> ``{"aurc", "low", "high", "n"}`` plus ``"minus_baseline": {"diff", "low", "high"}`` when a
        baseline is given, and ``"random"``: the AURC of an uninformative score (1 - mean(y)) with its interval.
    """
    y = (np.asarray(y) >= 0.5).astype(np.float64)
    names = list(scores)
    cols = {name: np.asarray(scores[name], dtype=np.float64) for name in names}
    for name, col in cols.items():
        if col.shape != y.shape or np.isnan(col).any():
            raise ValueError(f"bootstrap_aurc: score {name!r} must be {y.shape} with no NaN")
    point = {name: aurc(y, col) for name, col in cols.items()}
    point["random"] = float(1.0 - y.mean()) if len(y) else math.nan
    boots: dict[str, list[float]] = {name: [] for name in point}
    for idx in cluster_resamples(groups, n_boot, seed):
        for name, col in cols.items():
            boots[name].append(aurc(y[idx], col[idx]))
        boots["random"].append(float(1.0 - y[idx].mean()))
    out: dict[str, dict[str, float]] = {}
    for name, value in point.items():
        low, high = np.percentile(boots[name], [2.5, 97.5]) if n_boot else (math.nan, math.nan)
        out[name] = {"aurc": value, "low": float(low), "high": float(high), "n": int(len(y))}
        if baseline is not None and name != baseline:
            diff = np.array(boots[name]) - np.array(boots[baseline])
            dlo, dhi = np.percentile(diff, [2.5, 97.5]) if n_boot else (math.nan, math.nan)
            out[name]["minus_baseline"] = {"diff": value - point[baseline], "low": float(dlo), "high": float(dhi)}
    return out


def chance_verdict(low: float, high: float, chance: float = 0.5) -> str:
    """Words for an interval against chance: ``above chance``, ``below chance (inverted)``, ``not distinguishable
    from chance`` (the interval includes it), or ``not measurable`` (no interval).

    Example:
        >>> chance_verdict(0.47, 0.61)
        'not distinguishable from chance'
        >>> chance_verdict(0.16, 0.41)
        'below chance (inverted)'
    """
    if math.isnan(low) or math.isnan(high):
        return "not measurable"
    if low > chance:
        return "above chance"
    if high < chance:
        return "below chance (inverted)"
    return "not distinguishable from chance"


def difference_verdict(low: float, high: float) -> str:
    """Words for an interval of a difference A - B: ``A higher``, ``A lower``, or ``no difference distinguishable``
    (the interval includes 0), or ``not measurable``."""
    if math.isnan(low) or math.isnan(high):
        return "not measurable"
    if low > 0:
        return "higher"
    if high < 0:
        return "lower"
    return "no difference distinguishable"


def n_to_decide(point: float, low: float, high: float, n: int, chance: float = 0.5) -> int | None:
    """Rough sample size at which an interval like ``[low, high]`` around ``point`` (measured on ``n``) would
    exclude ``chance``, assuming its width shrinks as 1/sqrt(n); None when it already does or cannot."""
    if any(math.isnan(v) for v in (point, low, high)) or not low <= chance <= high or point == chance:
        return None
    half = (high - low) / 2
    return int(math.ceil(round(n * (half / abs(point - chance)) ** 2, 6)))
