"""Print the report card (README, docs/results.md): value rows from a bundle fitted by the cross-validated
pipeline, the other claims from their result files or, where this session did not re-run them, from
benchmarks/previous_results.json (each row names its command).

    python benchmarks/report_card.py --bundle runs/mix/bundle > runs/mix/report_card.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rpe.report_card import ablation_row, ablation_summary, generic_row, markdown, value_rows

HERE = Path(__file__).parent


def paired_note(ablate_dir: Path) -> str:
    """Each arm's accuracy drop against no ablation on the same problems (paired bootstrap over problems)."""
    import numpy as np

    from rpe.metrics import cluster_resamples
    from rpe.rollouts import read_trajectories

    base = {t.problem_id: t.reward for t in read_trajectories(ablate_dir / "baseline")}
    parts = []
    for arm in sorted(p for layer in ablate_dir.glob("layer*") for p in layer.iterdir() if (p / "manifest.json").exists()):
        got = {t.problem_id: t.reward for t in read_trajectories(arm)}
        d = np.array([base[i] - got[i] for i in sorted(set(base) & set(got))])  # one entry per problem
        lo, hi = np.percentile([d[idx].mean() for idx in cluster_resamples(np.arange(len(d)), 2000)], [2.5, 97.5])
        parts.append(f"{arm.parent.name}/{arm.name} {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] (lost {(d > 0).sum()}, won {(d < 0).sum()})")
    return "paired drop vs no ablation on the same problems: " + "; ".join(parts) + ". A drop of the paper's size " \
        "(tens of points) would be far outside these intervals"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="bundle folder from `rpe fit`")
    ap.add_argument("--previous", type=Path, default=HERE / "previous_results.json")
    ap.add_argument("--ablation", type=Path, help="results.json of `rpe ablate` on this bundle (replaces the old row)")
    args = ap.parse_args()
    metrics = json.loads((args.bundle / "bundle.json").read_text())["metrics"]
    previous = json.loads(args.previous.read_text())
    rows = value_rows(metrics)
    if args.ablation:
        summary = ablation_summary(json.loads(args.ablation.read_text()), layer=metrics["best_layer"])
        summary["note"] = paired_note(args.ablation.parent)
        rows.append(ablation_row(summary))
    for key in ("ablation", "dopamine", "transfer", "search", "gemma_s0", "gemma_final"):
        if key == "ablation" and args.ablation:
            continue
        r = previous.get(key)
        rows.append(generic_row(r["claim"], r["paper"], r) if r else generic_row(key, "", None))
    print(markdown(rows))
    print()
    print("Commands: " + "; ".join(f"{k}: `{v['command']}`" for k, v in previous.items() if isinstance(v, dict)))


if __name__ == "__main__":
    main()
