"""Do value neurons transfer across tasks? A bundle fitted on one task read, without refitting, on another task's
rollouts, beside a bundle fitted on that task at the same layer (the in-task control), and the overlap of the
two value-neuron sets against chance. Writes OUT (JSON with a report-card row for benchmarks/report_card.py).

    rpe rollouts --task count_bits --n-problems 300 --samples 2 --capture-layers 29 --out runs/count_bits
    rpe fit --rollouts runs/count_bits --out runs/count_bits/bundle --layers 29
    python benchmarks/transfer.py --source runs/mix/bundle --target runs/count_bits \\
        --target-bundle runs/count_bits/bundle --out runs/count_bits/transfer.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rpe.bundle import SubsystemBundle
from rpe.metrics import bootstrap_auroc, chance_iou, chance_verdict, iou
from rpe.models import load_model
from rpe.records import MANIFEST_FILE, atomic_write_json, read_trajectories
from rpe.report_card import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from rpe.signals import SignalReader


def transfer(source: Path, target: Path, target_bundle: Path, n_boot: int = 1000) -> dict:
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    model, tok = load_model(manifest["model"]["name"])
    src = SubsystemBundle.load(source, model=model, tokenizer=tok)
    own = SubsystemBundle.load(target_bundle, model=model, tokenizer=tok)
    trajs = [t for t in read_trajectories(target) if t.steps]
    sigs = SignalReader(src, model, tok).read([t.prompt_token_ids for t in trajs], [t.completion_token_ids for t in trajs],
                                              spans=[[(s.token_start, s.token_end) for s in t.steps] for t in trajs])
    y = np.array([t.reward for t in trajs])
    groups = np.array([t.problem_id for t in trajs])
    out: dict = {"source": str(source), "target": str(target), "target_task": manifest["task"].get("name"),
                 "n_trajectories": len(trajs), "n_problems": int(len(set(groups))), "accuracy": float(y.mean()),
                 "layer": src.layer, "transfer": {}, "own_task": {}}
    for name, scores in (("s0", [s.values[0] for s in sigs]), ("final", [s.values[-1] for s in sigs])):
        a, lo, hi = bootstrap_auroc(y, np.array(scores), groups=groups, n_boot=n_boot)
        out["transfer"][name] = {"auroc": a, "low": lo, "high": hi, "verdict": chance_verdict(lo, hi)}
        out["own_task"][name] = own.metrics["headline_cv"][name]["value neurons"]
    a_set, b_set = src.value_neurons.tolist(), own.value_neurons.tolist()
    d = int(model.config.hidden_size)
    out["iou"] = {"value": iou(a_set, b_set), "chance": chance_iou(d, len(a_set), len(b_set)),
                  "same_layer": own.layer == src.layer, "source_neurons": a_set, "target_neurons": b_set}
    out["card"] = card(out)
    return out


def card(r: dict) -> dict:
    """The report-card row: reproduced when the source probe is above chance on the target at s_0 and at the final
    step; not reproduced when it is not while the target's own probe is; otherwise inconclusive."""
    t, o = r["transfer"], r["own_task"]
    above = all(t[k]["low"] > 0.5 for k in ("s0", "final"))
    own_above = all(o[k]["low"] > 0.5 for k in ("s0", "final"))
    verdict = REPRODUCED if above else NOT_REPRODUCED if own_above else INCONCLUSIVE
    i = r["iou"]
    return {
        "claim": "value neurons transfer across tasks",
        "paper": "the set is robust across datasets and transfers",
        "measured": (f"{Path(r['source']).parent.name} bundle on {r['target_task']} without refitting (layer {r['layer']}, "
                     f"{r['n_trajectories']} trajectories): s_0 {t['s0']['auroc']:.3f} [{t['s0']['low']:.3f}, "
                     f"{t['s0']['high']:.3f}], final {t['final']['auroc']:.3f} [{t['final']['low']:.3f}, "
                     f"{t['final']['high']:.3f}]"),
        "control": (f"{r['target_task']}'s own probe (5-fold CV, same layer): s_0 {o['s0']['auroc']:.3f} "
                    f"[{o['s0']['low']:.3f}, {o['s0']['high']:.3f}], final {o['final']['auroc']:.3f}; IoU of the value "
                    f"sets {i['value']:.3f} (chance {i['chance']:.3f})"),
        "verdict": verdict,
        "note": "" if verdict == REPRODUCED else
        f"transfer: s_0 {t['s0']['verdict']}, final {t['final']['verdict']}",
        "command": "python benchmarks/transfer.py --source runs/mix/bundle --target runs/count_bits "
                   "--target-bundle runs/count_bits/bundle --out runs/count_bits/transfer.json",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True, help="bundle fitted on the source task")
    ap.add_argument("--target", type=Path, required=True, help="rollout folder of the target task")
    ap.add_argument("--target-bundle", type=Path, required=True, help="bundle fitted on the target at the same layer")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    res = transfer(args.source, args.target, args.target_bundle)
    atomic_write_json(args.out, res)
    print(json.dumps(res["card"], indent=1))


if __name__ == "__main__":
    main()
