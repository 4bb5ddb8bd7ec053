"""The sparsity claim against its control: k selected neurons against random sets of k neurons, refitted alike.

"A sparse 1% carries the value" means something only against random sets of the same size: on a small model
the outcome (difficulty, mostly) is spread through the residual stream, and almost any few dimensions carry
some of it. This module gives the pieces of that comparison (issue #28), on the folds of ``rpe fit``:

- :func:`sparse_refit_values`: out-of-fold values of a probe refitted on given neurons per fold, with a probe
  family that fits reliably on few inputs (the standardised logistic probe, L2 chosen on the inner validation
  split, as the layer is): an MLP refitted on 6 inputs underfits and makes the set look worse than it is;
- :func:`rankings_per_fold`: the selection methods, each run on a fold's training rows only (leak-free): the
  paper's first-layer weight norm of the dense probe, the dense linear probe's |coefficient|, univariate AUROC
  and the order in which neurons enter an L1 (lasso) path;
- :func:`random_set_values`: the same refit on ``n_draws`` random sets of k neurons (sink / massive-activation
  dimensions excluded, as ablation excludes them; optionally drawn to match the selected set's magnitudes);
- :func:`compare_with_random`: the selected set's AUROC minus the random sets' mean with a problem-clustered
  paired bootstrap interval, and its rank among the draws;
- :func:`sparsity_control`: all of it for every fraction of the pruning curve and every method (``rpe fit``'s
  ``metrics["sparsity"]``);
- :func:`rpe.report_card.sparsity_verdict`: the report card's words for the row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from rpe.controls import massive_dims
from rpe.crossval import OutOfFold, fold_split
from rpe.metrics import auroc, auroc_columns, cluster_resamples
from rpe.probe import ProbeConfig, ValueProbe
from rpe.store import StateSet

SELECTION_METHODS = ("first_layer_norm", "dense_coefficient", "univariate_auroc", "l1_path")
"""How neurons are ranked: the paper's L1 norm of the dense probe's first-layer weight columns (the bundle's
value neurons), |coefficient| of a standardised logistic fit on all neurons, |AUROC - 0.5| of each neuron alone,
and the order of entry into a lasso path (LARS) on the standardised neurons."""

REFIT = ProbeConfig(family="linear", hidden=0, target="mc")
"""The sparse refit of the control: the standardised logistic probe, L2 chosen on validation, on the Monte-Carlo
target (one fit per L2 strength; the TD target's fitted-value iteration costs up to 20 fits, and the control
refits every random set in every fold). The same refit for the selected set, the random sets and all neurons."""


def sparse_refit_values(states: StateSet, layer: int, folds: np.ndarray, neurons_per_fold: Sequence[torch.Tensor],
                        cfg: ProbeConfig = REFIT) -> OutOfFold:
    """Out-of-fold values (``.values``, (n_states,)) of probes refitted, fold by fold, on ``neurons_per_fold[f]``
    (indices into d_model) and scored on fold f's states; ``.val_auroc`` per fold on its inner validation
    states (what a choice between refits may look at)."""
    tidx = states.traj_index.numpy()
    y = states.state_rewards().numpy()
    out = OutOfFold(np.full(states.n_states, np.nan), [], [])
    for fold, neurons in enumerate(neurons_per_fold):
        split = fold_split(folds, states.problem_ids, fold, cfg.val_frac, cfg.seed)
        neurons = torch.as_tensor(neurons)
        probe = ValueProbe(cfg).fit(states, layer, neurons, split=split)
        values = probe.predict(states.acts[layer][:, neurons]).numpy()
        scored, val = split[tidx] == 2, split[tidx] == 1
        out.values[scored] = values[scored]
        out.val_auroc.append(auroc(y[val], values[val]))
        out.neurons.append(neurons)
    return out


def rank_neurons(method: str, x: torch.Tensor, y: np.ndarray, needed: int | None = None) -> torch.Tensor:
    """All d neurons, best first, by ``method`` on training rows ``x`` (n, d) with outcomes ``y`` (n,):
    ``dense_coefficient`` (|weight| of a standardised logistic fit on all neurons), ``univariate_auroc``
    (|AUROC - 0.5| of each neuron alone) or ``l1_path`` (order of entry into the lasso path of the outcome on
    the standardised neurons; neurons that never enter follow by |correlation|; ``needed``: the path stops
    after that many have entered). ``first_layer_norm`` needs the states' TD targets: :func:`rankings_per_fold`."""
    mean, std = x.float().mean(0), x.float().std(0).clamp_min(1e-6)
    z = (x.float() - mean) / std
    if method == "univariate_auroc":
        score = np.nan_to_num(np.abs(auroc_columns(y, z.numpy()) - 0.5), nan=0.0)
        return torch.as_tensor(np.argsort(-score, kind="stable"))
    if method == "dense_coefficient":
        from rpe.logistic import fit_logistic

        linear = torch.nn.Linear(z.shape[1], 1)
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.zero_()
        fit_logistic(linear, z, torch.as_tensor(y, dtype=torch.float32), l2=0.1)  # a fixed middle strength
        return torch.argsort(linear.weight.detach().abs().flatten(), descending=True, stable=True)
    if method == "l1_path":
        import warnings

        from sklearn.linear_model import lars_path

        zn = z.double().numpy()
        yc = np.asarray(y, dtype=np.float64) - float(np.mean(y))
        with warnings.catch_warnings():  # collinear neurons stop the path early: the rest follow by correlation
            warnings.simplefilter("ignore")
            _, active, _ = lars_path(zn, yc, method="lasso", max_iter=min(min(zn.shape) - 1, needed or zn.shape[1]))
        entered = list(dict.fromkeys(int(j) for j in active))
        corr = np.abs(zn.T @ yc)
        rest = [int(j) for j in np.argsort(-corr, kind="stable") if int(j) not in set(entered)]
        return torch.as_tensor(entered + rest)
    raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(SELECTION_METHODS)}")


def rankings_per_fold(states: StateSet, layer: int, folds: np.ndarray, method: str, cfg: ProbeConfig = REFIT,
                      probe_cfg: ProbeConfig | None = None, needed: int | None = None) -> list[torch.Tensor]:
    """Per fold, all d neurons best first by ``method``, ranked on the fold's training states only (the final
    outcome as the target; ``first_layer_norm`` fits the dense ``probe_cfg`` probe, default
    :class:`~rpe.probe.ProbeConfig`, on the fold's split and ranks by its first-layer weights). Only the first
    ``needed`` positions must be exact (see :func:`rank_neurons`)."""
    tidx = states.traj_index.numpy()
    y = states.state_rewards().numpy()
    out = []
    for fold in range(int(folds.max()) + 1):
        if method == "first_layer_norm":
            pc = probe_cfg or ProbeConfig()
            dense = ValueProbe(pc).fit(states, layer, split=fold_split(folds, states.problem_ids, fold, pc.val_frac, pc.seed))
            out.append(torch.argsort(dense.neuron_scores(), descending=True, stable=True))
            continue
        split = fold_split(folds, states.problem_ids, fold, cfg.val_frac, cfg.seed)
        train = split[tidx] == 0
        out.append(rank_neurons(method, states.acts[layer][torch.as_tensor(train)], y[train], needed))
    return out


def selected_per_fold(states: StateSet, layer: int, folds: np.ndarray, k: int, method: str,
                      cfg: ProbeConfig = REFIT, probe_cfg: ProbeConfig | None = None) -> list[torch.Tensor]:
    """The top ``k`` neurons by ``method``, ranked inside each fold on its training states, one sorted set per
    fold."""
    return [r[:k].sort().values for r in rankings_per_fold(states, layer, folds, method, cfg, probe_cfg, needed=k)]


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


def random_set_values(states: StateSet, layer: int, folds: np.ndarray,
                      sets: Sequence[torch.Tensor | Sequence[torch.Tensor]], cfg: ProbeConfig = REFIT,
                      progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
    """Out-of-fold values of the same refit on each random set: one set for every fold (drawn without looking
    at the data), or one set per fold (magnitude-matched to each fold's selected set)."""
    n_folds = int(folds.max()) + 1
    out = []
    for i, s in enumerate(sets):
        per_fold = [s] * n_folds if isinstance(s, torch.Tensor) else list(s)
        out.append(sparse_refit_values(states, layer, folds, per_fold, cfg).values)
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


def resampled_aurocs(y: np.ndarray, columns: np.ndarray, groups: np.ndarray, n_boot: int = 1000,
                     seed: int = 0) -> np.ndarray:
    """(n_kept, m) AUROC of every column of ``columns`` (n, m) on each problem-clustered bootstrap resample
    (resamples with one outcome only are dropped): paired, every column scored on the same resample."""
    rows = [auroc_columns(y[idx], columns[idx]) for idx in cluster_resamples(groups, n_boot, seed)]
    rows = [r for r in rows if not np.isnan(r).all()]
    return np.array(rows).reshape(len(rows), columns.shape[1])


def _interval(draws: np.ndarray) -> tuple[float, float]:
    if not len(draws):
        return float("nan"), float("nan")
    low, high = np.quantile(draws, [0.025, 0.975])
    return float(low), float(high)


def _against_random(point: float, point_random: np.ndarray, boot: np.ndarray, boot_random: np.ndarray) -> RandomSetComparison:
    """The comparison from the selected set's AUROC (``point``; per resample ``boot``, (n_kept,)) and the random
    sets' (``point_random``, (n_draws,); per resample ``boot_random``, (n_kept, n_draws))."""
    return RandomSetComparison(float(point), float(point_random.mean()), float(np.quantile(point_random, 0.95)),
                               float(point - point_random.mean()), *_interval(boot - boot_random.mean(1)),
                               int((point_random >= point).sum()), len(point_random))


def compare_with_random(selected: np.ndarray, randoms: Sequence[np.ndarray], y: np.ndarray, problems: np.ndarray,
                        mask: np.ndarray, n_boot: int = 1000, seed: int = 0) -> RandomSetComparison:
    """Selected set's AUROC minus the mean AUROC of the random sets on the states in ``mask``, paired: every
    bootstrap resample of problems rescores the selected set and every random set."""
    cols = np.column_stack([selected[mask]] + [r[mask] for r in randoms])
    point = auroc_columns(y[mask], cols)
    boot = resampled_aurocs(y[mask], cols, problems[mask], n_boot, seed)
    return _against_random(point[0], point[1:], boot[:, 0], boot[:, 1:])


def sparsity_control(states: StateSet, layer: int, folds: np.ndarray, fracs: Sequence[float], dense_values: np.ndarray,
                     *, given: dict[str, dict[float, Sequence[torch.Tensor]]] | None = None,
                     methods: Sequence[str] = SELECTION_METHODS, n_draws: int = 20, matched_frac: float | None = None,
                     probe_cfg: ProbeConfig | None = None, cfg: ProbeConfig = REFIT, n_boot: int = 1000, seed: int = 0,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The sparsity claim against its control, at ``layer``: for every fraction in ``fracs`` (< 1) and every
    selection method, the refit (``cfg``) on the neurons selected inside each fold, against the same refit on
    ``n_draws`` random sets of the same size (massive-activation dimensions excluded; the same draws for every
    method) and against all neurons (``dense_values``, (n_states,) out-of-fold values of the dense probe); at
    ``matched_frac``, also against magnitude-matched draws of the first method's sets.

    Args:
        given: selected sets already computed, ``{method: {frac: one set per fold}}`` (``rpe fit`` passes the
            pruning curve's first-layer-norm sets).

    Returns:
        ``{"refit", "n_draws", "excluded_dims", "rows": [per method and fraction: "method", "frac", "k",
        "s0"/"final" (AUROC with interval), "vs_all" and "vs_random" per position], "matched": {...} or None}``;
        every interval is a 95% problem-clustered paired bootstrap.
    """
    say = progress or (lambda msg: None)
    given = given or {}
    acts = states.acts[layer]
    d = acts.shape[1]
    y = states.state_rewards().numpy()
    problems = np.array(states.problem_ids)[states.traj_index.numpy()]
    at = {"s0": states.step_index.numpy() == 0, "final": states.is_terminal().numpy()}
    excluded = massive_dims(acts)
    largest = max((max(1, round(f * d)) for f in fracs if f < 1.0), default=1)
    rankings = {m: rankings_per_fold(states, layer, folds, m, cfg, probe_cfg, needed=largest)
                for m in methods if m not in given}
    rows: list[dict[str, Any]] = []
    matched = None
    for frac in sorted((f for f in fracs if f < 1.0), reverse=True):
        k = max(1, round(frac * d))
        say(f"sparsity control: {k} neurons, {n_draws} random sets")
        draws = random_set_values(states, layer, folds, random_sets(d, k, n_draws, seed + k, exclude=excluded), cfg)
        for method in methods:
            sets = list(given[method][frac]) if method in given else [r[:k].sort().values for r in rankings[method]]
            sel = sparse_refit_values(states, layer, folds, sets, cfg).values
            row: dict[str, Any] = {"method": method, "frac": frac, "k": k, "vs_all": {}, "vs_random": {}}
            for where, mask in at.items():
                cols = np.column_stack([sel[mask], dense_values[mask]] + [r[mask] for r in draws])
                point = auroc_columns(y[mask], cols)
                boot = resampled_aurocs(y[mask], cols, problems[mask], n_boot, seed)
                row[where] = {"auroc": float(point[0]), **dict(zip(("low", "high"), _interval(boot[:, 0])))}
                row["vs_all"][where] = {"diff": float(point[0] - point[1]),
                                        **dict(zip(("low", "high"), _interval(boot[:, 0] - boot[:, 1])))}
                row["vs_random"][where] = asdict(_against_random(point[0], point[2:], boot[:, 0], boot[:, 2:]))
            rows.append(row)
            if matched_frac is not None and frac == matched_frac and method == methods[0]:
                say(f"sparsity control: {n_draws} magnitude-matched sets of {k}")
                magnitudes = acts.abs().float().mean(0)
                per_fold = [random_sets(d, k, n_draws, seed + 7 * f + 1, exclude=excluded, magnitudes=magnitudes, like=s)
                            for f, s in enumerate(sets)]
                mdraws = random_set_values(states, layer, folds, [[pf[i] for pf in per_fold] for i in range(n_draws)], cfg)
                matched = {"method": method, "frac": frac, "k": k,
                           **{where: asdict(compare_with_random(sel, mdraws, y, problems, mask, n_boot, seed))
                              for where, mask in at.items()}}
    return {"refit": {"family": cfg.family, "target": cfg.target}, "n_draws": n_draws, "excluded_dims": excluded,
            "rows": rows, "matched": matched}


__all__ = ["REFIT", "SELECTION_METHODS", "RandomSetComparison", "compare_with_random", "random_set_values",
           "random_sets", "rank_neurons", "rankings_per_fold", "resampled_aurocs", "selected_per_fold",
           "sparse_refit_values", "sparsity_control"]
