"""Regenerate the training results (docs/results.md) (issue: TRL integration) in one command.

    python benchmarks/train_curves.py --bundle runs/results/bundle --out runs/train

Runs the three recipes (GRPO baseline, GRPO + RPE auxiliary reward, internal-critic PPO) one after the other,
same seed and budget, sharing the before-training evaluation; then, per arm, asks whether the value subsystem
survives fine-tuning: the pre-training bundle applied to the trained model's held-out rollouts (AUROC without
refitting), a dense probe refitted on those rollouts, and the IoU of its top value neurons with the old set vs
chance. The control for the IoU is the same refit on the *untrained* model's held-out rollouts.
Writes OUT/train_results.json and OUT/train_curves.png and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

ARMS = {"grpo_baseline": "GRPO (verifiable reward)", "grpo_rpe_reward": "GRPO + 0.1 x internal RPE",
        "internal_critic": "internal-critic PPO"}


def subsystem_after(model, tok, bundle, rollout_dir: Path) -> dict:
    """Old bundle on new rollouts (no refit) and IoU of refitted value neurons with the old ones."""
    from rpe.metrics import auroc, chance_iou, iou
    from rpe.probe import ProbeConfig, SingleClassError, ValueProbe
    from rpe.records import read_trajectories
    from rpe.store import capture_states

    trajs = [t for t in read_trajectories(rollout_dir) if t.steps]
    states = capture_states(model, trajs, [bundle.layer], pad_token_id=tok.pad_token_id or 0)
    acts = states.acts[bundle.layer]
    v = bundle.probe.predict(acts[:, bundle.value_neurons]).numpy()
    y = states.state_rewards().numpy()
    s0, final = states.step_index.numpy() == 0, states.is_terminal().numpy()
    out = {"n_trajectories": len(trajs), "accuracy": float(np.mean([t.reward for t in trajs])),
           "old_bundle_auroc_s0": auroc(y[s0], v[s0]), "old_bundle_auroc_final": auroc(y[final], v[final])}
    k, d = bundle.value_neurons.numel(), acts.shape[1]
    try:
        probe = ValueProbe(ProbeConfig()).fit(states, bundle.layer)
        new = probe.prune(k / d)
        out.update({"refit_test_auroc_final": probe.metrics["test_auroc_final"],
                    "iou_new_vs_old": iou(new.tolist(), bundle.value_neurons.tolist()),
                    "chance_iou": chance_iou(d, k, k), "new_value_neurons": new.tolist()})
    except (SingleClassError, ValueError) as err:
        out["refit_error"] = str(err)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, label in ARMS.items():
        if name not in results:
            continue
        hist = [h for h in results[name]["history"] if "rewards/correct/mean" in h]
        steps = np.array([h["step"] for h in hist])
        r = np.array([h["rewards/correct/mean"] for h in hist], dtype=float)
        w = 10
        smooth = np.convolve(r, np.ones(w) / w, mode="valid") if len(r) >= w else r
        axes[0].plot(steps[len(steps) - len(smooth):], smooth, label=label)
        vf = np.array([h.get("rpe/value_final") if h.get("rpe/value_final") is not None else np.nan for h in hist], dtype=float)
        axes[1].plot(steps, vf, label=label, alpha=0.8)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("verifiable reward (10-step mean)")
    axes[0].set_title("learning curves")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("internal value V(final)")
    axes[1].set_title("internal value during training (RPECallback)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/results/bundle")
    ap.add_argument("--out", type=Path, default=Path("runs/train"))
    ap.add_argument("--arms", nargs="*", default=list(ARMS))
    ap.add_argument("--max-steps", type=int, default=100)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from rpe.bundle import SubsystemBundle
    from rpe.trainers.recipes import parse_recipe, train

    results_path = args.out / "train_results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for name in args.arms:
        overrides = ["--bundle", args.bundle, "--output_dir", str(args.out / name), "--max_steps", str(args.max_steps),
                     "--eval_before_dir", str(args.out / "eval_before")]
        rpe_args, train_args, model_args = parse_recipe(recipes / f"{name}.yaml", overrides)
        outcome = train(rpe_args, train_args, model_args)
        history = [h for h in json.loads((args.out / name / "log_history.json").read_text())]
        bundle = SubsystemBundle.load(args.bundle)
        entry = {"summary": outcome.summary, "history": history,
                 "subsystem_after": subsystem_after(outcome.model, outcome.tokenizer, bundle, args.out / name / "eval_after")}
        if "control_before" not in results:
            from rpe.models import load_model

            base, tok = load_model(rpe_args.model)
            results["control_before"] = subsystem_after(base, tok, bundle, args.out / "eval_before")
        results[name] = entry
        results_path.write_text(json.dumps(results, indent=2, default=str))
        plot(results, args.out / "train_curves.png")
        logging.info("%s done: %s", name, outcome.summary.get("eval_after"))

    print("\n| arm | held-out accuracy before | after | mean verifiable reward, first 10 steps | last 10 steps |")
    print("|---|---|---|---|---|")
    for name, label in ARMS.items():
        if name not in results:
            continue
        s = results[name]["summary"]
        r = [h["rewards/correct/mean"] for h in results[name]["history"] if "rewards/correct/mean" in h]
        b, a = s["eval_before"], s["eval_after"]
        print(f"| {label} | {b['accuracy']:.2f} [{b['ci95'][0]:.2f}, {b['ci95'][1]:.2f}] | {a['accuracy']:.2f} "
              f"[{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}] | {np.mean(r[:10]):.2f} | {np.mean(r[-10:]):.2f} |")
    print("\n| model | old bundle AUROC s_0 | old bundle AUROC final | refit IoU with old value neurons | chance IoU |")
    print("|---|---|---|---|---|")
    rows = [("untrained (control)", results.get("control_before"))] + [
        (ARMS[n], results[n]["subsystem_after"]) for n in ARMS if n in results]
    for label, m in rows:
        if m is None:
            continue
        print(f"| {label} | {m['old_bundle_auroc_s0']:.3f} | {m['old_bundle_auroc_final']:.3f} | "
              f"{m.get('iou_new_vs_old', float('nan')):.3f} | {m.get('chance_iou', float('nan')):.3f} |")


if __name__ == "__main__":
    main()
