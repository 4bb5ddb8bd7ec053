"""IoU of value-neuron sets across tasks and layers vs chance, as a heatmap (issue: interventions and transfer).

    python benchmarks/transfer_heatmap.py --layers 12 16 20 24 28 --out runs/results

Reuses OUT/rollouts (chain_sum) and OUT/rollouts_chain_sum_2 (from benchmarks/task_iou.py). For every (task,
layer): a dense TD(0) probe and its top ``--frac`` neurons. Writes OUT/transfer_heatmap.json and
OUT/transfer_heatmap.png (IoU of every pair of sets; chance IoU of random sets of that size in the title).
Across models: SmolLM2-135M (d = 576) and Gemma-3-270M (d = 640) have different residual widths, so their neuron
indices cannot be compared; no cross-model IoU is reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rpe.metrics import chance_iou, iou
from rpe.models import load_model
from rpe.probe import ProbeConfig, ValueProbe
from rpe.records import read_trajectories
from rpe.store import capture_states


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 16, 20, 24, 28])
    ap.add_argument("--frac", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=Path("runs/results"))
    args = ap.parse_args()
    model, tok = load_model(args.model)
    folders = {"chain_sum": args.out / "rollouts", "chain_sum_2": args.out / "rollouts_chain_sum_2"}
    sets, labels = [], []
    for task, folder in folders.items():
        states = capture_states(model, read_trajectories(folder), args.layers, pad_token_id=tok.pad_token_id or 0)
        for layer in args.layers:
            sets.append(ValueProbe(ProbeConfig()).fit(states, layer).prune(args.frac).tolist())
            labels.append(f"{task} L{layer}")
    n = len(sets)
    mat = np.array([[iou(sets[i], sets[j]) for j in range(n)] for i in range(n)])
    d = int(model.config.hidden_size)
    k = len(sets[0])
    chance = chance_iou(d, k, k)
    (args.out / "transfer_heatmap.json").write_text(json.dumps({"labels": labels, "iou": mat.tolist(), "k": k, "d": d,
                                                                "chance_iou": chance, "sets": sets}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w" if mat[i, j] < 0.5 else "k")
    ax.set_title(f"IoU of top-{args.frac:g} value neurons (k={k} of {d}); chance IoU {chance:.3f}")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(args.out / "transfer_heatmap.png", dpi=110)
    same_layer = [mat[i, i + len(args.layers)] for i in range(len(args.layers))]
    print("| layer | " + " | ".join(str(x) for x in args.layers) + " |")
    print("|---|" + "---|" * len(args.layers))
    print("| IoU chain_sum vs chain_sum_2 | " + " | ".join(f"{v:.3f}" for v in same_layer) + " |")
    print(f"chance IoU {chance:.3f} (k = {k} of d = {d})")


if __name__ == "__main__":
    main()
