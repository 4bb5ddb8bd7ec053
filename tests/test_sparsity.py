"""The sparsity claim's control (rpe.sparsity): a refit that trains on few inputs, leak-free selection, random
sets of the same size, and the card's verdict rules."""

import numpy as np
import pytest
import torch

from rpe.crossval import kfold_by_problem
from rpe.metrics import auroc
from rpe.report_card import NOT_REPRODUCED, PRESENT_NOT_SPECIFIC, REPRODUCED, sparsity_verdict
from rpe.sparsity import (
    REFIT, SELECTION_METHODS, compare_with_random, random_set_values, random_sets, selected_per_fold,
    sparse_refit_values, sparsity_control,
)
from rpe.probe import ProbeConfig
from rpe.store import StateSet


def _planted(n_traj=240, d=200, planted=(17, 140), seed=0, strength=1.2):
    """States s_0 and final of n_traj trajectories; 1% of the dimensions (``planted``, or every dimension when
    it is empty) carry the outcome, the rest share a common factor (correlated dimensions) and no signal."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_traj).astype(float)
    rows = []
    for i in range(n_traj):
        for _ in range(2):
            common = rng.normal()
            x = 0.8 * common + rng.normal(size=d)
            x[list(planted) or slice(None)] += strength * (y[i] - 0.5) * 2
            rows.append(x)
    acts = torch.tensor(np.array(rows), dtype=torch.float32)
    states = StateSet({0: acts}, torch.arange(n_traj).repeat_interleave(2), torch.tensor([0, 1] * n_traj),
                      [str(i) for i in range(n_traj)], [f"p{i}" for i in range(n_traj)], torch.tensor(y))
    return states, list(planted)


SMALL_MLP = ProbeConfig(hidden=64, epochs=40)
"""The dense probe behind ``first_layer_norm`` in these tests: the paper's width is not needed on 200 dims."""


@pytest.fixture(scope="module")
def planted():
    states, dims = _planted()
    folds = kfold_by_problem(states.problem_ids, 5, 0)
    return states, dims, folds


@pytest.fixture(scope="module")
def dense_refit(planted):
    """Out-of-fold values of the same refit on all 200 dimensions (the reference every selection must reach)."""
    states, _, folds = planted
    return sparse_refit_values(states, 0, folds, [torch.arange(200)] * 5).values


@pytest.mark.parametrize("method", SELECTION_METHODS)
def test_selection_inside_folds_finds_the_planted_one_percent_and_the_refit_matches_the_dense_probe(planted, dense_refit,
                                                                                                 method):
    states, dims, folds = planted
    y = states.state_rewards().numpy()
    sets = selected_per_fold(states, 0, folds, k=2, method=method, probe_cfg=SMALL_MLP)
    assert all(sorted(s.tolist()) == dims for s in sets)
    sparse = sparse_refit_values(states, 0, folds, sets).values
    dense = dense_refit
    assert not np.isnan(sparse).any()
    assert auroc(y, sparse) >= auroc(y, dense) - 0.02  # the refit on 2 inputs trains (the MLP refit lost ~0.1)


def test_the_planted_set_beats_random_sets_of_its_size(planted):
    states, dims, folds = planted
    y = states.state_rewards().numpy()
    problems = np.array(states.problem_ids)[states.traj_index.numpy()]
    sel = sparse_refit_values(states, 0, folds, [torch.tensor(dims)] * 5).values
    draws = random_sets(200, 2, n_draws=10, seed=0, exclude=dims)
    assert all(not set(d.tolist()) & set(dims) for d in draws) and len({tuple(d.tolist()) for d in draws}) == 10
    rnd = random_set_values(states, 0, folds, draws)
    cmp = compare_with_random(sel, rnd, y, problems, np.ones(len(y), bool), n_boot=200)
    assert cmp.selected > 0.9 and abs(cmp.random_mean - 0.5) < 0.08
    assert cmp.low > 0.3 and cmp.rank == 0 and cmp.n_draws == 10
    # a random set scored against the others is not above them: the comparison can fail
    other = compare_with_random(rnd[0], rnd[1:], y, problems, np.ones(len(y), bool), n_boot=200)
    assert not other.low > 0 and other.rank > 0


def test_the_control_end_to_end_separates_a_planted_set_from_a_signal_spread_over_every_dimension(planted, dense_refit):
    states, dims, folds = planted
    given = {"first_layer_norm": {0.01: [torch.tensor(dims)] * 5}}  # as rpe fit passes its pruning curve's sets
    out = sparsity_control(states, 0, folds, [1.0, 0.01], dense_refit, given=given, n_draws=5, matched_frac=0.01,
                           n_boot=100, seed=0)
    assert [(r["method"], r["k"]) for r in out["rows"]] == [(m, 2) for m in SELECTION_METHODS]  # 1.0 is not a subset
    assert out["n_draws"] == 5 and out["refit"] == {"family": "linear", "target": "mc"}
    assert not set(out["excluded_dims"]) & set(dims)
    for row in out["rows"]:
        for where in ("s0", "final"):
            vs_random, vs_all = row["vs_random"][where], row["vs_all"][where]
            assert vs_random["low"] > 0.2 and vs_random["rank"] == 0 and vs_random["n_draws"] == 5
            assert vs_all["high"] >= -0.02 and vs_all["low"] <= vs_all["diff"] <= vs_all["high"]
            assert row[where]["low"] <= row[where]["auroc"] <= row[where]["high"]
            assert verdict_of(row, where) == REPRODUCED
    assert out["matched"]["method"] == "first_layer_norm" and out["matched"]["s0"]["low"] > 0.2

    # the outcome in every dimension: any 2 neurons carry it, and the selected 2 are not specific
    spread, _ = _planted(strength=0.25, planted=())
    spread_folds = kfold_by_problem(spread.problem_ids, 5, 0)
    dense = sparse_refit_values(spread, 0, spread_folds, [torch.arange(200)] * 5).values
    out = sparsity_control(spread, 0, spread_folds, [0.01], dense, methods=["univariate_auroc"], n_draws=5, n_boot=100)
    (row,) = out["rows"]
    assert row["s0"]["auroc"] > 0.55 and out["matched"] is None
    assert not row["vs_random"]["s0"]["low"] > 0 and verdict_of(row, "s0") != REPRODUCED
    assert row["vs_all"]["s0"]["high"] < 0  # and 2 neurons are far below all 200 of them


def verdict_of(row, where):
    return sparsity_verdict(*((row[k][where]["low"], row[k][where]["high"]) for k in ("vs_all", "vs_random")))


def test_magnitude_matched_draws_follow_the_selected_neurons_magnitudes():
    magnitudes = torch.arange(100, dtype=torch.float32)  # neuron j has magnitude j
    like = torch.tensor([5, 90])
    for draw in random_sets(100, 2, n_draws=10, seed=1, magnitudes=magnitudes, like=like):
        a, b = sorted(draw.tolist())
        assert abs(a - 5) <= 10 and abs(b - 90) <= 10 and 5 not in draw.tolist() and 90 not in draw.tolist()
    with pytest.raises(ValueError, match="only 1 neurons outside"):
        random_sets(3, 2, 1, 0, exclude=[0, 1])


def test_every_verdict_word_is_reachable_and_each_rule_fails_when_weakened():
    near_all, below_all = (-0.03, 0.01), (-0.14, -0.08)
    above_random, like_random = (0.02, 0.08), (-0.01, 0.03)
    assert sparsity_verdict(near_all, above_random) == REPRODUCED
    assert sparsity_verdict(near_all, like_random) == PRESENT_NOT_SPECIFIC
    assert sparsity_verdict(below_all, above_random) == NOT_REPRODUCED
    assert sparsity_verdict(below_all, like_random) == NOT_REPRODUCED
    # weaken each condition just past its edge
    assert sparsity_verdict((-0.05, -0.021), above_random) == NOT_REPRODUCED  # upper end below -tolerance
    assert sparsity_verdict((-0.05, -0.019), above_random) == REPRODUCED
    assert sparsity_verdict(near_all, (0.0, 0.05)) == PRESENT_NOT_SPECIFIC  # above random needs low > 0
    assert sparsity_verdict(near_all, (0.001, 0.05)) == REPRODUCED
    assert sparsity_verdict(near_all, (0.001, 0.05), beats_q95=False) == PRESENT_NOT_SPECIFIC
    assert REFIT.family == "linear"
