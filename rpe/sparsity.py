"""The sparsity claim against its control: k selected neurons against random sets of k neurons, refitted alike.

"A sparse 1% carries the value" means something only against random sets of the same size: on a small model
the outcome (difficulty, mostly) is spread through the residual stream, and almost any few dimensions carry
some of it. This module gives the pieces of that comparison (issue #28), on the folds of ``rpe fit``:

- :func:`sparse_refit_values`: out-of-fold values of a probe refitted on given neurons per fold, with a probe
  family that fits reliably on few inputs (the standardised logistic probe, L2 chosen on the inner validation
  split, as the layer is): an MLP refitted on 6 inputs underfits and makes the set look worse than it is;
- :func:`rank_neurons`: the selection methods, each run on a fold's training rows only (leak-free): the dense
  linear probe's |coefficient| and univariate AUROC;
- :func:`random_set_values`: the same refit on ``n_draws`` random sets of k neurons (sink / massive-activation
  dimensions excluded, as ablation excludes them; optionally drawn to match the selected set's magnitudes);
- :func:`compare_with_random`: the selected set's AUROC minus the random sets' mean with a problem-clustered
  paired bootstrap interval, and its rank among the draws;
- :func:`rpe.report_card.sparsity_verdict`: the report card's words for the row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rpe.crossval import fold_split
from rpe.metrics import auroc, cluster_resamples
from rpe.probe import ProbeConfig, ValueProbe
from rpe.store import StateSet

SELECTION_METHODS = ("dense_coefficient", "univariate_auroc")

REFIT = ProbeConfig(family="linear", hidden=0)
"""The sparse refit: the standardised logistic probe (TD targets as the dense probe), L2 chosen on validation."""


def sparse_refit_values(states: StateSet, layer: int, folds: np.ndarray, neurons_per_fold: Sequence[torch.Tensor],
                        cfg: ProbeConfig = REFIT) -> np.ndarray:
    """(n_states,) out-of-fold values of probes refitted, fold by fold, on ``neurons_per_fold[f]`` (indices into
    d_model) and scored on fold f's states."""
    tidx = states.traj_index.numpy()
    out = np.full(states.n_states, np.nan)
    for fold, neurons in enumerate(neurons_per_fold):
        split = fold_split(folds, states.problem_ids, fold, cfg.val_frac, cfg.seed)
        probe = ValueProbe(cfg).fit(states, layer, torch.as_tensor(neurons), split=split)
        scored = split[tidx] == 2
        out[scored] = probe.predict(states.acts[layer][:, torch.as_tensor(neurons)]).numpy()[scored]
    return out


def rank_neurons(method: str, x: torch.Tensor, y: np.ndarray, cfg: ProbeConfig = REFIT) -> torch.Tensor:
    """All d neurons, best first, by ``method`` on training rows ``x`` (n, d) with outcomes ``y`` (n,):
    ``dense_coefficient`` (|weight| of a standardised logistic fit on all neurons), ``univariate_auroc``
    (|AUROC - 0.5| of each neuron alone)."""
    if method == "univariate_auroc":
        xs = x.double().numpy()
        score = np.array([abs(auroc(y, xs[:, j]) - 0.5) for j in range(xs.shape[1])])
        score = np.nan_to_num(score, nan=0.0)
        return torch.as_tensor(np.argsort(-score, kind="stable"))
    if method == "dense_coefficient":
        from rpe.logistic import fit_logistic

        mean, std = x.float().mean(0), x.float().std(0).clamp_min(1e-6)
        z = (x.float() - mean) / std
        linear = torch.nn.Linear(z.shape[1], 1)
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.zero_()
        fit_logistic(linear, z, torch.as_tensor(y, dtype=torch.float32), l2=0.1)  # a fixed middle strength
        return torch.argsort(linear.weight.detach().abs().flatten(), descending=True, stable=True)
    raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(SELECTION_METHODS)}")


def selected_per_fold(states: StateSet, layer: int, folds: np.ndarray, k: int, method: str,
                      cfg: ProbeConfig = REFIT) -> list[torch.Tensor]:
    """The top ``k`` neurons by ``method``, ranked inside each fold on its training states (final outcome as the
    target), one set per fold."""
    tidx = states.traj_index.numpy()
    y = states.state_rewards().numpy()
    out = []
    for fold in range(int(folds.max()) + 1):
        split = fold_split(folds, states.problem_ids, fold, cfg.val_frac, cfg.seed)
        train = split[tidx] == 0
        out.append(rank_neurons(method, states.acts[layer][torch.as_tensor(train)], y[train], cfg)[:k].sort().values)
    return out


def random_sets(d_model: int, k: int, n_draws: int, seed: int, exclude: Sequence[int] = (),
                magnitudes: torch.Tensor | None = None, like: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``n_draws`` random sets of ``k`` neurons out of ``d_model``, never one in ``exclude`` (sink dimensions);
    with ``magnitudes`` (d,) and ``like`` (a selected set), each draw takes for every selected neuron one of the
    neurons nearest to it in magnitude rank (magnitude-matched draws)."""
    g = np.random.default_rng(seed)
    pool = np.setdiff1d(np.arange(d_model), np.asarray(list(exclude), dtype=int))
    if len(pool) < k:
        raise ValueError(f"only {len(pool)} neurons outside the {len(exclude)} excluded; cannot draw {k}")
    if magnitudes is None or like is None:
        return [torch.as_tensor(np.sort(g.choice(pool, size=k, replace=False))) for _ in range(n_draws)]
    order = pool[np.argsort(magnitudes.numpy()[pool], kind="stable")]
    rank_of = {int(n): r for r, n in enumerate(order)}
    draws = []
    for _ in range(n_draws):
        chosen: set[int] = set()
        for n in like.tolist():
            r = rank_of.get(int(n), int(np.searchsorted(magnitudes.numpy()[order], float(magnitudes[n]))))
            window = [int(m) for m in order[max(0, r - 10) : r + 11] if int(m) not in chosen and int(m) != int(n)]
            chosen.add(int(g.choice(window)) if window else int(g.choice([m for m in pool if m not in chosen])))
        draws.append(torch.as_tensor(sorted(chosen)))
    return draws


def random_set_values(states: StateSet, layer: int, folds: np.ndarray, sets: Sequence[torch.Tensor],
                      cfg: ProbeConfig = REFIT, progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
    """Out-of-fold values of the same refit on each random set (the set is the same in every fold: chosen
    without looking at the data)."""
    out = []
    for i, s in enumerate(sets):
        out.append(sparse_refit_values(states, layer, folds, [s] * (int(folds.max()) + 1), cfg))
        if progress:
            progress(i + 1, len(sets))
    return out


@dataclass(frozen=True)
class RandomSetComparison:
    """A selected set against random sets of its size, at one position (s_0 or the final state)."""

    selected: float
    """AUROC of the selected set's out-of-fold values."""
    random_mean: float
    random_q95: float
    diff: float
    """``selected - random_mean``."""
    low: float
    high: float
    """95% problem-clustered bootstrap interval of ``diff`` (every draw rescored on each resample)."""
    rank: int
    """How many random sets reach the selected set's AUROC (0 = it beats them all)."""
    n_draws: int


def compare_with_random(selected: np.ndarray, randoms: Sequence[np.ndarray], y: np.ndarray, problems: np.ndarray,
                        mask: np.ndarray, n_boot: int = 1000, seed: int = 0) -> RandomSetComparison:
    """Selected set's AUROC minus the mean AUROC of the random sets on the states in ``mask``, paired: every
    bootstrap resample of problems rescores the selected set and every random set."""
    ys, sel, rnd, grp = y[mask], selected[mask], [r[mask] for r in randoms], problems[mask]
    point_sel = auroc(ys, sel)
    point_rnd = np.array([auroc(ys, r) for r in rnd])
    diffs = []
    for idx in cluster_resamples(grp, n_boot, seed):
        yb = ys[idx]
        if yb.min() == yb.max():
            continue
        diffs.append(auroc(yb, sel[idx]) - np.mean([auroc(yb, r[idx]) for r in rnd]))
    low, high = (np.quantile(diffs, [0.025, 0.975]) if diffs else (np.nan, np.nan))
    return RandomSetComparison(float(point_sel), float(point_rnd.mean()), float(np.quantile(point_rnd, 0.95)),
                               float(point_sel - point_rnd.mean()), float(low), float(high),
                               int((point_rnd >= point_sel).sum()), len(rnd))


__all__ = ["REFIT", "SELECTION_METHODS", "RandomSetComparison", "compare_with_random", "random_set_values",
           "random_sets", "rank_neurons", "selected_per_fold", "sparse_refit_values"]
