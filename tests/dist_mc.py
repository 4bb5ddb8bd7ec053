"""Run by tests/test_distributed.py under torchrun (2 CPU processes): Monte-Carlo values of a rollout folder's
trajectories, shared out over the ranks, scored by the parity of the text length (a random model never
answers correctly). Writes OUT/values_rank{R}.json."""

import json
import sys
from pathlib import Path

from rpe.distributed import current_ranks, process_group
from rpe.dopamine import DopamineConfig, mc_state_values
from rpe.records import read_trajectories
from rpe.tiny import tiny_model


class ParityTask:
    def score(self, problem, text):
        return float(len(text) % 2)


class AnyProblem(dict):
    def __missing__(self, key):
        return None


rollouts, out = Path(sys.argv[1]), Path(sys.argv[2])
model, tok = tiny_model()
trajs = [t for t in read_trajectories(rollouts) if t.steps]
with process_group():
    values = mc_state_values(model, tok, ParityTask(), AnyProblem(), trajs,
                             DopamineConfig(n_continuations=3, max_new_tokens=6, batch_size=4), cache=out / "mc.json")
    (out / f"values_rank{current_ranks().rank}.json").write_text(json.dumps(values))
