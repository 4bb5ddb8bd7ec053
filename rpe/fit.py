"""The discovery pipeline behind ``rpe fit``: capture states, sweep layers, find value neurons, bundle them.

Every reported number is cross-validated by problem (:mod:`rpe.crossval`, default 5 folds): each problem is
scored once, by probes that never saw it, and neuron selection happens inside each fold.

Steps: capture s_0..s_T at the chosen layers (one forward per batch) -> per layer, out-of-fold values of a
dense probe (the fast linear family by default: the sweep only chooses the layer); the layer with the best mean
*inner-validation* AUROC is chosen (the scored folds never vote) -> at that layer, the configured probe (the
paper's MLP by default) for everything below ->
pruning curve: per fold, rank neurons on the training folds, refit on the top fraction (the configured family or
the logistic probe, whichever validates better) -> headline AUROCs at
s_0 and at the final state with problem-clustered bootstrap intervals, beside their controls (all neurons,
question length, prompt log-probability, a probe on the task's difficulty alone), and paired intervals of the
differences that carry the claims -> value beyond difficulty (AUROC within difficulty strata; a probe on
activations with difficulty regressed out) -> the sparsity control (every fraction of the curve and four
selection methods against random neuron sets of the same size, :mod:`rpe.sparsity`) -> the bundle: a probe on
all trajectories, its top neurons, a refit on them.
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
from rpe.bundle import SubsystemBundle, prompts_start_with_bos
from rpe.crossval import OutOfFold, cross_validate, kfold_by_problem
from rpe.difficulty import difficulty_features, difficulty_only_values
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
from rpe.sparsity import sparse_refit_values, sparsity_control
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
    sparsity_draws: int = 20
    """Random neuron sets per fraction of the pruning curve in the sparsity control (``metrics["sparsity"]``,
    :func:`rpe.sparsity.sparsity_control`; magnitude-matched draws as many at ``top_frac``); 0 skips it."""
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
        if self.sparsity_draws < 0:
            raise ValueError(f"sparsity_draws must be >= 0 (0 skips the sparsity control), got {self.sparsity_draws}")


def _ci(values: np.ndarray, y: np.ndarray, groups: np.ndarray, n_boot: int, seed: int = 0) -> dict[str, Any]:
    point, lo, hi = bootstrap_auroc(y, values, groups=groups, n_boot=n_boot, seed=seed)
    return {"auroc": point, "low": lo, "high": hi, "verdict": chance_verdict(lo, hi), "n": int(len(y))}


def _auroc_at(oof: np.ndarray, y: np.ndarray, step: np.ndarray, final: np.ndarray) -> dict[str, float]:
    return {"cv_auroc_s0": auroc(y[step == 0], oof[step == 0]), "cv_auroc_final": auroc(y[final], oof[final]),
            "cv_auroc_all": auroc(y, oof)}


@dataclass(frozen=True)
class Scoring:
    """What every stage scores against, one entry per captured state (n_states,), and the problem folds.

    Attributes:
        y: reward of the state's trajectory (1 = correct).
        step: step index t of s_t (0 = before any reasoning).
        final: True for the last state of its trajectory.
        problems: problem id of the state's trajectory (the bootstrap's clusters).
        traj: trajectory index of the state.
        folds: (n_trajectories,) cross-validation fold of each trajectory (:func:`rpe.crossval.kfold_by_problem`).
    """

    y: np.ndarray
    step: np.ndarray
    final: np.ndarray
    problems: np.ndarray
    traj: np.ndarray
    folds: np.ndarray

    @classmethod
    def of(cls, states: StateSet, n_folds: int, seed: int) -> Scoring:
        tidx = states.traj_index.numpy()
        return cls(y=states.state_rewards().numpy(), step=states.step_index.numpy(), final=states.is_terminal().numpy(),
                   problems=np.array(states.problem_ids)[tidx], traj=tidx,
                   folds=kfold_by_problem(states.problem_ids, n_folds, seed))

    @property
    def at(self) -> dict[str, np.ndarray]:
        """The two reported positions as state masks: ``s0`` (before any reasoning) and ``final`` (the last step)."""
        return {"s0": self.step == 0, "final": self.final}

    def aurocs(self, values: np.ndarray) -> dict[str, float]:
        """Point AUROCs of ``values`` (n_states,) at s_0, at the final state and over all states."""
        return _auroc_at(values, self.y, self.step, self.final)

    def interval(self, values: np.ndarray, mask: np.ndarray, n_boot: int) -> dict[str, Any]:
        """AUROC of ``values`` on the states in ``mask`` with its problem-clustered bootstrap interval and verdict."""
        return _ci(values[mask], self.y[mask], self.problems[mask], n_boot)


def states_to_fit(model, tokenizer, trajectories: Sequence[Trajectory], cfg: FitConfig, states: StateSet | None,
                  say: Callable[[str], None]) -> StateSet:
    """The states the fit reads: ``states`` narrowed to the layers to sweep (checked against ``trajectories``),
    or captured now from ``model`` at ``cfg.layers`` (default every ``cfg.layer_stride``-th layer)."""
    if states is None:
        n_layers = len(decoder_layers(model))
        layers = cfg.layers if cfg.layers is not None else list(range(0, n_layers, cfg.layer_stride))
        say(f"capturing {len(trajectories)} trajectories at {len(layers)} layers")
        return capture_states(model, trajectories, layers, batch_size=cfg.batch_size, pad_token_id=tokenizer.pad_token_id or 0)
    if states.trajectory_ids != [t.trajectory_id for t in trajectories]:
        raise ValueError("the given states were captured for other trajectories; capture them again")
    if states.neurons is not None:
        raise ValueError("the given states hold only some neurons; the layer sweep needs all of d_model")
    layers = cfg.layers if cfg.layers is not None else states.layers
    missing = sorted(set(layers) - set(states.layers))
    if missing:
        raise ValueError(f"layers {missing} were not captured (captured: {states.layers}); drop them or re-capture")
    return states.at_layers(layers)


def sweep_layers(states: StateSet, cfg: FitConfig, scoring: Scoring,
                 say: Callable[[str], None]) -> tuple[dict[int, dict[str, float]], int]:
    """Stage 1, the layer sweep: out-of-fold values of a dense probe (``cfg.sweep_family``) at every layer of
    ``states``. The layer is chosen by mean *inner-validation* AUROC only: the scored folds never vote.

    Returns:
        ``(per layer {"val_auroc_all", "cv_auroc_s0", "cv_auroc_final", "cv_auroc_all"}, chosen layer)``.
    """
    sweep_cfg = replace(cfg.probe, family=cfg.sweep_family) if cfg.sweep_family else cfg.probe
    sweep: dict[int, dict[str, float]] = {}
    for layer in states.layers:
        dense = cross_validate(states, layer, sweep_cfg, scoring.folds, progress=say)[1.0]
        sweep[layer] = {"val_auroc_all": dense.mean_val_auroc, **scoring.aurocs(dense.values)}

    return sweep, max(states.layers, key=lambda layer: _or_low(sweep[layer]["val_auroc_all"]))


def pruning_curve(states: StateSet, layer: int, cfg: FitConfig, scoring: Scoring,
                  say: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[float, OutOfFold]]:
    """Stage 2: out-of-fold AUROC (with intervals at s_0 and the final state) of probes refitted on the top
    fraction of neurons, ranked inside each fold (first-layer weight norm of the dense ``cfg.probe``), for
    ``cfg.prune_fracs`` plus ``cfg.top_frac`` and 1.0.

    The refit on k neurons is the configured family or the standardised logistic probe (same target), whichever
    has the better mean inner-validation AUROC (the scored folds never vote, as for the layer): an MLP refitted
    on a handful of inputs can underfit and make the neurons look worse than they are (issue #28).

    Returns:
        ``(one row per fraction, largest first, with "refit_family" and both refits' AUROCs; the out-of-fold
        values per fraction, of the chosen refit)``.
    """
    fracs = sorted(set(cfg.prune_fracs) | {cfg.top_frac, 1.0}, reverse=True)
    oof = cross_validate(states, layer, cfg.probe, scoring.folds, top_fracs=fracs, progress=say)
    d_model = states.acts[layer].shape[1]
    linear = replace(cfg.probe, family="linear", hidden=0)
    curve = []
    for frac in fracs:
        refits = {cfg.probe.family: oof[frac]}
        if frac < 1.0 and cfg.probe.family != "linear":
            say(f"pruning curve: logistic refit on {frac:g} of the neurons")
            refits["linear"] = sparse_refit_values(states, layer, scoring.folds, oof[frac].neurons, linear)
        family = max(refits, key=lambda f: _or_low(refits[f].mean_val_auroc))
        oof[frac] = refits[family]
        curve.append({"frac": frac, "n_neurons": d_model if frac == 1.0 else max(1, round(frac * d_model)),
                      "refit_family": family, **scoring.aurocs(oof[frac].values),
                      **{where: scoring.interval(oof[frac].values, mask, cfg.n_boot) for where, mask in scoring.at.items()},
                      "refits": {f: {"val_auroc": r.mean_val_auroc, **scoring.aurocs(r.values)} for f, r in refits.items()}})
    return curve, oof


def _or_low(value: float) -> float:
    return -1.0 if math.isnan(value) else value


def fit_value_neurons(states: StateSet, layer: int, cfg: FitConfig, fold_neurons: Sequence[torch.Tensor | None],
                      refit_family: str | None = None) -> tuple[ValueProbe, ValueProbe, dict[str, float]]:
    """Stage 3, the bundle's probes: a dense probe on every trajectory (a share of problems kept for
    validation), its top ``cfg.top_frac`` neurons, a refit on them (``refit_family``, default the configured
    one: the pruning curve's choice at ``cfg.top_frac``); and how stable that neuron set is against the sets
    chosen inside the folds (``fold_neurons``), beside the IoU two random sets would have.

    Returns:
        ``(dense probe, value-neuron probe, stability)``; the value neurons are ``sparse.neurons``, its
        configuration ``sparse.cfg``.
    """
    pcfg = cfg.probe
    codes = np.where(kfold_by_problem(states.problem_ids, max(2, round(1 / pcfg.val_frac)), pcfg.seed + 1) == 0, 1, 0)
    dense = ValueProbe(pcfg).fit(states, layer, split=codes)
    value_neurons = dense.prune(cfg.top_frac)
    family = refit_family or pcfg.family
    refit_cfg = replace(pcfg, family=family, hidden=0 if family == "linear" else pcfg.hidden)
    sparse = ValueProbe(refit_cfg).fit(states, layer, value_neurons, split=codes)
    fold_sets = [n for n in fold_neurons if n is not None]
    d_model = states.acts[layer].shape[1]
    stability = {
        "iou_fold_vs_bundle_mean": float(np.mean([iou(n, value_neurons) for n in fold_sets])),
        "iou_between_folds_mean": float(np.mean([iou(a, b) for a, b in itertools.combinations(fold_sets, 2)])),
        "chance_iou": chance_iou(d_model, value_neurons.numel(), value_neurons.numel()),
    }
    return dense, sparse, stability


def control_scores(model, tokenizer, trajectories: Sequence[Trajectory], states: StateSet, oof: dict[float, OutOfFold],
                   cfg: FitConfig, scoring: Scoring, difficulty: Sequence[dict[str, float]] | None,
                   ) -> tuple[dict[str, np.ndarray], list[tuple[str, str]], torch.Tensor | None, np.ndarray | None]:
    """Stage 4a: the scores the headline compares, per state: the value neurons' and all neurons' out-of-fold
    values, question length, mean prompt log-probability and, with ``difficulty``, a probe on the task's
    difficulty alone; and the paired differences that carry the claims.

    Returns:
        ``(scores by name, differences as (a, b) pairs, difficulty features per trajectory or None, strata or None)``.
    """
    q_len = question_length(trajectories).numpy()
    logprob = mean_prompt_logprob(model, trajectories, batch_size=cfg.batch_size, pad_token_id=tokenizer.pad_token_id or 0).numpy()
    scores = {VALUE: oof[cfg.top_frac].values, DENSE: oof[1.0].values, QLEN: -q_len[scoring.traj], LOGPROB: logprob[scoring.traj]}
    diffs = [(VALUE, DENSE), (VALUE, QLEN), (VALUE, LOGPROB)]
    features = strata = None
    if difficulty is not None and any(difficulty):
        features, strata = difficulty_features(difficulty, q_len)
        scores[DIFFICULTY] = difficulty_only_values(features, states.rewards.numpy(), scoring.folds)[scoring.traj]
        diffs += [(VALUE, DIFFICULTY), (DENSE, DIFFICULTY)]
    return scores, diffs, features, strata


def headline(scores: dict[str, np.ndarray], diffs: Sequence[tuple[str, str]], scoring: Scoring,
             n_boot: int) -> dict[str, Any]:
    """Stage 4b: at s_0 and at the final state, every score's AUROC and every paired difference with
    problem-clustered bootstrap intervals and verdicts (a score against chance, a difference against zero)."""
    out: dict[str, Any] = {}
    for where, mask in scoring.at.items():
        res = paired_bootstrap_auroc(scoring.y[mask], {k: v[mask] for k, v in scores.items()}, groups=scoring.problems[mask],
                                     diffs=list(diffs), n_boot=n_boot, seed=0)
        for name, r in res.items():
            r["verdict"] = difference_verdict(r["low"], r["high"]) if " - " in name else chance_verdict(r["low"], r["high"])
            r["n"] = int(mask.sum())
            if " - " not in name:
                r["n_to_decide"] = n_to_decide(r["auroc"], r["low"], r["high"], int(mask.sum()))
        out[where] = res
    return out


def value_beyond_difficulty(states: StateSet, layer: int, scores: dict[str, np.ndarray], features: torch.Tensor,
                            strata: np.ndarray, difficulty: Sequence[dict[str, float]], cfg: FitConfig,
                            scoring: Scoring, say: Callable[[str], None]) -> dict[str, Any]:
    """Stage 5: whether the value neurons know more than the task's difficulty: AUROCs within difficulty strata
    (at s_0 and the final state), per stratum at s_0, and probes on activations with the difficulty features
    regressed out inside each fold."""
    out: dict[str, Any] = {}
    st_state = strata[scoring.traj]
    for where, mask in scoring.at.items():
        within = {k: scores[k][mask] for k in (VALUE, DENSE, LOGPROB, QLEN)}
        res = paired_bootstrap_auroc(scoring.y[mask], within, groups=scoring.problems[mask], strata=st_state[mask],
                                     n_boot=cfg.n_boot, seed=0)
        for r in res.values():
            r["verdict"] = chance_verdict(r["low"], r["high"])
        out[f"within_strata_{where}"] = res
    per = []
    y = scoring.y
    for k in np.unique(strata):
        m = (st_state == k) & (scoring.step == 0)
        example = next(d for d, s in zip(difficulty, strata) if s == k)
        per.append({"stratum": example, "n_trajectories": int(m.sum()), "accuracy": float(y[m].mean()),
                    "auroc_s0_value_neurons": auroc(y[m], scores[VALUE][m]), "auroc_s0_all_neurons": auroc(y[m], scores[DENSE][m])})
    out["per_stratum"] = per
    resid = cross_validate(states, layer, cfg.probe, scoring.folds, top_fracs=[cfg.top_frac],
                           regress_out=features[scoring.traj], progress=say)
    for label, frac in (("residualised_all_neurons", 1.0), ("residualised_value_neurons", cfg.top_frac)):
        out[label] = {where: scoring.interval(resid[frac].values, mask, cfg.n_boot) for where, mask in scoring.at.items()}
    return out


def value_by_step(values: np.ndarray, scoring: Scoring, n_boot: int, min_states: int = 20) -> list[dict[str, Any]]:
    """Stage 6, step-resolved value: per step t with at least ``min_states`` states of both outcomes, the AUROC
    of V(s_t) (``values``, n_states) and the mean-V gap between correct and incorrect trajectories, with
    intervals."""
    rows = []
    for t in range(int(scoring.step.max()) + 1):
        m = scoring.step == t
        if m.sum() < min_states or len(np.unique(scoring.y[m])) < 2:
            continue
        gap, lo, hi = _gap_ci(values[m], scoring.y[m], scoring.problems[m], n_boot)
        rows.append({"step": t, "n": int(m.sum()), **scoring.interval(values, m, n_boot),
                     "gap": gap, "gap_low": lo, "gap_high": hi})
    return rows


def probe_table(states: StateSet, layer: int, oof: dict[float, OutOfFold], cfg: FitConfig, scoring: Scoring,
                say: Callable[[str], None], refit_family: str | None = None) -> list[dict[str, Any]]:
    """Stage 7: every probe family x target cross-validated at ``layer`` on the same folds (all neurons and the
    top fraction, refitted with the row's own family); the configured probe's row reuses ``oof`` when its top
    fraction was refitted with that family (``refit_family``, the pruning curve's choice)."""
    rows: list[dict[str, Any]] = []
    s0 = scoring.at["s0"]
    for family, target in itertools.product(FAMILIES, TARGETS):
        say(f"probe table: {family} {target}")
        same = family == cfg.probe.family and target == cfg.probe.target and refit_family in (None, family)
        res = {1.0: oof[1.0], cfg.top_frac: oof[cfg.top_frac]} if same else \
            cross_validate(states, layer, replace(cfg.probe, family=family, target=target), scoring.folds, top_fracs=[cfg.top_frac])
        for frac, o in res.items():
            rows.append({"family": family, "target": target, "frac": frac, **scoring.aurocs(o.values),
                         "s0": scoring.interval(o.values, s0, cfg.n_boot)})
    return rows


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

    The stages, in order: :func:`states_to_fit`, :func:`sweep_layers`, :func:`pruning_curve`,
    :func:`fit_value_neurons`, :func:`control_scores` and :func:`headline`, :func:`value_beyond_difficulty`
    (with ``difficulty``), :func:`rpe.sparsity.sparsity_control` (with ``cfg.sparsity_draws``),
    :func:`value_by_step`, :func:`probe_table` (with ``cfg.compare_probes``).

    Args:
        states: activations already captured for ``trajectories`` (e.g. during generation, the rollout
            folder's ``states.safetensors``); they must hold every layer to sweep with all neurons.
        difficulty: per trajectory, the task's difficulty features of its problem (:meth:`rpe.tasks.Task.difficulty`);
            enables the difficulty-only control, AUROC within difficulty strata and the residualised probe.
    """
    cfg = cfg or FitConfig()
    say = progress or (lambda msg: logger.info(msg))
    stopped = sum(t.finish_reason == "value" for t in trajectories)
    if stopped:
        raise ValueError(f"{stopped} of the {len(trajectories)} trajectories were stopped early by an internal value "
                         "(rpe rollouts --stop-bundle, finish_reason 'value'): their rewards are not outcomes, and a "
                         "probe fitted on them learns the stopping rule. Fit on a run collected without --stop-bundle")
    states = states_to_fit(model, tokenizer, trajectories, cfg, states, say)
    if difficulty is not None and len(difficulty) != len(trajectories):
        raise ValueError(f"difficulty has {len(difficulty)} entries for {len(trajectories)} trajectories")
    scoring = Scoring.of(states, cfg.folds, cfg.probe.seed)

    sweep, best = sweep_layers(states, cfg, scoring, say)
    say(f"best layer {best}: pruning curve")
    curve, oof = pruning_curve(states, best, cfg, scoring, say)
    refit_family = next(r["refit_family"] for r in curve if r["frac"] == cfg.top_frac)
    say(f"bundle: dense probe on all trajectories, value neurons, {refit_family} refit")
    dense_all, sparse_all, stability = fit_value_neurons(states, best, cfg, oof[cfg.top_frac].neurons, refit_family)
    say("baselines: question length, mean prompt log-probability")
    scores, diffs, features, strata = control_scores(model, tokenizer, trajectories, states, oof, cfg, scoring, difficulty)
    say("headline: paired cluster bootstrap")
    head = headline(scores, diffs, scoring, cfg.n_boot)
    beyond: dict[str, Any] = {}
    if features is not None and strata is not None and difficulty is not None:
        say("value beyond difficulty: within strata, residualised probe")
        beyond = value_beyond_difficulty(states, best, scores, features, strata, difficulty, cfg, scoring, say)
    sparsity = None
    if cfg.sparsity_draws:
        fracs = [r["frac"] for r in curve if r["frac"] < 1.0]
        sparsity = sparsity_control(states, best, scoring.folds, fracs, scores[DENSE],
                                    given={"first_layer_norm": {f: oof[f].neurons for f in fracs}},
                                    n_draws=cfg.sparsity_draws, matched_frac=cfg.top_frac, probe_cfg=cfg.probe,
                                    n_boot=cfg.n_boot, seed=cfg.probe.seed, progress=say)
        sparsity["card_frac"] = cfg.top_frac
    by_step = value_by_step(scores[VALUE], scoring, cfg.n_boot)
    families = probe_table(states, best, oof, cfg, scoring, say, refit_family) if cfg.compare_probes else []

    sweep_family = cfg.sweep_family or cfg.probe.family
    metrics = {
        "best_layer": best,
        "n_trajectories": len(trajectories),
        "n_problems": len(set(states.problem_ids)),
        "accuracy": float(states.rewards.mean()),
        "probe": {"family": cfg.probe.family, "target": cfg.probe.target, "sweep_family": sweep_family},
        "target": cfg.probe.target,
        "folds": cfg.folds,
        "headline_cv": head,
        "beyond_difficulty": beyond,
        "by_step": by_step,
        "probe_families": families,
        "value_neuron_stability": stability,
        "bundle_probe": {"dense": dense_all.metrics, "value_neurons": sparse_all.metrics},
        "pruning_curve": curve,
        "sparsity": sparsity,
        "layer_sweep": {str(k): v for k, v in sweep.items()},
    }
    assert sparse_all.state is not None and sparse_all.state.neurons is not None
    bundle = SubsystemBundle(
        model=fingerprint(model, tokenizer, model_name),
        layer=best,
        value_neurons=sparse_all.state.neurons,
        probe_state=sparse_all.state,
        probe_config=sparse_all.cfg,
        metrics=metrics,
        created_with={"fit": asdict(cfg)},
        prompt_bos=prompts_start_with_bos([t.prompt_token_ids for t in trajectories], tokenizer),
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


#: The run with power (README; docs/results.md): the paper budget runs the card's rollouts (800 problems x 2, an
#: 18-layer sweep) and fit (--compare-probes), then every other row's experiment.
POWERED_COMMAND = "rpe reproduce --budget paper --out runs/paper"


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
            "value finding from it (a row that reads 'not reproduced' at this size says only that the paper's "
            f"effect lies outside a wide interval); the run with power is: {POWERED_COMMAND}")


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
    "FitConfig", "Scoring", "control_scores", "fit_bundle", "fit_value_neurons", "headline", "power_note", "probe_table",
    "pruning_curve", "states_to_fit", "sweep_layers", "td_vs_mc", "value_beyond_difficulty", "value_by_step",
]
