"""Do value neurons matter? Accuracy with each neuron set ablated, beside the controls, and a causal RPE check.

:func:`run_ablation` (``rpe ablate``):
1. reads the fitting rollouts' activations at each requested layer (the controls need activation statistics);
2. builds neuron sets of one size per layer (:mod:`rpe.controls`): value neurons (the bundle's at its layer, a
   probe's top neurons elsewhere), random (several seeds, massive-activation dims excluded), random matched in
   mean |activation|, top-magnitude, next-token-probe, Wanda-style and Monte-Carlo-probe neurons;
3. collects held-out rollouts (same problems and sampling seed in every arm, so arms are paired) without
   ablation and with each set ablated; each arm is its own resumable rollout folder;
4. writes ``results.json`` (accuracy, Wilson interval, drop vs no ablation per arm) and ``ablation.png``
   (accuracy vs layer, one line per source).

:func:`rpe_causal_check`: ablate a growing share of value-ranked neurons upstream of the dopamine layer and
measure how much the dopamine neurons' Spearman correlation with the Monte-Carlo TD error drops, vs random
neurons of the same count. (Ablating at the dopamine layer itself cannot change that layer's activity: a
block's output depends only on earlier blocks.)
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rpe.controls import (SOURCES, massive_dims, matched_random_set, mc_probe_set, next_token_scores, random_set,
                          top_k, top_magnitude_set, wanda_scores)
from rpe.interventions import NeuronAblation
from rpe.metrics import wilson_interval
from rpe.records import Trajectory, atomic_write_json, read_trajectories
from rpe.rollouts import RolloutConfig, collect_rollouts, rollout_settings
from rpe.store import StateSet, capture_states
from rpe.tasks import DEFAULT_TASK

logger = logging.getLogger(__name__)


@dataclass
class AblateConfig:
    """Options of ``rpe ablate``."""

    task: str | None = None
    """Task of the held-out arms; None = the fitting rollouts' task (``DEFAULT_TASK`` when they have no
    manifest). The arms' prompt, sampling and segmenter always come from the fitting rollouts' manifest."""
    n_problems: int = 200
    """Held-out problems per arm (one sample each)."""
    seed: int = 1
    """Seed of the held-out problems and of sampling (the fitting rollouts use seed 0)."""
    layers: list[int] | None = None
    """Layers to ablate at (default: the bundle's layer)."""
    sources: list[str] = field(default_factory=lambda: list(SOURCES))
    random_seeds: int = 3
    """Seeds of each random control."""
    mode: str = "zero"
    n_neurons: int | None = None
    """Neurons per set (default: the bundle's value-neuron count)."""
    share: float | None = None
    """Neurons per set as a share of d_model (e.g. 0.1 for the top 10%); exclusive with ``n_neurons``. A set size
    other than the bundle's takes the value set from a dense probe fitted at that layer (its top-ranked neurons)."""
    max_fit_trajectories: int = 400
    batch_size: int = 16
    engine: str = "continuous"
    """Generation engine of every arm (``generate`` resumes arms made before the continuous engine existed)."""

    def __post_init__(self) -> None:
        bad = [s for s in self.sources if s not in SOURCES]
        if bad:
            raise ValueError(f"unknown neuron sources {bad}; choose from {', '.join(SOURCES)}")
        if self.n_problems < 1 or self.random_seeds < 1:
            raise ValueError("n_problems and random_seeds must be >= 1")
        if self.share is not None and (self.n_neurons is not None or not 0 < self.share <= 1):
            raise ValueError(f"share must lie in (0, 1] and cannot be combined with n_neurons; got {self.share}")


def _next_tokens(trajectories: list[Trajectory], states: StateSet) -> torch.Tensor:
    """The token after each state's position (-1 when the state is the last token)."""
    out = []
    for ti, si in zip(states.traj_index.tolist(), states.step_index.tolist()):
        t = trajectories[ti]
        full = t.prompt_token_ids + t.completion_token_ids
        pos = t.prompt_len - 1 if si == 0 else t.prompt_len + t.steps[si - 1].token_end - 1
        out.append(full[pos + 1] if pos + 1 < len(full) else -1)
    return torch.tensor(out)


def neuron_sets(model, bundle, trajectories: list[Trajectory], states: StateSet, layer: int, k: int,
                cfg: AblateConfig) -> tuple[dict[str, torch.Tensor], list[int]]:
    """``{arm name: (k,) indices}`` for one layer, and the massive-activation dims excluded from random draws."""
    from rpe.probe import ProbeConfig, ValueProbe

    acts = states.acts[layer]
    d = acts.shape[1]
    massive = massive_dims(acts)
    mean_abs = acts.abs().mean(0)
    sets: dict[str, torch.Tensor] = {}
    if layer == bundle.layer and bundle.value_neurons.numel() == k:
        value = bundle.value_neurons.long()
    else:
        value = top_k(ValueProbe(ProbeConfig()).fit(states, layer).neuron_scores(), k)
    for source in cfg.sources:
        if source == "value":
            sets["value"] = value
        elif source == "random":
            for s in range(cfg.random_seeds):
                sets[f"random/{s}"] = random_set(d, k, seed=1000 + s, exclude=set(massive) | set(value.tolist()))
        elif source == "random_matched":
            for s in range(cfg.random_seeds):
                sets[f"random_matched/{s}"] = matched_random_set(mean_abs, value, seed=2000 + s, exclude=set(massive))
        elif source == "top_magnitude":
            sets["top_magnitude"] = top_magnitude_set(mean_abs, k)
        elif source == "next_token":
            nxt = _next_tokens(trajectories, states)
            ok = nxt >= 0
            sets["next_token"] = top_k(next_token_scores(acts[ok], nxt[ok]), k)
        elif source == "wanda":
            sets["wanda"] = top_k(wanda_scores(model, layer, acts), k)
        elif source == "mc_probe":
            sets["mc_probe"] = mc_probe_set(states, layer, k)
    return sets, massive


def arm_settings(cfg: AblateConfig, rollouts: str | Path | list[Trajectory]) -> tuple[RolloutConfig, Any]:
    """The held-out arms' rollout configuration and task: prompt, sampling, segmenter and prompt budget from the
    fitting rollouts' manifest (defaults when ``rollouts`` is a list or has none), problems, seed, batch and
    engine from ``cfg``, one sample per problem, no capture. On the fitting task the arms never draw a question
    the fitting run used (``exclude_questions``): a JSONL or dataset task's other seed is a shuffle of the same
    questions, and a reasoning-gym generator repeats short expressions across seeds."""
    from rpe.tasks import load_task

    settings = rollout_settings(rollouts) if not isinstance(rollouts, list) else None
    base = settings.config if settings is not None else RolloutConfig(task=DEFAULT_TASK)
    if cfg.task is not None:
        task = load_task(cfg.task)
    else:
        task = settings.task() if settings is not None else load_task(DEFAULT_TASK)
    same_task = settings is not None and task.spec() == settings.task().spec()
    exclude = settings.question_keys() if same_task else None
    rcfg = replace(base, task=cfg.task or base.task, n_problems=cfg.n_problems, samples=1, seed=cfg.seed,
                   batch_size=cfg.batch_size, engine=cfg.engine, capture_layers=None, capture_neurons=None,
                   exclude_questions=exclude)
    return rcfg, task


def _arm(model, tok, task, rcfg: RolloutConfig, cfg: AblateConfig, out: Path, model_name: str,
         neurons: dict[int, torch.Tensor] | None, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """Held-out accuracy with ``neurons`` ablated (None: no ablation), resumable in ``out``."""
    spec = {"mode": cfg.mode, "neurons": {str(k): v.tolist() for k, v in (neurons or {}).items()}}
    spec_path = out / "ablation.json"
    overwrite = spec_path.exists() and json.loads(spec_path.read_text()) != spec
    if neurons:
        with NeuronAblation(model, neurons, mode="zero" if cfg.mode == "zero" else cfg.mode):
            res = collect_rollouts(model, tok, rcfg, out, task=task, model_name=model_name, overwrite=overwrite,
                                   progress=progress)
    else:
        res = collect_rollouts(model, tok, rcfg, out, task=task, model_name=model_name, overwrite=overwrite,
                               progress=progress)
    atomic_write_json(spec_path, spec)
    m = res.manifest
    return {"accuracy": m["accuracy"], "ci95": m["accuracy_ci95"], "n": res.n_trajectories}


def _captured(rollouts: str | Path | list[Trajectory], trajs: list[Trajectory], layers: list[int]) -> StateSet | None:
    """The activations ``rpe rollouts --capture-layers`` recorded for exactly ``trajs`` at ``layers`` (all
    neurons), narrowed to those layers; None when the folder has none that fit (then they are captured again)."""
    if isinstance(rollouts, list) or not (Path(rollouts) / "states.safetensors").is_file():
        return None
    states = StateSet.load(Path(rollouts) / "states.safetensors")
    if states.neurons is not None or not set(layers) <= set(states.layers) or \
            states.trajectory_ids != [t.trajectory_id for t in trajs]:
        return None
    return states.at_layers(layers)


def run_ablation(model, tok, bundle, rollouts: str | Path | list[Trajectory], cfg: AblateConfig, out_dir: str | Path, *,
                 model_name: str, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """The whole experiment; returns (and writes) ``results.json``. See the module docstring."""

    bundle.check_model(model, tok)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = cfg.layers or [bundle.layer]
    from rpe.tracker import hidden_size_of, check_layers

    layers = check_layers(model, layers)
    if cfg.share is not None:
        k = max(1, round(cfg.share * hidden_size_of(model)))
    else:
        k = cfg.n_neurons or int(bundle.value_neurons.numel())
    source = rollouts if isinstance(rollouts, list) else read_trajectories(rollouts)
    trajs = [t for t in source if t.steps][: cfg.max_fit_trajectories]
    if not trajs:
        raise ValueError(f"{rollouts} holds no trajectory with steps")
    rcfg, task = arm_settings(cfg, rollouts)
    states = _captured(rollouts, trajs, layers) or capture_states(model, trajs, layers, pad_token_id=tok.pad_token_id or 0)

    def arm_progress(name):
        return (lambda a, b: progress(name, a, b)) if progress else None

    results: dict[str, Any] = {"config": asdict(cfg), "n_neurons": k, "bundle_layer": bundle.layer,
                               "arm_settings": {"task": task.spec(), "prompt": asdict(rcfg.prompt),
                                                "sampling": asdict(rcfg.sampling), "segmenter": rcfg.segmenter,
                                                "excluded_fitting_questions": len(rcfg.exclude_questions or [])},
                               "baseline": _arm(model, tok, task, rcfg, cfg, out_dir / "baseline", model_name, None,
                                                arm_progress("no ablation")),
                               "layers": {}}
    base = results["baseline"]["accuracy"]
    for layer in layers:
        sets, massive = neuron_sets(model, bundle, trajs, states, layer, k, cfg)
        entry: dict[str, Any] = {"massive_dims": massive, "arms": {}}
        for name, idx in sets.items():
            r = _arm(model, tok, task, rcfg, cfg, out_dir / f"layer{layer}" / name.replace("/", "_"), model_name,
                     {layer: idx}, arm_progress(f"layer {layer}: {name}"))
            r["drop"] = base - r["accuracy"]
            r["neurons"] = idx.tolist()
            entry["arms"][name] = r
        entry["summary"] = summarise(entry["arms"])
        results["layers"][str(layer)] = entry
        atomic_write_json(out_dir / "results.json", results)
    plot_ablation(results, out_dir / "ablation.png")
    return results


def paired_drops(out_dir: str | Path, n_boot: int = 2000) -> list[dict[str, Any]]:
    """Each arm's accuracy drop against no ablation on the same problems, with a 95% paired bootstrap interval
    over problems and the counts of problems lost and won, from an ``rpe ablate`` output folder.

    Returns:
        One dict per arm folder (``layer``, ``arm``, ``n``, ``accuracy``, ``drop``, ``low``, ``high``, ``lost``,
        ``won``), sorted by layer and arm.
    """
    from rpe.metrics import paired_difference

    out_dir = Path(out_dir)

    def rewards(folder: Path) -> dict[str, float]:
        return {t.problem_id: t.reward for t in read_trajectories(folder)}

    def paired(a: dict[str, float], b: dict[str, float]) -> tuple[np.ndarray, float, float]:
        shared = sorted(set(a) & set(b))  # one entry per problem
        d = np.array([a[i] - b[i] for i in shared])
        _, lo, hi = paired_difference([a[i] for i in shared], [b[i] for i in shared], n_boot=n_boot)
        return d, lo, hi

    base = rewards(out_dir / "baseline")
    rows = []
    arms = [p for layer in out_dir.glob("layer*") for p in layer.iterdir() if (p / "manifest.json").exists()]
    for arm in sorted(arms, key=lambda p: (int(p.parent.name.removeprefix("layer")), p.name)):
        got = rewards(arm)
        d, lo, hi = paired(base, got)
        row = {"layer": int(arm.parent.name.removeprefix("layer")), "arm": arm.name, "n": len(d),
               "accuracy": float(np.mean(list(got.values()))), "drop": float(d.mean()), "low": lo, "high": hi,
               "lost": int((d > 0).sum()), "won": int((d < 0).sum())}
        if arm.name == "value":  # the claim: value neurons matter more than their controls, same problems
            for control in sorted(p for p in arm.parent.iterdir() if p.name != "value" and (p / "manifest.json").exists()):
                c, clo, chi = paired(rewards(control), got)
                row[f"vs {control.name}"] = {"diff": float(c.mean()), "low": clo, "high": chi}
        rows.append(row)
    return rows


def summarise(arms: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per source: mean accuracy and drop over its seeds, the min and max drop, and the Wilson interval of the
    accuracy pooled over its seeds (``ci95``)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for name, r in arms.items():
        by.setdefault(name.split("/")[0], []).append(r)
    out = {}
    for source, rs in by.items():
        drops = [r["drop"] for r in rs]
        correct = sum(round(r["accuracy"] * r["n"]) for r in rs)
        out[source] = {"accuracy": float(np.mean([r["accuracy"] for r in rs])), "drop": float(np.mean(drops)),
                       "drop_min": float(min(drops)), "drop_max": float(max(drops)), "n_sets": len(rs),
                       "ci95": list(wilson_interval(correct, sum(r["n"] for r in rs)))}
    return out


def plot_ablation(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(int(k) for k in results["layers"])
    sources = sorted({s for e in results["layers"].values() for s in e["summary"]})
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    step = min(np.diff(layers)) if len(layers) > 1 else 1
    for i, s in enumerate(sources):
        rows = [results["layers"][str(layer)]["summary"].get(s) for layer in layers]
        acc = np.array([r["accuracy"] if r else np.nan for r in rows])
        lo = np.array([r["accuracy"] - r["ci95"][0] if r and "ci95" in r else 0.0 for r in rows])
        hi = np.array([r["ci95"][1] - r["accuracy"] if r and "ci95" in r else 0.0 for r in rows])
        x = np.array(layers) + step * 0.06 * (i - (len(sources) - 1) / 2)  # side by side at each layer
        ax.errorbar(x, acc, yerr=[lo, hi], marker="o", capsize=3, label=s)
    base = results["baseline"]
    ax.axhline(base["accuracy"], color="black", ls="--", lw=1, label="no ablation")
    if "ci95" in base:
        ax.axhspan(*base["ci95"], color="black", alpha=0.08, lw=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"ablating {results['n_neurons']} neurons per set (95% Wilson intervals, pooled over seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rpe_causal_check(model, tok, bundle, rollouts: str | Path, *, shares=(0.05, 0.1, 0.2), upstream: int = 4,
                     seeds: int = 3, threshold: float = 0.3, max_trajectories: int = 200,
                     ranking: torch.Tensor | None = None) -> dict[str, Any]:
    """Spearman(dopamine activity, MC TD error) on surprising steps with a share of upstream value-ranked
    neurons ablated vs the same count of random ones. Needs ``rpe dopamine`` to have run (MC values cached in
    the rollout folder, dopamine neurons in the bundle).

    Args:
        ranking: (d,) neuron order at the ablation layer, most value-bearing first; by default a dense TD(0)
            probe is fitted there on the rollouts and its first-layer L1 norms give the order.
    """
    from scipy.stats import spearmanr

    from rpe.dopamine import DopamineConfig
    from rpe.probe import td_errors
    from rpe.probe import ProbeConfig, ValueProbe

    if bundle.dopamine_neurons.numel() == 0:
        raise ValueError("the bundle has no dopamine neurons; run `rpe dopamine` first")
    rollouts = Path(rollouts)
    mc_path = rollouts / "mc_values.json"
    if not mc_path.exists():
        raise ValueError(f"{mc_path} is missing; run `rpe dopamine --rollouts {rollouts}` first")
    stored = json.loads(mc_path.read_text())
    values = {}
    for v in stored.values():
        values.update(v)
    trajs = [t for t in read_trajectories(rollouts) if t.steps and t.trajectory_id in values][:max_trajectories]
    gamma = DopamineConfig().gamma
    la = bundle.layer - upstream
    if la < 0:
        raise ValueError(f"upstream={upstream} puts the ablation before layer 0")
    states = capture_states(model, trajs, [la], pad_token_id=tok.pad_token_id or 0)
    if ranking is None:
        ranking = torch.argsort(ValueProbe(ProbeConfig()).fit(states, la).neuron_scores(), descending=True)
    d = states.acts[la].shape[1]
    massive = set(massive_dims(states.acts[la]))
    mean, std = bundle.dopamine_stats()

    def spearman(neurons: torch.Tensor | None) -> float:
        with NeuronAblation(model, {la: neurons}) if neurons is not None else contextlib.nullcontext():
            st = capture_states(model, trajs, [bundle.layer], mode="steps", neurons=bundle.dopamine_neurons,
                                pad_token_id=tok.pad_token_id or 0)
        rows = (st.step_index >= 1).nonzero().flatten()
        act = ((st.acts[bundle.layer][rows] - mean) / std * bundle.dopamine_sign).mean(1).numpy()
        delta = np.array([td_errors(v := values[st.trajectory_ids[int(st.traj_index[r])]], gamma, reward=v[-1])[int(st.step_index[r]) - 1]
                          for r in rows])
        keep = np.abs(delta) > threshold
        return float(spearmanr(act[keep], delta[keep]).statistic)

    out: dict[str, Any] = {"ablation_layer": la, "dopamine_layer": bundle.layer, "baseline": spearman(None),
                           "massive_dims": sorted(massive), "shares": {}}
    for share in shares:
        n = max(1, round(share * d))
        value_rho = spearman(ranking[:n])
        rand = [spearman(random_set(d, n, seed=3000 + s, exclude=massive | set(ranking[:n].tolist()))) for s in range(seeds)]
        out["shares"][str(share)] = {"n_neurons": n, "value": value_rho, "random_mean": float(np.mean(rand)),
                                     "random": rand, "drop_value": out["baseline"] - value_rho,
                                     "drop_random": out["baseline"] - float(np.mean(rand))}
    return out


__all__ = ["AblateConfig", "neuron_sets", "paired_drops", "plot_ablation", "rpe_causal_check", "run_ablation",
           "summarise"]
