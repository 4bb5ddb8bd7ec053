"""``rpe reproduce``: the plan, resuming at every stage boundary, refusals, the CLI end to end."""

import json

import pytest
from typer.testing import CliRunner

from rpe.cli import app
from rpe.cli.reproduce import run_rpe
from rpe.reproduce import BUDGETS, STAGES, Pipeline, ReproduceConfig, StageFailed, card, early_layers, sweep_layers

runner = CliRunner()


def test_layer_plans_spread_over_the_depth():
    assert sweep_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert sweep_layers(4, 6) == [0, 1, 2, 3] and sweep_layers(30, 1) == [29]
    assert early_layers(28) == [2, 5] and early_layers(30) == [2, 5] and early_layers(4) == [1]


def test_budgets_meet_the_sizes_they_promise():
    paper = BUDGETS["paper"]
    assert paper.n_trajectories >= 1500 and paper.ablation_problems >= 500 and paper.ablation_early_layers
    assert {"random", "random_matched"} <= set(paper.ablation_controls) and paper.compare_probes
    assert BUDGETS["smoke"].n_trajectories < BUDGETS["small"].n_trajectories < paper.n_trajectories


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown budget 'huge'"):
        ReproduceConfig(budget="huge")
    with pytest.raises(ValueError, match="cannot skip fit"):
        ReproduceConfig(skip=("fit",))


def test_a_folder_of_other_settings_is_refused(tmp_path):
    Pipeline(ReproduceConfig(budget="smoke"), tmp_path, n_layers=4).save_state()
    with pytest.raises(ValueError, match=r"other settings \(budget: 'smoke'\)"):
        Pipeline(ReproduceConfig(budget="small"), tmp_path, n_layers=4)
    Pipeline(ReproduceConfig(budget="smoke", device="cpu"), tmp_path, n_layers=4)  # where it runs may change


def _config(answering_tiny, **kw):
    folder, task = answering_tiny
    return ReproduceConfig(model=str(folder), task=str(task), budget="smoke", device="cpu", **kw)


def _fake_stage_outputs(out, argv):
    """What each command writes that its stage's completion check reads (no model runs)."""
    name = argv[0]
    if name == "rollouts":
        (out / "rollouts").mkdir(parents=True, exist_ok=True)
        for f in ("manifest.json", "trajectories.parquet"):
            (out / "rollouts" / f).write_text("{}")
    elif name == "fit":
        (out / "bundle").mkdir(exist_ok=True)
        (out / "bundle" / "bundle.json").write_text(json.dumps({"layer": 3, "metrics": {"headline_cv": {}}}))
        (out / "bundle" / "weights.safetensors").write_text("")
    elif name == "dopamine":
        (out / "bundle" / "bundle.json").write_text(json.dumps({"layer": 3, "metrics": {"headline_cv": {}, "dopamine": {}}}))
    elif name == "analyze":
        (out / "report").mkdir(exist_ok=True)
        (out / "report" / "report.html").write_text("<html>")
    return 0


def test_a_failed_stage_keeps_earlier_work_and_the_rerun_continues_from_it(tmp_path):
    cfg = ReproduceConfig(budget="smoke", skip=("search", "ablate"))
    calls = []

    def broken_dopamine(argv):
        calls.append(argv[0])
        return 2 if argv[0] == "dopamine" else _fake_stage_outputs(tmp_path, argv)

    with pytest.raises(StageFailed, match=r"stage dopamine failed \(exit 2\): rpe dopamine --rollouts"):
        Pipeline(cfg, tmp_path, n_layers=4).run(broken_dopamine)
    assert calls == ["rollouts", "fit", "dopamine"]
    state = json.loads((tmp_path / "reproduce.json").read_text())
    assert set(state["stages"]) == {"rollouts", "fit"} and state["config"]["skip"] == ["search", "ablate"]
    calls.clear()
    assert Pipeline(cfg, tmp_path, n_layers=4).run(lambda a: calls.append(a[0]) or _fake_stage_outputs(tmp_path, a)) \
        == ["dopamine", "report"]
    assert calls == ["dopamine", "analyze"]
    # a stage whose command succeeds without writing its outputs is a failure, not a silent pass
    (tmp_path / "report" / "report.html").unlink()
    with pytest.raises(StageFailed, match="stage report failed"):
        Pipeline(cfg, tmp_path, n_layers=4).run(lambda a: 0)


def test_an_earlier_stage_that_runs_again_invalidates_the_later_ones(tmp_path):
    cfg = ReproduceConfig(budget="smoke", skip=("search", "ablate"))
    run = lambda a: _fake_stage_outputs(tmp_path, a)  # noqa: E731
    Pipeline(cfg, tmp_path, n_layers=4).run(run)
    (tmp_path / "bundle" / "weights.safetensors").unlink()  # the fit's output is gone: fit and all after it again
    pipe = Pipeline(cfg, tmp_path, n_layers=4)
    assert [s.name for s in pipe.pending()] == ["fit", "dopamine", "report"]
    assert pipe.run(run) == ["fit", "dopamine", "report"]


@pytest.fixture(scope="module")
def whole_run(answering_tiny, tmp_path_factory):
    """``rpe reproduce --budget smoke`` on the answering tiny model, uninterrupted, through the CLI."""
    folder, task = answering_tiny
    out = tmp_path_factory.mktemp("whole")
    args = ["reproduce", "--model", str(folder), "--task", str(task), "--budget", "smoke", "--out", str(out),
            "--device", "cpu"]
    return out, args, runner.invoke(app, args)


@pytest.mark.slow
def test_the_command_end_to_end_then_a_rerun_that_skips_everything(whole_run, answering_tiny):
    out, args, r = whole_run
    folder, task = answering_tiny
    assert r.exit_code == 0, r.output
    assert "estimated" in r.output and "stage 6/6: report" in r.output and "report card" in r.output
    assert set(json.loads((out / "reproduce.json").read_text())["stages"]) == set(STAGES)
    page = (out / "report" / "report.html").read_text()
    assert f"rpe reproduce: {folder} on {task} (smoke budget)" in page
    assert page.index("Report card") < page.index("Internal value over reasoning steps")
    assert "step-level search by internal value" in page and "zeroing value neurons" in page
    commands = (out / "commands.sh").read_text()
    assert commands.count("\nrpe ") == len(STAGES) and "--layers" in commands  # ablate's layer, known after fit
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "every stage was already complete" in again.output
    assert "done (kept)" in again.output
    other = runner.invoke(app, [*args[:5], "--budget", "small", "--out", str(out), "--estimate-only"])
    assert other.exit_code == 2 and "other settings" in other.output


@pytest.mark.slow
def test_resumes_at_every_stage_boundary_and_matches_an_uninterrupted_run(whole_run, answering_tiny, tmp_path):
    whole = whole_run[0]
    cfg = _config(answering_tiny)
    owned = {"rollouts": "rollouts/manifest.json", "ablate": "ablation/results.json",
             "dopamine": "bundle/weights.safetensors", "search": "search.json", "report": "report/report.html"}
    stamps = {}
    for stage in STAGES:  # a kill after each stage boundary, then the same command again
        assert Pipeline(cfg, tmp_path, n_layers=4).run(run_rpe, stop_after=stage) == [stage]  # only the next stage
        for path, mtime in stamps.items():
            assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten by {stage}"
        if stage in owned:
            stamps[tmp_path / owned[stage]] = (tmp_path / owned[stage]).stat().st_mtime_ns
    # the interrupted run measured what the uninterrupted one did
    for rel, key in (("search.json", "methods"), ("ablation/results.json", "layers")):
        a, b = (json.loads((d / rel).read_text())[key] for d in (whole, tmp_path))
        assert a == b, rel
    ma, mb = (json.loads((d / "bundle" / "bundle.json").read_text())["metrics"] for d in (whole, tmp_path))
    assert ma["headline_cv"] == mb["headline_cv"] and ma["dopamine"] == mb["dopamine"]
    rows = {r.claim: r for r in card(tmp_path)}
    assert rows["step-level search by internal value"].verdict != "not measured"
    assert rows["zeroing value neurons destroys reasoning"].verdict != "not measured"


@pytest.mark.slow
def test_smoke_budget_on_the_real_default_model(real_model, tmp_path):
    # dopamine is left out: 32 smoke trajectories of SmolLM2 give 8 surprising steps, which `rpe dopamine` refuses
    # (it needs 10); the tiny-model runs above cover that stage
    r = runner.invoke(app, ["reproduce", "--budget", "smoke", "--out", str(tmp_path), "--device", "cpu", "--skip", "dopamine"])
    assert r.exit_code == 0, r.output
    state = json.loads((tmp_path / "reproduce.json").read_text())
    assert set(state["stages"]) == set(STAGES) - {"dopamine"}
    assert "dopamine: skipped (left out with --skip)" in (tmp_path / "commands.sh").read_text()
    manifest = json.loads((tmp_path / "rollouts" / "manifest.json").read_text())
    assert manifest["n_trajectories"] == BUDGETS["smoke"].n_trajectories
    assert manifest["rollout"]["capture_layers"] == sweep_layers(30, BUDGETS["smoke"].sweep_layers)
    assert (tmp_path / "report" / "report.html").stat().st_size > 50_000


def test_task_options_reach_the_rollouts_command(tmp_path):
    cfg = ReproduceConfig(task="hf:data/gsm8k", task_options=("split=test", "config=main"))
    argv = Pipeline(cfg, tmp_path, n_layers=4).stage("rollouts").argv()
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--task-option"] == ["split=test", "config=main"]
    assert cfg.task_kwargs() == {"split": "test", "config": "main"}
    with pytest.raises(ValueError, match="KEY=VALUE, got 'split'"):
        ReproduceConfig(task_options=("split",)).task_kwargs()


@pytest.mark.slow
def test_ablation_reads_the_activations_captured_during_generation(whole_run, answering_tiny):
    import torch

    from rpe.ablate import _captured
    from rpe.models import load_model
    from rpe.records import read_trajectories
    from rpe.store import capture_states

    out = whole_run[0] / "rollouts"
    trajs = [t for t in read_trajectories(out) if t.steps]
    got = _captured(out, trajs, [3])  # the smoke budget captured layers 0 and 3 of the 4
    model, tok = load_model(str(answering_tiny[0]), device="cpu")
    fresh = capture_states(model, trajs, [3], pad_token_id=tok.pad_token_id)
    torch.testing.assert_close(got.acts[3], fresh.acts[3], atol=1e-4, rtol=1e-4)
    assert got.trajectory_ids == fresh.trajectory_ids and got.layers == [3]
    assert _captured(out, trajs[:-1], [3]) is None and _captured(out, trajs, [1]) is None  # else: capture again


@pytest.mark.slow
def test_early_stop_command_on_the_reproduced_bundle(whole_run, tmp_path):
    """`rpe early-stop` takes model, task and prompt from the fitting rollouts, leaves their questions out, and
    reports the three arms with tokens saved and accuracy lost."""
    from rpe.rollouts import rollout_settings
    from rpe.tasks import question_key

    out = whole_run[0]
    res_path = tmp_path / "es.json"
    r = runner.invoke(app, ["early-stop", "--bundle", str(out / "bundle"), "--rollouts", str(out / "rollouts"),
                            "--n-problems", "6", "--samples", "2", "--threshold", "2", "--max-step-tokens", "24",
                            "--out", str(res_path), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads(res_path.read_text())
    assert set(res["arms"]) == {"none", "value", "random_probe"} and res["n_problems"] == 6
    assert res["value"]["tokens_saved"] > 0 and "early stopping" in r.output
    fitted = set(rollout_settings(out / "rollouts").question_keys())
    from rpe.tasks import draw_problems

    held = draw_problems(rollout_settings(out / "rollouts").task(), 6, seed=1, exclude=sorted(fitted))
    assert not {question_key(p) for p in held} & fitted
    bad = runner.invoke(app, ["early-stop", "--bundle", str(out / "bundle"), "--rollouts", str(tmp_path),
                              "--out", str(res_path)])
    assert bad.exit_code != 0 and "not a finished rollout folder" in " ".join(bad.output.split())
