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
