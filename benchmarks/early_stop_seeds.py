"""Early stopping over several seeds: `rpe early-stop` results pooled (one JSON per seed).

    for s in 0 1 2; do rpe early-stop --bundle runs/demo/bundle --rollouts runs/demo/rollouts --n-problems 64 \
        --samples 4 --threshold 0.15 --seed $s --problem-seed $((s + 1)) --out runs/early_stop/seed$s.json; done
    python benchmarks/early_stop_seeds.py runs/early_stop/seed*.json

Per arm (no stopping, the value rule, the random-probe control stopping as many samples), pooled over the seeds'
problems: accuracy with its Wilson interval, tokens per problem and the share saved against no stopping, and
the accuracy lost against no stopping and the value rule minus the control, paired by problem (bootstrap over
problems). Prints a Markdown table; the last line is JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def pooled(results: list[dict]) -> dict:
    """The pooled table of several `rpe early-stop` results (see the module docstring)."""
    from rpe.metrics import paired_difference, wilson_interval

    arms = {arm: {"correct": [], "tokens": []} for arm in results[0]["arms"]}
    for res in results:
        for arm, r in res["arms"].items():
            arms[arm]["correct"] += list(r["correct"])
            arms[arm]["tokens"] += list(r["tokens"])
    base = arms["none"]
    out = {"seeds": len(results), "n_problems": len(base["correct"]), "arms": {}}
    for arm, r in arms.items():
        k, n = sum(r["correct"]), len(r["correct"])
        lo, hi = wilson_interval(k, n)
        row = {"accuracy": k / n, "ci95": [lo, hi], "tokens_per_problem": float(np.mean(r["tokens"])),
               "tokens_saved": 1 - float(np.sum(r["tokens"]) / np.sum(base["tokens"]))}
        if arm != "none":
            row["accuracy_lost"] = list(paired_difference(base["correct"], r["correct"]))
        out["arms"][arm] = row
    if "value" in arms and "random_probe" in arms:
        out["value_minus_control"] = list(paired_difference(arms["value"]["correct"], arms["random_probe"]["correct"]))
    return out


def main() -> None:
    files = [Path(p) for p in sys.argv[1:]]
    if not files:
        sys.exit(__doc__)
    out = pooled([json.loads(p.read_text()) for p in files])
    print(f"{out['seeds']} seeds, {out['n_problems']} problems pooled\n")
    print("| arm | accuracy [95% Wilson] | tokens / problem | tokens saved | accuracy lost vs none [95% paired] |")
    print("|---|---|---|---|---|")
    for arm, r in out["arms"].items():
        lost = r.get("accuracy_lost")
        cell = f"{lost[0]:+.3f} [{lost[1]:+.3f}, {lost[2]:+.3f}]" if lost else "-"
        print(f"| {arm} | {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['tokens_per_problem']:.1f} | "
              f"{r['tokens_saved']:.1%} | {cell} |")
    if "value_minus_control" in out:
        d = out["value_minus_control"]
        print(f"\nvalue rule minus random-probe control: {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
