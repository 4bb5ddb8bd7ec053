"""rpe.metrics against values computed by hand."""

import math

import numpy as np
import pytest

from rpe.metrics import auroc, auroc_columns, bootstrap_auroc, brier, chance_iou, ece, iou, stratified_auroc


def test_brier_and_ece_by_hand():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.6, 0.4])
    assert brier(y, p) == pytest.approx((0.01 + 0.04 + 0.16 + 0.16) / 4)
    # bins of width 0.5 (n_bins=2): [0.2, 0.4] -> mean p 0.3, rate 0; [0.6, 0.9] -> mean p 0.75, rate 1
    assert ece(y, p, n_bins=2) == pytest.approx(0.5 * 0.3 + 0.5 * 0.25)
    assert ece(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0


def test_auroc_counts_pairs_and_ties():
    y = np.array([1, 1, 0, 0])
    assert auroc(y, np.array([0.9, 0.5, 0.5, 0.1])) == pytest.approx(3.5 / 4)  # one tie counts half
    assert math.isnan(auroc(np.ones(3), np.arange(3)))


def test_auroc_columns_agrees_with_auroc_column_by_column_ties_included():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    cols = np.column_stack([rng.integers(0, 4, 60), rng.normal(size=60), -y + rng.normal(size=60) * 0.1])
    got = auroc_columns(y, cols)
    assert got == pytest.approx([auroc(y, cols[:, j]) for j in range(3)], abs=1e-12)
    assert got[2] < 0.1  # an inverted score is not folded
    assert auroc_columns(y, cols[:, 0]).shape == (1,)
    assert np.isnan(auroc_columns(np.ones(5), np.arange(10.0).reshape(5, 2))).all()


def test_stratified_auroc_counts_only_pairs_within_a_stratum():
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.2, 0.1])  # perfect within each stratum, mixed across
    assert stratified_auroc(y, s, np.array([0, 0, 1, 1])) == 1.0
    assert auroc(y, s) == pytest.approx(0.75)


def test_cluster_bootstrap_moves_samples_of_a_problem_together():
    rng = np.random.default_rng(0)
    y = np.repeat(rng.random(100) < 0.5, 4)  # 100 problems x 4 identical samples
    s = y + np.repeat(rng.normal(0, 1, 100), 4) + rng.normal(0, 0.1, 400)  # noise shared within a problem
    _, lo_c, hi_c = bootstrap_auroc(y, s, groups=np.repeat(np.arange(100), 4), n_boot=300)
    _, lo_i, hi_i = bootstrap_auroc(y, s, n_boot=300)
    assert hi_c - lo_c > hi_i - lo_i  # treating correlated samples as independent understates the width


def test_iou_and_its_chance_level():
    assert iou([1, 2, 3], [2, 3, 4]) == 0.5
    assert chance_iou(576, 6, 6) == pytest.approx((36 / 576) / (12 - 36 / 576))


def test_rank_sum_auroc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    from rpe.metrics import auroc, bootstrap_auroc

    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.3
    s = np.round(rng.normal(size=300) + y, 1)  # many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert math.isnan(auroc(np.ones(5), np.arange(5)))
    point, low, high = bootstrap_auroc(y, s, n_boot=200, seed=1)
    assert point == pytest.approx(roc_auc_score(y, s)) and low < point < high


def test_selective_accuracy_breaks_ties_at_random_in_expectation():
    from rpe.metrics import aurc, selective_accuracy

    y = np.array([1, 0, 1, 0, 0])
    cov, acc = selective_accuracy(y, np.array([0.9, 0.5, 0.5, 0.5, 0.1]))
    # the most confident is right; then a block of three ties holding one right answer: 1 + j/3 right of 1 + j
    np.testing.assert_allclose(cov, [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(acc, [1.0, (1 + 1 / 3) / 2, (1 + 2 / 3) / 3, 2 / 4, 2 / 5])
    np.testing.assert_allclose(selective_accuracy(y, np.zeros(5))[1], 0.4)  # no information: the base rate throughout
    assert aurc(y, np.zeros(5)) == pytest.approx(0.6)
    # a perfect ranking: right answers first, the least area; the reversed one the most
    perfect, reverse = aurc(y, y.astype(float)), aurc(y, -y.astype(float))
    assert perfect == pytest.approx(np.mean([0, 0, 1 / 3, 2 / 4, 3 / 5])) and reverse > 0.6 > perfect


def test_bootstrap_aurc_intervals_and_difference_from_the_baseline():
    from rpe.metrics import bootstrap_aurc

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(100), 2)
    y = (rng.random(200) < 0.4).astype(float)
    informative = y + rng.normal(0, 0.7, 200)
    res = bootstrap_aurc(y, {"informative": informative, "noise": rng.normal(size=200)}, groups=groups,
                         baseline="noise", n_boot=300)
    assert res["random"]["aurc"] == pytest.approx(1 - y.mean())
    for r in res.values():
        assert r["low"] <= r["aurc"] <= r["high"] and r["n"] == 200
    d = res["informative"]["minus_baseline"]  # fewer errors at equal coverage than noise: the interval below 0
    assert d["high"] < 0 and d["diff"] == pytest.approx(res["informative"]["aurc"] - res["noise"]["aurc"])
    assert "minus_baseline" not in res["noise"]
    with pytest.raises(ValueError, match="'bad' must be"):
        bootstrap_aurc(y, {"bad": np.full(200, np.nan)}, groups=groups)
