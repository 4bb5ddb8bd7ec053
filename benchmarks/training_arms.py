"""Helpers of the training benchmarks (dense_credit.py, prompt_selection.py): held-out rewards per problem and the
paired difference of two arms' accuracies over seeds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def per_problem_rewards(folder: Path) -> dict[str, float]:
    """Reward of each held-out problem in an evaluation folder (one sample per problem)."""
    from rpe.records import read_trajectories

    return {t.problem_id: float(t.reward) for t in read_trajectories(folder)}


def paired_accuracy_difference(arm: list[dict[str, float]], base: list[dict[str, float]], n_boot: int, seed: int) -> dict:
    """Mean accuracy difference arm - base, paired by problem within each seed (a seed's arms share its held-out
    problems, which exclude that seed's training questions), with a bootstrap interval that resamples problems
    within each seed."""
    per_seed = []
    for a, b in zip(arm, base, strict=True):
        common = sorted(set(a) & set(b))
        per_seed.append(np.array([a[p] - b[p] for p in common]))
    rng = np.random.default_rng(seed)
    mean = float(np.mean(np.concatenate(per_seed)))
    boots = [np.mean(np.concatenate([d[rng.integers(0, len(d), len(d))] for d in per_seed])) for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"diff": mean, "low": float(lo), "high": float(hi), "n_pairs": int(sum(len(d) for d in per_seed))}


def recipe_overrides(pairs: dict[str, object]) -> list[str]:
    """``--key value`` recipe overrides of the ``pairs`` whose value is set (not None)."""
    return [x for flag, value in pairs.items() if value is not None for x in (flag, str(value))]


def run_arms(args, arms: dict, results: dict, results_path: Path, *,
             overrides_for: Callable[[str], list[str]], record: Callable[..., dict]) -> None:
    """Train every arm of ``args.arms`` for every seed of ``args.seeds`` (all arms of a seed before the next seed,
    so a run cut short stays balanced), skipping runs ``results`` holds already, and save ``results`` after each.

    Args:
        arms: ``{arm: (recipe file, extra overrides, label)}``.
        overrides_for: the benchmark's own overrides for a recipe file.
        record: ``record(out, outcome, wall_seconds, train_args)``, what a run keeps.
    """
    import json
    import logging
    import time

    from rpe.trainers.recipes import parse_recipe, train

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for seed in args.seeds:
        for arm in args.arms:
            key = f"{arm}/seed{seed}"
            if key in results["runs"]:
                continue
            recipe, extra, _ = arms[arm]
            out = args.out / arm / f"seed{seed}"
            overrides = ["--bundle", args.bundle, "--output_dir", str(out), "--max_steps", str(args.max_steps),
                         "--seed", str(seed), "--eval_before_dir", str(args.out / "eval_before" / f"seed{seed}"), *extra,
                         *overrides_for(recipe)]
            rpe_args, train_args, model_args = parse_recipe(recipes / recipe, overrides)
            start = time.perf_counter()
            outcome = train(rpe_args, train_args, model_args)
            results["runs"][key] = record(out, outcome, time.perf_counter() - start, train_args)
            results.setdefault("before", {})[f"seed{seed}"] = per_problem_rewards(args.out / "eval_before" / f"seed{seed}")
            args.out.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=1, default=str))
            logging.info("%s done: %s", key, outcome.summary.get("eval_after"))
