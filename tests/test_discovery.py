"""Cross-validated discovery on a planted value signal that looks like the real case: correlated dimensions, a
difficulty feature that predicts the outcome on its own, and value information beyond difficulty."""

import math

import numpy as np
import pytest
import torch

from rpe.crossval import cross_validate, fold_split, kfold_by_problem, residualise
from rpe.metrics import (
    auroc,
    chance_verdict,
    difference_verdict,
    n_to_decide,
    paired_bootstrap_auroc,
    stratified_auroc,
)
from rpe.probe import ProbeConfig
from rpe.store import StateSet

D = 300
VALUE_DIMS = [40, 41, 42]  # 1% of 300
DIFFICULTY_DIMS = list(range(10))


def planted(n_problems: int = 240, samples: int = 2, n_steps: int = 3, seed: int = 0):
    """States s_0..s_3 of ``n_problems x samples`` trajectories in d = 300.

    Activations: 20 shared factors mixed into every dimension (strongly correlated columns, very unequal scales),
    the problem's difficulty (0, 1, 2) written into dims 0-9, and a per-trajectory latent ``u`` (the part of the
    outcome difficulty does not explain) written into dims 40-42 with a strength that grows over the steps.
    Outcome: Bernoulli(sigmoid(1.0 - 1.2 * difficulty + 1.8 * u)).
    """
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(20, D)) * rng.lognormal(0, 1, size=D)  # (20, d) correlated, unequal scales
    difficulty = rng.integers(0, 3, n_problems)
    rows, traj, step, pids, rewards, diff = [], [], [], [], [], []
    for p in range(n_problems):
        for k in range(samples):
            u = rng.normal()
            y = rng.random() < 1 / (1 + math.exp(-(1.0 - 1.2 * difficulty[p] + 1.8 * u)))
            for t in range(n_steps + 1):
                x = rng.normal(size=20) @ mix + rng.normal(size=D)
                x[DIFFICULTY_DIMS] += 1.5 * difficulty[p]
                x[VALUE_DIMS] += (0.8 + 0.4 * t) * (u + (0.5 if y else -0.5) * t / n_steps)
                rows.append(x)
                traj.append(len(rewards))
                step.append(t)
            pids.append(f"p{p}")
            rewards.append(float(y))
            diff.append({"level": float(difficulty[p])})
    states = StateSet({0: torch.tensor(np.array(rows), dtype=torch.float32)}, torch.tensor(traj), torch.tensor(step),
                      [f"{p}#{i}" for i, p in enumerate(pids)], pids, torch.tensor(rewards))
    return states, diff


@pytest.fixture(scope="module")
def planted_states():
    return planted()


def _oof_auroc(states, values, where):
    step = states.step_index.numpy()
    y = states.state_rewards().numpy()
    mask = step == 0 if where == "s0" else states.is_terminal().numpy()
    return auroc(y[mask], values[mask])


@pytest.mark.parametrize("family,target", [("linear", "td0"), ("linear", "td_lambda"), ("linear", "mc"),
                                           ("mlp", "td0"), ("mlp", "mc")])
def test_every_probe_family_and_the_one_percent_refit_recover_the_planted_value(planted_states, family, target):
    states, _ = planted_states
    folds = kfold_by_problem(states.problem_ids, 5, seed=0)
    cfg = ProbeConfig(family=family, target=target, hidden=128, seed=0)
    res = cross_validate(states, 0, cfg, folds, top_fracs=[0.01])
    for frac in (1.0, 0.01):
        values = res[frac].values
        assert not np.isnan(values).any()  # every state scored exactly once
        assert _oof_auroc(states, values, "s0") > (0.68 if frac == 1.0 else 0.62), (family, target, frac)
        assert _oof_auroc(states, values, "final") > 0.88, (family, target, frac)
    # the 1% set found inside each fold is the planted one (at least 2 of its 3 neurons in every fold)
    for neurons in res[0.01].neurons:
        assert len(set(neurons.tolist()) & set(VALUE_DIMS)) >= 2, neurons.tolist()


def test_no_probe_is_inverted_on_the_planted_signal(planted_states):
    """The failure seen on the real model: a probe that predicts the opposite of the outcome with an interval that
    excludes 0.5. Every fraction of the pruning curve must read above chance here."""
    states, _ = planted_states
    folds = kfold_by_problem(states.problem_ids, 5, seed=0)
    res = cross_validate(states, 0, ProbeConfig(), folds, top_fracs=[0.1, 0.01, 0.005])
    step = states.step_index.numpy()
    y = states.state_rewards().numpy()
    groups = np.array(states.problem_ids)[states.traj_index.numpy()]
    s0 = step == 0
    scores = {f: r.values[s0] for f, r in res.items()}
    out = paired_bootstrap_auroc(y[s0], scores, groups=groups[s0], n_boot=300)
    for frac, r in out.items():
        assert chance_verdict(r["low"], r["high"]) == "above chance", (frac, r)


def test_value_beyond_difficulty_is_found_and_difficulty_alone_is_not_it(planted_states):
    states, diff = planted_states
    from rpe.difficulty import difficulty_features

    q_len = np.zeros(len(diff))
    features, strata = difficulty_features(diff, q_len)
    assert features.shape == (len(diff), 3)  # two one-hot levels (one dropped) + question length
    tidx = states.traj_index.numpy()
    folds = kfold_by_problem(states.problem_ids, 5, seed=0)
    y = states.state_rewards().numpy()
    s0 = states.step_index.numpy() == 0
    plain = cross_validate(states, 0, ProbeConfig(family="linear", target="mc"), folds)[1.0].values
    resid = cross_validate(states, 0, ProbeConfig(family="linear", target="mc"), folds, regress_out=features[tidx])[1.0].values
    # a score that is difficulty alone ranks well overall and exactly at chance within strata
    level = -np.array([d["level"] for d in diff])[tidx]
    assert auroc(y[s0], level[s0]) > 0.6
    assert stratified_auroc(y[s0], level[s0], strata[tidx][s0]) == pytest.approx(0.5)
    # the probe keeps its signal within strata and with difficulty regressed out
    assert stratified_auroc(y[s0], plain[s0], strata[tidx][s0]) > 0.65
    assert auroc(y[s0], resid[s0]) > 0.65


def test_residualise_removes_the_linear_part_fitted_on_training_rows():
    rng = np.random.default_rng(0)
    f = torch.tensor(rng.normal(size=(200, 2)), dtype=torch.float32)
    x = 3 * f[:, :1] - 2 * f[:, 1:] + 5 + 0.01 * torch.randn(200, 1)
    train = torch.arange(200) < 150
    r = residualise(x, f, train)
    assert r.abs().max() < 0.1  # held-out rows too: the fit on training rows generalises


def test_kfold_by_problem_scores_every_problem_once():
    pids = [f"p{i // 3}" for i in range(3 * 53)]
    folds = kfold_by_problem(pids, 5, seed=3)
    for p in set(pids):
        assert len({folds[i] for i, q in enumerate(pids) if q == p}) == 1  # samples of a problem stay together
    sizes = np.bincount([folds[i] for i in range(0, len(pids), 3)])
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 53
    assert (folds == kfold_by_problem(pids, 5, seed=3)).all()
    split = fold_split(folds, pids, 2, 0.15, seed=0)
    assert set(np.asarray(pids)[split == 2]) == set(np.asarray(pids)[folds == 2])
    assert not set(np.asarray(pids)[split == 1]) & set(np.asarray(pids)[split == 0])
    assert abs((split == 1).sum() / (folds != 2).sum() - 0.15) < 0.03
    with pytest.raises(ValueError, match="only 4 distinct problems"):
        kfold_by_problem(["a", "b", "c", "d"], 5)


def test_paired_bootstrap_interval_covers_the_true_auroc_and_pairs_the_difference():
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    true_a = norm.cdf(1.0 / math.sqrt(2))  # AUROC of a unit shift between two unit normals
    covered, widths_sep, widths_diff = 0, [], []
    for rep in range(60):
        y = rng.random(300) < 0.4
        base = rng.normal(size=300)
        a = base + y * 1.0
        b = base + y * 1.0 + 0.3 * rng.normal(size=300)  # shares most noise with a: a paired comparison
        r = paired_bootstrap_auroc(y, {"a": a, "b": b}, groups=np.arange(300), diffs=[("a", "b")], n_boot=200, seed=rep)
        covered += r["a"]["low"] <= true_a <= r["a"]["high"]
        widths_sep.append(r["a"]["high"] - r["a"]["low"])
        widths_diff.append(r["a - b"]["high"] - r["a - b"]["low"])
    assert 0.85 <= covered / 60 <= 1.0
    assert np.mean(widths_diff) < 0.5 * np.mean(widths_sep)


def test_verdicts_name_chance_and_inversion():
    assert chance_verdict(0.55, 0.7) == "above chance"
    assert chance_verdict(0.16, 0.41) == "below chance (inverted)"
    assert chance_verdict(0.43, 0.75) == "not distinguishable from chance"
    assert chance_verdict(math.nan, 0.7) == "not measurable"
    assert difference_verdict(-0.2, -0.01) == "lower" and difference_verdict(-0.1, 0.2) == "no difference distinguishable"
    assert n_to_decide(0.6, 0.45, 0.75, 100) == 225  # half-width 0.15 must shrink to 0.10: (0.15/0.1)^2 x 100
    assert n_to_decide(0.7, 0.6, 0.8, 100) is None
