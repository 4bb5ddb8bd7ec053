"""Cross-validation by problem: every problem is tested exactly once, by a probe that never saw it.

``rpe fit`` reports out-of-fold values: the problems are dealt into ``k`` folds (all samples of a problem in
one fold); for fold ``f`` a probe is fitted on the other folds (a share of whose problems is held back for early
stopping / L2 choice) and predicts fold ``f``. The out-of-fold predictions of all folds together cover every
state once, so an AUROC over them uses every trajectory (a single test split uses 30%).

Neuron selection happens inside each fold (rank on the fold's training data, refit on the top fraction), so the
reported sparse-probe AUROC is never helped by the problems it is scored on. Difficulty features can be
regressed out of the activations inside each fold (fitted on the fold's training rows only).

Example:
    >>> folds = kfold_by_problem(states.problem_ids, k=5, seed=0)  # doctest: +SKIP
    >>> oof = cross_validate(states, layer=12, cfg=ProbeConfig(), folds=folds)  # doctest: +SKIP
    >>> oof.values.shape  # (n_states,)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from rpe.metrics import auroc
from rpe.probe import ProbeConfig, ValueProbe
from rpe.store import StateSet

logger = logging.getLogger(__name__)


def kfold_by_problem(problem_ids: Sequence[str], k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold (0..k-1) of each trajectory: problems are shuffled with ``seed`` and dealt round-robin, so folds
    differ in size by at most one problem and all samples of a problem share a fold.

    Returns:
        (n_trajectories,) int array.

    Raises:
        ValueError: fewer than ``2 k`` distinct problems.

    Example:
        >>> kfold_by_problem(["a", "a", "b", "b", "c", "d"], k=2, seed=0)
        array([1, 1, 0, 0, 0, 1])
    """
    if k < 2:
        raise ValueError(f"cross-validation needs k >= 2 folds, got {k}")
    uniq = sorted(set(problem_ids))
    if len(uniq) < 2 * k:
        raise ValueError(f"only {len(uniq)} distinct problems for {k} folds; collect at least {2 * k} problems or lower k")
    order = np.random.default_rng(seed).permutation(len(uniq))
    fold_of = {uniq[i]: rank % k for rank, i in enumerate(order)}
    return np.array([fold_of[p] for p in problem_ids])


def fold_split(folds: np.ndarray, problem_ids: Sequence[str], fold: int, val_frac: float, seed: int) -> np.ndarray:
    """Split codes for one fold: 2 = this fold (scored), 1 = validation (``val_frac`` of the other folds'
    problems, for early stopping and L2 choice), 0 = training. Returns (n_trajectories,) int array."""
    pids = np.asarray(problem_ids)
    rest = sorted(set(pids[folds != fold]))
    order = np.random.default_rng(seed + 7919 * (fold + 1)).permutation(len(rest))
    n_val = max(1, round(val_frac * len(rest)))
    val = {rest[i] for i in order[:n_val]}
    split = np.zeros(len(pids), dtype=int)
    split[np.isin(pids, list(val))] = 1
    split[folds == fold] = 2
    return split


@dataclass
class OutOfFold:
    """Out-of-fold values of one probe configuration.

    Attributes:
        values: (n_states,) V(s) of each state from the probe of the fold that held it out.
        val_auroc: per fold, AUROC over all validation states (inner split; used to choose layers without
            touching the scored folds).
        neurons: per fold, the input dimensions used (None = all of d_model).
    """

    values: np.ndarray
    val_auroc: list[float]
    neurons: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def mean_val_auroc(self) -> float:
        vals = [v for v in self.val_auroc if not math.isnan(v)]
        return float(np.mean(vals)) if vals else math.nan


def residualise(x: torch.Tensor, features: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Remove from every column of ``x`` its least-squares fit on ``[1, features]`` estimated on ``train`` rows.

    Args:
        x: (n, d) activations.
        features: (n, f) per-row covariates (e.g. one-hot difficulty).
        train: (n,) bool rows to estimate the fit on.

    Returns:
        (n, d) residuals.
    """
    design = torch.cat([torch.ones(features.shape[0], 1, dtype=torch.float64), features.double()], 1)  # (n, f+1)
    coef = torch.linalg.lstsq(design[train], x[train].double(), driver="gelsd").solution  # (f+1, d)
    return (x.double() - design @ coef).float()


def cross_validate(
    states: StateSet,
    layer: int,
    cfg: ProbeConfig,
    folds: np.ndarray,
    *,
    top_fracs: Sequence[float] = (),
    regress_out: torch.Tensor | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[float, OutOfFold]:
    """Out-of-fold values of a dense probe and of probes refitted on its top neurons, per fold.

    Args:
        states: captured states (all trajectories).
        layer: the layer to probe.
        cfg: probe configuration (family, target, ...).
        folds: (n_trajectories,) fold of each trajectory (:func:`kfold_by_problem`).
        top_fracs: fractions of the dense probe's neurons (ranked on each fold's training data) to refit on.
        regress_out: optional (n_states, f) covariates regressed out of the activations inside each fold.

    Returns:
        ``{1.0: dense, frac: sparse, ...}`` :class:`OutOfFold` per fraction.
    """
    k = int(folds.max()) + 1
    tidx = states.traj_index.numpy()
    y = states.state_rewards().numpy()
    fracs = [1.0] + [f for f in top_fracs if f < 1.0]
    out = {f: OutOfFold(np.full(states.n_states, np.nan), [], []) for f in fracs}
    for fold in range(k):
        split = fold_split(folds, states.problem_ids, fold, cfg.val_frac, cfg.seed)
        view = states
        if regress_out is not None:
            train_rows = torch.as_tensor(split[tidx] == 0)
            view = StateSet({layer: residualise(states.acts[layer], regress_out, train_rows)}, states.traj_index,
                            states.step_index, states.trajectory_ids, states.problem_ids, states.rewards)
        if progress:
            progress(f"layer {layer}: fold {fold + 1}/{k}")
        scored = split[tidx] == 2
        val = split[tidx] == 1
        dense = ValueProbe(cfg).fit(view, layer, split=split)
        for frac in fracs:
            neurons = None if frac == 1.0 else dense.prune(frac)
            probe = dense if neurons is None else ValueProbe(cfg).fit(view, layer, neurons, split=split)
            values = probe.predict(view.acts[layer][:, neurons] if neurons is not None else view.acts[layer]).numpy()
            out[frac].values[scored] = values[scored]
            out[frac].val_auroc.append(auroc(y[val], values[val]))
            out[frac].neurons.append(neurons)
    return out


__all__ = ["OutOfFold", "cross_validate", "fold_split", "kfold_by_problem", "residualise"]
