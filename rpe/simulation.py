"""The textbook account of dopamine as a TD error, run on the same episodes as the model: an RPE simulation.

A TD(lambda) learner (Sutton 1988; Schultz, Dayan and Montague 1997) with a linear value over simple, named
features of the transcript learns V from the episodes' rewards and emits its own RPE at every step. Comparing it
with the model's internal RPE (read through a bundle) and the Monte-Carlo RPE (from ``rpe dopamine``'s sampled
continuations) asks whether the model's surprise looks like what an agent that knows only these features would
feel.

Features are functions ``(trajectory, k) -> float`` of state ``s_k`` (0 = before any step); :data:`FEATURES`
holds the default ones, and any mapping of names to such functions can be passed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rpe.metrics import spearman_by_problem
from rpe.probe import td_errors
from rpe.records import Trajectory

Feature = Callable[[Trajectory, int], float]

_ARITH = re.compile(r"(-?\d+(?:\s*[-+*]\s*-?\d+)+)\s*=\s*(-?\d+)")


def bias(t: Trajectory, k: int) -> float:
    """Always 1: the learner's baseline value."""
    return 1.0


def step_fraction(t: Trajectory, k: int) -> float:
    """How far into the episode the state is: k / T."""
    return k / max(1, len(t.steps))


def last_step_verifies(t: Trajectory, k: int) -> float:
    """1 when the last step's arithmetic claims (``a + b - c = d``) are all true, 0 when one is false, 0.5 when it
    makes none (and at s_0)."""
    if k == 0:
        return 0.5
    claims = _ARITH.findall(t.steps[k - 1].text)
    if not claims:
        return 0.5
    for expr, result in claims:
        if re.fullmatch(r"[-+*\d\s]+", expr) is None:
            return 0.5
        value = eval_arith(expr)
        if value is None or value != int(result):
            return 0.0
    return 1.0


def eval_arith(expr: str) -> int | None:
    """Integer value of ``a op b op c ...`` with +, - and * (* before + and -), or None when it does not parse."""
    tokens = re.findall(r"\d+|[-+*]", expr)
    nums: list[int] = []
    ops: list[str] = []
    i, expect_number = 0, True
    try:
        while i < len(tokens):
            if expect_number:
                sign = 1
                while tokens[i] in "+-":  # unary signs
                    sign = -sign if tokens[i] == "-" else sign
                    i += 1
                nums.append(sign * int(tokens[i]))
                expect_number = False
            else:
                ops.append(tokens[i])
                expect_number = True
            i += 1
    except (IndexError, ValueError):
        return None
    if expect_number or not nums:
        return None
    terms = [nums[0]]
    for op, n in zip(ops, nums[1:]):
        if op == "*":
            terms[-1] *= n
        else:
            terms.append(n if op == "+" else -n)
    return sum(terms)


def wrong_so_far(t: Trajectory, k: int) -> float:
    """1 when any step up to s_k made a false arithmetic claim."""
    return float(any(last_step_verifies(t, j) == 0.0 for j in range(1, k + 1)))


FEATURES: dict[str, Feature] = {"bias": bias, "step_fraction": step_fraction,
                                "last_step_verifies": last_step_verifies, "wrong_so_far": wrong_so_far}
"""The default features (add the task's difficulty with :func:`difficulty_feature`)."""


def difficulty_feature(difficulty: Mapping[str, float]) -> Feature:
    """A feature giving each trajectory's problem difficulty (e.g. the number of terms), from ``{problem_id: d}``."""
    return lambda t, k: float(difficulty.get(t.problem_id, 0.0))


@dataclass
class TDLambdaLearner:
    """Linear TD(lambda) with accumulating eligibility traces over the episodes, several passes.

    V(s) = w . phi(s); after step t the error delta_t = r_t + gamma V(s_t) - V(s_{t-1}) (terminal: r - V(s_{T-1}),
    V of the terminal state is 0) moves w by alpha delta_t e_t, e_t = gamma lambda e_{t-1} + phi(s_{t-1}).
    The learned w is the average of the iterates over the second half of the passes (Polyak-Ruppert), with a small
    step: the last iterate of the earlier alpha = 0.05, 20 passes wandered with the last episodes visited (the weight
    of the number of terms read -0.19, -0.37 and -0.11 on the first 400, 800 and 1,100 trajectories of one run,
    and the pooled Spearman with the model's RPE 0.73, 0.28 and 0.74); now -0.25, -0.26 and -0.24.
    """

    features: Mapping[str, Feature]
    alpha: float = 0.01
    gamma: float = 1.0
    lam: float = 0.9
    epochs: int = 40
    seed: int = 0
    average: bool = True
    """Average the iterates of the second half of the passes (False: keep the last iterate)."""

    def _phi(self, t: Trajectory) -> np.ndarray:
        return np.array([[f(t, k) for f in self.features.values()] for k in range(len(t.steps) + 1)])

    def fit(self, trajectories: Sequence[Trajectory]) -> TDLambdaLearner:
        """Learn w from the episodes (visited in a seeded random order each pass)."""
        rng = np.random.default_rng(self.seed)
        self._phis = {t.trajectory_id: self._phi(t) for t in trajectories}
        self.w = np.zeros(len(self.features))
        total, n_avg = np.zeros_like(self.w), 0
        for epoch in range(self.epochs):
            for i in rng.permutation(len(trajectories)):
                t = trajectories[i]
                phi = self._phis[t.trajectory_id]
                e = np.zeros_like(self.w)
                for step in range(1, len(t.steps) + 1):
                    v_prev = phi[step - 1] @ self.w
                    terminal = step == len(t.steps)
                    delta = (t.reward - v_prev) if terminal else self.gamma * (phi[step] @ self.w) - v_prev
                    e = self.gamma * self.lam * e + phi[step - 1]
                    self.w += self.alpha * delta * e
                if self.average and epoch >= self.epochs // 2:
                    total += self.w
                    n_avg += 1
        if n_avg:
            self.w = total / n_avg
        return self

    def values(self, t: Trajectory) -> np.ndarray:
        """(T + 1,) V(s_0..s_T) under the learned weights (V(s_T) is the last state's value, before the reward)."""
        phi = self._phis.get(t.trajectory_id)
        return (phi if phi is not None else self._phi(t)) @ self.w

    def rpe(self, t: Trajectory) -> np.ndarray:
        """(T,) the learner's RPE per step: gamma V(s_t) - V(s_{t-1}), the last step r - V(s_{T-1})."""
        return td_errors(self.values(t), self.gamma, reward=t.reward)


def simulate_rollouts(model, tokenizer, bundle, rollouts, out_dir, *, max_trajectories: int | None = None,
                      learner: TDLambdaLearner | None = None, n_boot: int = 1000, examples: int = 4) -> dict:
    """The model's internal RPE, the TD(lambda) learner's RPE and (when ``rpe dopamine`` cached Monte-Carlo values
    in the folder) the Monte-Carlo RPE on the same steps: pairwise Spearman with problem-bootstrap intervals, over
    all steps, per step position, and over the steps before the last (``nonterminal``: the last step's error carries
    the reward in every series, which alone correlates them). Writes ``simulation.json`` and ``simulation.png``.
    """
    import json
    from pathlib import Path

    from rpe.difficulty import difficulty_from_run
    from rpe.records import atomic_write_json, read_trajectories
    from rpe.signals import SignalReader

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trajs = [t for t in read_trajectories(rollouts) if t.steps][:max_trajectories]
    if len(trajs) < 10:
        raise ValueError(f"{rollouts} has {len(trajs)} trajectories with steps; the simulation needs at least 10")
    features = dict(FEATURES)
    diff = difficulty_from_run(rollouts, trajs)
    if diff:
        for name in diff[0]:
            by_id = {t.trajectory_id: d[name] for t, d in zip(trajs, diff)}
            features[f"difficulty:{name}"] = lambda t, k, by_id=by_id: float(by_id.get(t.trajectory_id, 0.0))
    learner = learner or TDLambdaLearner(features)
    learner.features = features
    learner.fit(trajs)
    reader = SignalReader(bundle, model, tokenizer)
    sigs = reader.read([t.prompt_token_ids for t in trajs],
                                                       [t.completion_token_ids for t in trajs],
                                                       spans=[[(s.token_start, s.token_end) for s in t.steps] for t in trajs])
    mc_path = Path(rollouts) / "mc_values.json"
    mc: dict[str, list[float]] = {}
    if mc_path.exists():
        for values in json.loads(mc_path.read_text()).values():
            mc.update(values)
    # undiscounted: Monte-Carlo values estimate a success probability, and with 4 continuations many states tie; a
    # 1 - 1e-5 discount would order the ties by their value (V = 1 -> -1e-5, V = 0 -> 0) in every rank correlation
    gamma = 1.0
    per_traj = []  # per trajectory: each series' (T,) RPE, the last step's being the reward-time error
    for t, sig in zip(trajs, sigs):
        internal = td_errors(sig.values, reader.gamma, reward=t.reward)
        mc_rpe = (td_errors(mc[t.trajectory_id], gamma, reward=t.reward) if t.trajectory_id in mc
                  else [np.nan] * len(t.steps))
        per_traj.append({"internal": internal, "learner": learner.rpe(t), "monte_carlo": np.asarray(mc_rpe, float)})
    arr = {k: np.concatenate([r[k] for r in per_traj]) for k in ("internal", "learner", "monte_carlo")}
    problems = np.array([t.problem_id for t in trajs for _ in t.steps])
    pos = np.concatenate([np.arange(1, len(t.steps) + 1) for t in trajs])
    last = np.concatenate([np.arange(1, len(t.steps) + 1) == len(t.steps) for t in trajs])
    result: dict = {"n_trajectories": len(trajs), "n_steps": int(len(pos)), "features": list(features),
                    "weights": dict(zip(features, map(float, learner.w))), "pairs": {}, "by_step": {},
                    "nonterminal": {}}
    for a, b in [("internal", "learner"), ("internal", "monte_carlo"), ("learner", "monte_carlo")]:
        ok = np.isfinite(arr[a]) & np.isfinite(arr[b])
        if ok.sum() < 10:
            continue

        def corr(rows: np.ndarray) -> dict[str, float]:
            return spearman_by_problem(arr[a][rows], arr[b][rows], list(problems[rows]), n_boot)

        key = f"{a} vs {b}"
        result["pairs"][key] = corr(ok)
        if (ok & ~last).sum() >= 10:  # steps before the last: no reward term shared by every series
            result["nonterminal"][key] = corr(ok & ~last)
        result["by_step"][key] = {int(k): corr(ok & (pos == k)) for k in sorted(set(pos[ok].tolist()))
                                  if (ok & (pos == k)).sum() >= 10}
    atomic_write_json(out_dir / "simulation.json", result)
    _plot(trajs[:examples], per_traj[:examples], out_dir / "simulation.png")
    return result


def _plot(trajs, series, path) -> None:
    """The three RPE series of a few example episodes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(trajs), figsize=(3.2 * len(trajs), 2.8), squeeze=False)
    for ax, t, r in zip(axes[0], trajs, series):
        steps = np.arange(1, len(t.steps) + 1)
        ax.plot(steps, r["internal"], "o-", label="internal (model)")
        ax.plot(steps, r["learner"], "s--", label="TD(lambda) learner")
        if np.isfinite(r["monte_carlo"]).all():
            ax.plot(steps, r["monte_carlo"], "^:", label="Monte-Carlo")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(steps)
        ax.set_title(f"{t.trajectory_id} (r = {t.reward:.0f})", fontsize=8)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("RPE")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["FEATURES", "TDLambdaLearner", "bias", "difficulty_feature", "eval_arith", "last_step_verifies",
           "simulate_rollouts", "step_fraction", "wrong_so_far"]
