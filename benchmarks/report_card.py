"""Print the report card (README, docs/results.md): value rows from a bundle fitted by the cross-validated
pipeline, the other claims from their result files or, where this session did not re-run them, from
benchmarks/previous_results.json (each row names its command).

    python benchmarks/report_card.py --bundle runs/mix/bundle > runs/mix/report_card.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rpe.report_card import ablation_row, ablation_summary, dopamine_row, generic_row, markdown, search_row, value_rows

HERE = Path(__file__).parent


def paired_note(ablate_dir: Path) -> str:
    """Each arm's accuracy drop against no ablation on the same problems (paired bootstrap over problems)."""
    from rpe.ablate import paired_drops

    parts = [f"layer{r['layer']}/{r['arm']} {r['drop']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] (lost {r['lost']}, "
             f"won {r['won']})" for r in paired_drops(ablate_dir)]
    return "paired drop vs no ablation on the same problems: " + "; ".join(parts) + ". A drop of the paper's size " \
        "(tens of points) would be far outside these intervals"


def ablation_table(ablate_dirs: list[Path]) -> str:
    """One Markdown row per arm of each ``rpe ablate`` folder: accuracy, paired drop with its interval."""
    from rpe.ablate import paired_drops

    out = ["| layer | neurons zeroed | set | held-out accuracy | paired drop vs none [95% CI] | lost / won | "
           "value drop minus control drop (paired) |", "|---|---|---|---|---|---|---|"]
    for d in ablate_dirs:
        k = json.loads((d / "results.json").read_text())["n_neurons"]
        for r in paired_drops(d):
            extra = "; ".join(f"{name.removeprefix('vs ').removesuffix('_0')} {v['diff']:+.3f} "
                              f"[{v['low']:+.3f}, {v['high']:+.3f}]" for name, v in r.items() if name.startswith("vs "))
            out.append(f"| {r['layer']} | {k} | {r['arm'].removesuffix('_0')} | {r['accuracy']:.3f} | "
                       f"{r['drop']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] | {r['lost']} / {r['won']} | {extra} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="bundle folder from `rpe fit`")
    ap.add_argument("--previous", type=Path, default=HERE / "previous_results.json")
    ap.add_argument("--ablation", type=Path, help="results.json of `rpe ablate` on this bundle (replaces the old row)")
    ap.add_argument("--search", type=Path, help="results JSON of `rpe search` on this bundle with the value, random "
                    "and greedy methods (replaces the old row)")
    ap.add_argument("--transfer", type=Path, help="transfer.json of benchmarks/transfer.py (replaces the old row)")
    ap.add_argument("--ablation-table", type=Path, nargs="*", default=[],
                    help="`rpe ablate` output folders: print their paired table (e.g. the 1%% and the 10%% runs)")
    args = ap.parse_args()
    if args.ablation_table:
        print(ablation_table(args.ablation_table))
        return
    metrics = json.loads((args.bundle / "bundle.json").read_text())["metrics"]
    previous = json.loads(args.previous.read_text())
    rows = value_rows(metrics)
    if args.ablation:
        summary = ablation_summary(json.loads(args.ablation.read_text()), layer=metrics["best_layer"])
        summary["note"] = paired_note(args.ablation.parent)
        rows.append(ablation_row(summary))
    if "dopamine" in metrics:  # `rpe dopamine` on this bundle
        rows.append(dopamine_row(metrics["dopamine"]))
    if args.search:
        rows.append(search_row(json.loads(args.search.read_text())))
    if args.transfer:
        r = json.loads(args.transfer.read_text())["card"]
        rows.append(generic_row(r["claim"], r["paper"], r))
    live = {"ablation": bool(args.ablation), "dopamine": "dopamine" in metrics, "search": bool(args.search),
            "transfer": bool(args.transfer)}
    for key in ("ablation", "dopamine", "transfer", "search", "gemma_s0", "gemma_final", "dense_credit",
                "prefix_contamination", "prompt_selection", "early_stop"):
        if live.get(key):
            continue
        r = previous.get(key)
        rows.append(generic_row(r["claim"], r["paper"], r) if r else generic_row(key, "", None))
    print(markdown(rows))
    print()
    print("Commands: " + "; ".join(f"{k}: `{v['command']}`" for k, v in previous.items() if isinstance(v, dict)))


if __name__ == "__main__":
    main()
