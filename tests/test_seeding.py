"""Random streams: library code leaves the caller's global RNG as it was, and Monte-Carlo continuations are
keyed by what they continue (trajectory, state, continuation), not by where they sit in a batch."""

import numpy as np
import pytest
import torch

from rpe.dopamine import DopamineConfig, find_dopamine_neurons, mc_state_values
from rpe.prompts import PromptConfig
from rpe.records import read_trajectories
from rpe.rollouts import RolloutConfig, collect_rollouts
from rpe.sampling import SamplingConfig, stream_seed
from rpe.seeding import seeded


def test_seeded_restores_the_callers_state_also_after_an_error():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded(7):
        inside = torch.rand(2)
    with pytest.raises(RuntimeError):
        with seeded(7):
            assert torch.equal(torch.rand(2), inside)  # the same seed gives the same draws
            raise RuntimeError
    assert torch.equal(torch.rand(3), expected)


def test_stream_seeds_are_keyed_and_valid_generator_seeds():
    a = stream_seed(0, "traj-1", 2, 0)
    assert a == stream_seed(0, "traj-1", 2, 0) and 0 <= a < 2**63
    assert len({stream_seed(0, "traj-1", k, j) for k in range(20) for j in range(20)}) == 400
    assert stream_seed(1, "traj-1", 2, 0) != a and stream_seed(0, "traj-12", 0, 0) != stream_seed(0, "traj-1", 20, 0)
    torch.Generator().manual_seed(a)


class _ParityTask:
    """Scores a text by the parity of its length: values vary with what was sampled (a random model never
    answers correctly)."""

    def score(self, problem, text):
        return float(len(text) % 2)


class _AnyProblem(dict):
    def __missing__(self, key):
        return None


@pytest.fixture
def rollouts(tiny_llama, tmp_path):
    model, tok = tiny_llama
    cfg = RolloutConfig(n_problems=4, samples=1, sampling=SamplingConfig(max_new_tokens=16), prompt=PromptConfig(shots=1))
    collect_rollouts(model, tok, cfg, tmp_path / "r", model_name="tiny")
    trajs = [t for t in read_trajectories(tmp_path / "r") if t.steps]
    assert len(trajs) >= 3
    return trajs


def _values(tiny_llama, trajs, **cfg):
    model, tok = tiny_llama
    return mc_state_values(model, tok, _ParityTask(), _AnyProblem(), trajs, DopamineConfig(n_continuations=3, max_new_tokens=6, **cfg))


def test_mc_values_do_not_depend_on_batch_size_batch_mates_or_resume(tiny_llama, rollouts, tmp_path):
    """The offset seeds (seed + b) gave a state other continuations when the batch size changed, when a resumed
    run started elsewhere, or when the trajectories were shared between processes."""
    whole = _values(tiny_llama, rollouts, batch_size=12)
    assert len({v for vals in whole.values() for v in vals[:-1]}) > 1  # the values vary: the test can fail
    assert _values(tiny_llama, rollouts, batch_size=3) == whole
    alone = _values(tiny_llama, rollouts[1:2], batch_size=12)  # one trajectory, as one rank's share would have it
    assert alone == {rollouts[1].trajectory_id: whole[rollouts[1].trajectory_id]}
    model, tok = tiny_llama
    cache = tmp_path / "mc.json"
    dcfg = DopamineConfig(n_continuations=3, max_new_tokens=6, batch_size=12)
    mc_state_values(model, tok, _ParityTask(), _AnyProblem(), rollouts[:2], dcfg, cache=cache)  # an interrupted run
    assert mc_state_values(model, tok, _ParityTask(), _AnyProblem(), rollouts, dcfg, cache=cache) == whole  # resumed
    assert _values(tiny_llama, rollouts, batch_size=12, seed=1) != whole


def test_library_calls_leave_the_global_rng_as_it_was(tiny_llama, rollouts, tmp_path):
    from rpe.bundle import random_bundle
    from rpe.controls import next_token_scores
    from rpe.probe import ProbeConfig, ValueProbe
    from rpe.store import StateSet

    model, tok = tiny_llama
    rng = np.random.default_rng(0)
    n_traj, steps = 40, 3
    acts = torch.tensor(rng.normal(size=(n_traj * steps, 6)), dtype=torch.float32)
    rewards = torch.tensor([float(i % 2) for i in range(n_traj)])
    states = StateSet({0: acts}, torch.arange(n_traj).repeat_interleave(steps), torch.arange(steps).repeat(n_traj),
                      [str(i) for i in range(n_traj)], [f"p{i}" for i in range(n_traj)], rewards)
    calls = {
        "rollouts (continuous)": lambda: collect_rollouts(model, tok, RolloutConfig(
            n_problems=2, sampling=SamplingConfig(max_new_tokens=4), prompt=PromptConfig(shots=1)), tmp_path / "a"),
        "rollouts (generate)": lambda: collect_rollouts(model, tok, RolloutConfig(
            n_problems=2, engine="generate", sampling=SamplingConfig(max_new_tokens=4), prompt=PromptConfig(shots=1)),
            tmp_path / "b"),
        "mc values (generate)": lambda: _values(tiny_llama, rollouts[:1], engine="generate"),
        "probe fit (mlp)": lambda: ValueProbe(ProbeConfig(epochs=2)).fit(states, 0),
        "probe fit (linear)": lambda: ValueProbe(ProbeConfig(family="linear", hidden=0)).fit(states, 0),
        "dopamine": lambda: find_dopamine_neurons(acts, rng.normal(size=len(acts)), [f"p{i // 3}" for i in range(len(acts))],
                                                  DopamineConfig(epochs=2, n_random=2, n_boot=10, n_perm=10, min_surprising=5)),
        "random bundle": lambda: random_bundle(model, tok),
        "next-token control": lambda: next_token_scores(acts, torch.arange(len(acts)) % 5, epochs=2),
    }
    for name, call in calls.items():
        torch.manual_seed(2024)
        expected = torch.rand(4)
        torch.manual_seed(2024)
        call()
        assert torch.equal(torch.rand(4), expected), f"{name} reseeded the global generator"
