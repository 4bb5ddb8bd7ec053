"""The discovery pipeline behind ``rpe fit``: capture states, sweep layers, find value neurons, bundle them.

Every reported number is cross-validated by problem (:mod:`rpe.crossval`, default 5 folds): each problem is
scored once, by probes that never saw it, and neuron selection happens inside each fold.

Steps: capture s_0..s_T at the chosen layers (one forward per batch) -> per layer, out-of-fold values of a
dense probe (the fast linear family by default: the sweep only chooses the layer); the layer with the best mean
*inner-validation* AUROC is chosen (the scored folds never vote) -> at that layer, the configured probe (the
paper's MLP by default) for everything below ->
pruning curve: per fold, rank neurons on the training folds, refit on the top fraction -> headline AUROCs at
s_0 and at the final state with problem-clustered bootstrap intervals, beside their controls (all neurons,
question length, prompt log-probability, a probe on the task's difficulty alone), and paired intervals of the
differences that carry the claims -> value beyond difficulty (AUROC within difficulty strata; a probe on
activations with difficulty regressed out) -> the bundle: a probe on all trajectories, its top neurons, a
refit on them.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from rpe.baselines import mean_prompt_logprob, question_length
from rpe.bundle import SubsystemBundle
from rpe.crossval import cross_validate, kfold_by_problem
from rpe.metrics import (
    auroc,
    bootstrap_auroc,
    chance_iou,
    chance_verdict,
    cluster_resamples,
    difference_verdict,
    iou,
    n_to_decide,
    paired_bootstrap_auroc,
)
from rpe.models import fingerprint
from rpe.probe import FAMILIES, TARGETS, ProbeConfig, ValueProbe
from rpe.records import Trajectory
from rpe.store import StateSet, capture_states
from rpe.tracker import decoder_layers

logger = logging.getLogger(__name__)

VALUE = "value neurons"
DENSE = "all neurons"
QLEN = "question length (shorter = more confident)"
LOGPROB = "mean prompt log-prob"
DIFFICULTY = "difficulty only (probe on the task's difficulty features)"


@dataclass
class FitConfig:
    """Options of ``rpe fit``."""

    layers: list[int] | None = None
    """Layers to sweep; None = every ``layer_stride``-th layer."""
    layer_stride: int = 2
    """Stride of the default sweep."""
    top_frac: float = 0.01
    """Fraction of d_model kept as value neurons (PAPER.md: 1%)."""
    prune_fracs: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.1, 0.05, 0.01, 0.005])
    """Fractions of the pruning curve."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    sweep_family: str | None = "linear"
    """Probe family of the layer sweep (it only chooses the layer; everything reported at that layer uses
    ``probe``). ``linear`` cross-validates 18 layers in minutes and matches the MLP's dense AUROC on SmolLM2
    (docs/results.md); None sweeps with ``probe.family``."""
    folds: int = 5
    """Cross-validation folds by problem: every problem is scored once by probes that never saw it."""
    compare_probes: bool = False
    """Also cross-validate every probe family x target at the chosen layer (one table on the same states)."""
    batch_size: int = 16
    n_boot: int = 1000

    def __post_init__(self) -> None:
        if isinstance(self.probe, dict):
            self.probe = ProbeConfig(**self.probe)
        if self.sweep_family not in (None, *FAMILIES):
            raise ValueError(f"sweep_family {self.sweep_family!r} is not one of {', '.join(FAMILIES)} (or None)")
        if not 0 < self.top_frac <= 1:
            raise ValueError(f"top_frac must be in (0, 1], got {self.top_frac}")
        if self.layer_stride < 1:
            raise ValueError(f"layer_stride must be >= 1, got {self.layer_stride}")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")


def _ci(values: np.ndarray, y: np.ndarray, groups: np.ndarray, n_boot: int, seed: int = 0) -> dict[str, Any]:
    point, lo, hi = bootstrap_auroc(y, values, groups=groups, n_boot=n_boot, seed=seed)
    return {"auroc": point, "low": lo, "high": hi, "verdict": chance_verdict(lo, hi), "n": int(len(y))}


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


def _difficulty_only(features: torch.Tensor, rewards: np.ndarray, folds: np.ndarray) -> np.ndarray:
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


def _auroc_at(oof: np.ndarray, y: np.ndarray, step: np.ndarray, final: np.ndarray) -> dict[str, float]:
    return {"cv_auroc_s0": auroc(y[step == 0], oof[step == 0]), "cv_auroc_final": auroc(y[final], oof[final]),
            "cv_auroc_all": auroc(y, oof)}


def fit_bundle(
    model,
    tokenizer,
    trajectories: Sequence[Trajectory],
    cfg: FitConfig | None = None,
    *,
    model_name: str | None = None,
    states: StateSet | None = None,
    difficulty: Sequence[dict[str, float]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[SubsystemBundle, StateSet]:
    """Run the discovery pipeline and return the bundle (metrics inside) and the captured states.

    Args:
        states: activations already captured for ``trajectories`` (e.g. during generation, the rollout
            folder's ``states.safetensors``); they must hold every layer to sweep with all neurons.
        difficulty: per trajectory, the task's difficulty features of its problem (:meth:`rpe.tasks.Task.difficulty`);
            enables the difficulty-only control, AUROC within difficulty strata and the residualised probe.
    """
    cfg = cfg or FitConfig()
    say = progress or (lambda msg: logger.info(msg))
    n_layers = len(decoder_layers(model))
    if states is not None:
        if states.trajectory_ids != [t.trajectory_id for t in trajectories]:
            raise ValueError("the given states were captured for other trajectories; capture them again")
        if states.neurons is not None:
            raise ValueError("the given states hold only some neurons; the layer sweep needs all of d_model")
        layers = cfg.layers if cfg.layers is not None else states.layers
        missing = sorted(set(layers) - set(states.layers))
        if missing:
            raise ValueError(f"layers {missing} were not captured (captured: {states.layers}); drop them or re-capture")
        states = StateSet({layer: states.acts[layer] for layer in layers}, states.traj_index, states.step_index,
                          states.trajectory_ids, states.problem_ids, states.rewards)
    else:
        layers = cfg.layers if cfg.layers is not None else list(range(0, n_layers, cfg.layer_stride))
        say(f"capturing {len(trajectories)} trajectories at {len(layers)} layers")
        states = capture_states(model, trajectories, layers, batch_size=cfg.batch_size, pad_token_id=tokenizer.pad_token_id or 0)
    if difficulty is not None and len(difficulty) != len(trajectories):
        raise ValueError(f"difficulty has {len(difficulty)} entries for {len(trajectories)} trajectories")

    pcfg = cfg.probe
    folds = kfold_by_problem(states.problem_ids, cfg.folds, pcfg.seed)
    tidx = states.traj_index.numpy()
    step = states.step_index.numpy()
    final = states.is_terminal().numpy()
    y = states.state_rewards().numpy()
    pids = np.array(states.problem_ids)[tidx]
    at = {"s0": step == 0, "final": final}  # the two reported positions: before any reasoning, the last step

    # 1. layer sweep: out-of-fold dense values per layer; the choice uses inner-validation AUROC only
    sweep: dict[int, dict[str, float]] = {}
    sweep_cfg = replace(pcfg, family=cfg.sweep_family) if cfg.sweep_family else pcfg
    for layer in states.layers:
        dense = cross_validate(states, layer, sweep_cfg, folds, progress=say)[1.0]
        sweep[layer] = {"val_auroc_all": dense.mean_val_auroc, **_auroc_at(dense.values, y, step, final)}

    def score(layer: int) -> float:
        v = sweep[layer]["val_auroc_all"]
        return -1.0 if math.isnan(v) else v

    best = max(states.layers, key=score)

    # 2. pruning curve at the chosen layer (neurons ranked inside each fold)
    say(f"best layer {best}: pruning curve")
    fracs = sorted(set(cfg.prune_fracs) | {cfg.top_frac, 1.0}, reverse=True)
    oof = cross_validate(states, best, pcfg, folds, top_fracs=fracs, progress=say)
    d_model = states.acts[best].shape[1]
    curve = []
    for frac in fracs:
        curve.append({"frac": frac, "n_neurons": d_model if frac == 1.0 else max(1, round(frac * d_model)),
                      **_auroc_at(oof[frac].values, y, step, final),
                      **{w: _ci(oof[frac].values[m], y[m], pids[m], cfg.n_boot) for w, m in at.items()}})
    v_sparse, v_dense = oof[cfg.top_frac].values, oof[1.0].values

    # 3. the bundle: dense probe on every trajectory (a share of problems kept for validation), top neurons, refit
    say("bundle: dense probe on all trajectories, value neurons, refit")
    codes = np.where(kfold_by_problem(states.problem_ids, max(2, round(1 / pcfg.val_frac)), pcfg.seed + 1) == 0, 1, 0)
    dense_all = ValueProbe(pcfg).fit(states, best, split=codes)
    value_neurons = dense_all.prune(cfg.top_frac)
    sparse_all = ValueProbe(pcfg).fit(states, best, value_neurons, split=codes)
    fold_sets = [n for n in oof[cfg.top_frac].neurons if n is not None]
    stability = {
        "iou_fold_vs_bundle_mean": float(np.mean([iou(n, value_neurons) for n in fold_sets])),
        "iou_between_folds_mean": float(np.mean([iou(a, b) for a, b in itertools.combinations(fold_sets, 2)])),
        "chance_iou": chance_iou(d_model, value_neurons.numel(), value_neurons.numel()),
    }

    # 4. headline: out-of-fold values beside their controls, paired differences
    say("baselines: question length, mean prompt log-probability")
    q_len = question_length(trajectories).numpy()
    logprob = mean_prompt_logprob(model, trajectories, batch_size=cfg.batch_size, pad_token_id=tokenizer.pad_token_id or 0).numpy()
    scores = {VALUE: v_sparse, DENSE: v_dense, QLEN: -q_len[tidx], LOGPROB: logprob[tidx]}
    diffs = [(VALUE, DENSE), (VALUE, QLEN), (VALUE, LOGPROB)]
    features = strata = None
    if difficulty is not None and any(difficulty):
        features, strata = difficulty_features(difficulty, q_len)
        scores[DIFFICULTY] = _difficulty_only(features, states.rewards.numpy(), folds)[tidx]
        diffs += [(VALUE, DIFFICULTY), (DENSE, DIFFICULTY)]
    say("headline: paired cluster bootstrap")
    headline: dict[str, Any] = {}
    for where, mask in at.items():
        res = paired_bootstrap_auroc(y[mask], {k: v[mask] for k, v in scores.items()}, groups=pids[mask], diffs=diffs,
                                     n_boot=cfg.n_boot, seed=0)
        for name, r in res.items():
            r["verdict"] = difference_verdict(r["low"], r["high"]) if " - " in name else chance_verdict(r["low"], r["high"])
            r["n"] = int(mask.sum())
            if " - " not in name:
                r["n_to_decide"] = n_to_decide(r["auroc"], r["low"], r["high"], int(mask.sum()))
        headline[where] = res

    # 5. value beyond difficulty
    beyond: dict[str, Any] = {}
    if features is not None and strata is not None:
        say("value beyond difficulty: within strata, residualised probe")
        st_state = strata[tidx]
        for where, mask in at.items():
            within = {k: scores[k][mask] for k in (VALUE, DENSE, LOGPROB, QLEN)}
            res = paired_bootstrap_auroc(y[mask], within, groups=pids[mask], strata=st_state[mask], n_boot=cfg.n_boot, seed=0)
            for r in res.values():
                r["verdict"] = chance_verdict(r["low"], r["high"])
            beyond[f"within_strata_{where}"] = res
        per = []
        for k in np.unique(strata):
            m = (st_state == k) & (step == 0)
            example = next(d for d, s in zip(difficulty, strata) if s == k)
            per.append({"stratum": example, "n_trajectories": int(m.sum()), "accuracy": float(y[m].mean()),
                        "auroc_s0_value_neurons": auroc(y[m], v_sparse[m]), "auroc_s0_all_neurons": auroc(y[m], v_dense[m])})
        beyond["per_stratum"] = per
        resid = cross_validate(states, best, pcfg, folds, top_fracs=[cfg.top_frac], regress_out=features[tidx], progress=say)
        for label, frac in (("residualised_all_neurons", 1.0), ("residualised_value_neurons", cfg.top_frac)):
            beyond[label] = {w: _ci(resid[frac].values[m], y[m], pids[m], cfg.n_boot) for w, m in at.items()}

    # 6. step-resolved value: AUROC of V(s_t) per step and the correct/incorrect gap
    by_step = []
    for t in range(int(step.max()) + 1):
        m = step == t
        if m.sum() < 20 or len(np.unique(y[m])) < 2:
            continue
        gap, lo, hi = _gap_ci(v_sparse[m], y[m], pids[m], cfg.n_boot)
        by_step.append({"step": t, "n": int(m.sum()), **_ci(v_sparse[m], y[m], pids[m], cfg.n_boot),
                        "gap": gap, "gap_low": lo, "gap_high": hi})

    # 7. probe families x targets at the chosen layer
    families: list[dict[str, Any]] = []
    if cfg.compare_probes:
        for family, target in itertools.product(FAMILIES, TARGETS):
            say(f"probe table: {family} {target}")
            c = replace(pcfg, family=family, target=target)
            same = family == pcfg.family and target == pcfg.target  # the headline run: reuse it
            res = {1.0: oof[1.0], cfg.top_frac: oof[cfg.top_frac]} if same else \
                cross_validate(states, best, c, folds, top_fracs=[cfg.top_frac])
            for frac, o in res.items():
                families.append({"family": family, "target": target, "frac": frac,
                                 **_auroc_at(o.values, y, step, final),
                                 "s0": _ci(o.values[at["s0"]], y[at["s0"]], pids[at["s0"]], cfg.n_boot)})

    metrics = {
        "best_layer": best,
        "n_trajectories": len(trajectories),
        "n_problems": len(set(states.problem_ids)),
        "accuracy": float(states.rewards.mean()),
        "probe": {"family": pcfg.family, "target": pcfg.target, "sweep_family": sweep_cfg.family},
        "target": pcfg.target,
        "folds": cfg.folds,
        "headline_cv": headline,
        "beyond_difficulty": beyond,
        "by_step": by_step,
        "probe_families": families,
        "value_neuron_stability": stability,
        "bundle_probe": {"dense": dense_all.metrics, "value_neurons": sparse_all.metrics},
        "pruning_curve": curve,
        "layer_sweep": {str(k): v for k, v in sweep.items()},
    }
    assert sparse_all.state is not None
    bundle = SubsystemBundle(
        model=fingerprint(model, tokenizer, model_name),
        layer=best,
        value_neurons=value_neurons,
        probe_state=sparse_all.state,
        probe_config=pcfg,
        metrics=metrics,
        created_with={"fit": asdict(cfg)},
    )
    return bundle, states


def _gap_ci(values: np.ndarray, y: np.ndarray, groups: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean V of correct minus mean V of incorrect trajectories, with a cluster-bootstrap 95% interval."""
    pos = y >= 0.5

    def gap(idx: np.ndarray) -> float:
        p, n = pos[idx], ~pos[idx]
        return float(values[idx][p].mean() - values[idx][n].mean()) if p.any() and n.any() else math.nan

    draws = np.asarray([d for d in map(gap, cluster_resamples(groups, n_boot, seed)) if not math.isnan(d)])
    point = gap(np.arange(len(y)))
    if draws.size < 10:
        return point, math.nan, math.nan
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return point, float(lo), float(hi)


def task_difficulty(trajectories: Sequence[Trajectory], task, n_problems: int, seed: int) -> list[dict[str, float]]:
    """Per trajectory, the difficulty features of its problem, by drawing the run's problems again
    (``task.problems(n_problems, seed)`` is deterministic). Trajectories whose problem is not drawn get ``{}``."""
    by_id = {p.id: task.difficulty(p) for p in task.problems(n_problems, seed=seed)}
    return [by_id.get(t.problem_id, {}) for t in trajectories]


#: The run with power behind the report card (README; docs/results.md).
POWERED_COMMAND = (
    "rpe rollouts --task chain_sum_mix --n 800 --samples 2 --batch-size 32 --capture-layers 0,2,4,5,6,8,10,12,14,16,"
    "18,20,22,24,26,27,28,29 --out runs/mix && rpe fit --rollouts runs/mix --out runs/mix/bundle --compare-probes"
)


#: Half-width of the s_0 interval at which a run counts as powered (issue: discovery on >= 1,500 trajectories).
POWERED_HALF_WIDTH = 0.05


def power_note(metrics: dict[str, Any]) -> str | None:
    """A warning when the headline value-neuron AUROC at s_0 is not above chance: for a small run, that it is a
    smoke run without power (roughly how many trajectories would decide it, and the command of the run with
    power); for a run with power (interval half-width <= 0.05), that the null is measured. None when the
    interval lies above 0.5."""
    m = metrics["headline_cv"]["s0"][VALUE]
    if m["verdict"] == "above chance":
        return None
    half = (m["high"] - m["low"]) / 2
    measured = f"{m['auroc']:.3f} [{m['low']:.3f}, {m['high']:.3f}] on {metrics['n_trajectories']} trajectories"
    if half <= POWERED_HALF_WIDTH:
        return (f"The value-neuron AUROC at s_0 is {measured}: {m['verdict']}, at a power where the interval's "
                f"half-width is {half:.3f}. A measured null for this neuron set, not a smoke run.")
    need = m.get("n_to_decide") if m["auroc"] > 0.5 else None  # extrapolating a noisy inverted point misleads
    more = f" (roughly {need} trajectories would decide it)" if need else ""
    return (f"Smoke run without power: the value-neuron AUROC at s_0 is {measured}, {m['verdict']}{more}. Read no "
            f"finding from it; the run with power is: {POWERED_COMMAND}")


def difficulty_from_run(rollouts, trajectories: Sequence[Trajectory]) -> list[dict[str, float]] | None:
    """Difficulty features per trajectory for a rollout folder, by drawing its problems again from the task in
    its manifest; None when the folder has no manifest or the task has no difficulty features."""
    import json
    from pathlib import Path

    from rpe.tasks import load_task

    manifest = Path(rollouts) / "manifest.json"
    if not manifest.exists():
        return None
    meta = json.loads(manifest.read_text())
    try:
        task = load_task(meta["task"])
    except Exception as err:  # a moved task file, an unknown task: the control is skipped, not the fit
        logger.warning("difficulty features unavailable (%s): no difficulty control", err)
        return None
    out = task_difficulty(trajectories, task, int(meta["rollout"]["n_problems"]), int(meta["rollout"]["seed"]))
    return out if any(out) else None


def td_vs_mc(states: StateSet, layer: int, base: ProbeConfig | None = None) -> dict[str, dict[str, float]]:
    """Fit TD(0) and Monte-Carlo probes on the same states and layer; returns their test metrics."""
    base = base or ProbeConfig()
    out = {}
    for target in ("td0", "mc"):
        c = ProbeConfig(**{**asdict(base), "target": target})
        m = ValueProbe(c).fit(states, layer).metrics
        out[target] = {k: m[k] for k in ("test_auroc_s0", "test_auroc_final", "test_auroc_all", "test_brier", "test_ece")}
    return out


__all__ = [
    "FitConfig", "difficulty_features", "difficulty_from_run", "fit_bundle", "power_note", "task_difficulty",
    "td_vs_mc"
]
