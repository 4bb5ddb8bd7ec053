"""The linear probe at our users' widths: a 5-fold cross-validated fit on 3,000 random states of d 4096.

    python benchmarks/probe_scale.py [--d 4096] [--states 3000]

Reports the time of the full 5-fold linear cross-validation (L-BFGS above ``NEWTON_MAX_DIM``), and beside it,
measured in the same run on the same data, one Newton fit and one L-BFGS fit of a single fold at one L2 strength
(the unit the cross-validation repeats: 5 folds x 5 strengths), with the two optima's agreement. The last line
is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--states", type=int, default=3000)
    args = ap.parse_args()
    from torch import nn

    from rpe.bench.machine import machine_info
    from rpe.crossval import cross_validate, kfold_by_problem
    from rpe.logistic import lbfgs_fit, newton_fit
    from rpe.probe import ProbeConfig
    from rpe.store import StateSet

    g = torch.Generator().manual_seed(0)
    n_traj = args.states // 3  # s_0, s_1, s_2 per trajectory
    x = torch.randn(args.states, args.d, generator=g)
    direction = torch.randn(args.d, generator=g)
    rewards = (torch.rand(n_traj, generator=g) < 0.4).float()
    traj = torch.arange(n_traj).repeat_interleave(3)
    x += 0.01 * (rewards[traj] * 2 - 1)[:, None] * direction  # a faint value direction to find
    states = StateSet({0: x}, traj, torch.arange(3).repeat(n_traj), [str(i) for i in range(n_traj)],
                      [f"p{i // 2}" for i in range(n_traj)], rewards)
    folds = kfold_by_problem(states.problem_ids, 5, 0)
    start = time.perf_counter()
    oof = cross_validate(states, 0, ProbeConfig(family="linear", target="mc"), folds)[1.0]
    cv_seconds = time.perf_counter() - start
    from rpe.metrics import auroc

    y = states.state_rewards().numpy()
    unit = {}
    xs = (x - x.mean(0)) / x.std(0)
    train = torch.as_tensor(folds != 0)[traj]
    for name, solve in (("lbfgs", lbfgs_fit), ("newton", newton_fit)):
        lin = nn.Linear(args.d, 1)
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
        start = time.perf_counter()
        steps = solve(lin, xs[train], states.state_rewards()[train], 1e-2)
        unit[name] = {"seconds": round(time.perf_counter() - start, 2), "steps": steps,
                      "w": torch.cat([lin.weight.flatten(), lin.bias]).detach()}
    gap = float((unit["lbfgs"]["w"] - unit["newton"]["w"]).abs().max())
    result = {"machine": machine_info(), "d": args.d, "states": args.states,
              "cv_5fold_linear_seconds": round(cv_seconds, 1), "cv_auroc_all": round(float(auroc(y, oof.values)), 3),
              "one_fit": {k: {kk: vv for kk, vv in v.items() if kk != "w"} for k, v in unit.items()},
              "newton_vs_lbfgs_time": round(unit["newton"]["seconds"] / unit["lbfgs"]["seconds"], 1),
              "max_weight_difference": round(gap, 6), "weight_scale": round(float(unit["newton"]["w"].abs().max()), 4)}
    print(json.dumps(result))
    return None


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
