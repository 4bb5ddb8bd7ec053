import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

import rpe.envs  # noqa: F401  (registers the ids)
from rpe.envs import ReasoningEnv


@pytest.mark.parametrize("env_id", ["rpe/ChainSum-v0", "rpe/ChainSum4-v0"])
def test_registered_envs_pass_check_env(env_id):
    env = gymnasium.make(env_id, n_problems=20)
    check_env(env.unwrapped, skip_render_check=True)


def test_generic_env_takes_any_task():
    env = gymnasium.make("rpe/Reasoning-v0", task="rg:leg_counting", n_problems=5)
    obs, info = env.reset(seed=0)
    assert "legs" in obs.lower() and info["step_index"] == 0


def test_reward_only_at_the_end_from_the_verifier():
    env = ReasoningEnv("chain_sum", n_problems=10)
    obs, info = env.reset(seed=1)
    obs, reward, terminated, truncated, info = env.step("Step 1: 1 + 1 = 2.")
    assert (reward, terminated, truncated, info["step_index"]) == (0.0, False, False, 1)
    assert obs.endswith("Step 1: 1 + 1 = 2.")
    obs, reward, terminated, truncated, info = env.step(f"Answer: {info['answer']}")
    assert (reward, terminated, truncated, info["step_index"], info["final"]) == (1.0, True, False, 2, True)
    env.reset(seed=1)
    assert env.step("Answer: 99999")[1:3] == (0.0, True)


def test_truncation_at_max_steps():
    env = ReasoningEnv("chain_sum", n_problems=3, max_steps=2)
    env.reset(seed=0)
    assert env.step("thinking")[2:4] == (False, False)
    _, reward, terminated, truncated, info = env.step("still thinking")
    assert (reward, terminated, truncated, info["final"]) == (0.0, False, True, True)


def test_reset_is_seeded():
    env = ReasoningEnv("chain_sum", n_problems=50)
    ids = [env.reset(seed=s)[1]["problem_id"] for s in (1, 2, 1)]
    assert ids[0] == ids[2]
    assert env.reset(options={"problem_index": 7})[1]["problem_id"] == env.problems[7].id
    with pytest.raises(ValueError, match="outside the pool"):
        env.reset(options={"problem_index": 50})


def test_step_before_reset_and_bad_action():
    env = ReasoningEnv("chain_sum", n_problems=2)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("x")
    env.reset(seed=0)
    with pytest.raises(TypeError, match="str"):
        env.step(3)


def test_internal_rpe_wrapper_matches_a_whole_transcript_read(tiny_llama):
    """V(s_t), delta_t and dopamine per step equal SignalReader.read of the whole transcript; terminal RPE is
    r - V(s_{T-1}); shaping adds beta (gamma V(s') - V(s)) with potential 0 after the terminal step."""
    import gymnasium
    import numpy as np

    from rpe.envs import InternalRPE
    from rpe.signals import SignalReader

    from conftest import make_tiny_bundle

    model, tok = tiny_llama
    bundle = make_tiny_bundle(model, tok)
    for key in ("net.2.weight", "net.0.weight"):  # a steeper random probe, so values differ between states
        bundle.probe_state.weights[key] = bundle.probe_state.weights[key] * 8
    base = gymnasium.make("rpe/ChainSum-v0", max_steps=6)
    env = InternalRPE(base, bundle, model=model, tokenizer=tok, shaping=0.5)
    obs, info = env.reset(seed=0)
    answer = info["answer"]
    infos, rewards = [], []
    for action in ["4 + 1 = 5.", "5 - 3 = 2.", "2 + 0 = 2.", f"The answer is {answer}."]:
        obs, reward, terminated, truncated, step_info = env.step(action)
        infos.append(step_info)
        rewards.append(reward)
        if terminated or truncated:
            break
    assert terminated and infos[-1]["reward_unshaped"] == 1.0
    unwrapped = base.unwrapped
    p = tok(unwrapped.prompt, add_special_tokens=False)["input_ids"]
    c = tok(unwrapped.completion, add_special_tokens=False)["input_ids"]
    whole = SignalReader(bundle, model, tok).read([p], [c])[0]
    values = env.internal_values
    assert np.ptp(values) > 0.01  # the check below compares values that differ
    np.testing.assert_allclose(values, whole.values, atol=1e-4)
    assert info["internal_value"] == pytest.approx(whole.values[0], abs=1e-4)
    g = env.reader.gamma
    for t, step_info in enumerate(infos[:-1], start=1):
        assert step_info["internal_rpe"] == pytest.approx(g * values[t] - values[t - 1], abs=1e-6)
        assert step_info["dopamine"] == pytest.approx(whole.dopamine[t - 1], abs=1e-4)
        assert rewards[t - 1] == pytest.approx(0.5 * (g * values[t] - values[t - 1]), abs=1e-6)
    assert infos[-1]["internal_rpe"] == pytest.approx(1.0 - values[-2], abs=1e-6)
    assert rewards[-1] == pytest.approx(1.0 + 0.5 * (0.0 - values[-2]), abs=1e-6)
    env.reset(seed=1)  # a new episode starts from a fresh cache
    assert len(env.internal_values) == 1


def test_internal_rpe_feeds_only_each_new_step_and_refuses_another_model(tiny_llama, tiny_bundle):
    import gymnasium

    from rpe.bundle import BundleMismatchError
    from rpe.envs import InternalRPE
    from rpe.models import TinyModelConfig, tiny_model
    from rpe.tracker import decoder_layers

    model, tok = tiny_llama
    env = InternalRPE(gymnasium.make("rpe/ChainSum-v0"), tiny_bundle, model=model, tokenizer=tok)
    widths = []
    hook = decoder_layers(model)[0].register_forward_pre_hook(
        lambda m, args, kwargs: widths.append((kwargs.get("hidden_states", args[0] if args else None)).shape[1]),
        with_kwargs=True)
    try:
        env.reset(seed=0)
        prompt_len = len(tok(env.unwrapped.prompt, add_special_tokens=False)["input_ids"])
        env.step("4 + 1 = 5.")
        env.step("5 + 2 = 7.")
    finally:
        hook.remove()
    step2 = len(tok("\n\n5 + 2 = 7.", add_special_tokens=False)["input_ids"])
    assert widths[0] == prompt_len and len(widths) == 3 and widths[2] == step2  # the prompt once, then each step
    other, otok = tiny_model(TinyModelConfig(architecture="qwen2"))
    with pytest.raises(BundleMismatchError):
        InternalRPE(gymnasium.make("rpe/ChainSum-v0"), tiny_bundle, model=other, tokenizer=otok)
