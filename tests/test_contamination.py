"""Prefix contamination (rpe.contamination): step labels from the arithmetic, and the before/after AUROCs on
planted credits whose answer is known."""

import numpy as np
import pytest

from rpe.contamination import arithmetic_right, first_wrong_step, prefix_contamination, step_labels


def test_arithmetic_checks_whole_equations_with_precedence():
    assert arithmetic_right("Step 1: 3 + 4 - 2 = 5.") is True  # a chain is one equation, not "4 - 2 = 5"
    assert arithmetic_right("Step 2: 7 - 9 = -2.") is True and arithmetic_right("2 + 3 x 4 = 14") is True
    assert arithmetic_right("5 - 3 = 3, then 3 + 1 = 4") is False and arithmetic_right("Answer: 4") is None
    assert first_wrong_step(["4 + 1 = 5.", "5 - 3 = 3.", "3 + 1 = 4."]) == 1
    assert first_wrong_step(["4 + 1 = 5.", "5 - 3 = 2.", "The answer is 2."]) is None
    assert first_wrong_step(["Let me think.", "2 * 3 = 7"]) == 1
    assert step_labels(["1 + 1 = 2.", "2 + 2 = 5.", "5 + 1 = 6.", "6 - 1 = 4.", "Answer: 4"]) == [
        "clean", "first_wrong", "after_right", "after_wrong", "unchecked"]


def _chains(n: int, contaminated: bool, seed: int = 0):
    """n four-step chains (one problem per two chains): right steps get credit +1, wrong ones -1, plus noise;
    after the first error the credit ignores the step when ``contaminated``."""
    rng = np.random.default_rng(seed)
    credits, texts, groups = [], [], []
    for i in range(n):
        right = rng.random(4) < 0.7
        steps = [f"{k} + 1 = {k + 1 if r else k + 2}." for k, r in enumerate(right)]
        wrong = first_wrong_step(steps)
        signal = np.where(right, 1.0, -1.0)
        if contaminated and wrong is not None:
            signal[wrong + 1 :] = rng.choice([-1.0, 1.0], 3 - wrong)
        credits.append(signal + rng.normal(0, 0.5, 4))
        texts.append(steps)
        groups.append(f"p{i // 2}")
    return credits, texts, groups


def test_planted_contamination_is_found_and_its_absence_is_not_claimed():
    found = prefix_contamination(*_chains(400, contaminated=True), n_boot=300)
    assert found["flags_first_error"]["verdict"] == "above chance" and found["flags_first_error"]["auroc"][0] > 0.9
    assert found["after_error"]["verdict"] == "not distinguishable from chance"
    assert found["contamination"]["verdict"] == "higher" and found["contamination"]["drop"][1] > 0.2
    clean = prefix_contamination(*_chains(400, contaminated=False), n_boot=300)
    assert clean["after_error"]["verdict"] == "above chance"
    assert clean["contamination"]["verdict"] == "no difference distinguishable"
    assert sum(clean["counts"].values()) == 1600 and clean["n_with_error"] > 300


def test_mismatched_inputs_are_named():
    with pytest.raises(ValueError, match="has 2 steps but \\(3,\\) credits"):
        prefix_contamination([np.zeros(3)], [["1 + 1 = 2", "Answer: 2"]], ["p0"])
    with pytest.raises(ValueError, match="1 credit arrays, 2 step lists"):
        prefix_contamination([np.zeros(1)], [["a"], ["b"]], ["p0"])


def test_the_benchmark_reads_td_credits_and_places_the_bundle_among_its_controls():
    import importlib.util
    from pathlib import Path

    import torch

    spec = importlib.util.spec_from_file_location("prefix_contamination", Path(__file__).parents[1] / "benchmarks" / "prefix_contamination.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    class Identity:  # a probe whose value is the first neuron
        def predict(self, acts):
            return acts[:, 0]

    acts = [torch.tensor([[0.2, 9.0], [0.5, 9.0], [0.4, 9.0]]), torch.tensor([[0.1, 0.0], [0.9, 0.0]])]
    credits = bench.td_credits(Identity(), acts, gamma=1.0)
    np.testing.assert_allclose(credits[0], [0.3, -0.1])
    np.testing.assert_allclose(credits[1], [0.8])
    mine = {"flags_first_error": {"auroc": [0.6]}, "after_error": {"auroc": [0.5]}, "contamination": {"drop": [0.1]},
            "right_step_after_error": {"auroc": [0.5]}}
    draws = [{"flags_first_error": {"auroc": [a]}, "after_error": {"auroc": [0.5]}, "contamination": {"drop": [0.0]},
              "right_step_after_error": {"auroc": [0.5]}} for a in (0.4, 0.5, 0.7, 0.8)]
    band = bench.control_band(draws, mine)
    assert band["flags_first_error"]["share_at_or_above_bundle"] == 0.5 and band["flags_first_error"]["mean"] == 0.6
    assert band["contamination"]["share_at_or_above_bundle"] == 0.0


def test_a_credit_that_only_drifts_along_the_chain_is_not_read_as_contamination():
    """Credit falling with the step index, blind to the steps: later steps (most steps after an error) get less
    credit, which an unstratified comparison would read as contamination; pairs at the same position do not."""
    rng = np.random.default_rng(1)
    credits, texts, groups = [], [], []
    for i in range(400):
        right = rng.random(4) < 0.7
        texts.append([f"{k} + 1 = {k + 1 if r else k + 2}." for k, r in enumerate(right)])
        credits.append(-1.0 * np.arange(4) + rng.normal(0, 0.3, 4))
        groups.append(f"p{i}")
    drift = prefix_contamination(credits, texts, groups, n_boot=300)
    assert drift["right_step_after_error"]["verdict"] == "not distinguishable from chance"
    assert drift["flags_first_error"]["verdict"] == "not distinguishable from chance"
    # the same chains where an earlier error costs a right step 0.5 of credit: found
    for c, t in zip(credits, texts):
        wrong = first_wrong_step(t)
        if wrong is not None:
            c[wrong + 1 :] -= 0.5
    shifted = prefix_contamination(credits, texts, groups, n_boot=300)
    assert shifted["right_step_after_error"]["verdict"] == "above chance"
    assert shifted["by_position"]["after_right"][0] == 0 and sum(shifted["by_position"]["clean"]) == shifted["counts"]["clean"]
