"""Early stopping inside rollouts (rpe.rollout_stop) on the tiny answering model: a stopped sample's later tokens are
never generated (counted at the model's forward), the samples that run on are the unstopped run's, the value that
stops a sample is the one the bundle reads at that step, and the measurement on an unstopped run predicts the
tokens a live stopped run saves."""

import numpy as np
import pytest
import torch

from rpe.decoding import generate_continuous
from rpe.rollout_stop import ValueStop, judged_steps, matched_plan, threshold_plan, values_by_trajectory
from rpe.sampling import SamplingConfig
from rpe.segment import StepEnds, split_steps, token_char_ends, token_spans
from rpe.store import StateSet

SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=40)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rpe.bundle import random_bundle
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.tasks import load_task
    from rpe.tiny import tiny_answering_model, tiny_parity_task

    model, tok = tiny_answering_model()
    task_file = tiny_parity_task(tmp_path_factory.mktemp("task") / "parity.jsonl")
    task = load_task(task_file)

    builder = PromptBuilder(task, tok, PromptConfig(shots=1))
    prompts = [builder.encode(builder(p)) for p in task.problems(8, seed=1)] * 2
    bundle = random_bundle(model, tok, layer=1, k=4, hidden=0, seed=0)
    # the tiny model's states differ little between samples: standardise the probe's inputs to their spread at
    # s_1 so that its values separate the samples (a planted probe; still no finding)
    from rpe.signals import SignalReader

    gen, _ = generate_continuous(model, tok, prompts, SAMPLING, seed=11, max_rows=6)
    sigs = SignalReader(bundle, model, tok).read(prompts, gen.completion_ids)
    acts = torch.cat([s.value_acts[1:2] for s in sigs if len(s.values) > 1])
    bundle.probe_state.mean, bundle.probe_state.std = acts.mean(0), acts.std(0)
    return model, tok, task_file, builder, prompts, bundle


def split_threshold(values):
    """A threshold in the widest gap between the middle values (so float noise cannot move a sample across it)."""
    v = np.sort(np.asarray(values))
    lo, hi = len(v) // 4, 3 * len(v) // 4
    gaps = np.diff(v[lo : hi + 1])
    j = lo + int(np.argmax(gaps))
    assert gaps.max() > 1e-4, f"the probe's values do not separate: {v}"
    return float((v[j] + v[j + 1]) / 2)


def fed_rows(model):
    """Counts rows fed one token at a time (the decode forwards) through a forward pre-hook; a context manager."""
    counter = {"rows": 0}

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            counter["rows"] += ids.shape[0]

    class Counting:
        def __enter__(self):
            self.handle = model.register_forward_pre_hook(hook, with_kwargs=True)
            return counter

        def __exit__(self, *exc):
            self.handle.remove()

    return Counting()


def test_step_ends_find_the_last_token_of_every_ended_step_as_token_spans_do(setup):
    _, tok, *_ = setup
    texts = ["Go.\n\nAnswer: 1", "a b.\n \nc d\n\n\ne.\n\nAnswer: 0\n\n", "x\ny\n\nz", "one. two! three?"]
    for method in ("paragraph", "newline", "sentence"):
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            ends = StepEnds(method)
            found = [t for i in ids for t in ends.fed(tok.decode([i]))]
            spans = split_steps(text, method)
            last = [b - 1 for _, b in token_spans(spans, token_char_ends(tok, ids))]
            # every step but a last one with no separator after it has ended, at the token token_spans names
            assert found == last[: len(found)] and len(found) >= len(last) - 1, (method, text)


def test_a_value_stopped_row_generates_nothing_after_its_stop(setup):
    model, tok, _, _, prompts, bundle = setup
    with fed_rows(model) as free_count:
        free, _ = generate_continuous(model, tok, prompts, SAMPLING, seed=5, max_rows=6)
    from rpe.signals import SignalReader

    sigs = SignalReader(bundle, model, tok).read(prompts, free.completion_ids)
    marks = [judged_steps(tok, ids) for ids in free.completion_ids]
    judged = [i for i, m in enumerate(marks) if m]
    assert len(judged) >= 8, "too few samples wrote a step before their answer"
    threshold = split_threshold([sigs[i].values[1] for i in judged])
    rule = ValueStop(bundle, threshold)
    with fed_rows(model) as cut_count:
        cut, _ = generate_continuous(model, tok, prompts, SAMPLING, seed=5, max_rows=6, value_stop=rule)
    stopped = [i for i, r in enumerate(cut.finish_reasons) if r == "value"]
    assert 0 < len(stopped) < len(judged)
    for i in range(len(prompts)):
        if i in stopped:  # the unstopped sample cut where its first step ended, and judged by V(s_1)
            assert sigs[i].values[1] < threshold
            assert cut.completion_ids[i] == free.completion_ids[i][: marks[i][0]]
            assert cut.stop_values[i] == pytest.approx([sigs[i].values[1]], abs=1e-4)
        else:  # every other sample is the unstopped run's, token for token
            assert cut.completion_ids[i] == free.completion_ids[i] and cut.finish_reasons[i] == free.finish_reasons[i]
    # the forwards fed exactly the tokens kept: nothing after a stop was generated or fed
    saved = sum(len(free.completion_ids[i]) - len(cut.completion_ids[i]) for i in stopped)
    assert saved > 0 and cut_count["rows"] == free_count["rows"] - saved


def test_rollouts_stop_live_as_the_measurement_on_the_unstopped_run_predicts(setup, tmp_path):
    from rpe.rollout_stop import stop_savings
    from rpe.rollouts import RolloutConfig, collect_rollouts

    model, tok, task, *_, bundle = setup
    bundle.save(tmp_path / "bundle")
    base = dict(task=task, n_problems=12, samples=2, batch_size=8, seed=3, sampling=SAMPLING)
    free = collect_rollouts(model, tok, RolloutConfig(**base, capture_layers=[1]), tmp_path / "free")
    from rpe.records import read_trajectories

    records = {t.trajectory_id: t for t in read_trajectories(tmp_path / "free")}
    states = StateSet.load(tmp_path / "free" / "states.safetensors")
    judged = [v[1] for t, v in zip(states.trajectory_ids, values_by_trajectory(states, bundle))
              if judged_steps(tok, records[t].completion_token_ids)]
    threshold = split_threshold(judged)
    measured = stop_savings(tmp_path / "free", bundle, tok, model, thresholds=[threshold], n_controls=3, n_boot=50)
    row = measured["thresholds"][f"{threshold:g}"]
    assert "difficulty" not in row  # asked for only with difficulty scores
    # the difficulty control stops as many samples, those its scores rank lowest: an oracle score (the outcome)
    # stops wrong samples first, its reverse correct ones first
    outcome = {t.trajectory_id: t.reward for t in records.values()}
    n_stop = round(row["value"]["stopped_share"] * len(outcome))
    oracle = stop_savings(tmp_path / "free", bundle, tok, model, thresholds=[threshold], n_controls=1, n_boot=20,
                          difficulty=outcome)["thresholds"][f"{threshold:g}"]
    worst = stop_savings(tmp_path / "free", bundle, tok, model, thresholds=[threshold], n_controls=1, n_boot=20,
                         difficulty={k: 1 - v for k, v in outcome.items()})["thresholds"][f"{threshold:g}"]
    assert oracle["difficulty"]["stopped_share"] == worst["difficulty"]["stopped_share"] == row["value"]["stopped_share"]
    n_wrong = sum(v < 0.5 for v in outcome.values())
    assert oracle["difficulty"]["accuracy_lost"] == pytest.approx(max(0, n_stop - n_wrong) / len(outcome))
    assert worst["difficulty"]["accuracy_lost"] >= row["value"]["accuracy_lost"] >= oracle["difficulty"]["accuracy_lost"]
    assert oracle["value_minus_difficulty_lost"]["diff"] == pytest.approx(
        row["value"]["accuracy_lost"] - oracle["difficulty"]["accuracy_lost"])
    with pytest.raises(ValueError, match="difficulty scores lack"):
        stop_savings(tmp_path / "free", bundle, tok, model, thresholds=[threshold], difficulty={})
    live = collect_rollouts(model, tok, RolloutConfig(**base, stop_bundle=str(tmp_path / "bundle"), stop_below=threshold),
                            tmp_path / "live")
    n_stopped = live.manifest["stopped_by_value"]
    assert n_stopped == round(row["value"]["stopped_share"] * free.n_trajectories) > 0
    saved = 1 - live.manifest["completion_tokens"] / free.manifest["completion_tokens"]
    assert saved == pytest.approx(row["value"]["tokens_saved"], abs=1e-9) and saved > 0
    lost = sum(t.reward for t in read_trajectories(tmp_path / "free")) - sum(
        t.reward for t in read_trajectories(tmp_path / "live"))
    assert lost / free.n_trajectories == pytest.approx(row["value"]["accuracy_lost"], abs=1e-9)
    # the control stopped as many samples
    assert row["random_probe"]["stopped_share"] == pytest.approx(row["value"]["stopped_share"])
    reasons = [t.finish_reason for t in read_trajectories(tmp_path / "live")]
    assert reasons.count("value") == n_stopped
    # a stopped run's rewards are not outcomes: fitting on it and measuring on it are refused
    from rpe.fit import fit_bundle

    with pytest.raises(ValueError, match="stopped early by an internal value"):
        fit_bundle(model, tok, read_trajectories(tmp_path / "live"))
    with pytest.raises(ValueError, match="already stopped early"):
        stop_savings(tmp_path / "live", bundle, tok, model)


def test_plans_stop_at_the_first_low_step_and_the_control_matches_the_counts():
    values = [np.array([0.5, 0.05, 0.9]), np.array([0.5, 0.6, 0.02]), np.array([0.5, 0.6]), np.array([0.5, 0.01])]
    marks = [[4, 9], [3, 7], [5], []]  # the last never ended a step: never judged
    full = np.array([12, 10, 8, 6])
    plan = threshold_plan(values, marks, full, threshold=0.1, after_step=1)
    assert plan.stopped_at.tolist() == [1, 2, 0, 0] and plan.tokens.tolist() == [4, 7, 8, 6]
    later = threshold_plan(values, marks, full, threshold=0.1, after_step=2)
    assert later.stopped_at.tolist() == [0, 2, 0, 0]
    control = [np.array([0.5, 0.9, 0.1]), np.array([0.5, 0.1, 0.9]), np.array([0.5, 0.2]), np.array([0.5, 0.0])]
    matched = matched_plan(control, marks, full, {1: 1, 2: 1})
    # step 1: the lowest-valued running sample with an ended step (row 1, 0.1); step 2: row 0 is the only one left
    assert matched.stopped_at.tolist() == [2, 1, 0, 0] and matched.tokens.tolist() == [9, 3, 8, 6]
    summary = plan.summary(full, np.array([1.0, 0.0, 1.0, 0.0]))
    assert summary == {"stopped_share": 0.5, "tokens_saved": pytest.approx(1 - 25 / 36), "accuracy_lost": 0.25}


def test_bad_rules_and_configs_are_refused(setup):
    from rpe.rollouts import RolloutConfig

    *_, bundle = setup
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        ValueStop(bundle, 1.5)
    with pytest.raises(ValueError, match="after_step"):
        ValueStop(bundle, 0.1, after_step=0)
    with pytest.raises(ValueError, match="need stop_bundle"):
        RolloutConfig(stop_below=0.2)
    assert RolloutConfig(stop_bundle="b").stop_below == 0.1


def test_early_stopping_refuses_the_generate_engine(setup, tmp_path):
    from rpe.rollouts import RolloutConfig, collect_rollouts

    model, tok, task, *_, bundle = setup
    bundle.save(tmp_path / "bundle")
    cfg = RolloutConfig(task=task, n_problems=2, engine="generate", stop_bundle=str(tmp_path / "bundle"))
    with pytest.raises(ValueError, match="continuous engine"):
        collect_rollouts(model, tok, cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "trajectories.parquet").exists()


def test_the_cli_refuses_shared_questions_unless_asked_and_records_them(answering_tiny, tmp_path):
    """`rpe early-stop --on-rollouts` on a run of the fitting questions: refused, naming --held-out-from; with
    --same-questions measured, and the results say how many questions the fit and the measurement share."""
    import json

    from typer.testing import CliRunner

    from rpe.bundle import random_bundle
    from rpe.cli import app
    from rpe.models import load_model

    folder, task = answering_tiny
    runner = CliRunner()
    common = ["rollouts", "--model", str(folder), "--task", str(task), "--n-problems", "6", "--samples", "2",
              "--max-new-tokens", "24", "--shots", "1", "--capture-layers", "1"]
    for name, seed in (("fit", "0"), ("held", "1")):
        r = runner.invoke(app, [*common, "--seed", seed, "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    model, tok = load_model(str(folder))
    random_bundle(model, tok, layer=1, k=4, hidden=0, seed=0).save(tmp_path / "bundle")
    args = ["early-stop", "--bundle", str(tmp_path / "bundle"), "--rollouts", str(tmp_path / "fit"),
            "--on-rollouts", str(tmp_path / "held"), "--thresholds", "0.5", "--controls", "2",
            "--out", str(tmp_path / "stop.json")]
    r = runner.invoke(app, args)
    assert r.exit_code != 0 and "--held-out-from" in r.output and "--same-questions" in r.output
    assert not (tmp_path / "stop.json").exists()
    r = runner.invoke(app, [*args, "--same-questions"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "stop.json").read_text())
    assert 0 < res["questions_shared_with_fit"] <= res["questions"] and res["n_trajectories"] == 12
    assert "held out in samples only" in r.output
    assert "no difficulty control" in r.output and "difficulty" not in res["thresholds"]["0.5"]  # parity has none


def test_difficulty_scores_predict_from_the_fitting_runs_difficulty():
    """The difficulty control's scores: a question difficulty that decided every fitting outcome ranks held-out
    samples the same way; question length is centred within each run (its few-shot examples may differ)."""
    from rpe.difficulty import difficulty_scores
    from rpe.records import SCHEMA_VERSION, Trajectory

    def traj(i, reward, prompt_tokens):
        return Trajectory(SCHEMA_VERSION, f"t{i}", f"p{i}", "synthetic", 0, "q", "a", [], None, "", reward,
                          list(range(prompt_tokens)), [1], "eos", False, False, {}, {}, 0)

    fitted = [traj(i, float(i % 2 == 0), 20) for i in range(20)]
    fitted_d = [{"terms": 2.0 if i % 2 == 0 else 4.0} for i in range(20)]
    held = [traj(100 + i, 0.0, 90) for i in range(6)]  # longer few-shot prompts: no effect after centring
    held_d = [{"terms": 2.0 if i < 3 else 4.0} for i in range(6)]
    scores = difficulty_scores(fitted, fitted_d, held, held_d)
    assert set(scores) == {t.trajectory_id for t in held}
    easy, hard = [scores[f"t{100 + i}"] for i in range(3)], [scores[f"t{100 + i}"] for i in range(3, 6)]
    assert min(easy) > 0.7 > 0.3 > max(hard)
    with pytest.raises(ValueError, match="same outcome"):
        difficulty_scores([traj(0, 1.0, 5), traj(1, 1.0, 5)], [{"terms": 2.0}] * 2, held, held_d)
    with pytest.raises(ValueError, match="no difficulty features"):
        difficulty_scores(fitted, [{}] * 20, held, held_d)
