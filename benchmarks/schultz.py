"""The Schultz test during training: does the internal RPE move from the reward to the earliest predictive step?

Schultz, Dayan and Montague (1997) saw the dopamine burst move from the reward to the earliest cue that predicts it
as learning proceeds. `RPECallback` logs the mean internal RPE by step position (`rpe/rpe_step1`, ...) and at reward
delivery (`rpe/rpe_terminal`) at every logging step. This script draws them over training, beside the training
reward, from a run's `log_history.json` (written by `rpe train`), with 95% intervals over the logging steps of each
window (mean +- 1.96 standard errors), and prints the first and last window.

    rpe train --config recipes/grpo_rpe_reward.yaml --bundle runs/mix/bundle --output_dir runs/schultz
    python benchmarks/schultz.py --log runs/schultz/log_history.json --out runs/schultz/schultz.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

KEYS = [f"rpe/rpe_step{k}" for k in range(1, 7)] + ["rpe/rpe_terminal"]


def windows(history: list[dict], key: str, width: int) -> list[tuple[int, float, float]]:
    """``(last step, mean, half-width of the 95% interval)`` of ``key`` over consecutive windows of logging steps."""
    rows = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float)) and np.isfinite(h[key])]
    out = []
    for i in range(0, len(rows) - width + 1, width):
        chunk = np.array([v for _, v in rows[i : i + width]])
        out.append((rows[i + width - 1][0], float(chunk.mean()), float(1.96 * chunk.std(ddof=1) / np.sqrt(len(chunk)))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", type=Path, required=True, help="log_history.json of a run with RPECallback")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--window", type=int, default=10, help="logging steps per point")
    args = ap.parse_args()
    history = [h for h in json.loads(args.log.read_text()) if "step" in h]
    reward_key = next((k for k in ("rewards/correct/mean", "reward") if any(k in h for h in history)), None)
    present = [k for k in KEYS if any(isinstance(h.get(k), (int, float)) for h in history)]
    if not present:
        raise SystemExit(f"{args.log} has no rpe/rpe_step* keys: train with RPECallback (rpe >= this release)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in present:
        pts = windows(history, key, args.window)
        if pts:
            x, m, h = map(np.array, zip(*pts))
            ax.errorbar(x, m, yerr=h, marker="o", capsize=2, label=key.removeprefix("rpe/rpe_"))
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean internal RPE")
    ax.set_title(f"internal RPE by step position ({args.window}-step windows, 95% CI)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    if reward_key:
        pts = windows(history, reward_key, args.window)
        if pts:
            x, m, h = map(np.array, zip(*pts))
            ax_r.errorbar(x, m, yerr=h, marker="o", capsize=2, color="black")
        ax_r.set_title(f"training reward ({reward_key})", fontsize=9)
        ax_r.set_xlabel("training step")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    for key in present + ([reward_key] if reward_key else []):
        pts = windows(history, key, args.window)
        if len(pts) >= 2:
            (s0, m0, h0), (s1, m1, h1) = pts[0], pts[-1]
            print(f"{key}: steps <= {s0}: {m0:+.3f} +- {h0:.3f}; steps <= {s1}: {m1:+.3f} +- {h1:.3f}")


if __name__ == "__main__":
    main()
