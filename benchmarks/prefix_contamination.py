"""Prefix contamination of the internal step credit: before and after the first wrong step, beside its control.

    rpe rollouts --task chain_sum_4 --n-problems 300 --samples 2 --seed 11 --out runs/cs4
    python benchmarks/prefix_contamination.py --rollouts runs/cs4 --bundle runs/demo/bundle --out runs/cs4/contamination.json

Reads the bundle's step credit on every step of the rollouts (the internal TD error gamma V(s_t) - V(s_{t-1}),
what the dense-credit trainer adds to each step's tokens; and dopamine activity where the bundle has dopamine
neurons), and the same TD error through random probe directions of the same norm on the same neurons (the
control of the dense trainer; ``--controls`` draws, and where the bundle falls among them). Steps are labelled
by their arithmetic (:mod:`rpe.contamination`): does the credit flag the first wrong step (AUROC of right steps
on a clean prefix vs the first wrong step), does it still separate right from wrong steps after it, and does an
earlier error lower a right step's credit? Each AUROC counts pairs of steps at the same position in the chain;
contamination is the first AUROC minus the second, with 95% cluster-bootstrap intervals over problems. One read
of the value neurons serves every probe; the per-step credits are kept in OUT. Rollouts that fitted the bundle
would make the value in-sample: use others (the script reports how many of the rollouts' questions the bundle's
fitting run saw, when its folder is given).
Writes OUT (JSON) and prints a Markdown table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def td_credits(probe, acts: list, gamma: float) -> list:
    """Per trajectory, (T,) TD errors gamma V(s_t) - V(s_{t-1}) of ``probe`` on its (T + 1, k) value-neuron
    activations at s_0..s_T."""
    from rpe.probe import td_errors

    return [td_errors(probe.predict(a).numpy(), gamma) for a in acts]


def control_band(results: list[dict], value: dict) -> dict:
    """Where the bundle's readings fall among the random directions': per reading, the draws' mean and the 2.5 and
    97.5 percentiles of their point estimates, and the share of draws at or above the bundle's value."""
    import numpy as np

    out = {}
    for key, field in (("flags_first_error", "auroc"), ("after_error", "auroc"), ("contamination", "drop"),
                       ("right_step_after_error", "auroc")):
        draws = np.array([r[key][field][0] for r in results], dtype=float)
        mine = value[key][field][0]
        out[key] = {"mean": round(float(np.nanmean(draws)), 4),
                    "p2.5_p97.5": [round(float(x), 4) for x in np.nanpercentile(draws, [2.5, 97.5])],
                    "share_at_or_above_bundle": round(float(np.mean(draws >= mine)), 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", required=True, type=Path)
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--fit-rollouts", type=Path, default=None, help="The bundle's fitting rollouts (overlap check).")
    parser.add_argument("--controls", type=int, default=20, help="random probe directions (the control's draws)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    from rpe.bench.machine import machine_info
    from rpe.bundle import SubsystemBundle
    from rpe.cli.common import rollout_model_name
    from rpe.contamination import prefix_contamination
    from rpe.models import load_model
    from rpe.probe import ValueProbe
    from rpe.records import read_trajectories
    from rpe.signals import SignalReader
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
    reader = SignalReader(bundle, model, tok)
    acts, dopamine = [], []
    for start in range(0, len(trajs), reader.batch_size):  # one read: the value neurons at every s_t
        batch = trajs[start : start + reader.batch_size]
        for sig in reader.read([t.prompt_token_ids for t in batch], [t.completion_token_ids for t in batch],
                               spans=[[(s.token_start, s.token_end) for s in t.steps] for t in batch]):
            acts.append(sig.value_acts)
            dopamine.append(sig.dopamine)
    texts = [[s.text for s in t.steps] for t in trajs]
    groups = [t.problem_id for t in trajs]
    credits = {"internal TD error": td_credits(bundle.probe, acts, reader.gamma)}
    if bundle.dopamine_neurons.numel():
        credits["dopamine activity"] = dopamine
    results = {name: prefix_contamination(c, texts, groups, n_boot=args.n_boot) for name, c in credits.items()}
    controls = [prefix_contamination(td_credits(ValueProbe.from_state(random_direction_state(bundle.probe_state, seed),
                                                                      bundle.probe_config), acts, reader.gamma),
                                     texts, groups, n_boot=0)  # the draws' point estimates make the band
                for seed in range(args.controls)]
    band = control_band(controls, results["internal TD error"])
    out = {"benchmark": "prefix_contamination", "machine": machine, "rollouts": str(args.rollouts),
           "bundle": str(args.bundle), "n_trajectories": len(trajs), "fit_question_overlap": overlap,
           "accuracy": sum(t.reward for t in trajs) / len(trajs), "signals": results,
           "control": {"random_directions": args.controls, "band": band, "draws": controls},
           "credits": {"steps": texts, "problems": groups,
                       **{k: [list(map(float, c)) for c in v] for k, v in credits.items()}}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))

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
    cells = [f"mean {b['mean']:.3f}, 95% of draws [{b['p2.5_p97.5'][0]:.3f}, {b['p2.5_p97.5'][1]:.3f}], "
             f"{b['share_at_or_above_bundle']:.0%} at or above" for b in band.values()]
    print(f"| control: {args.controls} random probe directions of the same norm | " + " | ".join(cells) + " |")
    print(json.dumps({k: out[k] for k in ("benchmark", "n_trajectories", "fit_question_overlap", "accuracy")}))


if __name__ == "__main__":
    main()
