"""Prefix contamination of the internal step credit: before and after the first wrong step, beside its control.

    rpe rollouts --task chain_sum_4 --n-problems 300 --samples 2 --seed 11 --out runs/cs4
    python benchmarks/prefix_contamination.py --rollouts runs/cs4 --bundle runs/demo/bundle --out runs/cs4/contamination.json

Reads the bundle's step credit on every step of the rollouts (the internal TD error gamma V(s_t) - V(s_{t-1}),
what the dense-credit trainer adds to each step's tokens; and dopamine activity where the bundle has dopamine
neurons), and the same TD error through a random probe direction of the same norm (the control of the dense
trainer). Steps are labelled by their arithmetic (:mod:`rpe.contamination`): does the credit flag the first
wrong step (AUROC of right steps on a clean prefix vs the first wrong step), does it still separate right
from wrong steps after it, and does an earlier error lower a right step's credit? Each AUROC counts pairs of
steps at the same position in the chain; contamination is the first AUROC minus the second, with 95%
cluster-bootstrap intervals over problems. The per-step credits are kept in OUT. Rollouts that fitted the bundle would make the value in-sample: use others (the
script reports how many of the rollouts' questions the bundle's fitting run saw, when its folder is given).
Writes OUT (JSON) and prints a Markdown table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


def credits_by_trajectory(table: dict[str, list], column: str) -> tuple[list, list, list]:
    """Per trajectory of a :func:`rpe.analyze.step_table`: (T,) credits from ``column``, the T step texts, and
    its problem id."""
    import numpy as np

    credits, texts, groups, current = [], [], [], None
    for tid, pid, step, value, text in zip(table["trajectory_id"], table["problem_id"], table["step"],
                                           table[column], table["text"]):
        if step == 0:
            current = tid
            credits.append([])
            texts.append([])
            groups.append(pid)
            continue
        assert tid == current, "step_table rows are grouped by trajectory"
        credits[-1].append(value)
        texts[-1].append(text)
    return [np.asarray(c) for c in credits], texts, groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", required=True, type=Path)
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--fit-rollouts", type=Path, default=None, help="The bundle's fitting rollouts (overlap check).")
    parser.add_argument("--control-seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    from rpe.analyze import step_table
    from rpe.bench.machine import machine_info
    from rpe.bundle import SubsystemBundle
    from rpe.cli.common import rollout_model_name
    from rpe.contamination import prefix_contamination
    from rpe.models import load_model
    from rpe.records import read_trajectories
    from rpe.trainers.dense import random_direction_state

    machine = machine_info()
    print(f"machine: {machine}")
    model, tok = load_model(rollout_model_name(args.rollouts, None), device=args.device, dtype=args.dtype)
    bundle = SubsystemBundle.load(args.bundle, model=model, tokenizer=tok)
    trajs = read_trajectories(args.rollouts)
    overlap = None
    if args.fit_rollouts is not None:  # questions of these rollouts the bundle's fitting run also asked
        from rpe.rollouts import rollout_settings

        fitted, these = rollout_settings(args.fit_rollouts), rollout_settings(args.rollouts)
        if fitted is not None and these is not None:
            overlap = len(set(fitted.question_keys()) & set(these.question_keys()))
    control = replace(bundle, probe_state=random_direction_state(bundle.probe_state, args.control_seed))
    signals = {"internal TD error": (bundle, "rpe"),
               "control: random probe direction of the same norm": (control, "rpe")}
    if bundle.dopamine_neurons.numel():
        signals["dopamine activity"] = (bundle, "dopamine")
    tables, results, read = {}, {}, {}
    for name, (b, column) in signals.items():
        if id(b) not in tables:
            tables[id(b)] = step_table(model, tok, b, trajs)
        credits, texts, groups = credits_by_trajectory(tables[id(b)], column)
        results[name] = prefix_contamination(credits, texts, groups, n_boot=args.n_boot)
        read[name] = [c.round(6).tolist() for c in credits]  # kept for another analysis without a second read
        read["steps"], read["problems"] = texts, groups
    out = {"benchmark": "prefix_contamination", "machine": machine, "rollouts": str(args.rollouts),
           "bundle": str(args.bundle), "n_trajectories": len(trajs), "fit_question_overlap": overlap,
           "accuracy": sum(t.reward for t in trajs) / len(trajs), "signals": results, "credits": read}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))

    first = next(iter(results.values()))
    print(f"\n{len(trajs)} trajectories, {first['n_with_error']} with a wrong step; steps: {first['counts']}\n")
    print("| credit | right vs first wrong step (AUROC) | right vs wrong after it (AUROC) | contamination (drop) | "
          "right steps, clean vs after an error (AUROC) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        f, a, d, p = r["flags_first_error"], r["after_error"], r["contamination"], r["right_step_after_error"]
        print(f"| {name} | {f['auroc'][0]:.3f} [{f['auroc'][1]:.3f}, {f['auroc'][2]:.3f}] {f['verdict']} | "
              f"{a['auroc'][0]:.3f} [{a['auroc'][1]:.3f}, {a['auroc'][2]:.3f}] {a['verdict']} | "
              f"{d['drop'][0]:+.3f} [{d['drop'][1]:+.3f}, {d['drop'][2]:+.3f}] {d['verdict']} | "
              f"{p['auroc'][0]:.3f} [{p['auroc'][1]:.3f}, {p['auroc'][2]:.3f}] {p['verdict']} |")
    print(json.dumps({k: out[k] for k in ("benchmark", "n_trajectories", "fit_question_overlap", "accuracy")}))


if __name__ == "__main__":
    main()
