import numpy as np
import pytest
import torch

from rpe.dopamine import DopamineConfig, find_dopamine_neurons, mc_state_values, td_errors
from rpe.prompts import PromptConfig
from rpe.rollouts import RolloutConfig, SamplingConfig, collect_rollouts, read_trajectories
from rpe.tasks import load_task


def test_td_errors_definition():
    assert td_errors([0.2, 0.5, 1.0], gamma=1.0) == pytest.approx([0.3, 0.5])
    assert td_errors([0.5, 0.0], gamma=0.9) == pytest.approx([-0.5])


def test_planted_dopamine_neurons_are_found_with_sign():
    rng = np.random.default_rng(0)
    n, d = 600, 100
    deltas = rng.choice([-0.8, -0.5, 0.5, 0.8], size=n) + rng.normal(0, 0.05, n)
    acts = rng.normal(size=(n, d))
    acts[:, 7] += 1.5 * deltas  # rises with RPE
    acts[:, 70] -= 1.5 * deltas  # falls with RPE
    pids = [f"p{i // 3}" for i in range(n)]
    res = find_dopamine_neurons(torch.tensor(acts), deltas, pids, DopamineConfig(top_frac=0.02, n_random=30))
    assert set(res.neurons.tolist()) == {7, 70}
    assert dict(zip(res.neurons.tolist(), res.sign.tolist())) == {7: 1.0, 70: -1.0}
    m = res.metrics
    assert m["test_spearman_dopamine"] > 0.6 and abs(m["test_spearman_random_mean"]) < 0.15
    assert m["test_activity_positive_rpe"] > 0 > m["test_activity_negative_rpe"]


def test_too_few_surprising_steps_is_an_error():
    with pytest.raises(ValueError, match="too few surprising"):
        find_dopamine_neurons(torch.zeros(10, 4), np.zeros(10), ["p"] * 10, DopamineConfig())


def test_mc_values_are_cached_and_end_with_the_reward(tiny_llama, tmp_path):
    model, tok = tiny_llama
    cfg = RolloutConfig(n_problems=3, samples=1, sampling=SamplingConfig(max_new_tokens=16), prompt=PromptConfig(shots=1))
    collect_rollouts(model, tok, cfg, tmp_path, model_name="tiny")
    trajs = [t for t in read_trajectories(tmp_path) if t.steps]
    task = load_task("chain_sum")
    problems = {p.id: p for p in task.problems(3, seed=0)}
    dcfg = DopamineConfig(n_continuations=2, max_new_tokens=8)
    calls = []
    values = mc_state_values(model, tok, task, problems, trajs, dcfg, cache=tmp_path / "mc.json", progress=lambda a, b: calls.append(a))
    assert set(values) == {t.trajectory_id for t in trajs}
    for t in trajs:
        v = values[t.trajectory_id]
        assert len(v) == len(t.steps) + 1 and v[-1] == t.reward
        assert all(x in (0.0, 0.5, 1.0) for x in v)
    n_calls = len(calls)
    again = mc_state_values(model, tok, task, problems, trajs, dcfg, cache=tmp_path / "mc.json", progress=lambda a, b: calls.append(a))
    assert again == values and len(calls) == n_calls  # nothing resampled
