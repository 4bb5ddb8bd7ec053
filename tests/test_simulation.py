"""The RPE simulation: feature functions, the TD(lambda) learner on planted episodes, the bootstrap Spearman."""

import numpy as np
import pytest

from rpe.records import SCHEMA_VERSION, Step, Trajectory
from rpe.metrics import spearman_by_problem
from rpe.simulation import FEATURES, TDLambdaLearner, eval_arith, last_step_verifies, step_fraction, wrong_so_far


def _traj(i: int, steps: list[str], reward: float) -> Trajectory:
    text = "\n\n".join(steps)
    spans, pos = [], 0
    for j, s in enumerate(steps):
        spans.append(Step(s, pos, pos + len(s), j, j + 1))
        pos += len(s) + 2
    return Trajectory(SCHEMA_VERSION, f"t{i}", f"p{i}", "synthetic", 0, "", text, spans, None, "", reward,
                      [1], list(range(len(steps))), "eos", False, False, {}, {}, 0)


def test_arithmetic_features():
    assert eval_arith("4 + 1 - 2") == 3 and eval_arith("2 * 3 + 1") == 7 and eval_arith("-2 + 5") == 3
    assert eval_arith("4 +") is None
    t = _traj(0, ["4 + 1 = 5.", "5 - 3 = 1.", "The answer is 1."], 0.0)
    assert [last_step_verifies(t, k) for k in range(4)] == [0.5, 1.0, 0.0, 0.5]
    assert [wrong_so_far(t, k) for k in range(4)] == [0.0, 0.0, 1.0, 1.0]
    assert [step_fraction(t, k) for k in range(4)] == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_td_lambda_learner_learns_that_a_false_step_predicts_failure():
    rng = np.random.default_rng(0)
    trajs = []
    for i in range(200):  # a wrong second step makes the answer wrong; otherwise right 90% of the time
        wrong = rng.random() < 0.4
        second = "3 + 4 = 8." if wrong else "3 + 4 = 7."
        trajs.append(_traj(i, ["1 + 2 = 3.", second, "The answer is 7."], float(not wrong and rng.random() < 0.9)))
    learner = TDLambdaLearner(FEATURES, alpha=0.05, lam=0.8, epochs=30).fit(trajs)
    right = next(t for t in trajs if "= 7." in t.steps[1].text)
    wrong = next(t for t in trajs if "= 8." in t.steps[1].text)
    v_right, v_wrong = learner.values(right), learner.values(wrong)
    assert v_right[0] == pytest.approx(v_wrong[0])  # the same start
    assert v_right[2] - v_wrong[2] > 0.5  # after the second step the learner knows
    assert learner.rpe(wrong)[1] < -0.3  # the false step is a negative surprise
    assert learner.rpe(right)[-1] == pytest.approx(right.reward - v_right[-2])


def test_td_lambda_learner_weights_do_not_depend_on_the_visiting_order():
    """The averaged iterate is the learner's estimate, not the last episodes' pull: two seeds (two visiting orders)
    give the same weights to 0.03 (the last iterate of a constant-step learner differs by more)."""
    rng = np.random.default_rng(0)
    trajs = []
    for i in range(400):
        wrong = rng.random() < 0.4
        second = "3 + 4 = 8." if wrong else "3 + 4 = 7."
        trajs.append(_traj(i, ["1 + 2 = 3.", second, "The answer is 7."], float(not wrong and rng.random() < 0.8)))
    a = TDLambdaLearner(FEATURES, seed=0).fit(trajs).w
    b = TDLambdaLearner(FEATURES, seed=1).fit(trajs).w
    np.testing.assert_allclose(a, b, atol=0.03)
    last = [TDLambdaLearner(FEATURES, alpha=0.05, epochs=20, seed=s, average=False).fit(trajs).w for s in (0, 1)]
    assert np.abs(last[0] - last[1]).max() > 0.03  # what the average removes


def test_spearman_by_problem_interval():
    rng = np.random.default_rng(1)
    x = rng.normal(size=300)
    out = spearman_by_problem(x, x + rng.normal(scale=0.5, size=300), [f"p{i // 3}" for i in range(300)], n_boot=200)
    assert 0.7 < out["low"] <= out["spearman"] <= out["high"] < 1 and out["n_steps"] == 300


def test_rpe_simulate_command_end_to_end(tiny_llama, tmp_path):
    import json

    from typer.testing import CliRunner

    from conftest import make_tiny_bundle
    from rpe.cli import app
    from rpe.prompts import PromptConfig
    from rpe.records import read_trajectories
    from rpe.rollouts import RolloutConfig, collect_rollouts
    from rpe.sampling import SamplingConfig

    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = RolloutConfig(n_problems=12, samples=1, segmenter="regex", segment_pattern="[a-z0-9]",
                        sampling=SamplingConfig(max_new_tokens=24), prompt=PromptConfig(shots=1))
    collect_rollouts(model, tok, cfg, tmp_path / "r", model_name=str(tmp_path / "m"))
    rng = np.random.default_rng(0)
    mc = {t.trajectory_id: rng.random(len(t.steps)).tolist() + [t.reward]
          for t in read_trajectories(tmp_path / "r") if t.steps}
    (tmp_path / "r" / "mc_values.json").write_text(json.dumps({"settings": mc}))
    bundle_dir = make_tiny_bundle(model, tok).save(tmp_path / "b")
    r = CliRunner().invoke(app, ["simulate", "--rollouts", str(tmp_path / "r"), "--bundle", str(bundle_dir),
                                 "--out", str(tmp_path / "sim")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "sim" / "simulation.json").read_text())
    assert set(res["pairs"]) == {"internal vs learner", "internal vs monte_carlo", "learner vs monte_carlo"}
    assert set(res["nonterminal"]) == set(res["pairs"])  # the same pairs without the reward-time step
    assert res["n_steps"] == sum(len(t.steps) for t in read_trajectories(tmp_path / "r"))
    assert (tmp_path / "sim" / "simulation.png").stat().st_size > 1000
    assert "learner weights:" in r.output and "Spearman of per-step RPE" in r.output  # (the table wraps at 80)
