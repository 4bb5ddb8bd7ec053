"""Overlap of value-neuron sets found on two tasks, against the chance overlap of random sets.

    python benchmarks/task_iou.py --tasks chain_sum chain_sum_2 --layer 28 --out runs/results

For each task: rollouts (resumable; OUT/rollouts for the first task if it exists, else OUT/rollouts_TASK),
states at ``--layer``, a dense value probe, and its top-k neurons for several fractions. Prints the IoU of the
two tasks' sets beside the chance IoU of two random sets of the same sizes, and the AUROC of each task's probe
applied without refitting to the other task's test states. Writes OUT/task_iou.json.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from rpe.metrics import auroc, chance_iou, iou
from rpe.models import load_model
from rpe.probe import ProbeConfig, ValueProbe
from rpe.records import read_trajectories
from rpe.rollouts import RolloutConfig, collect_rollouts
from rpe.store import capture_states


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", nargs=2, default=["chain_sum", "chain_sum_2"])
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--fracs", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    ap.add_argument("--out", type=Path, default=Path("runs/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model, tok = load_model(args.model)
    probes, states = {}, {}
    for i, task in enumerate(args.tasks):
        folder = args.out / ("rollouts" if i == 0 else f"rollouts_{task}")
        res = collect_rollouts(model, tok, RolloutConfig(task=task, n_problems=args.n, samples=args.samples), folder,
                               model_name=args.model)
        logging.info("%s: %d trajectories, accuracy %.3f", task, res.n_trajectories, res.accuracy)
        trajs = read_trajectories(folder)
        states[task] = capture_states(model, trajs, [args.layer], pad_token_id=tok.pad_token_id)
        probes[task] = ValueProbe(ProbeConfig()).fit(states[task], args.layer)
    a, b = args.tasks
    d = states[a].acts[args.layer].shape[1]
    rows = []
    for frac in args.fracs:
        sa, sb = probes[a].prune(frac), probes[b].prune(frac)
        rows.append({"frac": frac, "k": int(sa.numel()), "iou": iou(sa.tolist(), sb.tolist()),
                     "chance_iou": chance_iou(d, int(sa.numel()), int(sb.numel()))})
    transfer = {}
    for src, dst in ((a, b), (b, a)):
        st = states[dst]
        split = probes[dst].split
        test = np.isin(st.traj_index.numpy(), np.flatnonzero(split == 2))
        y = st.state_rewards().numpy()
        v_src = probes[src].predict(st.acts[args.layer]).numpy()
        v_dst = probes[dst].predict(st.acts[args.layer]).numpy()
        transfer[f"{src}->{dst}"] = {"auroc_transferred": auroc(y[test], v_src[test]),
                                     "auroc_refit_on_target": auroc(y[test], v_dst[test])}
    result = {"model": args.model, "layer": args.layer, "tasks": args.tasks, "iou": rows, "transfer": transfer,
              "accuracy": {t: float(states[t].rewards.mean()) for t in args.tasks}}
    (args.out / "task_iou.json").write_text(json.dumps(result, indent=2))
    print(f"\n| value neurons kept | k | IoU {a} vs {b} | chance IoU |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['frac']:g} | {r['k']} | {r['iou']:.3f} | {r['chance_iou']:.3f} |")
    print("\n| probe -> test states of | AUROC (all states), no refit | AUROC of the target's own probe |\n|---|---|---|")
    for k, v in transfer.items():
        print(f"| {k} | {v['auroc_transferred']:.3f} | {v['auroc_refit_on_target']:.3f} |")


if __name__ == "__main__":
    main()
