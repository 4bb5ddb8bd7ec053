"""Prompt selection by V(s_0) (rpe.selection): with a planted value that knows each prompt's solve rate, selection
must leave fewer zero-advantage GRPO groups than random skipping at the same rate; an uninformative predictor
must not."""

import numpy as np
import pytest

from rpe.selection import (SelectionConfig, random_keep, select_by_score, select_by_value, zero_advantage_share)


def _groups(p: np.ndarray, g: int, rng) -> list[np.ndarray]:
    return [(rng.random(g) < pi).astype(float) for pi in p]


def test_planted_value_selection_beats_random_skipping_at_the_same_rate():
    rng = np.random.default_rng(0)
    n, g = 2000, 8
    # a weak model: most prompts hopeless, some solved, a middle band that teaches
    p = np.concatenate([np.zeros(900), np.ones(300), rng.uniform(0.1, 0.9, 800)])
    planted = np.clip(p + rng.normal(0, 0.03, n), 0, 1)  # the internal value knows the solve rate, with noise
    keep = select_by_value(planted, SelectionConfig(low=0.05, high=0.95, explore=0.0))
    shares = {"value": [], "random": [], "uninformative": []}
    for seed in range(5):
        groups = _groups(p, g, np.random.default_rng(seed + 1))
        shares["value"].append(zero_advantage_share([gr for gr, k in zip(groups, keep) if k]))
        rand = random_keep(n, int(keep.sum()), seed=seed)
        shares["random"].append(zero_advantage_share([gr for gr, k in zip(groups, rand) if k]))
        noise = select_by_score(np.random.default_rng(seed + 9).random(n), int(keep.sum()))
        shares["uninformative"].append(zero_advantage_share([gr for gr, k in zip(groups, noise) if k]))
    everything = zero_advantage_share(_groups(p, g, np.random.default_rng(1)))
    assert everything > 0.6  # without selection most groups teach nothing
    # selection removes most hopeless and solved prompts (the ~5% the noise lifts into the band stay), leaving the
    # middle band's own zero-advantage groups (p = 0.1 gives 8 failures in 43% of groups); random skipping keeps
    # the mix
    assert max(shares["value"]) < 0.25 and min(shares["random"]) > 0.6
    assert np.mean(shares["value"]) < np.mean(shares["random"]) / 3
    assert abs(np.mean(shares["uninformative"]) - np.mean(shares["random"])) < 0.05  # no information, no gain


def test_explore_keeps_a_share_of_the_skipped_and_nan_is_refused():
    values = np.r_[np.zeros(1000), np.full(1000, 0.5)]
    keep = select_by_value(values, SelectionConfig(explore=0.2, seed=3))
    assert keep[1000:].all() and 0.15 < keep[:1000].mean() < 0.25
    assert np.array_equal(keep, select_by_value(values, SelectionConfig(explore=0.2, seed=3)))  # deterministic
    with pytest.raises(ValueError, match="NaN"):
        select_by_value(np.array([0.5, np.nan]), SelectionConfig())
    with pytest.raises(ValueError, match="low <= high"):
        SelectionConfig(low=0.9, high=0.1)


def test_controls_keep_the_same_number():
    scores = np.array([5.0, 1.0, 3.0, 4.0, 2.0])
    assert select_by_score(scores, 3).tolist() == [False, False, True, True, True]  # the middle ranks: 3, 4, 2
    assert select_by_score(scores, 2, two_sided=False).tolist() == [True, False, False, True, False]
    assert random_keep(10, 4, seed=1).sum() == 4
    assert zero_advantage_share([[1, 1], [0, 1], [0, 0]]) == pytest.approx(2 / 3)
