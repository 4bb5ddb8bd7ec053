import math

import numpy as np
import pytest
import torch

from rpe.probe import ProbeConfig, SingleClassError, ValueProbe, lambda_returns, split_by_problem
from rpe.records import SCHEMA_VERSION, Step, Trajectory
from rpe.store import StateSet, capture_states

PLANTED = [5, 17, 42]


def _synthetic_trajectories(tok, n_problems=120, samples=2, seed=0):
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghij0123456789 +=")
    out = []
    for p in range(n_problems):
        prompt = tok("Q" + "".join(rng.choice(alphabet, 12)), add_special_tokens=False)["input_ids"]
        for k in range(samples):
            comp = tok("".join(rng.choice(alphabet, 18)), add_special_tokens=False)["input_ids"]
            steps = [Step("x", 0, 1, 0, 6), Step("y", 0, 1, 6, 12), Step("z", 0, 1, 12, 18)]
            out.append(Trajectory(SCHEMA_VERSION, f"p{p}#{k}", f"p{p}", "synthetic", k, "", "", steps, None, "1",
                                  float(rng.random() < 0.5), prompt, comp, "eos", False, False, {}, {}, seed))
    return out


@pytest.fixture(scope="module")
def planted_states():
    """Real tiny-model activations at s_0..s_3 with a value signal planted in three neurons of layer 1."""
    from rpe.tiny import tiny_model

    model, tok = tiny_model()
    trajs = _synthetic_trajectories(tok)
    states = capture_states(model, trajs, [1], batch_size=64)
    acts = states.acts[1]
    scale = acts.std(0)
    r = states.state_rewards() * 2 - 1  # +-1
    ramp = (states.step_index.float() + 1) / 4  # the value gets more certain as reasoning proceeds
    for j in PLANTED:
        acts[:, j] += 1.2 * scale[j] * r * ramp
    return states


@pytest.mark.parametrize("target", ["mc", "td0", "td_lambda"])
def test_synthetic_recovery_of_planted_value_neurons(planted_states, target):
    probe = ValueProbe(ProbeConfig(target=target, hidden=256, epochs=40, lr=1e-3, seed=0)).fit(planted_states, layer=1)
    assert probe.metrics["test_auroc_final"] > 0.9
    assert set(probe.prune(3 / 64).tolist()) == set(PLANTED)
    refit = ValueProbe(ProbeConfig(target=target, hidden=256, epochs=40, lr=1e-3)).fit(planted_states, 1, probe.prune(3 / 64))
    assert refit.metrics["test_auroc_final"] > 0.9
    assert refit.predict(planted_states.acts[1]).shape == (planted_states.n_states,)


def test_no_signal_gives_chance_auroc(planted_states):
    shuffled = StateSet({1: planted_states.acts[1][:, [i for i in range(64) if i not in PLANTED]]},
                        planted_states.traj_index, planted_states.step_index, planted_states.trajectory_ids,
                        planted_states.problem_ids, planted_states.rewards)
    probe = ValueProbe(ProbeConfig(target="mc", hidden=256, epochs=30, lr=1e-3)).fit(shuffled, 1)
    assert abs(probe.metrics["test_auroc_final"] - 0.5) < 0.2


def test_lambda_returns_match_definitions():
    traj = torch.tensor([0, 0, 0, 1, 1])
    rewards = torch.tensor([1.0, 0.0])
    values = torch.tensor([0.2, 0.4, 0.6, 0.3, 0.9])
    g = 0.9
    td0 = lambda_returns(values, rewards, traj, g, 0.0)
    assert torch.allclose(td0, torch.tensor([g * 0.4, g * 0.6, 1.0, g * 0.9, 0.0]))
    mc = lambda_returns(values, rewards, traj, g, 1.0)
    assert torch.allclose(mc, torch.tensor([g * g, g, 1.0, 0.0, 0.0]))
    # TD targets equal MC targets when gamma = 1 and V is the true return
    true_v = rewards[traj]
    assert torch.allclose(lambda_returns(true_v, rewards, traj, 1.0, 0.0), lambda_returns(true_v, rewards, traj, 1.0, 1.0))


def test_split_is_by_problem_and_seeded():
    pids = [f"p{i // 3}" for i in range(300)]
    split = split_by_problem(pids, 0.15, 0.15, seed=1)
    for p in set(pids):
        assert len({split[i] for i, q in enumerate(pids) if q == p}) == 1
    assert (split == split_by_problem(pids, 0.15, 0.15, seed=1)).all()
    assert abs((split == 2).mean() - 0.15) < 0.02
    with pytest.raises(ValueError, match="too few"):
        split_by_problem(["a", "b"], 0.15, 0.15, 0)


def test_single_class_is_refused_with_advice(planted_states):
    st = planted_states
    allright = StateSet(st.acts, st.traj_index, st.step_index, st.trajectory_ids, st.problem_ids, torch.ones_like(st.rewards))
    with pytest.raises(SingleClassError, match="too easy.*20% and 80%"):
        ValueProbe().fit(allright, 1)


def test_probe_config_checks():
    with pytest.raises(ValueError, match="td0, td_lambda, mc"):
        ProbeConfig(target="q")
    with pytest.raises(ValueError, match="gamma"):
        ProbeConfig(gamma=0)
    with pytest.raises(RuntimeError, match="not fitted"):
        ValueProbe().predict(torch.zeros(1, 4))


def test_state_set_round_trip(planted_states, tmp_path):
    planted_states.save(tmp_path / "s.safetensors", dtype=torch.float16)
    back = StateSet.load(tmp_path / "s.safetensors")
    assert back.trajectory_ids == planted_states.trajectory_ids
    assert torch.equal(back.traj_index, planted_states.traj_index)
    assert torch.allclose(back.acts[1], planted_states.acts[1], atol=1e-2, rtol=1e-2)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable activation store"):
        StateSet.load(tmp_path / "bad.safetensors")


def test_nan_activations_name_layer_and_trajectory(tiny_llama):
    from rpe.tracker import NonFiniteActivationError, decoder_layers

    model, tok = tiny_llama
    trajs = _synthetic_trajectories(tok, n_problems=2, samples=1)
    handle = decoder_layers(model)[0].register_forward_hook(lambda m, a, o: (o[0] * math.nan,) + tuple(o[1:]) if isinstance(o, tuple) else o * math.nan)
    try:
        with pytest.raises(NonFiniteActivationError, match=r"layer 1 .*p0#0.*load in bfloat16 or float32 \(--dtype\)"):
            capture_states(model, trajs, [1])
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", ["ends", "steps"])
def test_shared_prefix_reuse_gives_the_same_activations(arch, mode):
    from rpe.tiny import TinyModelConfig, tiny_model

    model, tok = tiny_model(TinyModelConfig(architecture=arch))
    shared = tok("Q: worked example one. A: 1. Q: worked example two. A: 2. ", add_special_tokens=False)["input_ids"]
    trajs = _synthetic_trajectories(tok, n_problems=5, samples=2)
    for t in trajs:
        t.prompt_token_ids = shared + t.prompt_token_ids
    fast = capture_states(model, trajs, [0, 2], batch_size=3, mode=mode, reuse_prefix=True, min_prefix=8)
    slow = capture_states(model, trajs, [0, 2], batch_size=3, mode=mode, reuse_prefix=False)
    for layer in (0, 2):
        assert torch.allclose(fast.acts[layer], slow.acts[layer], atol=1e-4)
    assert torch.equal(fast.step_index, slow.step_index)


def test_mean_prompt_logprob_matches_a_plain_forward(tiny_llama):
    from rpe.baselines import mean_prompt_logprob

    model, tok = tiny_llama
    shared = tok("Q: worked example one. A: 1. Q: two. A: 2. ", add_special_tokens=False)["input_ids"]
    trajs = _synthetic_trajectories(tok, n_problems=3, samples=1)
    for t in trajs:
        t.prompt_token_ids = shared + t.prompt_token_ids
    from rpe.kvcache import common_prefix_len

    shared_len = common_prefix_len([t.prompt_token_ids for t in trajs])
    assert shared_len >= len(shared)
    got = mean_prompt_logprob(model, trajs, batch_size=2)
    for t, g in zip(trajs, got):
        ids = torch.tensor([t.prompt_token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        assert torch.isclose(g, logp[shared_len:].mean(), atol=1e-4)


def test_lbfgs_reaches_the_newton_optimum_of_the_soft_target_logistic_loss(monkeypatch):
    """Wide probes (d > NEWTON_MAX_DIM) are fitted by L-BFGS; on data both can fit, it lands on Newton's optimum."""
    from torch import nn

    import rpe.logistic
    from rpe.logistic import NEWTON_MAX_DIM, fit_logistic, lbfgs_fit, newton_fit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 48, generator=g)
    w_true = torch.randn(48, generator=g)
    targets = torch.sigmoid(x @ w_true * 0.5)  # soft targets, as TD bootstraps give
    fits = {}
    for name, solve in (("newton", newton_fit), ("lbfgs", lbfgs_fit)):
        lin = nn.Linear(48, 1)
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
        solve(lin, x, targets, 1e-2)
        fits[name] = torch.cat([lin.weight.flatten(), lin.bias]).detach()
    torch.testing.assert_close(fits["lbfgs"], fits["newton"], atol=2e-4, rtol=1e-3)
    monkeypatch.setattr(rpe.logistic, "newton_fit", lambda *a, **k: pytest.fail("Newton on a wide probe"))
    wide = torch.randn(50, NEWTON_MAX_DIM + 1, generator=g)
    lin = nn.Linear(NEWTON_MAX_DIM + 1, 1)
    calls = fit_logistic(lin, wide, (wide[:, 0] > 0).float(), 1e-1)  # L-BFGS: no (d+1) x (d+1) system
    assert calls > 1 and torch.isfinite(lin.weight).all()
