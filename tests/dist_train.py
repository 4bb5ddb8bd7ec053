"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: ``rpe train`` with the
arguments after SIDE_DIR, recording on each rank the files it wrote (renames, ``Path.write_*`` and files
opened for writing) and the probe it ended with (the verifiable reward is the parity of the completion's
token ids: a random model is never correct, and a refit needs both outcomes), into SIDE_DIR/rank{R}.json and SIDE_DIR/rank{R}_probe.pt."""

import builtins
import json
import os
import pathlib
import sys

import torch

side, args = pathlib.Path(sys.argv[1]), sys.argv[2:]
rank = int(os.environ.get("RANK", "0"))
written: list[str] = []


def _logging(fn, target_arg):
    def wrapped(*a, **kw):
        written.append(os.path.abspath(str(a[target_arg])))
        return fn(*a, **kw)
    return wrapped


os.replace = _logging(os.replace, 1)
os.rename = _logging(os.rename, 1)
pathlib.Path.write_text = _logging(pathlib.Path.write_text, 0)
pathlib.Path.write_bytes = _logging(pathlib.Path.write_bytes, 0)
_open = builtins.open


def _open_logging(file, mode="r", *a, **kw):
    if any(c in mode for c in "wax+") and not isinstance(file, int):
        written.append(os.path.abspath(str(file)))
    return _open(file, mode, *a, **kw)


builtins.open = _open_logging

import rpe.trainers.recipes as recipes  # noqa: E402
import rpe.trainers.rewards as rewards  # noqa: E402


def _parity_reward(task, problems):  # a random model is never correct: the refit needs both outcomes
    def parity(prompts, completions, completion_ids=None, **kwargs):
        return [float(sum(c) % 2) for c in completion_ids]
    return parity


rewards.correctness_reward = _parity_reward

outcomes = []
run = recipes.train


def _train(*a, **kw):
    outcomes.append(run(*a, **kw))
    return outcomes[-1]


recipes.train = _train
from rpe.cli import app  # noqa: E402

try:
    app(args, prog_name="rpe", standalone_mode=False)
finally:
    builtins.open = _open
    side.mkdir(parents=True, exist_ok=True)
    (side / f"rank{rank}.json").write_text(json.dumps({"written": written, "summary": outcomes[-1].summary if outcomes else None}))
    if outcomes and outcomes[-1].bundle is not None:
        torch.save(outcomes[-1].bundle.probe_state.weights, side / f"rank{rank}_probe.pt")
