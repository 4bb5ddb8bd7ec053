"""The task's difficulty as a control: features and strata per trajectory, and a probe on difficulty alone.

``rpe fit`` scores the value neurons beside a logistic regression on these features (does the model know more
than how hard the problem looks?), and within difficulty strata.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from rpe.records import Trajectory

logger = logging.getLogger(__name__)


def difficulty_features(difficulty: Sequence[dict[str, float]], q_len: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Covariates of difficulty per trajectory: one-hot of every value of every difficulty key, plus the question
    length standardised; and a stratum id per trajectory (the tuple of difficulty values).

    Returns:
        ``(features (n_trajectories, f), strata (n_trajectories,) int)``.
    """
    keys = sorted({k for d in difficulty for k in d})
    cols = []
    for key in keys:
        values = sorted({d.get(key, math.nan) for d in difficulty})
        for v in values[1:]:  # drop one level: the intercept carries it
            cols.append([1.0 if d.get(key, math.nan) == v else 0.0 for d in difficulty])
    q = (q_len - q_len.mean()) / (q_len.std() + 1e-9)
    feats = torch.tensor(np.column_stack([np.asarray(cols).T if cols else np.zeros((len(difficulty), 0)), q]), dtype=torch.float32)
    labels = [tuple(d.get(k, math.nan) for k in keys) for d in difficulty]
    index = {lab: i for i, lab in enumerate(sorted(set(labels)))}
    return feats, np.array([index[lab] for lab in labels])


def difficulty_only_values(features: torch.Tensor, rewards: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """(n_trajectories,) out-of-fold P(correct) from a logistic regression on the difficulty features alone."""
    from sklearn.linear_model import LogisticRegression

    x = features.numpy()
    out = np.full(len(rewards), np.nan)
    y = rewards >= 0.5
    for fold in np.unique(folds):
        train = folds != fold
        if len(np.unique(y[train])) < 2:
            out[~train] = y[train].mean()
            continue
        model = LogisticRegression(C=1.0, max_iter=1000).fit(x[train], y[train])
        out[~train] = model.predict_proba(x[~train])[:, 1]
    return out


def task_difficulty(trajectories: Sequence[Trajectory], task, n_problems: int, seed: int) -> list[dict[str, float]]:
    """Per trajectory, the difficulty features of its problem, by drawing the run's problems again
    (``task.problems(n_problems, seed)`` is deterministic). Trajectories whose problem is not drawn get ``{}``."""
    return _per_trajectory(trajectories, task, task.problems(n_problems, seed=seed))


def _per_trajectory(trajectories: Sequence[Trajectory], task, problems) -> list[dict[str, float]]:
    by_id = {p.id: task.difficulty(p) for p in problems}
    return [by_id.get(t.problem_id, {}) for t in trajectories]


def difficulty_by_problem(rollouts) -> dict[str, dict[str, float]] | None:
    """Problem id -> difficulty features for a rollout folder, by drawing its problems again from the task in its
    manifest (:meth:`rpe.rollouts.RolloutSettings.problems`); None when the folder has no manifest (an imported
    file) or the task cannot be loaded."""
    from rpe.rollouts import rollout_settings

    settings = rollout_settings(rollouts)
    if settings is None:
        return None
    try:
        task = settings.task()
        return {p.id: task.difficulty(p) for p in settings.problems()}
    except Exception as err:  # a moved task file, an unknown task: the control is skipped, not the fit
        logger.warning("difficulty features unavailable (%s): no difficulty control", err)
        return None


def difficulty_from_run(rollouts, trajectories: Sequence[Trajectory]) -> list[dict[str, float]] | None:
    """Difficulty features per trajectory for a rollout folder (:func:`difficulty_by_problem`); None when the
    folder has no manifest or the task has no difficulty features."""
    by_problem = difficulty_by_problem(rollouts)
    if by_problem is None:
        return None
    out = [by_problem.get(t.problem_id, {}) for t in trajectories]
    return out if any(out) else None


def difficulty_scores(fitted: Sequence[Trajectory], fitted_difficulty: Sequence[dict[str, float]],
                      held: Sequence[Trajectory], held_difficulty: Sequence[dict[str, float]]) -> dict[str, float]:
    """Trajectory id -> P(correct) of each of ``held`` predicted from its question's difficulty alone: a logistic
    regression on the difficulty features (:func:`difficulty_features`: one-hot difficulty values and question
    length, centred within each run) fitted on ``fitted`` (the bundle's fitting rollouts) and applied to
    ``held``. The control of "the internal value knows more than how hard the question looks" wherever
    held-out samples are scored.

    Raises:
        ValueError: no difficulty features, or one outcome only among ``fitted``.
    """
    from sklearn.linear_model import LogisticRegression

    if not any(fitted_difficulty) or not any(held_difficulty):
        raise ValueError("difficulty_scores: the task gives no difficulty features for these trajectories")
    y = np.array([t.reward >= 0.5 for t in fitted])
    if len(np.unique(y)) < 2:
        raise ValueError(f"difficulty_scores: all {len(y)} fitting trajectories have the same outcome")
    # prompt tokens, centred within each run: the runs' few-shot examples may differ in length, their questions'
    # lengths are what the feature means
    q_len = np.concatenate([(n := np.array([float(t.prompt_len) for t in run])) - n.mean() for run in (fitted, held)])
    features, _ = difficulty_features(list(fitted_difficulty) + list(held_difficulty), q_len)
    x = features.numpy()
    model = LogisticRegression(C=1.0, max_iter=1000).fit(x[: len(fitted)], y)
    p = model.predict_proba(x[len(fitted):])[:, 1]
    return {t.trajectory_id: float(v) for t, v in zip(held, p)}


__all__ = ["difficulty_by_problem", "difficulty_features", "difficulty_from_run", "difficulty_only_values", "difficulty_scores",
           "task_difficulty"]
