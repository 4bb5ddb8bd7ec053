"""Report card verdicts and the power warning, on metrics built by hand (the real numbers are in README)."""

import pytest

from rpe.fit import DENSE, DIFFICULTY, LOGPROB, QLEN, VALUE, power_note
from rpe.report_card import (
    INCONCLUSIVE, NOT_REPRODUCED, PRESENT_NOT_SPECIFIC, REPRODUCED, CardRow, markdown, sparsity_row, to_html, value_rows,
)


def _r(auroc, low, high, n=1600):
    from rpe.metrics import chance_verdict

    return {"auroc": auroc, "low": low, "high": high, "n": n, "verdict": chance_verdict(low, high)}


def _d(diff, low, high):
    from rpe.metrics import difference_verdict

    return {"diff": diff, "low": low, "high": high, "verdict": difference_verdict(low, high)}


def metrics(value_s0, diffs_s0=(0.05, 0.04, 0.06), value_final=(0.8, 0.75, 0.85), n=1600, dense_diff=(0.0, -0.03, 0.03)):
    s0 = {VALUE: _r(*value_s0, n=n), DENSE: _r(0.7, 0.65, 0.75, n), QLEN: _r(0.6, 0.55, 0.65, n),
          LOGPROB: _r(0.6, 0.55, 0.65, n), DIFFICULTY: _r(0.6, 0.55, 0.65, n)}
    for c, (d, lo, hi) in zip((QLEN, LOGPROB, DIFFICULTY), [(x, x - 0.03, x + 0.03) for x in diffs_s0]):
        s0[f"{VALUE} - {c}"] = _d(d, lo, hi)
    s0[f"{VALUE} - {DENSE}"] = _d(*dense_diff)
    final = {VALUE: _r(*value_final, n=n), DENSE: _r(0.85, 0.8, 0.9, n), QLEN: _r(0.6, 0.55, 0.65, n),
             f"{VALUE} - {DENSE}": _d(-0.05, -0.08, -0.02)}
    curve = [{"frac": 1.0, "cv_auroc_s0": 0.7, "cv_auroc_final": 0.85}, {"frac": 0.01, "cv_auroc_s0": value_s0[0],
                                                                         "cv_auroc_final": value_final[0]}]
    return {"n_trajectories": n, "folds": 5, "best_layer": 12, "headline_cv": {"s0": s0, "final": final},
            "pruning_curve": curve}


def test_reproduced_when_above_chance_and_above_every_control():
    rows = value_rows(metrics((0.68, 0.64, 0.72)))
    assert rows[0].verdict == REPRODUCED
    assert rows[1].verdict == REPRODUCED  # final step above chance
    assert rows[2].verdict == NOT_REPRODUCED and "loses signal" in rows[2].note  # final: 1% below all neurons
    assert "no random-set control" in rows[2].control


def _vs_random(low, high, rank=0, n_draws=20):
    mid = (low + high) / 2
    return {"selected": 0.7, "random_mean": 0.7 - mid, "random_q95": 0.7 - mid + 0.01, "diff": mid, "low": low,
            "high": high, "rank": rank, "n_draws": n_draws}


def with_control(m, s0=(0.02, 0.08), final=(0.02, 0.08), matched=None, final_vs_all=(-0.03, 0.01)):
    """``m`` with a sparsity control: the card's set minus random sets (uniform draws; ``matched``: the
    magnitude-matched draws, the same at both positions) and, at the final state, minus all neurons."""
    m["headline_cv"]["final"][f"{VALUE} - {DENSE}"] = _d(sum(final_vs_all) / 2, *final_vs_all)
    vs_all = {"s0": _d(*dense_diff_of(m, "s0")), "final": _d(sum(final_vs_all) / 2, *final_vs_all)}
    row = {"method": "first_layer_norm", "frac": 0.01, "k": 6, "vs_all": vs_all,
           "vs_random": {"s0": _vs_random(*s0), "final": _vs_random(*final)}}
    m["sparsity"] = {"card_frac": 0.01, "n_draws": 20, "rows": [row],
                     "matched": None if matched is None else {"s0": _vs_random(*matched), "final": _vs_random(*matched)}}
    return m


def dense_diff_of(m, where):
    d = m["headline_cv"][where][f"{VALUE} - {DENSE}"]
    return d["diff"], d["low"], d["high"]


def test_a_lost_one_percent_says_from_which_fraction_the_claim_holds():
    m = with_control(metrics((0.68, 0.64, 0.72), dense_diff=(-0.08, -0.1, -0.05)), final_vs_all=(-0.08, -0.021))
    assert "holds from" not in sparsity_row(m).note  # 1% loses at both positions and is the only fraction
    five = {"method": "first_layer_norm", "frac": 0.05, "k": 29, "vs_all": {w: _d(0.0, -0.01, 0.01) for w in ("s0", "final")},
            "vs_random": {"s0": _vs_random(0.01, 0.05), "final": _vs_random(-0.01, 0.05)}}
    m["sparsity"]["rows"].append(five)
    note = sparsity_row(m).note
    assert "at s_0 it holds from 5% kept" in note and "final state" not in note.split("holds")[-1]


def test_sparsity_row_every_verdict_word_is_reachable_and_each_rule_fails_when_weakened():
    above = metrics((0.68, 0.64, 0.72))  # value neurons above chance at s_0 and final; within noise of all at s_0
    row = sparsity_row(with_control(above))
    assert row.verdict == REPRODUCED and "s_0, final" in row.note and "6-neuron random sets (20 draws)" in row.control
    # random sets reach the selected set (interval includes 0) at one position: present but not specific
    assert sparsity_row(with_control(metrics((0.68, 0.64, 0.72)), final=(-0.01, 0.05))).verdict == PRESENT_NOT_SPECIFIC
    assert sparsity_row(with_control(metrics((0.68, 0.64, 0.72)), final=(0.001, 0.05))).verdict == REPRODUCED
    # as for the dopamine row, the random sets' 95th percentile must be beaten too
    m = with_control(metrics((0.68, 0.64, 0.72)))
    m["sparsity"]["rows"][0]["vs_random"]["s0"]["random_q95"] = 0.71
    assert sparsity_row(m).verdict == PRESENT_NOT_SPECIFIC
    # the harder control decides: magnitude-matched draws as good as the set
    row = sparsity_row(with_control(metrics((0.68, 0.64, 0.72)), matched=(-0.02, 0.03)))
    assert row.verdict == PRESENT_NOT_SPECIFIC and "magnitude-matched" in row.control
    # clearly below all neurons at one position: not reproduced, whatever the random sets do
    row = sparsity_row(with_control(metrics((0.68, 0.64, 0.72)), final_vs_all=(-0.08, -0.021)))
    assert row.verdict == NOT_REPRODUCED and "final" in row.note
    assert sparsity_row(with_control(metrics((0.68, 0.64, 0.72)), final_vs_all=(-0.08, -0.019))).verdict == REPRODUCED
    # a position where the value neurons are not above chance is not judged; none judged: inconclusive
    row = sparsity_row(with_control(metrics((0.55, 0.45, 0.65)), final_vs_all=(-0.08, -0.021)))
    assert row.verdict == NOT_REPRODUCED and "final" in row.note and "s_0" not in row.note
    row = sparsity_row(with_control(metrics((0.55, 0.45, 0.65), value_final=(0.55, 0.45, 0.65)), final_vs_all=(-0.08, -0.021)))
    assert row.verdict == INCONCLUSIVE and "not distinguishable from chance" in row.note


def test_without_the_random_set_control_the_sparsity_row_never_says_reproduced():
    m = metrics((0.68, 0.64, 0.72))
    m["headline_cv"]["final"][f"{VALUE} - {DENSE}"] = _d(-0.01, -0.03, 0.01)  # within noise everywhere
    row = sparsity_row(m)
    assert row.verdict == INCONCLUSIVE and "re-run rpe fit" in row.note
    assert sparsity_row(with_control(m)).verdict == REPRODUCED  # the same numbers with the control


def test_the_final_step_row_asks_for_the_papers_level_not_only_above_chance():
    assert value_rows(metrics((0.68, 0.64, 0.72), value_final=(0.787, 0.756, 0.819)))[1].verdict == REPRODUCED
    row = value_rows(metrics((0.68, 0.64, 0.72), value_final=(0.696, 0.629, 0.758)))[1]
    assert row.verdict == NOT_REPRODUCED and "below the paper's 0.8" in row.note
    assert value_rows(metrics((0.68, 0.64, 0.72), value_final=(0.3, 0.2, 0.4)))[1].verdict == NOT_REPRODUCED
    assert value_rows(metrics((0.68, 0.64, 0.72), value_final=(0.55, 0.45, 0.65)))[1].verdict == INCONCLUSIVE


def test_a_control_that_ranks_better_means_not_reproduced():
    rows = value_rows(metrics((0.68, 0.64, 0.72), diffs_s0=(-0.08, 0.02, 0.05)))
    assert rows[0].verdict == NOT_REPRODUCED and "question length" in rows[0].note


def test_an_interval_over_chance_is_inconclusive_with_the_n_that_decides_it():
    rows = value_rows(metrics((0.55, 0.45, 0.65), n=200))
    assert rows[0].verdict == INCONCLUSIVE and "roughly 800 trajectories" in rows[0].note  # (0.1/0.05)^2 x 200


def test_an_inverted_probe_is_never_inconclusive():
    rows = value_rows(metrics((0.27, 0.16, 0.41)))
    assert rows[0].verdict == NOT_REPRODUCED and "inverted" in rows[0].note


@pytest.mark.parametrize("value,n,expect", [
    ((0.68, 0.64, 0.72), 1600, None),
    ((0.52, 0.477, 0.567), 1600, "A measured null"),
    ((0.55, 0.40, 0.70), 64, "Smoke run without power"),
    ((0.30, 0.10, 0.45), 64, "Smoke run without power"),
])
def test_power_note_says_smoke_run_or_measured_null(value, n, expect):
    note = power_note(metrics(value, n=n))
    if expect is None:
        assert note is None
    else:
        assert expect in note and f"on {n} trajectories" in note
        if "Smoke" in expect:
            assert "rpe reproduce --budget paper" in note


def test_card_renders_and_escapes():
    rows = [CardRow("<script>x</script>", "p", "m", "c", REPRODUCED, "n & m")]
    page = to_html(rows)
    assert "<script>" not in page and "&lt;script&gt;" in page and "n &amp; m" in page
    assert markdown(rows).splitlines()[2].endswith("| **reproduced**: n & m |")


def test_ablation_row_from_results_json():
    from rpe.report_card import ablation_row, ablation_summary

    res = {"n_neurons": 6, "baseline": {"accuracy": 0.24, "ci95": [0.205, 0.279], "n": 500},
           "layers": {"29": {"summary": {"value": {"accuracy": 0.236, "ci95": [0.201, 0.275]},
                                         "random": {"accuracy": 0.238, "ci95": [0.203, 0.277]},
                                         "random_matched": {"accuracy": 0.242, "ci95": [0.207, 0.281]}}}}}
    row = ablation_row(ablation_summary(res))
    assert row.verdict == NOT_REPRODUCED and "n = 500 per arm" in row.measured and "random_matched 0.242" in row.control
    res["layers"]["29"]["summary"]["value"] = {"accuracy": 0.05, "ci95": [0.034, 0.073]}
    assert ablation_row(ablation_summary(res)).verdict == REPRODUCED


def test_a_bundle_from_before_cross_validation_gets_a_message_not_a_crash(tmp_path):
    import json

    from rpe.report import bundle_section, report_card_section

    (tmp_path / "bundle.json").write_text(json.dumps({"layer": 28, "n_value_neurons": 6, "metrics": {"headline_test": {}}}))
    assert "re-run <code>rpe fit</code>" in bundle_section(tmp_path)
    assert "re-run <code>rpe fit</code>" in report_card_section(tmp_path)


def test_search_row_pairs_value_against_random_and_greedy():
    from rpe.report_card import INCONCLUSIVE, NOT_MEASURED, NOT_REPRODUCED, REPRODUCED, search_row

    def res(value, random, greedy):
        methods = {name: {"accuracy": sum(c) / len(c), "ci95": [0.0, 1.0], "correct": c}
                   for name, c in (("value", value), ("random", random), ("greedy", greedy))}
        return {"n_problems": len(value), "config": {"n": 4}, "methods": methods}

    n = 200
    assert search_row(res([1.0] * n, [0.0] * n, [0.0] * n)).verdict == REPRODUCED
    tie = res([1.0, 0.0] * (n // 2), [1.0, 0.0] * (n // 2), [1.0, 0.0] * (n // 2))
    row = search_row(tie)
    assert row.verdict == NOT_REPRODUCED and "+5.6 points" in row.note  # a tie excludes the paper's gain at n = 200
    few = res([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    assert search_row(few).verdict == INCONCLUSIVE  # 4 problems: wide intervals include 0 and +0.056
    tied16 = search_row(res([1.0, 0.0] * 8, [1.0, 0.0] * 8, [1.0, 0.0] * 8))  # a degenerate [0, 0] "interval"
    assert tied16.verdict == INCONCLUSIVE and "only 16 problems; >= 100 needed" in tied16.note
    assert search_row({"methods": {"greedy": {}}}).verdict == NOT_MEASURED
