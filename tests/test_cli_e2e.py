"""End to end through the CLI on the real default model (slow: about three minutes on 2 cores)."""

import json

import pytest
from typer.testing import CliRunner

from rpe.cli import app
from rpe.records import read_trajectories

runner = CliRunner()


@pytest.mark.slow
def test_rollouts_fit_report_on_the_real_model(real_model, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["rollouts", "--n-problems", "24", "--samples", "2", "--max-new-tokens", "64", "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_trajectories"] == 48 and manifest["mean_steps"] >= 2
    assert 0.0 < manifest["accuracy"] < 1.0
    # re-running the finished command is a no-op that reports the same result
    again = runner.invoke(app, ["rollouts", "--n-problems", "24", "--samples", "2", "--max-new-tokens", "64", "--out", str(out)])
    assert again.exit_code == 0 and f"accuracy {manifest['accuracy']:.3f}" in again.output

    r = runner.invoke(app, ["fit", "--rollouts", str(out), "--out", str(out / "bundle"), "--layers", "8,14",
                            "--epochs", "20", "--sparsity-draws", "4"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "bundle" / "metrics.json").read_text())
    assert metrics["best_layer"] in (8, 14) and len(metrics["pruning_curve"]) == 6
    assert "all neurons" in r.output and "pruning curve" in r.output
    sparsity = metrics["sparsity"]  # every fraction below 1 x four selection methods, against 4 random sets each
    assert sparsity["n_draws"] == 4 and len(sparsity["rows"]) == 5 * 4 and sparsity["matched"]["k"] == 6
    assert "sparsity control" in r.output and "card: a sparse 1% carries the value" in r.output
    assert metrics["headline_cv"]["s0"]["value neurons"]["n"] == 48  # cross-validated: every trajectory scored
    assert {r["stratum"]["num_terms"] for r in metrics["beyond_difficulty"]["per_stratum"]} <= {2.0, 3.0, 4.0}
    s0 = metrics["headline_cv"]["s0"]["value neurons"]
    if s0["verdict"] != "above chance":  # 48 trajectories: the output must say it is a smoke run and name the real one
        assert "Smoke run without power" in r.output and "rpe reproduce --budget paper" in r.output

    # early stopping inside rollouts: measured on an unstopped held-out run, then done live; the live run saves the
    # tokens the measurement predicts (the same streams, cut where the value fell below the threshold)
    layer = str(metrics["best_layer"])
    held = ["rollouts", "--n-problems", "16", "--samples", "2", "--max-new-tokens", "64", "--seed", "5",
            "--held-out-from", str(out)]
    r = runner.invoke(app, [*held, "--capture-layers", layer, "--out", str(tmp_path / "held")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["early-stop", "--bundle", str(out / "bundle"), "--rollouts", str(out), "--on-rollouts",
                            str(tmp_path / "held"), "--thresholds", "0.3,0.5", "--controls", "3",
                            "--out", str(tmp_path / "stop.json")])
    assert r.exit_code == 0, r.output
    measured = json.loads((tmp_path / "stop.json").read_text())["thresholds"]["0.5"]["value"]
    r = runner.invoke(app, [*held, "--stop-bundle", str(out / "bundle"), "--stop-below", "0.5",
                            "--out", str(tmp_path / "live")])
    assert r.exit_code == 0, r.output
    live = json.loads((tmp_path / "live" / "manifest.json").read_text())
    free = json.loads((tmp_path / "held" / "manifest.json").read_text())
    # up to a sample whose value sits at the threshold (decoding's activations and a full forward's differ in
    # float rounding)
    assert abs(live["stopped_by_value"] - measured["stopped_share"] * 32) <= 1
    assert 1 - live["completion_tokens"] / free["completion_tokens"] == pytest.approx(measured["tokens_saved"], abs=0.03)
    from rpe.rollouts import rollout_settings

    assert not set(rollout_settings(out).question_keys()) & set(rollout_settings(tmp_path / "held").question_keys())

    # the RPE simulation on the same real rollouts: the model's RPE beside the TD(lambda) learner's, every step
    r = runner.invoke(app, ["simulate", "--rollouts", str(out), "--bundle", str(out / "bundle"), "--out",
                            str(out / "simulation")])
    assert r.exit_code == 0, r.output
    sim = json.loads((out / "simulation" / "simulation.json").read_text())
    assert sim["n_steps"] == sum(len(t.steps) for t in read_trajectories(out))
    pair = sim["pairs"]["internal vs learner"]
    assert pair["n_steps"] == sim["n_steps"] and pair["low"] <= pair["spearman"] <= pair["high"]
    assert (out / "simulation" / "simulation.png").stat().st_size > 10_000

    r = runner.invoke(app, ["report", "--rollouts", str(out), "--bundle", str(out / "bundle")])
    assert r.exit_code == 0, r.output
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Value neurons" in page
    assert "Sparsity control" in page and page.count("<td>first_layer_norm</td>") == 5  # one row per fraction
    assert "against random sets of its size" in page  # the card's sparsity row
    assert page.index("Report card") < page.index("Steps per completion")  # the card opens the report


@pytest.mark.slow
def test_fit_refuses_rollouts_of_another_model(real_model, tmp_path, tiny_llama):
    from rpe.prompts import PromptConfig
    from rpe.rollouts import RolloutConfig, collect_rollouts
    from rpe.sampling import SamplingConfig

    model, tok = tiny_llama
    collect_rollouts(model, tok, RolloutConfig(n_problems=12, samples=1, sampling=SamplingConfig(max_new_tokens=8),
                                               prompt=PromptConfig(shots=1)), tmp_path, model_name="tiny")
    r = runner.invoke(app, ["fit", "--rollouts", str(tmp_path), "--out", str(tmp_path / "b"),
                            "--model", "smollm2-135m-instruct"])
    assert r.exit_code == 2 and "differs" in r.output and not (tmp_path / "b").exists()
