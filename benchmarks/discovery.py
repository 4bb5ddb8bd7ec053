"""Regenerate the README's discovery results (issue: value and dopamine neurons) in one command.

    python benchmarks/discovery.py --model smollm2-135m-instruct --task chain_sum --n 200 --samples 2 --out runs/results

Steps (each resumable / cached): rollouts -> fit (TD(0), layer sweep, pruning curve, controls) -> TD(0) vs MC on
the best layer -> dopamine neurons vs random sets. Writes OUT/discovery.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from rpe.dopamine import DopamineConfig, dopamine_from_rollouts
from rpe.fit import FitConfig, fit_bundle, td_vs_mc
from rpe.models import load_model
from rpe.probe import ProbeConfig
from rpe.rollouts import RolloutConfig, collect_rollouts, read_trajectories


def fmt(m: dict) -> str:
    return f"{m['auroc']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def save_plots(m: dict, out: Path) -> None:
    """OUT/pruning_curve.png and OUT/layer_sweep.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    curve = m["pruning_curve"]
    for key, label in (("test_auroc_s0", "V(s_0)"), ("test_auroc_final", "V(final step)")):
        axes[0].plot([r["frac"] for r in curve], [r[key] for r in curve], marker="o", label=label)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("fraction of neurons kept (layer %d)" % m["best_layer"])
    axes[0].set_ylabel("test AUROC")
    axes[0].set_title("pruning curve")
    layers = sorted(int(k) for k in m["layer_sweep"])
    axes[1].plot(layers, [m["layer_sweep"][str(k)]["val_auroc_all"] for k in layers], marker="o", label="validation")
    axes[1].plot(layers, [m["layer_sweep"][str(k)]["test_auroc_all"] for k in layers], marker="o", label="test")
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("AUROC, all states")
    axes[1].set_title("layer sweep (dense probe)")
    for ax in axes:
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "discovery.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="chain_sum")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--layer-stride", type=int, default=2)
    ap.add_argument("--continuations", type=int, default=4)
    ap.add_argument("--dopamine-trajectories", type=int, default=200)
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--shots", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("runs/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    model, tok = load_model(args.model)
    rollouts = args.out / "rollouts"
    from rpe.prompts import PromptConfig
    from rpe.rollouts import SamplingConfig

    rcfg = RolloutConfig(task=args.task, n_problems=args.n, samples=args.samples, prompt=PromptConfig(shots=args.shots),
                         sampling=SamplingConfig(max_new_tokens=args.max_new_tokens))
    res = collect_rollouts(model, tok, rcfg, rollouts, model_name=args.model)
    logging.info("rollouts: %d, accuracy %.3f", res.n_trajectories, res.accuracy)
    trajs = read_trajectories(rollouts)
    bundle, states = fit_bundle(model, tok, trajs, FitConfig(layer_stride=args.layer_stride), model_name=args.model,
                                progress=logging.info)
    td_mc = td_vs_mc(states, bundle.layer, ProbeConfig())
    bundle.metrics["td_vs_mc"] = td_mc
    dcfg = DopamineConfig(n_continuations=args.continuations, threshold=args.threshold,
                          max_new_tokens=min(96, args.max_new_tokens))
    dres = dopamine_from_rollouts(model, tok, rollouts, bundle, dcfg, max_trajectories=args.dopamine_trajectories,
                                  progress=lambda a, b: logging.info("MC values %d/%d", a, b))
    bundle.save(args.out / "bundle")
    save_plots(bundle.metrics, args.out)
    summary = {"rollouts": res.manifest, "fit": bundle.metrics}
    (args.out / "discovery.json").write_text(json.dumps(summary, indent=2, default=str))

    m = bundle.metrics
    h = m["headline_test"]
    print(f"\n{args.model} on {args.task}: {res.n_trajectories} trajectories, accuracy {res.accuracy:.3f}, best layer {m['best_layer']}\n")
    print("| AUROC (test split, 95% CI) | at s_0 | at final step |\n|---|---|---|")
    for name in h["s0"]:
        print(f"| {name} | {fmt(h['s0'][name])} | {fmt(h['final'][name])} |")
    print("\n| neurons kept | " + " | ".join(f"{r['frac']:g}" for r in m["pruning_curve"]) + " |")
    print("|---|" + "---|" * len(m["pruning_curve"]))
    print("| test AUROC s_0 | " + " | ".join(f"{r['test_auroc_s0']:.3f}" for r in m["pruning_curve"]) + " |")
    print("| test AUROC final | " + " | ".join(f"{r['test_auroc_final']:.3f}" for r in m["pruning_curve"]) + " |")
    print("\n| target | AUROC s_0 | AUROC final | AUROC all states | Brier |\n|---|---|---|---|---|")
    for target, v in td_mc.items():
        print(f"| {target} | {v['test_auroc_s0']:.3f} | {v['test_auroc_final']:.3f} | {v['test_auroc_all']:.3f} | {v['test_brier']:.3f} |")
    d = dres.metrics
    print(f"\n| Spearman with RPE (held-out steps, |delta| > {args.threshold}) | value |\n|---|---|")
    print(f"| dopamine neurons ({d['n_neurons']}) | {d['test_spearman_dopamine']:.3f} |")
    print(f"| random neurons, same count (mean of {dcfg.n_random}) | {d['test_spearman_random_mean']:.3f} |")
    print(f"| random neurons, 95th percentile | {d['test_spearman_random_q95']:.3f} |")


if __name__ == "__main__":
    main()
