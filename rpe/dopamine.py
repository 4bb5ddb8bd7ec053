"""Dopamine neurons: neurons whose activity tracks the reward-prediction error (RPE) of each reasoning step.

Method (PAPER.md):
1. Monte-Carlo value of each state: sample ``n_continuations`` completions from s_k (the prompt plus the
   first k steps, as tokens) and score them with the task's verifier; V(s_T) is the trajectory's reward.
2. TD error of step t: delta_t = gamma * V(s_t) - V(s_{t-1}).
3. Keep steps with |delta| > ``threshold`` (surprising events).
4. Per-neuron activation averaged over the step's tokens, z-scored per neuron.
5. On a training split (by problem): a small MLP (d -> 32 -> 1, MSE) predicts delta; its first-layer L1
   norms pick candidate neurons; the candidates with the largest |Spearman| with delta are the dopamine
   neurons, each with its sign.
6. On the held-out split: Spearman between delta and the signed mean activity of the dopamine neurons, with a
   95% bootstrap interval over problems and a one-sided permutation p-value (delta shuffled across held-out
   steps), beside the same statistic for random neuron sets of the same size (the control).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from rpe.distributed import barrier, current_ranks, gather_objects
from rpe.generation import generate_from_ids
from rpe.sampling import SamplingConfig, stream_seed
from rpe.seeding import seeded
from rpe.metrics import permutation_p_spearman, spearman_by_problem
from rpe.probe import split_by_problem, td_errors
from rpe.records import Trajectory, atomic_write_json
from rpe.tasks import Problem, Task

logger = logging.getLogger(__name__)


@dataclass
class DopamineConfig:
    """Options of ``rpe dopamine``."""

    n_continuations: int = 4
    """Continuations sampled from each state to estimate its value."""
    max_new_tokens: int | None = None
    """Token budget of one continuation; None = sized from the rollouts (:func:`continuation_budget`: the
    longest completion among them, so a continuation can finish wherever the rollouts' completions did)."""
    temperature: float = 0.7
    threshold: float = 0.3
    """Keep steps with |delta| above this."""
    gamma: float = 1 - 1e-5
    top_frac: float = 0.01
    """Fraction of d_model reported as dopamine neurons."""
    candidate_frac: float = 0.1
    """Fraction of d_model kept as candidates by the MLP's first-layer L1 norm."""
    hidden: int = 32
    epochs: int = 500
    """Full-batch AdamW steps of the delta predictor (long enough that trained weights, not the random
    initialisation, decide the L1 ranking)."""
    lr: float = 1e-2
    test_frac: float = 0.3
    n_random: int = 50
    """Random neuron sets drawn for the control."""
    n_boot: int = 1000
    """Bootstrap resamples (over held-out problems) of the held-out Spearman's interval."""
    n_perm: int = 2000
    """Permutations of the held-out deltas for the p-value."""
    batch_size: int = 32
    engine: str = "continuous"
    """Generation engine of the continuations (:mod:`rpe.generation`); ``generate`` is the earlier path (one
    padded ``model.generate`` per batch of states x continuations), kept for comparison."""
    min_surprising: int = 10
    """Fewer surprising steps than this is an error (below 50 the result is flagged as a small sample)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_continuations < 1:
            raise ValueError(f"n_continuations must be >= 1, got {self.n_continuations}")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if not 0 < self.top_frac <= self.candidate_frac <= 1:
            raise ValueError("need 0 < top_frac <= candidate_frac <= 1")


def _state_prefixes(t: Trajectory) -> list[list[int]]:
    """Token ids of s_0 .. s_{T-1}: the prompt, then the prompt plus each completed step."""
    return [t.prompt_token_ids] + [t.prompt_token_ids + t.completion_token_ids[: s.token_end] for s in t.steps[:-1]]


def states_per_call(batch_size: int, n_continuations: int, engine: str) -> int:
    """States valued per generation call: one batch of rows with ``generate``; with the continuous engine enough
    to keep ``batch_size`` rows busy as rows finish (it refills free slots and prefills a state's N continuations
    once).

    Example:
        >>> states_per_call(32, 4, "generate"), states_per_call(32, 4, "continuous")
        (8, 32)
    """
    return max(1, batch_size // n_continuations) * (4 if engine == "continuous" else 1)


def mc_state_values(
    model,
    tokenizer,
    task: Task,
    problems: dict[str, Problem],
    trajectories: Sequence[Trajectory],
    cfg: DopamineConfig,
    *,
    stop_strings: Sequence[str] = (),
    cache: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[float]]:
    """Monte-Carlo V(s_0..s_T) per trajectory id (V(s_T) = the trajectory's reward).

    Continuation j of state k of trajectory ``id`` samples from the stream
    :func:`rpe.sampling.stream_seed` ``(cfg.seed, id, k, j)`` (continuous engine): the values do not depend on
    the batch size, on which trajectories share a call, on a resume or on how many processes share the work.
    Under a launcher (``torchrun``, :mod:`rpe.distributed`) rank r values the trajectories i with
    i % world == r and every rank returns all values.

    Results are cached in ``cache`` (JSON keyed by the sampling settings; under a launcher each rank writes
    ``CACHE.rankR`` and the main rank merges them into ``cache``) so a rerun or a resumed run only samples what
    is missing.
    """
    if cfg.max_new_tokens is None:
        cfg = replace(cfg, max_new_tokens=continuation_budget(trajectories))
    settings = {"n": cfg.n_continuations, "max_new_tokens": cfg.max_new_tokens, "t": cfg.temperature, "seed": cfg.seed,
                "streams": "keyed"}  # values sampled with offset seeds (before keyed streams) are not reused
    if cfg.engine != "generate":  # caches written before the continuous engine keep their key
        settings["engine"] = cfg.engine
    key = json.dumps(settings)
    ranks = current_ranks()
    done = _cached_values(cache, key)
    todo = [t for t in trajectories if t.trajectory_id not in done and t.steps]
    mine = [t for i, t in enumerate(todo) if ranks.owns(i)]
    own_cache = cache if cache is None or ranks.world == 1 else cache.with_name(f"{cache.name}.rank{ranks.rank}")
    sampling = SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    items = [(t, k, prefix) for t in mine for k, prefix in enumerate(_state_prefixes(t))]
    per_call = states_per_call(cfg.batch_size, cfg.n_continuations, cfg.engine)  # results cached after each call
    partial: dict[str, dict[int, float]] = {}
    for b in range(0, len(items), per_call):
        chunk = items[b : b + per_call]
        prompts = [prefix for _, _, prefix in chunk for _ in range(cfg.n_continuations)]
        streams = [stream_seed(cfg.seed, t.trajectory_id, k, j) for t, k, _ in chunk for j in range(cfg.n_continuations)]
        gen = generate_from_ids(model, tokenizer, prompts, sampling, stop_strings=stop_strings, seed=cfg.seed,
                                row_seeds=streams, max_rows=cfg.batch_size, engine=cfg.engine)
        for i, (t, k, prefix) in enumerate(chunk):
            head = t.completion[: t.steps[k - 1].char_end] if k else ""
            scores = []
            for j in range(cfg.n_continuations):
                text = gen.texts[i * cfg.n_continuations + j]
                scores.append(task.score(problems[t.problem_id], head + text))
            partial.setdefault(t.trajectory_id, {})[k] = float(np.mean(scores))
        for t in {c[0].trajectory_id: c[0] for c in chunk}.values():
            got = partial.get(t.trajectory_id, {})
            if len(got) == len(t.steps):
                done[t.trajectory_id] = [got[k] for k in range(len(t.steps))] + [t.reward]
        if own_cache is not None:
            _store_values(own_cache, key, done)
        if progress:
            progress(min(b + per_call, len(items)), len(items))
    if ranks.world > 1:  # every rank gets every rank's values; the main rank keeps them in one cache file
        for values in gather_objects(done):
            done.update(values)
        if cache is not None and ranks.is_main:
            _store_values(cache, key, done)
            for part in cache.parent.glob(f"{cache.name}.rank*"):
                part.unlink()
        barrier()
    return {t.trajectory_id: done[t.trajectory_id] for t in trajectories if t.trajectory_id in done}


def _store_values(path: Path, key: str, values: dict[str, list[float]]) -> None:
    """Write ``values`` under ``key`` into the JSON cache ``path`` (other keys kept), atomically."""
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored[key] = values
    atomic_write_json(path, stored)


def _cached_values(cache: Path | None, key: str) -> dict[str, list[float]]:
    """The values stored under ``key`` in ``cache`` and in the per-rank files an interrupted launched run left."""
    done: dict[str, list[float]] = {}
    if cache is None:
        return done
    for path in [cache, *sorted(cache.parent.glob(f"{cache.name}.rank*"))]:
        if path.exists():
            done.update(json.loads(path.read_text()).get(key, {}))
    return done


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _column_spearman(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman of every column of ``z`` (n, d) with ``y`` (n,): Pearson on ranks."""
    from scipy.stats import rankdata

    rz = rankdata(z, axis=0)
    ry = rankdata(y)
    rz = rz - rz.mean(0)
    ry = ry - ry.mean()
    denom = np.sqrt((rz**2).sum(0) * (ry**2).sum())
    return np.divide(rz.T @ ry, denom, out=np.zeros(z.shape[1]), where=denom > 0)


@dataclass
class DopamineResult:
    """What :func:`find_dopamine_neurons` found.

    Attributes:
        neurons: (m,) indices into d_model, best first.
        sign: (m,) +1 when activation rises with RPE, -1 when it falls.
        metrics: held-out Spearman of the dopamine set vs random sets, counts, per-sign mean activity.
    """

    neurons: torch.Tensor
    sign: torch.Tensor
    metrics: dict[str, Any]
    mean: torch.Tensor | None = None
    """(m,) mean step-averaged activation of each chosen neuron (over all steps)."""
    std: torch.Tensor | None = None
    """(m,) its standard deviation."""


def find_dopamine_neurons(
    step_acts: torch.Tensor, deltas: np.ndarray, problem_ids: Sequence[str], cfg: DopamineConfig
) -> DopamineResult:
    """Rank neurons by how well their step-averaged activity tracks delta.

    Args:
        step_acts: (n_steps, d) activations averaged over each step's tokens.
        deltas: (n_steps,) TD errors of those steps.
        problem_ids: (n_steps,) problem of each step (the split is by problem).
    """
    x = step_acts.double().numpy()
    mu, sd = x.mean(0), x.std(0)
    z = (x - mu) / np.where(sd > 0, sd, 1.0)  # per-neuron z-score over all steps
    keep = np.abs(deltas) > cfg.threshold
    if keep.sum() < cfg.min_surprising:
        raise ValueError(
            f"only {int(keep.sum())} steps have |delta| > {cfg.threshold}: too few surprising events. Use more "
            "trajectories, more continuations, or a lower --threshold."
        )
    if keep.sum() < 50:
        logger.warning("only %d surprising steps: the dopamine result is a small-sample estimate", int(keep.sum()))
    z, y, pids = z[keep], np.asarray(deltas)[keep], np.asarray(problem_ids)[keep]
    split = split_by_problem(list(pids), 1e-9, cfg.test_frac, cfg.seed)  # no validation split here
    train, test = split != 2, split == 2
    d = z.shape[1]
    with seeded(cfg.seed):
        net = nn.Sequential(nn.Linear(d, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.01)
    xt, yt = torch.tensor(z[train], dtype=torch.float32), torch.tensor(y[train], dtype=torch.float32)
    for _ in range(cfg.epochs):
        loss = nn.functional.mse_loss(net(xt).squeeze(-1), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    l1 = net[0].weight.detach().abs().sum(0).numpy()  # (d,)
    n_cand = max(1, round(cfg.candidate_frac * d))
    candidates = np.argsort(-l1)[:n_cand]
    rho_train = _column_spearman(z[train], y[train])
    m = max(1, round(cfg.top_frac * d))
    chosen = candidates[np.argsort(-np.abs(rho_train[candidates]))[:m]]
    sign = np.sign(rho_train[chosen])
    sign[sign == 0] = 1

    def held_out(neurons: np.ndarray, signs: np.ndarray) -> float:
        activity = (z[test][:, neurons] * signs).mean(1)
        return _spearman(activity, y[test])

    rng = np.random.default_rng(cfg.seed)
    random_rhos = []
    for _ in range(cfg.n_random):
        r = rng.choice(d, size=m, replace=False)
        r_sign = np.sign(rho_train[r])
        r_sign[r_sign == 0] = 1
        random_rhos.append(held_out(r, r_sign))
    random_rhos = np.array([v for v in random_rhos if not np.isnan(v)])
    rho_test = _column_spearman(z[test], y[test])
    activity_test = (z[test][:, chosen] * sign).mean(1)
    interval = spearman_by_problem(activity_test, y[test], list(pids[test]), cfg.n_boot, cfg.seed)
    rho = _spearman(activity_test, y[test])  # held_out(chosen, sign), from the activity computed above
    raw_test = z[test][:, chosen]
    metrics = {
        "n_steps": int(len(deltas)),
        "n_surprising": int(keep.sum()),
        "n_train": int(train.sum()),
        "n_test": int(test.sum()),
        "n_neurons": m,
        "test_spearman_dopamine": rho,
        "test_spearman_low": interval["low"],
        "test_spearman_high": interval["high"],
        "test_permutation_p": permutation_p_spearman(activity_test, y[test], n_perm=cfg.n_perm, seed=cfg.seed),
        "test_random_sets_at_least": float((random_rhos >= rho).mean()) if len(random_rhos) else float("nan"),
        "n_test_problems": int(len(set(pids[test]))),
        "test_spearman_random_mean": float(random_rhos.mean()) if len(random_rhos) else float("nan"),
        "test_spearman_random_q95": float(np.quantile(random_rhos, 0.95)) if len(random_rhos) else float("nan"),
        "test_mean_abs_spearman_per_neuron": float(np.abs(rho_test[chosen]).mean()),
        "test_mean_abs_spearman_per_neuron_all": float(np.abs(rho_test).mean()),
        "test_activity_positive_rpe": float(activity_test[y[test] > 0].mean()) if (y[test] > 0).any() else float("nan"),
        "test_activity_negative_rpe": float(activity_test[y[test] < 0].mean()) if (y[test] < 0).any() else float("nan"),
        "test_raw_activation_positive_rpe": raw_test[y[test] > 0].mean(0).tolist() if (y[test] > 0).any() else [],
        "test_raw_activation_negative_rpe": raw_test[y[test] < 0].mean(0).tolist() if (y[test] < 0).any() else [],
        "config": asdict(cfg),
    }
    return DopamineResult(
        torch.as_tensor(chosen, dtype=torch.long), torch.as_tensor(sign, dtype=torch.float32), metrics,
        mean=torch.as_tensor(mu[chosen], dtype=torch.float32),
        std=torch.as_tensor(np.where(sd[chosen] > 0, sd[chosen], 1.0), dtype=torch.float32),
    )


def continuation_budget(trajectories: Sequence[Trajectory]) -> int:
    """Tokens of the longest completion among ``trajectories`` (at least 1): the Monte-Carlo continuation budget
    that lets a continuation from any state run as long as the rollouts' own completions did."""
    return max([len(t.completion_token_ids) for t in trajectories] + [1])


def dopamine_from_rollouts(
    model,
    tokenizer,
    rollout_dir: str | Path,
    bundle,
    cfg: DopamineConfig | None = None,
    *,
    max_trajectories: int | None = None,
    sweep_layers: Sequence[int] = (),
    progress: Callable[[int, int], None] | None = None,
) -> DopamineResult:
    """Find dopamine neurons at the bundle's layer from a rollout folder; updates ``bundle`` in memory.

    Monte-Carlo values are cached in ``rollout_dir/mc_values.json``. ``sweep_layers``: the same search at other
    layers too, on the same steps and split (one forward captures them all); each layer's held-out result goes to
    ``metrics["by_layer"]`` with a Bonferroni-adjusted p-value (the bundle keeps its own layer's neurons, which
    :class:`rpe.signals.SignalReader` reads).
    """
    from rpe.prompts import COMPLETION_STOP, resolve_style
    from rpe.records import MANIFEST_FILE, read_trajectories
    from rpe.rollouts import rollout_settings
    from rpe.store import capture_states

    cfg = cfg or DopamineConfig()
    rollout_dir = Path(rollout_dir)
    bundle.check_model(model, tokenizer)
    settings = rollout_settings(rollout_dir)
    if settings is None:
        raise FileNotFoundError(f"{rollout_dir / MANIFEST_FILE} does not exist; point at a finished `rpe rollouts` folder")
    trajectories = [t for t in read_trajectories(rollout_dir) if t.steps][:max_trajectories]
    if cfg.max_new_tokens is None:  # recorded with the result below
        cfg = replace(cfg, max_new_tokens=continuation_budget(trajectories))
    task = settings.task()
    problems = {p.id: p for p in settings.problems()}
    style = resolve_style(settings.config.prompt, tokenizer)
    values = mc_state_values(
        model, tokenizer, task, problems, trajectories, cfg,
        stop_strings=[COMPLETION_STOP] if style == "completion" else [],
        cache=rollout_dir / "mc_values.json", progress=progress,
    )
    trajectories = [t for t in trajectories if t.trajectory_id in values]
    layers = sorted({bundle.layer, *sweep_layers})
    states = capture_states(model, trajectories, layers, mode="steps", pad_token_id=tokenizer.pad_token_id or 0)
    rows = (states.step_index >= 1).nonzero().flatten()
    deltas = np.array([
        # Monte-Carlo values end with V(s_T) = r: the reward-time error is r - V(s_{T-1})
        td_errors(v := values[states.trajectory_ids[int(states.traj_index[r])]], cfg.gamma, reward=v[-1])[int(states.step_index[r]) - 1]
        for r in rows
    ])
    pids = [states.problem_ids[int(states.traj_index[r])] for r in rows]
    result = find_dopamine_neurons(states.acts[bundle.layer][rows], deltas, pids, cfg)
    if sweep_layers:
        result.metrics["by_layer"] = {}
        for layer in layers:
            r = result if layer == bundle.layer else find_dopamine_neurons(states.acts[layer][rows], deltas, pids, cfg)
            m = r.metrics
            result.metrics["by_layer"][str(layer)] = {
                **{k: m[k] for k in ("test_spearman_dopamine", "test_spearman_low", "test_spearman_high",
                                     "test_permutation_p", "test_spearman_random_q95", "n_test")},
                "p_bonferroni": min(1.0, m["test_permutation_p"] * len(layers)),
                "neurons": r.neurons.tolist(),
            }
    all_values = np.concatenate([np.asarray(v) for v in values.values()])
    result.metrics["mean_mc_value"] = float(all_values.mean())
    result.metrics["n_trajectories"] = len(trajectories)
    bundle.dopamine_neurons = result.neurons
    bundle.dopamine_sign = result.sign
    bundle.dopamine_mean, bundle.dopamine_std = result.mean, result.std
    bundle.metrics["dopamine"] = result.metrics
    return result
