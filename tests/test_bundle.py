import json

import pytest
import torch

from rpe.bundle import BundleFormatError, BundleMismatchError, SubsystemBundle
from rpe.fit import FitConfig, fit_bundle
from rpe.tiny import TinyModelConfig, tiny_model
from rpe.probe import ProbeConfig

from test_probe import _synthetic_trajectories


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    model, tok = tiny_model()
    trajs = _synthetic_trajectories(tok, n_problems=40, samples=2)
    cfg = FitConfig(layers=[1, 2], top_frac=0.1, prune_fracs=[1.0, 0.1], probe=ProbeConfig(hidden=32, epochs=5), n_boot=50)
    bundle, states = fit_bundle(model, tok, trajs, cfg, model_name="tiny")
    path = bundle.save(tmp_path_factory.mktemp("b") / "bundle")
    return model, tok, trajs, bundle, states, path


def test_fit_produces_metrics_and_neurons(fitted):
    model, tok, trajs, bundle, states, path = fitted
    m = bundle.metrics
    assert m["best_layer"] in (1, 2) and bundle.layer == m["best_layer"]
    assert bundle.value_neurons.numel() == round(0.1 * 64)
    assert [r["frac"] for r in m["pruning_curve"]] == [1.0, 0.1]
    top = m["pruning_curve"][1]  # the 10% refit: the MLP or the logistic probe, whichever validates better
    assert set(top["refits"]) == {"mlp", "linear"}
    assert top["refit_family"] == max(top["refits"], key=lambda f: top["refits"][f]["val_auroc"])
    assert top["cv_auroc_s0"] == top["refits"][top["refit_family"]]["cv_auroc_s0"]
    assert bundle.probe_config.family == top["refit_family"]  # the bundle's value-neuron probe is that refit
    assert set(m["headline_cv"]["s0"]) == {
        "value neurons", "all neurons", "question length (shorter = more confident)", "mean prompt log-prob",
        "value neurons - all neurons", "value neurons - question length (shorter = more confident)",
        "value neurons - mean prompt log-prob"}
    for where in ("s0", "final"):
        for name, v in m["headline_cv"][where].items():
            point = v["diff"] if " - " in name else v["auroc"]
            assert v["low"] <= point <= v["high"] and v["verdict"]
            assert v["n"] == (80 if where == "s0" else 80)  # every trajectory is scored once (cross-validated)
    assert json.loads((path / "metrics.json").read_text())["best_layer"] == m["best_layer"]


def test_round_trip_and_value(fitted):
    model, tok, trajs, bundle, states, path = fitted
    loaded = SubsystemBundle.load(path, model=model, tokenizer=tok)
    assert torch.equal(loaded.value_neurons, bundle.value_neurons) and loaded.layer == bundle.layer
    # bundle.value at the last prompt token equals the probe on the captured s_0 activations
    t = trajs[0]
    text = tok.decode(t.prompt_token_ids)
    v = loaded.value(model, tok, [text])
    s0 = states.acts[bundle.layer][(states.traj_index == 0) & (states.step_index == 0)]
    assert torch.allclose(v, bundle.probe.predict(s0), atol=1e-5)
    assert ((0 <= v) & (v <= 1)).all()


def test_other_model_is_refused_with_both_fingerprints(fitted):
    *_, path = fitted
    other, otok = tiny_model(TinyModelConfig(architecture="qwen2", hidden_size=32))
    with pytest.raises(BundleMismatchError) as err:
        SubsystemBundle.load(path, model=other, tokenizer=otok)
    msg = str(err.value)
    assert "architecture" in msg and "hidden_size" in msg and "LlamaForCausalLM" in msg and "Qwen2ForCausalLM" in msg


def test_corrupted_or_old_bundles_are_named(fitted, tmp_path):
    import shutil

    *_, path = fitted
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "weights.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(BundleFormatError, match="weights.safetensors"):
        SubsystemBundle.load(broken)
    meta = json.loads((path / "bundle.json").read_text())
    meta["bundle_version"] = 0
    shutil.copytree(path, tmp_path / "old")
    (tmp_path / "old" / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleFormatError, match="version 0"):
        SubsystemBundle.load(tmp_path / "old")
    with pytest.raises(BundleFormatError, match="missing"):
        SubsystemBundle.load(tmp_path / "nothing")


def test_failed_save_keeps_the_old_bundle(fitted, monkeypatch):
    *_, bundle, _, path = fitted
    before = (path / "weights.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("rpe.bundle.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        bundle.save(path)
    assert (path / "weights.safetensors").read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".bundle")]


def test_fit_reuses_given_states_and_checks_them(fitted):
    model, tok, trajs, bundle, states, path = fitted
    cfg = FitConfig(layers=[1], top_frac=0.1, prune_fracs=[1.0], probe=ProbeConfig(hidden=32, epochs=5), n_boot=20)
    again, used = fit_bundle(model, tok, trajs, cfg, states=states)
    assert used.layers == [1] and torch.equal(used.acts[1], states.acts[1])
    with pytest.raises(ValueError, match=r"layers \[3\] were not captured"):
        fit_bundle(model, tok, trajs, FitConfig(layers=[3]), states=states)
    with pytest.raises(ValueError, match="other trajectories"):
        fit_bundle(model, tok, trajs[:-1], cfg, states=states)


def test_fit_bundle_end_to_end_finds_the_planted_layer_neurons_and_beats_its_controls():
    """Planted value signal in 3 neurons of layer 2 only (layer 1 carries none): the cross-validated pipeline
    picks layer 2, puts the planted neurons in the 5% set, keeps the signal down the pruning curve while the
    kept neurons include them, and its headline AUROCs are above chance and above the prompt controls (which
    carry nothing here)."""
    from rpe.store import capture_states

    model, tok = tiny_model()
    trajs = _synthetic_trajectories(tok, n_problems=60, samples=2)
    states = capture_states(model, trajs, [1, 2], batch_size=64)
    acts = states.acts[2]
    scale = acts.std(0)
    r = states.state_rewards() * 2 - 1
    for j in (5, 17, 42):
        acts[:, j] += 1.5 * scale[j] * r
    cfg = FitConfig(layers=[1, 2], top_frac=0.05, prune_fracs=[1.0, 0.5, 0.1, 0.05], n_boot=200,
                    probe=ProbeConfig(hidden=32, epochs=40))
    bundle, _ = fit_bundle(model, tok, trajs, cfg, states=states, model_name="tiny")
    m = bundle.metrics
    assert m["best_layer"] == 2 and bundle.layer == 2
    assert {5, 17, 42} <= set(bundle.value_neurons.tolist())  # 3 of the 3 planted neurons in the 5% (3) set
    curve = {row["frac"]: row for row in m["pruning_curve"]}
    for frac in (1.0, 0.5, 0.1, 0.05):
        assert curve[frac]["cv_auroc_s0"] > 0.8, (frac, curve[frac])
    s0 = m["headline_cv"]["s0"]
    assert s0["value neurons"]["verdict"] == "above chance" and s0["value neurons"]["auroc"] > 0.85
    for control in ("question length (shorter = more confident)", "mean prompt log-prob"):
        assert s0[f"value neurons - {control}"]["low"] > 0  # paired interval above the control


def test_fit_stages_called_one_by_one_give_the_bundles_numbers(fitted):
    """fit_bundle is its named stages in order: calling them by hand on the same states reproduces its metrics."""
    from rpe.fit import Scoring, fit_value_neurons, pruning_curve, sweep_layers, value_by_step

    model, tok, trajs, bundle, states, path = fitted
    cfg = FitConfig(**bundle.created_with["fit"])
    scoring = Scoring.of(states, cfg.folds, cfg.probe.seed)
    assert scoring.y.shape == scoring.step.shape == scoring.problems.shape == (states.acts[1].shape[0],)
    assert scoring.at["s0"].sum() == len(trajs) and scoring.at["final"].sum() == len(trajs)
    sweep, best = sweep_layers(states, cfg, scoring, lambda _: None)
    assert best == bundle.layer and best == max(sweep, key=lambda k: sweep[k]["val_auroc_all"])
    assert {str(k): v for k, v in sweep.items()} == bundle.metrics["layer_sweep"]
    curve, oof = pruning_curve(states, best, cfg, scoring, lambda _: None)
    assert curve == bundle.metrics["pruning_curve"]
    _, sparse, stability = fit_value_neurons(states, best, cfg, oof[cfg.top_frac].neurons)
    assert torch.equal(sparse.state.neurons, bundle.value_neurons)
    assert stability == bundle.metrics["value_neuron_stability"] and 0 <= stability["chance_iou"] < 1
    assert value_by_step(oof[cfg.top_frac].values, scoring, cfg.n_boot) == bundle.metrics["by_step"]
    # a step needs min_states states of both outcomes: with more than the run has, no step is reported
    assert value_by_step(oof[cfg.top_frac].values, scoring, cfg.n_boot, min_states=10_000) == []
