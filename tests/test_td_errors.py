"""One TD error: every place that computes an internal RPE gives the numbers of rpe.probe.td_errors on one
episode (the environment wrapper, the signal reader, the internal critic, the TD learner of the simulation,
Monte-Carlo values as dopamine and ablation read them, and the callback's reward-time error)."""

import gymnasium
import numpy as np
import pytest

from rpe.probe import td_errors

from conftest import make_tiny_bundle


@pytest.fixture
def episode(tiny_llama):
    """A 4-step ChainSum episode of the tiny model through InternalRPE, answered correctly (reward 1)."""
    from rpe.envs import InternalRPE

    model, tok = tiny_llama
    bundle = make_tiny_bundle(model, tok)
    for key in ("net.2.weight", "net.0.weight"):  # a steeper random probe, so the values differ between states
        bundle.probe_state.weights[key] = bundle.probe_state.weights[key] * 8
    env = InternalRPE(gymnasium.make("rpe/ChainSum-v0", max_steps=6), bundle, model=model, tokenizer=tok)
    _, info = env.reset(seed=0)
    infos = []
    for action in ["4 + 1 = 5.", "5 - 3 = 2.", "2 + 0 = 2.", f"The answer is {info['answer']}."]:
        *_, terminated, truncated, step_info = env.step(action)
        infos.append(step_info)
        if terminated or truncated:
            break
    assert terminated and infos[-1]["reward_unshaped"] == 1.0
    return env, bundle, np.array([i["internal_rpe"] for i in infos]), 1.0


def test_every_user_computes_the_same_td_errors(tiny_llama, episode):
    from rpe.signals import SignalReader
    from rpe.simulation import FEATURES, TDLambdaLearner
    from rpe.trainers.critic import gae_per_step

    model, tok = tiny_llama
    env, bundle, env_rpe, reward = episode
    values, gamma = env.internal_values, env.reader.gamma  # V(s_0..s_T) of the episode
    expected = td_errors(values, gamma, reward=reward)
    assert np.ptp(values) > 0.01 and len(expected) == 4
    np.testing.assert_allclose(expected[:-1], gamma * values[1:-1] - values[:-2], atol=1e-12)
    assert expected[-1] == pytest.approx(reward - values[-2])
    np.testing.assert_allclose(env_rpe, expected, atol=1e-9)  # the gymnasium wrapper, step by step

    unwrapped = env.unwrapped
    prompt = tok(unwrapped.prompt, add_special_tokens=False)["input_ids"]
    completion = tok(unwrapped.completion, add_special_tokens=False)["input_ids"]
    sig = SignalReader(bundle, model, tok).read([prompt], [completion])[0]
    np.testing.assert_allclose(sig.values, values, atol=1e-4)
    np.testing.assert_allclose(sig.rpe, td_errors(sig.values, gamma), atol=1e-12)  # the model's own: no reward
    np.testing.assert_allclose(td_errors(sig.values, gamma, reward=reward), expected, atol=1e-4)  # callback, simulation

    # the internal critic's GAE with lambda = 0 is the TD error of each step
    np.testing.assert_allclose(gae_per_step(values[:-1], reward, gamma, lam=0.0), expected, atol=1e-12)

    # the simulation's TD learner, given these values
    learner = TDLambdaLearner(dict(FEATURES), gamma=gamma)
    learner.values = lambda t: values

    class _Episode:
        reward = 1.0
    np.testing.assert_allclose(learner.rpe(_Episode()), expected, atol=1e-12)

    # Monte-Carlo values (dopamine, ablation, simulation) end with V(s_T) = r
    mc = [*values[:-1], reward]
    np.testing.assert_allclose(td_errors(mc, gamma, reward=mc[-1]), expected, atol=1e-12)
