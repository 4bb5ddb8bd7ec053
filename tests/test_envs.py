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
    assert obs.endswith("Step 1: 1 + 1 = 2.\n\n")  # the next step starts after the separator
    obs, reward, terminated, truncated, info = env.step(f"Answer: {info['answer']}")
    assert (reward, terminated, truncated, info["step_index"], info["final"]) == (1.0, True, False, 2, True)
    assert obs.endswith(f"Step 1: 1 + 1 = 2.\n\nAnswer: {info['answer']}")  # the final transcript
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
    from rpe.tiny import TinyModelConfig, tiny_model
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


def test_internal_rpe_takes_a_bundle_folder_as_the_callback_does(tiny_llama, tiny_bundle, tmp_path):
    """One convention for "a bundle": the object or its folder (the README's gymnasium example passes a folder);
    the folder is loaded, checked against the model, and gives the values the object gives."""
    import gymnasium

    from rpe.bundle import BundleFormatError
    from rpe.envs import InternalRPE

    model, tok = tiny_llama
    folder = tiny_bundle.save(tmp_path / "bundle")
    infos = []
    for bundle in (tiny_bundle, str(folder), folder):
        env = InternalRPE(gymnasium.make("rpe/ChainSum-v0"), bundle, model=model, tokenizer=tok)
        env.reset(seed=3)
        infos.append(env.step("4 + 1 = 5.")[4])
        assert env.bundle.layer == tiny_bundle.layer
    assert infos[1]["internal_value"] == pytest.approx(infos[0]["internal_value"], abs=1e-6)
    assert infos[2]["internal_rpe"] == pytest.approx(infos[0]["internal_rpe"], abs=1e-6)
    with pytest.raises(BundleFormatError, match="not a complete bundle"):
        InternalRPE(gymnasium.make("rpe/ChainSum-v0"), tmp_path / "missing", model=model, tokenizer=tok)
    with pytest.raises(TypeError, match="SubsystemBundle or the path"):
        InternalRPE(gymnasium.make("rpe/ChainSum-v0"), 3, model=model, tokenizer=tok)


def _greedy_tiny(architecture: str = "llama"):
    """A tiny model whose greedy steps are not empty (its end ids are damped) and end at blank lines now and then."""
    import torch

    from rpe.tiny import tiny_model

    model, tok = tiny_model(architecture=architecture)
    with torch.no_grad():
        for end in (tok.eos_token_id, tok.pad_token_id):
            model.lm_head.weight[end] *= 0.3
        model.lm_head.weight[tok.convert_tokens_to_ids("\n")] *= 2.0  # steps end at blank lines
    return model, tok


def test_llm_policy_greedy_step_equals_generate_and_feeds_each_token_once():
    import gymnasium

    from rpe.envs import LLMPolicy
    from rpe.generation import generate_from_ids
    from rpe.sampling import SamplingConfig

    model, tok = _greedy_tiny()
    greedy = SamplingConfig(temperature=0)
    policy = LLMPolicy(model, tok, sampling=greedy, max_step_tokens=12)
    env = gymnasium.make("rpe/ChainSum-v0", max_steps=4)
    obs, _ = env.reset(seed=0)
    for _ in range(4):
        step = policy(obs)
        ids = tok(obs, add_special_tokens=False)["input_ids"]
        ref = generate_from_ids(model, tok, [ids], SamplingConfig(temperature=0, max_new_tokens=12),
                                stop_strings=["\n\n"], engine="generate")
        assert step == ref.texts[0].strip()  # the same step a fresh generate from the whole transcript gives
        obs, _, terminated, truncated, _ = env.step(step)
        if terminated or truncated:
            break
    final = len(tok(obs, add_special_tokens=False)["input_ids"])
    # one prompt prefill, then only new tokens: each transcript token is fed about once (re-tokenised step
    # boundaries are fed again), never the whole transcript per step
    assert policy.stats["fed_tokens"] + policy.stats["generated_tokens"] <= final + 8 * policy.stats["calls"]


def _three_episodes():
    """A greedy tiny model, three ChainSum episodes in a vector env, and a factory of greedy policies on them."""
    import functools

    import gymnasium

    from rpe.envs import LLMPolicy
    from rpe.sampling import SamplingConfig

    model, tok = _greedy_tiny()
    venv = gymnasium.make_vec("rpe/ChainSum-v0", num_envs=3, vectorization_mode="sync", max_steps=3)
    obs, _ = venv.reset(seed=0)
    return tok, venv, obs, functools.partial(LLMPolicy, model, tok, sampling=SamplingConfig(temperature=0),
                                             max_step_tokens=10)


def test_llm_policy_in_a_vector_env_matches_one_episode_at_a_time():
    tok, venv, obs, policy = _three_episodes()
    batched, single = policy(), policy()
    prompt_len = len(tok(obs[0], add_special_tokens=False)["input_ids"])
    for call in range(5):  # past the step limit: autoreset starts new episodes in the same slots
        steps = batched(list(obs))
        if call == 0:  # three new episodes: the shared few-shot prefix is fed once, then each question
            assert batched.stats["fed_tokens"] < 1.5 * prompt_len
        assert steps == [single(o) for o in obs]  # batching episodes together changes no step
        obs, _, _, _, _ = venv.step(steps)
    assert batched.stats["calls"] == 5


def test_llm_policy_keeps_episode_caches_within_its_byte_budget():
    """Episodes beyond the byte budget are dropped oldest first (the newest always stays); steps are unchanged."""
    _, _, obs, policy = _three_episodes()
    roomy = policy()
    first = roomy(list(obs))
    per_episode = roomy.cache_bytes / len(roomy._episodes)
    assert len(roomy._episodes) == 3 and per_episode > 0
    tight = policy(max_cache_bytes=int(1.5 * per_episode))
    assert tight(list(obs)) == first  # the same first steps under a budget that keeps one episode
    assert len(tight._episodes) == 1 and tight.cache_bytes <= 1.5 * per_episode
    assert tight(list(obs)) == first  # dropped caches are rebuilt from the transcripts: the steps do not change


def test_internal_rpe_refeeds_from_where_a_retokenised_transcript_differs(tiny_llama, tiny_bundle):
    """When the transcript's tokens change before the end of what was fed (a re-tokenised boundary), the cache is
    cropped to the common prefix and the rest fed again: the recorded columns equal a fresh forward's."""
    import gymnasium
    import torch

    from rpe.envs import InternalRPE
    from rpe.tracker import ActivationTracker

    model, tok = tiny_llama
    env = InternalRPE(gymnasium.make("rpe/ChainSum-v0"), tiny_bundle, model=model, tokenizer=tok)
    env.reset(seed=0)
    a = tok("Q: 12 + 30 = 42\n\nok", add_special_tokens=False)["input_ids"]
    b = a[:6] + tok("9 + 1 = 10", add_special_tokens=False)["input_ids"]  # differs from position 6 on
    env._feed(a)
    env._feed(b)
    with ActivationTracker(model, [tiny_bundle.layer], neurons=env.reader.columns, record_all=True) as tr, \
            torch.no_grad():
        model(input_ids=torch.tensor([b]))
    torch.testing.assert_close(env._acts, tr.generated()[tiny_bundle.layer][0].float(), atol=1e-4, rtol=1e-4)


def test_bench_env_runs_both_arms_on_a_tiny_model(tiny_llama, tmp_path):
    from rpe.bench.rollouts import RolloutBenchConfig, bench_env

    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = RolloutBenchConfig(model=str(tmp_path / "m"), task="chain_sum_2", n_problems=3, batch_size=3,
                             max_new_tokens=12, max_step_tokens=6, max_steps=2)
    out = bench_env(cfg)
    assert out["n_episodes"] == 3 and 3 <= out["env_steps"] <= 6
    assert out["ratio"] > 0 and out["policy_stats"]["calls"] >= 1
    # the shared-prefix arm generated what the copied one did, and shared its prompts' prefix
    assert out["same_generated_tokens"] and out["policy_stats"]["shared_prefix_tokens"] > 0
    assert out["ratio_shared_vs_copied_prefix"] > 0


def test_bench_rollouts_runs_every_arm_on_a_tiny_model(tiny_llama, tmp_path):
    from rpe.bench.rollouts import RolloutBenchConfig, bench_rollouts

    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = RolloutBenchConfig(model=str(tmp_path / "m"), task="chain_sum_2", n_problems=4, batch_size=4,
                             max_new_tokens=12, max_step_tokens=6, max_steps=2, naive_problems=2, mc_states=4,
                             dtypes=("float32", "bfloat16"))
    out = bench_rollouts(cfg)
    arms = {"plain_generate", "rpe_generate_engine", "rpe_copied_prefix", "rpe", "rpe_capture_4_layers"}
    assert set(out["useful_tokens_per_s"]) == {"naive_env_loop", *arms} and out["dtype"] == "float32"
    assert set(out["mc_states_per_s"]) == {"generate", "continuous_copied_prefix", "continuous"}
    assert out["compute_bound_tokens_per_s"] > 0 and out["compute_bound_tokens_per_s_shared_prefix"] > 0
    traffic = out["decode_traffic"]  # 4 rows: the prefix read 4 times when copied, once when shared
    assert traffic["prefix_kv_bytes_per_copy"] > 0
    assert traffic["copied_prefix_bytes_per_step"] - traffic["weights_bytes"] == 4 * traffic["prefix_kv_bytes_per_copy"]
    assert traffic["shared_prefix_bytes_per_step"] - traffic["weights_bytes"] == traffic["prefix_kv_bytes_per_copy"]
    from rpe.bench.rollouts import dtype_refusal

    if dtype_refusal("bfloat16") is None:
        assert out["by_dtype"]["bfloat16"]["dtype"] == "bfloat16" and set(out["ratio_bf16_vs_fp32"]) == arms
    else:
        assert "bfloat16" in out["dtypes_skipped"]


def _episode_tokens(policy, env):
    """The policy's tokens of the finished transcript and the prompt's length in them."""
    from rpe.envs.reasoning_env import STEP_SEPARATOR

    u = env.unwrapped
    ids, _ = policy.observe(u.prompt + u.completion + STEP_SEPARATOR)  # all fed already: nothing new
    return ids, len(policy.tokenizer(u.prompt, add_special_tokens=False)["input_ids"])


def _model_tokens(model):
    """A counter of the tokens that go through the model's first block (all forwards, all rows)."""
    from rpe.tracker import decoder_layers

    seen = []
    hook = decoder_layers(model)[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None).shape[:2].numel()),
        with_kwargs=True)
    return seen, hook


def _run_episode(env, policy, seed, max_calls=6):
    obs, info = env.reset(seed=seed)
    infos, steps = [info], []
    for _ in range(max_calls):
        steps.append(policy(obs))
        obs, _, terminated, truncated, info = env.step(steps[-1])
        infos.append(info)
        if terminated or truncated:
            break
    return steps, infos


def test_internal_rpe_on_the_policy_reads_what_the_policy_recorded():
    """With policy=, V(s_t), delta_t and dopamine equal SignalReader.read of the transcript in the policy's own tokens,
    the steps are those of the policy alone, and the wrapper adds no forward of its own."""
    import gymnasium
    import numpy as np

    from rpe.envs import InternalRPE, LLMPolicy
    from rpe.sampling import SamplingConfig
    from rpe.signals import SignalReader

    from conftest import make_tiny_bundle

    model, tok = _greedy_tiny()
    bundle = make_tiny_bundle(model, tok)
    for key in ("net.2.weight", "net.0.weight"):  # a steeper random probe, so values differ between states
        bundle.probe_state.weights[key] = bundle.probe_state.weights[key] * 8
    greedy = SamplingConfig(temperature=0)

    alone = LLMPolicy(model, tok, sampling=greedy, max_step_tokens=12)
    seen, hook = _model_tokens(model)
    try:
        plain = [_run_episode(gymnasium.make("rpe/ChainSum-v0", max_steps=4), alone, seed)[0] for seed in (0, 1)]
    finally:
        hook.remove()
    tokens_alone = sum(seen)

    policy = LLMPolicy(model, tok, sampling=greedy, max_step_tokens=12)
    env = InternalRPE(gymnasium.make("rpe/ChainSum-v0", max_steps=4), bundle, policy)
    seen, hook = _model_tokens(model)
    try:
        runs = [_run_episode(env, policy, seed) for seed in (0, 1)]
    finally:
        hook.remove()
    assert [steps for steps, _ in runs] == plain  # recording changes no step
    # no forward of the wrapper's own (that would add every step's ~12 tokens): only each prompt's last token is
    # computed twice (at reset for V(s_0), then with the first step's batch)
    assert sum(seen) == tokens_alone + 2

    reader = SignalReader(bundle, model, tok)
    for seed, (steps, infos) in zip((0, 1), runs):
        env.reset(seed=seed)
        for step in steps:  # replay (the policy's cache holds this transcript: nothing is fed again)
            env.step(step)
        ids, p = _episode_tokens(policy, env)
        whole = reader.read([ids[:p]], [ids[p:]])[0]
        values = env.internal_values
        assert len(values) == len(steps) + 1 and np.ptp(values) > 0.01
        np.testing.assert_allclose([i["internal_value"] for i in infos], values, atol=1e-6)
        np.testing.assert_allclose(values, whole.values, atol=1e-4)
        np.testing.assert_allclose([i["dopamine"] for i in infos[1:]], whole.dopamine, atol=1e-4)


def test_internal_rpe_reads_an_outside_action_through_the_policy_cache(tiny_llama, tiny_bundle):
    """An action the policy did not write is fed once (its tokens only) and read like any other."""
    import gymnasium
    import numpy as np

    from rpe.envs import InternalRPE, LLMPolicy
    from rpe.signals import SignalReader

    model, tok = tiny_llama
    policy = LLMPolicy(model, tok, max_step_tokens=8)
    env = InternalRPE(gymnasium.make("rpe/ChainSum-v0"), tiny_bundle, policy)
    env.reset(seed=0)
    fed = policy.stats["fed_tokens"]
    env.step("4 + 1 = 5.")
    step_tokens = len(tok("\n\n4 + 1 = 5.\n\n", add_special_tokens=False)["input_ids"])
    assert policy.stats["fed_tokens"] - fed <= step_tokens  # only the new step (and its separator)
    env.step("Answer: 7")
    ids, p = _episode_tokens(policy, env)
    whole = SignalReader(tiny_bundle, model, tok).read([ids[:p]], [ids[p:]])[0]
    np.testing.assert_allclose(env.internal_values, whole.values, atol=1e-4)
    with pytest.raises(ValueError, match="another bundle"):
        from conftest import make_tiny_bundle

        InternalRPE(gymnasium.make("rpe/ChainSum-v0"), make_tiny_bundle(model, tok, layer=1), policy)
    with pytest.raises(TypeError, match="policy="):
        InternalRPE(gymnasium.make("rpe/ChainSum-v0"), tiny_bundle)


def test_internal_rpe_wrappers_of_a_vector_env_share_one_policy():
    """gymnasium.make_vec with InternalRPE on each sub-environment and one LLMPolicy: the batched episodes give the
    values one episode at a time gives, through autoreset."""
    import gymnasium
    import numpy as np

    from rpe.envs import InternalRPE, LLMPolicy
    from rpe.sampling import SamplingConfig

    from conftest import make_tiny_bundle

    model, tok = _greedy_tiny()
    bundle = make_tiny_bundle(model, tok)
    greedy = SamplingConfig(temperature=0)
    policy = LLMPolicy(model, tok, sampling=greedy, max_step_tokens=10)
    venv = gymnasium.make_vec("rpe/ChainSum-v0", num_envs=3, vectorization_mode="sync", max_steps=2,
                              wrappers=[lambda e: InternalRPE(e, bundle, policy)])
    obs, info = venv.reset(seed=0)
    batched = [list(info["internal_value"])]
    for _ in range(2):
        obs, _, _, _, info = venv.step(policy(list(obs)))
        batched.append(list(info["internal_value"]))
    single_policy = LLMPolicy(model, tok, sampling=greedy, max_step_tokens=10)
    for i in range(3):
        env = InternalRPE(gymnasium.make("rpe/ChainSum-v0", max_steps=2), bundle, single_policy)
        _, infos = _run_episode(env, single_policy, seed=i, max_calls=2)  # make_vec seeds env i with seed + i
        np.testing.assert_allclose([row[i] for row in batched][: len(infos)], [x["internal_value"] for x in infos],
                                   atol=1e-4)


def test_policy_and_wrapper_on_the_real_default_model(real_model):
    """SmolLM2 acting in the default task through LLMPolicy + InternalRPE: non-empty steps that continue the
    transcript as one greedy generate of the whole completion does, an answer at the end, and values equal to a
    whole-transcript read."""
    import numpy as np

    from rpe.bundle import random_bundle
    from rpe.envs import InternalRPE, LLMPolicy, ReasoningEnv
    from rpe.generation import generate_from_ids
    from rpe.sampling import SamplingConfig
    from rpe.signals import SignalReader

    model, tok = real_model
    bundle = random_bundle(model, tok, layer=20, k=6, m=6, hidden=32)
    greedy = SamplingConfig(temperature=0)
    alone = LLMPolicy(model, tok, sampling=greedy, max_step_tokens=48)
    seen, hook = _model_tokens(model)
    try:
        plain = [_run_episode(ReasoningEnv("chain_sum_mix", n_problems=20, max_steps=6), alone, s)[0] for s in (0, 1)]
    finally:
        hook.remove()
    tokens_alone = sum(seen)
    policy = LLMPolicy(model, tok, sampling=greedy, max_step_tokens=48)
    env = InternalRPE(ReasoningEnv("chain_sum_mix", n_problems=20, max_steps=6), bundle, policy)
    seen, hook = _model_tokens(model)
    try:
        runs = [_run_episode(env, policy, seed) for seed in (0, 1)]
    finally:
        hook.remove()
    assert [steps for steps, _ in runs] == plain
    assert sum(seen) == tokens_alone + 2  # only each prompt's last token is computed twice
    reader = SignalReader(bundle, model, tok)
    for seed, (steps, infos) in zip((0, 1), runs):
        env.reset(seed=seed)
        for step in steps:
            env.step(step)
        assert all(steps) and "final" in infos[-1] and infos[-1]["step_index"] == len(steps)
        assert "answer" in steps[-1].lower()  # ended by a final answer, not by the step limit
        prompt_ids = tok(env.unwrapped.prompt, add_special_tokens=False)["input_ids"]
        ref = generate_from_ids(model, tok, [prompt_ids], SamplingConfig(temperature=0, max_new_tokens=160),
                                stop_strings=["Question:"], engine="generate")
        assert ref.texts[0].startswith("\n\n".join(steps))  # step by step = one generate (own tokens kept)
        ids, p = _episode_tokens(policy, env)
        whole = reader.read([ids[:p]], [ids[p:]])[0]
        np.testing.assert_allclose(env.internal_values, whole.values, atol=1e-4)
        assert len(whole.values) == len(steps) + 1


def test_llm_policy_shares_the_few_shot_prefix_and_changes_no_step(monkeypatch):
    """Episodes of one call share their few-shot prefix: the batch holds it once (each row's cache is narrower
    than the prefix), and sampled steps and recorded activations equal the copied prefix's."""
    import torch

    import rpe.envs.policy as policy_module
    from rpe.kvcache import cache_len
    from rpe.sampling import SamplingConfig

    tok, venv, obs, policy = _three_episodes()
    prompt_len = len(tok(obs[0], add_special_tokens=False)["input_ids"])
    widths = []
    real_step = policy_module.decode_step

    def spy(model, cache, mask, tokens, positions, **kw):
        widths.append((cache_len(cache), "shared_prefix" in kw))
        return real_step(model, cache, mask, tokens, positions, **kw)

    monkeypatch.setattr(policy_module, "decode_step", spy)
    sampled = SamplingConfig(temperature=1.0)
    shared, copied = policy(sampling=sampled, seed=3), policy(sampling=sampled, seed=3, share_prefix=False)
    for p in (shared, copied):
        p.record(2, torch.tensor([0, 5, 9]))
    runs = {}
    for name, p in (("shared", shared), ("copied", copied)):
        widths.clear()
        o, _ = venv.reset(seed=0)
        steps = []
        for _ in range(3):
            steps.append(p(list(o)))
            o, _, _, _, _ = venv.step(steps[-1])
        runs[name] = (steps, [p.observe(x)[1] for x in o], list(widths))
    (steps_s, acts_s, widths_s), (steps_c, acts_c, widths_c) = runs["shared"], runs["copied"]
    assert steps_s == steps_c
    for a, b in zip(acts_s, acts_c):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert all(kw for _, kw in widths_s) and not any(kw for _, kw in widths_c)
    # the rows of the copied batch hold the whole prompt (all but its last token), the shared batch's rows their own
    assert max(w for w, _ in widths_s) < prompt_len // 4 and min(w for w, _ in widths_c) == prompt_len - 1
    assert shared.stats["shared_prefix_tokens"] >= 3 * (prompt_len // 2) and copied.stats["shared_prefix_tokens"] == 0


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "phi3"])
def test_llm_policy_shared_prefix_steps_equal_one_episode_at_a_time_on_each_architecture(arch):
    """Greedy steps of three episodes batched with their prefix shared equal each episode alone (no sharing)."""
    import gymnasium

    from rpe.envs import LLMPolicy
    from rpe.sampling import SamplingConfig

    model, tok = _greedy_tiny(arch)
    venv = gymnasium.make_vec("rpe/ChainSum-v0", num_envs=3, vectorization_mode="sync", max_steps=2)
    obs, _ = venv.reset(seed=0)
    batched, single = (LLMPolicy(model, tok, sampling=SamplingConfig(temperature=0), max_step_tokens=8)
                       for _ in range(2))
    for _ in range(2):
        steps = batched(list(obs))
        assert steps == [single(o) for o in obs]
        obs, _, _, _, _ = venv.step(steps)
    assert batched.stats["shared_prefix_tokens"] > 0 and single.stats["shared_prefix_tokens"] == 0
