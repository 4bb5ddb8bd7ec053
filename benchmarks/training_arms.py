"""Helpers of the training benchmarks (dense_credit.py, prompt_selection.py): held-out rewards per problem and the
paired difference of two arms' accuracies over seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def per_problem_rewards(folder: Path) -> dict[str, float]:
    """Reward of each held-out problem in an evaluation folder (one sample per problem)."""
    from rpe.records import read_trajectories

    return {t.problem_id: float(t.reward) for t in read_trajectories(folder)}


def paired_accuracy_difference(arm: list[dict[str, float]], base: list[dict[str, float]], n_boot: int, seed: int) -> dict:
    """Mean accuracy difference arm - base, paired by problem within each seed (a seed's arms share its held-out
    problems, which exclude that seed's training questions), with a bootstrap interval that resamples problems
    within each seed."""
    per_seed = []
    for a, b in zip(arm, base, strict=True):
        common = sorted(set(a) & set(b))
        per_seed.append(np.array([a[p] - b[p] for p in common]))
    rng = np.random.default_rng(seed)
    mean = float(np.mean(np.concatenate(per_seed)))
    boots = [np.mean(np.concatenate([d[rng.integers(0, len(d), len(d))] for d in per_seed])) for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"diff": mean, "low": float(lo), "high": float(hi), "n_pairs": int(sum(len(d) for d in per_seed))}
