"""Dense internal credit against GRPO and its random-direction control, several seeds, one command.

    python benchmarks/dense_credit.py --bundle runs/demo/bundle --out runs/dense_std --seeds 0 1 2 --max-steps 30 \
        --dense-scale batch_std --dense-weight 0.5 --dense-clip 2.0 --arms grpo dense dense_random internal_critic

Arms (recipes/, same task, budget, seeds and held-out problems; only the advantage differs):

- ``grpo``: GRPO on the verifiable reward (recipes/grpo_baseline.yaml);
- ``dense``: GRPO + 0.1 x clip(the model's own per-step TD error) on each step's tokens (recipes/grpo_dense_rpe.yaml);
- ``dense_random``: the same through a random probe direction of the same norm (the control: does any dense
  term help, or this one?);
- ``internal_critic`` (``--arms`` to add it): the internal-critic PPO (recipes/internal_critic.yaml).

``--dense-scale batch_std --dense-weight 0.5 --dense-clip 2`` puts the dense term on the scale of GRPO's
advantages (the credit divided by its spread over the batch; the control by its own).

Held-out accuracy after training (100 problems of a disjoint seed, excluding the seed's training questions, so
the arms of one seed share their problems), pooled over seeds: the mean, and each arm's difference from ``grpo``
paired by problem within each seed, with a bootstrap interval that resamples problems within seeds. The
before-training evaluation is shared by the arms of a seed. Also the training reward of the first and last 10 steps, seconds per step (wall clock
of ``train``, evaluations excluded) and the prefix-contamination numbers the dense trainer logs. Writes
OUT/dense_results.json (resumable: finished runs are kept) and prints Markdown tables; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from training_arms import paired_accuracy_difference, per_problem_rewards, recipe_overrides, run_arms

ARMS = {
    "grpo": ("grpo_baseline.yaml", [], "GRPO (verifiable reward)"),
    "dense": ("grpo_dense_rpe.yaml", [], "GRPO + dense internal credit (value differences)"),
    "dense_random": ("grpo_dense_rpe.yaml", ["--dense_source", "random_direction"],
                     "control: dense credit from a random probe direction of the same norm"),
    "internal_critic": ("internal_critic.yaml", [], "internal-critic PPO"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/demo/bundle")
    ap.add_argument("--out", type=Path, default=Path("runs/dense"))
    ap.add_argument("--arms", nargs="*", default=["grpo", "dense", "dense_random"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--dense-scale", choices=["raw", "batch_std"], default=None,
                    help="dense arms' dense_scale (default: the recipe's, raw)")
    ap.add_argument("--dense-weight", type=float, default=None, help="dense arms' dense_weight (default: the recipe's)")
    ap.add_argument("--dense-clip", type=float, default=None, help="dense arms' dense_clip (default: the recipe's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from rpe.bench.machine import machine_info
    from rpe.metrics import wilson_interval

    results_path = args.out / "dense_results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}
    results["machine"] = machine_info()
    dense_overrides = dense_options(args)
    results["dense_overrides"] = dense_overrides

    def record(out: Path, outcome, wall: float, train_args) -> dict:
        history = json.loads((out / "log_history.json").read_text())
        steps = [h for h in history if "rewards/correct/mean" in h]
        train_seconds = sum(h.get("step_time", 0.0) for h in steps) or None
        return {
            "summary": outcome.summary, "wall_seconds": wall,
            "seconds_per_step": (train_seconds / len(steps)) if train_seconds else None,
            "reward_first10": float(np.mean([h["rewards/correct/mean"] for h in steps[:10]])),
            "reward_last10": float(np.mean([h["rewards/correct/mean"] for h in steps[-10:]])),
            "credit_before_error": _mean(steps, "dense/credit_before_error"),
            "credit_after_error": _mean(steps, "dense/credit_after_error"),
            "after": per_problem_rewards(out / "eval_after"),
        }

    run_arms(args, ARMS, results, results_path, record=record,
             overrides_for=lambda recipe: dense_overrides if recipe == "grpo_dense_rpe.yaml" else [])

    before = results["before"]
    b_k, b_n = int(sum(sum(r.values()) for r in before.values())), sum(len(r) for r in before.values())
    lo, hi = wilson_interval(b_k, b_n)
    print(f"\nheld-out accuracy before training, pooled over seeds: {b_k / b_n:.3f} [{lo:.3f}, {hi:.3f}] (n={b_n})\n")
    print("| arm | seeds | held-out accuracy after, pooled (95% CI) | minus GRPO (95% CI over problems) | "
          "reward, first 10 steps | last 10 | s / step |")
    print("|---|---|---|---|---|---|---|")
    table = {}
    for arm in args.arms:
        runs = [results["runs"][f"{arm}/seed{s}"] for s in args.seeds if f"{arm}/seed{s}" in results["runs"]]
        if not runs:
            continue
        k = sum(sum(r["after"].values()) for r in runs)
        n = sum(len(r["after"]) for r in runs)
        lo, hi = wilson_interval(int(k), n)
        both = [s for s in args.seeds if f"{arm}/seed{s}" in results["runs"] and f"grpo/seed{s}" in results["runs"]]
        diff = (paired_accuracy_difference([results["runs"][f"{arm}/seed{s}"]["after"] for s in both],
                                  [results["runs"][f"grpo/seed{s}"]["after"] for s in both], args.n_boot, 0)
                if arm != "grpo" and both else None)
        sps = [r["seconds_per_step"] for r in runs if r["seconds_per_step"]]
        table[arm] = {"seeds": len(runs), "accuracy": k / n, "ci95": [lo, hi], "minus_grpo": diff,
                      "reward_first10": float(np.mean([r["reward_first10"] for r in runs])),
                      "reward_last10": float(np.mean([r["reward_last10"] for r in runs])),
                      "seconds_per_step": float(np.mean(sps)) if sps else None,
                      "credit_before_error": _nanmean([r["credit_before_error"] for r in runs]),
                      "credit_after_error": _nanmean([r["credit_after_error"] for r in runs])}
        d = f"{diff['diff']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]" if diff else "-"
        t = table[arm]
        print(f"| {ARMS[arm][2]} | {len(runs)} | {k / n:.3f} [{lo:.3f}, {hi:.3f}] | {d} | {t['reward_first10']:.2f} | "
              f"{t['reward_last10']:.2f} | {t['seconds_per_step'] or float('nan'):.1f} |")
    if "dense" in table and "dense_random" in table:
        both = [s for s in args.seeds if f"dense/seed{s}" in results["runs"] and f"dense_random/seed{s}" in results["runs"]]
        table["dense"]["minus_control"] = paired_accuracy_difference(
            [results["runs"][f"dense/seed{s}"]["after"] for s in both],
            [results["runs"][f"dense_random/seed{s}"]["after"] for s in both], args.n_boot, 1)
        results["card"] = card_row(table, args)
        print(f"\ndense minus control: {_interval(table['dense']['minus_control'])}")
    results["table"] = table
    results_path.write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps({"benchmark": "dense_credit", "machine": results["machine"], "max_steps": args.max_steps,
                      "seeds": args.seeds, "table": table}))


def dense_options(args) -> list[str]:
    """The recipe overrides the dense arms (and their control) get from ``--dense-*``."""
    return recipe_overrides({"--dense_scale": args.dense_scale, "--dense_weight": args.dense_weight,
                             "--dense_clip": args.dense_clip})


def _interval(d: dict) -> str:
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def card_row(table: dict, args) -> dict:
    """The report card's row (read by benchmarks/report_card.py through previous_results.json)."""
    from rpe.report_card import INCONCLUSIVE, REPRODUCED

    dense, vs_grpo, vs_control = table["dense"], table["dense"]["minus_grpo"], table["dense"]["minus_control"]
    helps = vs_grpo["low"] > 0 and vs_control["low"] > 0
    seeds = len(args.seeds)
    return {
        "claim": "(beyond the paper) per-step internal RPE as dense credit in GRPO",
        "paper": "proposed as a use (internal RPE as an auxiliary reward), not measured",
        "measured": f"held-out accuracy {dense['accuracy']:.3f} [{dense['ci95'][0]:.3f}, {dense['ci95'][1]:.3f}] "
                    f"({seeds} seeds x 100 problems, {args.max_steps} LoRA steps); minus GRPO {_interval(vs_grpo)}",
        "control": f"random probe direction of the same norm {table['dense_random']['accuracy']:.3f}, dense minus it "
                   f"{_interval(vs_control)}; GRPO {table['grpo']['accuracy']:.3f}"
                   + (f"; internal-critic PPO {table['internal_critic']['accuracy']:.3f}, minus GRPO "
                      f"{_interval(table['internal_critic']['minus_grpo'])}" if "internal_critic" in table else ""),
        "verdict": REPRODUCED if helps else INCONCLUSIVE,
        "note": "above GRPO and above the control" if helps else
                "not distinguishable from GRPO or from the random-direction control at this budget",
        "command": f"python benchmarks/dense_credit.py --bundle {args.bundle} --out {args.out} --seeds "
                   f"{' '.join(map(str, args.seeds))} --max-steps {args.max_steps}"
                   + "".join(f" {a.replace('_', '-') if a.startswith('--') else a}" for a in dense_options(args))
                   + (f" --arms {' '.join(args.arms)}" if args.arms != ["grpo", "dense", "dense_random"] else ""),
    }


def _mean(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if h.get(key) is not None]
    return float(np.mean(values)) if values else None


def _nanmean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


if __name__ == "__main__":
    main()
