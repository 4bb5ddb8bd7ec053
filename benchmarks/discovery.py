"""Regenerate the discovery results (docs/results.md) (value and dopamine neurons) in one command.

    python benchmarks/discovery.py --model smollm2-135m-instruct --task chain_sum_mix --n 800 --samples 2 --out runs/mix

Steps (each resumable / cached): rollouts (activations captured during generation) -> cross-validated fit (layer
sweep, pruning curve, controls, value beyond difficulty, every probe family x target) -> dopamine neurons vs
random sets (``--dopamine-trajectories 0`` skips it). Writes OUT/discovery.json, OUT/discovery.png and prints the
Markdown tables of docs/results.md. ``--tables-only`` reprints them from OUT/bundle.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from rpe.dopamine import DopamineConfig, dopamine_from_rollouts
from rpe.difficulty import difficulty_from_run
from rpe.fit import FitConfig, fit_bundle
from rpe.models import load_model
from rpe.records import read_trajectories
from rpe.rollouts import RolloutConfig, collect_rollouts


def fmt(m: dict) -> str:
    point = m.get("auroc", m.get("diff"))
    return f"{point:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def tables(m: dict) -> str:
    """The Markdown tables of docs/results.md from a bundle's metrics."""
    out = []
    h = m["headline_cv"]
    out.append(f"| AUROC ({m['folds']}-fold CV by problem, 95% CI) | at s_0 | reading | at final step | reading |")
    out.append("|---|---|---|---|---|")
    for name in h["s0"]:
        out.append(f"| {name} | {fmt(h['s0'][name])} | {h['s0'][name]['verdict']} | {fmt(h['final'][name])} | "
                   f"{h['final'][name]['verdict']} |")
    b = m.get("beyond_difficulty") or {}
    if b:
        out.append("\n| value beyond difficulty | at s_0 | at final step |\n|---|---|---|")
        for name in b["within_strata_s0"]:
            out.append(f"| {name}, within difficulty strata | {fmt(b['within_strata_s0'][name])} | {fmt(b['within_strata_final'][name])} |")
        for key in ("residualised_all_neurons", "residualised_value_neurons"):
            out.append(f"| {key.replace('_', ' ')} (difficulty regressed out) | {fmt(b[key]['s0'])} | {fmt(b[key]['final'])} |")
        out.append("\n| stratum | trajectories | accuracy | AUROC s_0 value neurons | AUROC s_0 all neurons |\n|---|---|---|---|---|")
        for r in b["per_stratum"]:
            out.append(f"| {r['stratum']} | {r['n_trajectories']} | {r['accuracy']:.3f} | {r['auroc_s0_value_neurons']:.3f} | "
                       f"{r['auroc_s0_all_neurons']:.3f} |")
    out.append("\n| neurons kept | neurons | refit | AUROC s_0 | AUROC final |\n|---|---|---|---|---|")
    for r in m["pruning_curve"]:
        out.append(f"| {r['frac']:g} | {r['n_neurons']} | {r.get('refit_family', '-')} | {fmt(r['s0'])} | {fmt(r['final'])} |")
    sp = m.get("sparsity")
    if sp:
        out.append(f"\n| selection (ranked inside each fold) | kept | AUROC s_0 | minus all neurons | minus {sp['n_draws']} random "
                   "sets (rank) | AUROC final | minus all neurons | minus random sets (rank) |\n|---|---|---|---|---|---|---|---|")
        for r in sp["rows"]:
            cells = []
            for w in ("s0", "final"):
                vr = r["vs_random"][w]
                cells += [fmt(r[w]), fmt(r["vs_all"][w]), f"{fmt(vr)} ({vr['rank']} of {vr['n_draws']} reach it; "
                          f"random mean {vr['random_mean']:.3f})"]
            out.append(f"| {r['method']} | {r['frac']:g} ({r['k']}) | " + " | ".join(cells) + " |")
        mm = sp.get("matched")
        if mm:
            out.append(f"\nMagnitude-matched random sets of {mm['k']} ({mm['method']}): " + "; ".join(
                f"{w} random mean {mm[w]['random_mean']:.3f}, selected minus them {fmt(mm[w])}, {mm[w]['rank']} of "
                f"{mm[w]['n_draws']} reach it" for w in ("s0", "final")) + ".")
    if m.get("probe_families"):
        out.append("\n| probe | target | neurons | AUROC s_0 (95% CI) | AUROC final | AUROC all states |\n|---|---|---|---|---|---|")
        for r in m["probe_families"]:
            kept = "all" if r["frac"] == 1.0 else f"{r['frac']:g}"
            out.append(f"| {r['family']} | {r['target']} | {kept} | {fmt(r['s0'])} | "
                       f"{r['cv_auroc_final']:.3f} | {r['cv_auroc_all']:.3f} |")
    out.append("\n| layer | inner-validation AUROC (chooses) | CV AUROC s_0 | CV AUROC final |\n|---|---|---|---|")
    for k in sorted(m["layer_sweep"], key=int):
        v = m["layer_sweep"][k]
        out.append(f"| {k} | {v['val_auroc_all']:.3f} | {v['cv_auroc_s0']:.3f} | {v['cv_auroc_final']:.3f} |")
    if m.get("by_step"):
        out.append("\n| step | states | AUROC of V(s_t) (value neurons) | mean V correct - incorrect |\n|---|---|---|---|")
        for r in m["by_step"]:
            out.append(f"| {r['step']} | {r['n']} | {fmt(r)} | {r['gap']:.3f} [{r['gap_low']:.3f}, {r['gap_high']:.3f}] |")
    st = m.get("value_neuron_stability")
    if st:
        out.append(f"\nValue-neuron sets across folds: IoU with the bundle's set {st['iou_fold_vs_bundle_mean']:.3f}, between "
                   f"folds {st['iou_between_folds_mean']:.3f} (chance {st['chance_iou']:.3f}).")
    return "\n".join(out)


def save_plots(m: dict, out: Path) -> None:
    """OUT/pruning_curve.png and OUT/layer_sweep.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    curve = m["pruning_curve"]
    for key, label in (("cv_auroc_s0", "V(s_0)"), ("cv_auroc_final", "V(final step)")):
        axes[0].plot([r["frac"] for r in curve], [r[key] for r in curve], marker="o", label=label)
    control = {r["frac"]: r for r in (m.get("sparsity") or {}).get("rows", []) if r["method"] == "first_layer_norm"}
    if control:
        fr = sorted(control)
        for w, label in (("s0", "random sets (logistic refit), s_0"), ("final", "random sets (logistic refit), final")):
            axes[0].plot(fr, [control[f]["vs_random"][w]["random_mean"] for f in fr], ls=":", marker="x", label=label)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("fraction of neurons kept (layer %d)" % m["best_layer"])
    axes[0].set_ylabel("cross-validated AUROC")
    axes[0].set_title("pruning curve (neurons ranked inside each fold)")
    layers = sorted(int(k) for k in m["layer_sweep"])
    axes[1].plot(layers, [m["layer_sweep"][str(k)]["val_auroc_all"] for k in layers], marker="o", label="inner validation (chooses)")
    axes[1].plot(layers, [m["layer_sweep"][str(k)]["cv_auroc_s0"] for k in layers], marker="o", label="CV, s_0")
    axes[1].plot(layers, [m["layer_sweep"][str(k)]["cv_auroc_final"] for k in layers], marker="o", label="CV, final")
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("AUROC")
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
    ap.add_argument("--task", default="chain_sum_mix")
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--capture-layers", default="0,2,4,5,6,8,10,12,14,16,18,20,22,24,26,27,28,29")
    ap.add_argument("--continuations", type=int, default=4)
    ap.add_argument("--dopamine-trajectories", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--shots", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--tables-only", action="store_true", help="reprint the tables from OUT/bundle")
    ap.add_argument("--out", type=Path, default=Path("runs/mix"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.tables_only:
        print(tables(json.loads((args.out / "bundle" / "bundle.json").read_text())["metrics"]))
        return

    model, tok = load_model(args.model)
    from rpe.prompts import PromptConfig
    from rpe.sampling import SamplingConfig
    from rpe.store import StateSet

    layers = [int(x) for x in args.capture_layers.split(",")]
    rcfg = RolloutConfig(task=args.task, n_problems=args.n, samples=args.samples, batch_size=args.batch_size,
                         prompt=PromptConfig(shots=args.shots), capture_layers=layers,
                         sampling=SamplingConfig(max_new_tokens=args.max_new_tokens))
    res = collect_rollouts(model, tok, rcfg, args.out, model_name=args.model)
    logging.info("rollouts: %d, accuracy %.3f", res.n_trajectories, res.accuracy)
    trajs = read_trajectories(args.out)
    states = StateSet.load(args.out / "states.safetensors")
    bundle, states = fit_bundle(model, tok, trajs, FitConfig(compare_probes=True), model_name=args.model, states=states,
                                difficulty=difficulty_from_run(args.out, trajs), progress=logging.info)
    if args.dopamine_trajectories:
        dcfg = DopamineConfig(n_continuations=args.continuations, threshold=args.threshold,
                              max_new_tokens=min(96, args.max_new_tokens))
        dopamine_from_rollouts(model, tok, args.out, bundle, dcfg, max_trajectories=args.dopamine_trajectories,
                               progress=lambda a, b: logging.info("MC values %d/%d", a, b))
    bundle.save(args.out / "bundle")
    save_plots(bundle.metrics, args.out)
    (args.out / "discovery.json").write_text(json.dumps({"rollouts": res.manifest, "fit": bundle.metrics}, indent=2, default=str))
    m = bundle.metrics
    print(f"\n{args.model} on {args.task}: {res.n_trajectories} trajectories, accuracy {res.accuracy:.3f}, "
          f"best layer {m['best_layer']}\n")
    print(tables(m))
    if "dopamine" in m:
        d = m["dopamine"]
        print(f"\nDopamine: held-out Spearman {d['test_spearman_dopamine']:.3f} vs random mean "
              f"{d['test_spearman_random_mean']:.3f} (95th pct {d['test_spearman_random_q95']:.3f}), {d['n_surprising']} surprising steps")


if __name__ == "__main__":
    main()
