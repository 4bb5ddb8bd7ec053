"""Early stopping inside rollouts: stop a sample while it is generated once its internal value says it will fail,
and measure what that saves against a random probe.

**Live** (``rpe rollouts --stop-bundle B --stop-below 0.1``; :class:`ValueStop`, passed to
:func:`rpe.decoding.generate_continuous` as ``value_stop``): as a sample's tokens are fed back, the end of each
step is found as it arrives (:class:`rpe.segment.StepEnds`, the rollout's segmenter) and V(s_t) is read from the
activations the forward that fed the step's last token computed anyway (no extra forward). From step
``after_step`` on, a sample whose V(s_t) is below ``threshold`` is stopped once the separator after the step has
been fed: its row leaves the batch and the cache, and none of its later tokens are generated. Its record says
``finish_reason="value"``; its reward is the verifiable reward of the text it has (0 unless it already answered).

**Measured** (:func:`stop_savings`, ``rpe early-stop --on-rollouts DIR``): with the continuous engine every row
samples from its own stream (batch seed, row), so a stopped run's samples are the unstopped run's, cut where they
were stopped (tested). One unstopped run with states captured at the bundle's layer therefore gives, for every
threshold, the tokens the rule saves (those after each stop) and the accuracy it loses (the correct samples it
stops), with no second run; and the same for the control: random probes (random neurons and weights of the same
layer and size, :func:`rpe.bundle.random_bundle`) that stop as many samples at each step, their lowest-valued
ones. Equal stopping at equal steps, so a difference in accuracy lost is the probe's choice of whom to stop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rpe.segment import Segmenter, StepEnds

if TYPE_CHECKING:
    from rpe.bundle import SubsystemBundle
    from rpe.store import StateSet


class ValueStop:
    """The rule that stops a generating sample: after step t >= ``after_step``, stop if V(s_t) < ``threshold``.

    Args:
        bundle: the bundle whose value probe judges (its layer and value neurons are recorded while generating).
        threshold: a sample whose value after a step is below this is stopped, in [0, 1].
        after_step: the first step after which samples may be stopped (1 = after the first step).
        segmenter, pattern: how steps end (the rollout's segmenter).
    """

    def __init__(self, bundle: SubsystemBundle, threshold: float, *, after_step: int = 1,
                 segmenter: Segmenter = "paragraph", pattern: str | None = None):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"stop threshold must be a value in [0, 1], got {threshold}")
        if after_step < 1:
            raise ValueError(f"after_step must be >= 1 (s_0 is the prompt: nothing generated to save), got {after_step}")
        StepEnds(segmenter, pattern)  # a bad segmenter or pattern fails here, not mid-generation
        self.bundle = bundle
        self.threshold, self.after_step = float(threshold), int(after_step)
        self.segmenter, self.pattern = segmenter, pattern
        self.layer = int(bundle.layer)
        self.columns = bundle.value_neurons.long()
        """Neurons recorded at :attr:`layer` while generating (the probe's inputs)."""
        self.probe = bundle.probe

    def value(self, act: torch.Tensor) -> float:
        """V(s) of one state from its (k,) activations at :attr:`columns`."""
        from rpe.tracker import check_finite

        act = act.float()[None]
        check_finite(act, self.layer, where=" while judging a sample for early stopping")
        return float(self.probe.predict(act)[0])

    def watch(self) -> RowWatch:
        """A fresh per-sample watcher."""
        return RowWatch(self, StepEnds(self.segmenter, self.pattern))


@dataclass
class RowWatch:
    """One generating sample under :class:`ValueStop`: its step ends so far, and the values it was judged by."""

    rule: ValueStop
    ends: StepEnds
    acts: list[torch.Tensor] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    """V(s_t) of each step t = 1, 2, ... that has ended."""
    stopped_at: int | None = None
    """The step after which the sample was stopped (None: never)."""

    def fed(self, piece: str, act: torch.Tensor) -> bool:
        """After the next generated token (text ``piece``, (k,) activations ``act``) was fed: stop the sample?"""
        self.acts.append(act)
        for token in self.ends.fed(piece):
            self.values.append(self.rule.value(self.acts[token]))
            if len(self.values) >= self.rule.after_step and self.values[-1] < self.rule.threshold:
                self.stopped_at = len(self.values)
                return True
        return False


# ---------------------------------------------------------------------------------------------------------
# measurement on an unstopped run


def judged_steps(tokenizer, completion_ids: Sequence[int], segmenter: Segmenter = "paragraph",
                 pattern: str | None = None) -> list[int]:
    """For each step t = 1, 2, ... that ends inside the completion (its separator arrives), the number of tokens
    generated when a live :class:`ValueStop` judges it: a sample stopped after step t keeps exactly these."""
    ends = StepEnds(segmenter, pattern)
    out: list[int] = []
    for i, token in enumerate(completion_ids):
        out += [i + 1] * len(ends.fed(tokenizer.decode([token], skip_special_tokens=True)))
    return out


@dataclass
class StopPlan:
    """Where each trajectory of a run is stopped by one rule: ``stopped_at[i]`` (0 = never), its tokens kept."""

    stopped_at: np.ndarray
    tokens: np.ndarray

    def lost(self, correct: np.ndarray) -> np.ndarray:
        """(n,) 1.0 where a correct trajectory (``correct > 0``) is stopped, else 0.0."""
        return ((self.stopped_at > 0) & (correct > 0)).astype(float)

    def summary(self, full_tokens: np.ndarray, correct: np.ndarray) -> dict[str, float]:
        return {"stopped_share": float((self.stopped_at > 0).mean()),
                "tokens_saved": float(1.0 - self.tokens.sum() / max(full_tokens.sum(), 1)),
                "accuracy_lost": float(self.lost(correct).mean())}


def threshold_plan(values: list[np.ndarray], checkpoints: list[list[int]], full_tokens: np.ndarray,
                   threshold: float, after_step: int) -> StopPlan:
    """The value rule: each trajectory stops at its first judged step t >= ``after_step`` with V(s_t) below
    ``threshold``. ``values[i][t]`` is V(s_t) (index 0: s_0); ``checkpoints[i]`` from :func:`judged_steps`."""
    stopped, tokens = np.zeros(len(values), int), full_tokens.copy()
    for i, (v, marks) in enumerate(zip(values, checkpoints)):
        for t in range(after_step, len(marks) + 1):
            if t < len(v) and v[t] < threshold:
                stopped[i], tokens[i] = t, marks[t - 1]
                break
    return StopPlan(stopped, tokens)


def matched_plan(values: list[np.ndarray], checkpoints: list[list[int]], full_tokens: np.ndarray,
                 counts: dict[int, int]) -> StopPlan:
    """The control: at each step t (in order), stop ``counts[t]`` of the trajectories still running and judged
    there, those with the lowest ``values`` (another probe's), as the value rule stopped ``counts[t]``."""
    stopped, tokens = np.zeros(len(values), int), full_tokens.copy()
    for t in sorted(counts):
        running = [i for i, marks in enumerate(checkpoints) if stopped[i] == 0 and len(marks) >= t and t < len(values[i])]
        order = sorted(running, key=lambda i: values[i][t])[: counts[t]]
        for i in order:
            stopped[i], tokens[i] = t, checkpoints[i][t - 1]
    return StopPlan(stopped, tokens)


def values_by_trajectory(states: StateSet, bundle: SubsystemBundle) -> list[np.ndarray]:
    """Per trajectory of ``states`` (``states.trajectory_ids`` order), V(s_0), V(s_1), ... by ``bundle``'s probe,
    read from the states held at its layer (every neuron, or at least its value neurons' columns)."""
    acts = states.acts[bundle.layer].float()
    v = bundle.probe.predict(acts[:, bundle.value_neurons.long()]).double().numpy()
    ti, si = states.traj_index.numpy(), states.step_index.numpy()
    order = np.lexsort((si, ti))  # by trajectory, then by step
    counts = np.bincount(ti, minlength=len(states.trajectory_ids))
    return np.split(v[order], np.cumsum(counts)[:-1])


def _paired_difference(a: np.ndarray, b: np.ndarray, boots: list[np.ndarray]) -> dict[str, float]:
    """Mean of ``a - b`` (per sample) with its 95% interval over the resamples ``boots`` (index arrays)."""
    diffs = [float((a[idx] - b[idx]).mean()) for idx in boots]
    return {"diff": float((a - b).mean()), "low": float(np.percentile(diffs, 2.5)),
            "high": float(np.percentile(diffs, 97.5))}


def stop_savings(rollout_dir: str | Path, bundle: SubsystemBundle, tokenizer, model, *,
                 thresholds: Sequence[float] = (0.05, 0.1, 0.2, 0.3), after_step: int = 1, n_controls: int = 20,
                 n_boot: int = 2000, seed: int = 0, difficulty: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Tokens saved and accuracy lost by stopping inside the rollouts of ``rollout_dir`` (an unstopped run,
    states captured at ``bundle.layer`` with every neuron, questions the bundle was not fitted on), for each
    threshold, against ``n_controls`` random probes stopping as many samples at each step, and, with
    ``difficulty`` (trajectory id -> the P(correct) the question's difficulty alone predicts:
    :func:`rpe.difficulty.difficulty_scores`), against stopping as many of the samples whose question looks
    hardest (ties broken at random).

    Returns:
        ``{"n_trajectories", "accuracy", "after_step", "thresholds": {t: {"value": {"stopped_share",
        "tokens_saved", "accuracy_lost"}, "random_probe": {"tokens_saved", "accuracy_lost": mean over probes,
        "accuracy_lost_range"}, "value_minus_control_lost": {"diff", "low", "high"}}}}``; accuracy lost is the
        share of all samples that were correct and are stopped; its difference from the control is paired by
        sample, with a 95% bootstrap interval over problems. With ``difficulty``, each threshold also has
        ``"difficulty": {"stopped_share", "tokens_saved", "accuracy_lost"}`` and
        ``"value_minus_difficulty_lost": {"diff", "low", "high"}``.
    """
    import json

    from rpe.bundle import random_bundle
    from rpe.metrics import cluster_resamples
    from rpe.records import MANIFEST_FILE, read_trajectories
    from rpe.store import StateSet

    rollout_dir = Path(rollout_dir)
    if not (rollout_dir / MANIFEST_FILE).is_file():
        raise ValueError(f"{rollout_dir} is not a finished rollout folder (no {MANIFEST_FILE})")
    manifest = json.loads((rollout_dir / MANIFEST_FILE).read_text())
    rollout = manifest["rollout"]
    if rollout.get("stop_bundle"):
        raise ValueError(f"{rollout_dir} was already stopped early (--stop-bundle): measure on an unstopped run")
    if "states" not in manifest.get("files", {}):
        raise ValueError(f"{rollout_dir} has no captured states: collect it with --capture-layers {bundle.layer}")
    states = StateSet.load(rollout_dir / manifest["files"]["states"])
    if bundle.layer not in states.acts:
        raise ValueError(f"{rollout_dir} holds layers {states.layers}, not the bundle's layer {bundle.layer}: "
                         f"collect it with --capture-layers {bundle.layer}")
    if states.neurons is not None and states.neurons.get(bundle.layer) is not None:
        raise ValueError(f"{rollout_dir} kept only some neurons of layer {bundle.layer}; the random-probe control "
                         "needs every neuron (collect without --capture-neurons)")
    trajectories = {t.trajectory_id: t for t in read_trajectories(rollout_dir)}
    ids = states.trajectory_ids
    records = [trajectories[i] for i in ids]
    segmenter, pattern = rollout.get("segmenter", "paragraph"), rollout.get("segment_pattern")
    checkpoints = [judged_steps(tokenizer, r.completion_token_ids, segmenter, pattern) for r in records]
    full = np.array([len(r.completion_token_ids) for r in records])
    correct = np.array([float(r.reward) for r in records])
    groups = np.array([r.problem_id for r in records])
    value = values_by_trajectory(states, bundle)
    k, hidden = int(bundle.value_neurons.numel()), bundle.probe_state.hidden
    controls = [values_by_trajectory(states, random_bundle(model, tokenizer, layer=bundle.layer, k=k, hidden=hidden,
                                                           seed=seed + c)) for c in range(n_controls)]
    hardest_first = None
    if difficulty is not None:
        missing = [i for i in ids if i not in difficulty]
        if missing:
            raise ValueError(f"difficulty scores lack {len(missing)} of the {len(ids)} trajectories of {rollout_dir} "
                             f"(e.g. {missing[0]})")
        jitter = np.random.default_rng(seed).random(len(ids)) * 1e-9  # ties (one question's samples) at random
        hardest_first = [np.full(len(v), float(difficulty[i]) + j) for i, v, j in zip(ids, value, jitter)]
    boots = list(cluster_resamples(groups, n_boot, seed))
    out: dict[str, Any] = {"rollouts": str(rollout_dir), "n_trajectories": len(records), "accuracy": float(correct.mean()),
                           "after_step": after_step, "n_controls": n_controls, "thresholds": {}}
    for threshold in thresholds:
        plan = threshold_plan(value, checkpoints, full, threshold, after_step)
        counts = {int(t): int((plan.stopped_at == t).sum()) for t in np.unique(plan.stopped_at[plan.stopped_at > 0])}
        control_plans = [matched_plan(c, checkpoints, full, counts) for c in controls]
        lost = plan.lost(correct)
        control_lost = np.mean([p.lost(correct) for p in control_plans], 0)
        summaries = [p.summary(full, correct) for p in control_plans]
        out["thresholds"][f"{threshold:g}"] = {
            "value": plan.summary(full, correct),
            "random_probe": {"stopped_share": float(np.mean([s["stopped_share"] for s in summaries])),
                             "tokens_saved": float(np.mean([s["tokens_saved"] for s in summaries])),
                             "accuracy_lost": float(control_lost.mean()),
                             "accuracy_lost_range": [min(s["accuracy_lost"] for s in summaries),
                                                     max(s["accuracy_lost"] for s in summaries)]},
            "value_minus_control_lost": _paired_difference(lost, control_lost, boots),
        }
        if hardest_first is not None:
            by_difficulty = matched_plan(hardest_first, checkpoints, full, counts)
            out["thresholds"][f"{threshold:g}"].update({
                "difficulty": by_difficulty.summary(full, correct),
                "value_minus_difficulty_lost": _paired_difference(lost, by_difficulty.lost(correct), boots)})
    return out


__all__ = ["RowWatch", "StopPlan", "ValueStop", "judged_steps", "matched_plan", "stop_savings", "threshold_plan",
           "values_by_trajectory"]
