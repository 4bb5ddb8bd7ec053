import numpy as np
import pytest
import torch

from rpe.dopamine import DopamineConfig, find_dopamine_neurons, mc_state_values
from rpe.probe import td_errors
from rpe.prompts import PromptConfig
from rpe.records import read_trajectories
from rpe.rollouts import RolloutConfig, collect_rollouts
from rpe.sampling import SamplingConfig
from rpe.tasks import load_task
from conftest import make_tiny_bundle  # noqa: I001


def test_td_errors_definition():
    assert td_errors([0.2, 0.5, 1.0], gamma=1.0, reward=1.0) == pytest.approx([0.3, 0.5])
    assert td_errors([0.5, 0.0], gamma=0.9, reward=0.0) == pytest.approx([-0.5])
    assert td_errors([0.5, 0.8, 0.7], gamma=0.9, reward=1.0) == pytest.approx([0.9 * 0.8 - 0.5, 0.2])  # r undiscounted
    assert td_errors([0.5, 0.8, 0.7], gamma=0.9) == pytest.approx([0.9 * 0.8 - 0.5, 0.9 * 0.7 - 0.8])  # no reward seen
    assert td_errors([0.4], gamma=0.9, reward=1.0).size == 0  # no step, no error
    with pytest.raises(ValueError, match="V\\(s_0..s_T\\)"):
        td_errors([], gamma=0.9)


def test_an_exact_prediction_of_the_reward_is_a_zero_error_whatever_the_reward():
    """r = V(s_{T-1}) gives delta_T = 0 for r = 1 as for r = 0 (a discounted reward made the first -1e-5, which
    ranked every correct episode's exact prediction below every wrong one's)."""
    gamma = 1 - 1e-5
    assert td_errors([0.3, 1.0, 1.0], gamma, reward=1.0)[-1] == 0.0 == td_errors([0.3, 0.0, 0.0], gamma, reward=0.0)[-1]


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
    assert 0.4 < m["test_spearman_low"] < m["test_spearman_dopamine"] < m["test_spearman_high"]
    assert m["test_permutation_p"] == pytest.approx(1 / (DopamineConfig().n_perm + 1))  # no shuffle reaches it
    assert m["test_random_sets_at_least"] == 0.0


def test_dopamine_neurons_of_noise_are_not_distinguishable_from_chance():
    """No neuron tracks delta: the held-out interval includes 0, the p-value is large and the card says so."""
    from rpe.report_card import NOT_REPRODUCED, dopamine_row

    rng = np.random.default_rng(1)
    n, d = 900, 100
    deltas = rng.choice([-0.8, -0.5, 0.5, 0.8], size=n)
    pids = [f"p{i // 3}" for i in range(n)]
    m = find_dopamine_neurons(torch.tensor(rng.normal(size=(n, d))), deltas, pids,
                              DopamineConfig(top_frac=0.02, n_random=30)).metrics
    assert m["test_spearman_low"] < 0 < m["test_spearman_high"] and m["test_permutation_p"] > 0.05
    row = dopamine_row(m)
    assert row.verdict == NOT_REPRODUCED and "not distinguishable from chance" in row.note


def test_dopamine_row_needs_power_an_interval_above_zero_and_a_beaten_control():
    from rpe.report_card import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, dopamine_row

    base = {"n_surprising": 400, "n_test": 120, "test_spearman_dopamine": 0.35, "test_spearman_low": 0.2,
            "test_spearman_high": 0.5, "test_permutation_p": 0.001, "test_spearman_random_mean": 0.0,
            "test_spearman_random_q95": 0.15}
    assert dopamine_row(base).verdict == REPRODUCED
    assert dopamine_row({**base, "n_surprising": 120}).verdict == INCONCLUSIVE
    assert dopamine_row({**base, "test_spearman_random_q95": 0.4}).verdict == NOT_REPRODUCED
    assert dopamine_row({**base, "test_spearman_low": -0.05}).verdict == NOT_REPRODUCED
    assert dopamine_row({**base, "test_permutation_p": 0.2}).verdict == NOT_REPRODUCED


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


@pytest.fixture
def stepped_rollouts(tiny_llama, tmp_path):
    """Rollouts of the tiny model with many steps per completion (steps end at lower-case letters and digits), and a folder holding
    the model so the CLI can load it by the name the manifest records."""
    model, tok = tiny_llama
    model_dir = tmp_path / "tiny_model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = RolloutConfig(n_problems=12, samples=1, segmenter="regex", segment_pattern="[a-z0-9]",
                        sampling=SamplingConfig(max_new_tokens=24), prompt=PromptConfig(shots=1))
    out = tmp_path / "rollouts"
    collect_rollouts(model, tok, cfg, out, model_name=str(model_dir))
    trajs = read_trajectories(out)
    assert sum(len(t.steps) for t in trajs) >= 40
    return out, trajs


def _planted_values(trajs) -> dict[str, list[float]]:
    """Known Monte-Carlo values: V(s_k) cycles through 0.9, 0.1, 0.6, ...; V(s_T) is the reward."""
    cycle = [0.9, 0.1, 0.6, 0.0, 1.0, 0.3]
    return {t.trajectory_id: [cycle[(k + i) % 6] for k in range(len(t.steps))] + [t.reward]
            for i, t in enumerate(trajs) if t.steps}


def test_dopamine_from_rollouts_maps_each_step_to_its_td_error(tiny_llama, stepped_rollouts, monkeypatch):
    """Step rows -> TD errors: the activation of the end of step t is paired with gamma V(s_t) - V(s_{t-1}) of
    its own trajectory, for every step in order, and the problem ids travel with them."""
    import rpe.dopamine as dopamine
    from rpe.store import capture_states

    model, tok = tiny_llama
    out, trajs = stepped_rollouts
    planted = _planted_values(trajs)
    monkeypatch.setattr(dopamine, "mc_state_values", lambda *a, **k: planted)
    seen = {}
    real_find = dopamine.find_dopamine_neurons

    def spy(acts, deltas, pids, cfg):
        seen.update(acts=acts, deltas=deltas, pids=pids)
        return real_find(acts, deltas, pids, cfg)

    monkeypatch.setattr(dopamine, "find_dopamine_neurons", spy)
    cfg = DopamineConfig(n_random=5, epochs=20, gamma=0.9, min_surprising=5)
    bundle = make_tiny_bundle(model, tok)  # dopamine_from_rollouts updates it (the session bundle stays as it is)
    result = dopamine.dopamine_from_rollouts(model, tok, out, bundle, cfg)
    expected_deltas, expected_pids, expected_acts = [], [], []
    stepped = [t for t in trajs if t.steps]
    states = capture_states(model, stepped, [bundle.layer], mode="steps", pad_token_id=tok.pad_token_id)
    for i, t in enumerate(stepped):
        v = planted[t.trajectory_id]
        for k in range(1, len(t.steps) + 1):
            expected_deltas.append(0.9 * v[k] - v[k - 1])
            expected_pids.append(t.problem_id)
            row = ((states.traj_index == i) & (states.step_index == k)).nonzero().item()
            expected_acts.append(states.acts[bundle.layer][row])
    np.testing.assert_allclose(seen["deltas"], expected_deltas, atol=1e-12)
    assert seen["pids"] == expected_pids
    torch.testing.assert_close(seen["acts"], torch.stack(expected_acts))
    assert result.metrics["n_trajectories"] == len(stepped)
    assert result.metrics["mean_mc_value"] == pytest.approx(np.mean(np.concatenate(list(planted.values()))))


class _RecordingTask:
    """Scores 1.0 when the text it is given ends with an odd continuation index, and remembers every text."""

    def __init__(self):
        self.texts = []

    def score(self, problem, text):
        self.texts.append(text)
        return float(text.endswith(("#1", "#3")))


def test_mc_values_join_each_continuation_to_the_transcript_up_to_its_state(tiny_llama, stepped_rollouts, monkeypatch):
    import rpe.dopamine as dopamine
    from rpe.sampling import GeneratedBatch

    model, tok = tiny_llama
    _, trajs = stepped_rollouts
    trajs = [t for t in trajs if len(t.steps) >= 2][:2]
    calls = []

    def fake_generate(model, tokenizer, prompts, sampling, stop_strings=(), seed=0, **engine_options):
        calls.append([list(p) for p in prompts])
        texts = [f" cont#{j % 4}" for j in range(len(prompts))]
        return GeneratedBatch(prompt_ids=[list(p) for p in prompts], completion_ids=[[] for _ in prompts], texts=texts,
                              finish_reasons=["eos"] * len(prompts), prompt_truncated=[False] * len(prompts))

    monkeypatch.setattr(dopamine, "generate_from_ids", fake_generate)
    task = _RecordingTask()
    problems = {t.problem_id: None for t in trajs}
    values = dopamine.mc_state_values(model, tok, task, problems, trajs, DopamineConfig(n_continuations=4, batch_size=8))
    prompts = [p for c in calls for p in c]
    expected_prompts, expected_texts = [], []
    for t in trajs:
        for k in range(len(t.steps)):
            prefix = t.prompt_token_ids + t.completion_token_ids[: t.steps[k - 1].token_end] if k else t.prompt_token_ids
            head = t.completion[: t.steps[k - 1].char_end] if k else ""
            expected_prompts += [prefix] * 4
            expected_texts += [head + f" cont#{j}" for j in range(4)]
    assert prompts == expected_prompts  # every state's continuations start from the transcript up to it
    assert task.texts == expected_texts  # and are scored joined to the text of the steps before
    for t in trajs:
        assert values[t.trajectory_id] == [0.5] * len(t.steps) + [t.reward]  # 2 of 4 continuations "correct"


def test_rpe_dopamine_command_end_to_end(tiny_llama, stepped_rollouts, monkeypatch):
    """`rpe dopamine` on a tiny model loaded from the folder the manifest names: the bundle on disk gains
    dopamine neurons with signs and metrics, and the command prints the held-out table. The Monte-Carlo values
    are planted (a random model solves nothing, so sampled values would all be 0)."""
    from typer.testing import CliRunner

    import rpe.dopamine as dopamine
    from rpe.bundle import SubsystemBundle
    from rpe.cli import app

    model, tok = tiny_llama
    out, trajs = stepped_rollouts
    bundle_dir = make_tiny_bundle(model, tok).save(out.parent / "bundle")
    planted = _planted_values(trajs)
    monkeypatch.setattr(dopamine, "mc_state_values", lambda *a, **k: planted)
    r = CliRunner().invoke(app, ["dopamine", "--rollouts", str(out), "--bundle", str(bundle_dir), "--threshold", "0.2",
                                 "--top-frac", "0.05", "--sweep-layers", "1,3"])
    assert r.exit_code == 0, r.output
    saved = SubsystemBundle.load(bundle_dir, model=model, tokenizer=tok)
    assert saved.dopamine_neurons.numel() == round(0.05 * 64) and set(saved.dopamine_sign.tolist()) <= {-1.0, 1.0}
    m = saved.metrics["dopamine"]
    assert m["n_trajectories"] == len([t for t in trajs if t.steps]) and m["n_surprising"] >= 10
    assert "dopamine neurons, layer" in r.output and "Spearman with RPE" in r.output
    assert f"{m['test_spearman_dopamine']:.3f}" in r.output
    printed = " ".join(r.output.split())
    assert m["n_surprising"] < 300 and "held-out Spearman: inconclusive, only" in printed  # the card's power rule
    # the sweep: the bundle's layer (2) and the others, the bundle's own row equal to its result
    assert set(m["by_layer"]) == {"1", "2", "3"} and "the same search at each layer" in r.output
    own = m["by_layer"]["2"]
    assert own["test_spearman_dopamine"] == m["test_spearman_dopamine"] and own["neurons"] == saved.dopamine_neurons.tolist()
    assert all(v["p_bonferroni"] == min(1.0, 3 * v["test_permutation_p"]) for v in m["by_layer"].values())


def test_continuation_budget_is_sized_from_the_rollouts(tiny_llama, tmp_path):
    """No budget given: continuations get the longest completion's tokens (the cache key records it)."""
    import json

    from rpe.dopamine import continuation_budget

    model, tok = tiny_llama
    cfg = RolloutConfig(n_problems=3, samples=1, sampling=SamplingConfig(max_new_tokens=16), prompt=PromptConfig(shots=1))
    collect_rollouts(model, tok, cfg, tmp_path, model_name="tiny")
    trajs = [t for t in read_trajectories(tmp_path) if t.steps]
    longest = max(len(t.completion_token_ids) for t in trajs)
    assert continuation_budget(trajs) == longest and continuation_budget([]) == 1
    task = load_task("chain_sum")
    problems = {p.id: p for p in task.problems(3, seed=0)}
    mc_state_values(model, tok, task, problems, trajs, DopamineConfig(n_continuations=1), cache=tmp_path / "mc.json")
    (key,) = json.loads((tmp_path / "mc.json").read_text())
    assert json.loads(key)["max_new_tokens"] == longest <= 16
