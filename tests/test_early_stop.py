"""Early stopping of hopeless samples (rpe.early_stop) on the tiny answering model: a stopped sample's later tokens
are never generated, the samples that run on are the unstopped run's, and the control stops as many."""

import numpy as np
import pytest

import rpe.early_stop as early_stop
from rpe.early_stop import EarlyStopConfig, matched_rule, run_early_stop, sample_with_early_stop, threshold_rule


@pytest.fixture(scope="module")
def setup():
    from rpe.bundle import random_bundle
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.signals import SignalReader
    from rpe.tasks import load_task
    from rpe.tiny import tiny_answering_model, tiny_parity_task

    model, tok = tiny_answering_model()
    import tempfile
    from pathlib import Path

    task = load_task(tiny_parity_task(Path(tempfile.mkdtemp()) / "parity.jsonl"))
    builder = PromptBuilder(task, tok, PromptConfig(shots=1))
    problems = task.problems(6, seed=1)
    prompts = [builder.encode(builder(p)) for p in problems]
    bundle = random_bundle(model, tok, layer=1, k=4, hidden=0, seed=0)
    return model, tok, task, builder, prompts, bundle, SignalReader(bundle, model, tok)


CFG = EarlyStopConfig(n=4, after_step=1, max_steps=5, max_step_tokens=24, max_new_tokens=64, seed=3)


def test_a_stopped_sample_generates_nothing_after_its_stop(setup, monkeypatch):
    model, tok, _, _, prompts, _, reader = setup
    calls = []
    real = early_stop.generate_from_ids

    def spy(*args, row_seeds, **kwargs):
        calls.append(list(row_seeds))
        return real(*args, row_seeds=row_seeds, **kwargs)

    monkeypatch.setattr(early_stop, "generate_from_ids", spy)
    free = sample_with_early_stop(model, tok, reader, prompts, CFG, None)
    n_free_calls = len(calls)

    def odd_samples_after_step_one(problem, step, values, samples):
        return [s for s in samples if s % 2 == 1] if step == 1 else []

    calls.clear()
    cut = sample_with_early_stop(model, tok, reader, prompts, CFG, odd_samples_after_step_one)
    multi_step = [(p, s) for p in range(len(prompts)) for s in range(CFG.n) if cut[p][s].stopped_at == 1]
    assert multi_step, "no sample ran past its first step: the test needs the model to write several steps"
    stopped_seeds = {early_stop.stream_seed(CFG.seed, p, s, step) for p, s in multi_step for step in range(2, 6)}
    assert not stopped_seeds & {seed for call in calls[1:] for seed in call}  # never a row after its stop
    for p in range(len(prompts)):
        for s in range(CFG.n):
            a, b = cut[p][s], free[p][s]
            if a.stopped_at is None:  # the samples that ran on are the unstopped run's, token for token
                assert a.completion_ids == b.completion_ids and a.finished
            else:  # a stopped sample is the unstopped one cut after its first step, and generated no more
                assert s % 2 == 1 and b.completion_ids[: len(a.completion_ids)] == a.completion_ids
                assert len(a.completion_ids) < len(b.completion_ids) and not a.finished
    assert sum(len(r.completion_ids) for rs in cut for r in rs) < sum(len(r.completion_ids) for rs in free for r in rs)
    assert len(calls) <= n_free_calls


def test_threshold_rule_keeps_the_best_sample_and_matched_rule_stops_the_lowest():
    keep = threshold_rule(0.5, keep_one=True)
    assert keep(0, 1, np.array([0.1, 0.4, 0.2]), [0, 2, 3]) == [0, 3]  # all below: the highest (sample 2) runs on
    assert threshold_rule(0.5, keep_one=False)(0, 1, np.array([0.1, 0.4]), [0, 2]) == [0, 2]
    assert keep(0, 1, np.array([0.9, 0.4]), [1, 2]) == [2]
    matched = matched_rule({(3, 2): 2})
    assert matched(3, 2, np.array([0.5, 0.1, 0.9, 0.2]), [4, 5, 6, 7]) == [5, 7]
    assert matched(3, 1, np.array([0.5, 0.1]), [4, 5]) == [] and matched(0, 2, np.array([0.1]), [0]) == []


def test_run_early_stop_reports_tokens_saved_and_the_matched_control(setup):
    model, tok, task, builder, _, bundle, _ = setup
    cfg = EarlyStopConfig(n=3, after_step=1, max_steps=5, max_step_tokens=24, max_new_tokens=64, seed=3,
                          threshold=2.0, keep_one=True, batch_problems=4)  # V lies in [0, 1]: above every value
    res = run_early_stop(model, tok, bundle, task, builder, 8, cfg, problem_seed=1)
    arms = res["arms"]
    assert set(arms) == {"none", "value", "random_probe"} and res["n_problems"] == 8
    assert arms["none"]["stopped_share"] == 0
    # threshold above every value: every sample but the best of each problem stops after step 1 (unless done)
    assert 0 < arms["value"]["stopped_share"] <= 2 / 3
    assert arms["random_probe"]["stopped_share"] == pytest.approx(arms["value"]["stopped_share"])
    for arm in ("value", "random_probe"):
        saved = 1 - sum(arms[arm]["tokens"]) / sum(arms["none"]["tokens"])
        assert res[arm]["tokens_saved"] == pytest.approx(saved) and saved > 0
        assert all(t <= n for t, n in zip(arms[arm]["tokens"], arms["none"]["tokens"]))
        lost = res[arm]["accuracy_lost"]
        assert lost["diff"] == pytest.approx(arms["none"]["accuracy"] - arms[arm]["accuracy"])
        assert lost["low"] <= lost["diff"] <= lost["high"]


def test_config_refuses_greedy_and_empty_budgets():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        EarlyStopConfig(temperature=0.0)
    with pytest.raises(ValueError, match="must be >= 1"):
        EarlyStopConfig(n=0)


def test_a_sample_is_judged_at_its_step_end_as_the_bundle_states_are(setup, monkeypatch):
    """The value after step t is read at the step's last token (the blank line after it excluded): the state
    rpe rollouts records and the bundle was fitted on, and the number SignalReader gives for that state of the
    finished completion."""
    from rpe.rollouts import make_steps

    model, tok, _, _, prompts, _, reader = setup
    reads = []
    real_read = reader.read

    def spy(prefixes, completions, spans):
        reads.extend((list(c), sp[0]) for c, sp in zip(completions, spans))
        return real_read(prefixes, completions, spans=spans)

    monkeypatch.setattr(reader, "read", spy)
    runs = sample_with_early_stop(model, tok, reader, prompts, CFG, threshold_rule(-1.0, keep_one=True))
    ends = {}
    for prompt, rs in zip(prompts, runs):
        for r in rs:
            text = tok.decode(r.completion_ids, skip_special_tokens=True)
            steps = make_steps(tok, r.completion_ids, text, "paragraph", None)
            spans = [(st.token_start, st.token_end) for st in steps]
            for st in steps:
                ends[tuple(r.completion_ids[: st.token_end])] = st.token_end
            sig = real_read([prompt], [r.completion_ids], spans=[spans])[0]
            np.testing.assert_allclose(r.values, sig.values[1 : 1 + len(r.values)], atol=1e-5)
    assert reads
    for completion, (start, end) in reads:  # each read ends where a step's text ends, never on the blank line
        assert start == 0 and end == len(completion) and ends.get(tuple(completion)) == end


def test_seeds_pool_by_problem():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("early_stop_seeds", Path(__file__).parents[1] / "benchmarks" / "early_stop_seeds.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    one = {"arms": {"none": {"correct": [1, 0, 1], "tokens": [10, 10, 10]},
                    "value": {"correct": [1, 0, 0], "tokens": [8, 5, 7]},
                    "random_probe": {"correct": [1, 1, 0], "tokens": [8, 5, 7]}}}
    out = bench.pooled([one, one])
    assert out["n_problems"] == 6 and out["seeds"] == 2
    assert abs(out["arms"]["value"]["tokens_saved"] - 0.333333) < 1e-5 and out["arms"]["none"]["tokens_saved"] == 0
    assert abs(out["arms"]["value"]["accuracy_lost"][0] - 1 / 3) < 1e-9  # none minus value, paired
    assert out["value_minus_control"][0] == -1 / 3
