import contextlib
import json

import pytest
import torch

from rpe.controls import massive_dims, matched_random_set, random_set, top_magnitude_set
from rpe.interventions import NeuronAblation
from rpe.tracker import ActivationTracker, decoder_layers


def _ids(tok, text="Q: 1+2=3\n\nAnswer: 3"):
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def _layer_hooks(model):
    return sum(len(b._forward_hooks) for b in decoder_layers(model))


@pytest.mark.parametrize("mode,kwargs,expect", [
    ("zero", {}, lambda h: torch.zeros_like(h)),
    ("scale", {"scale": 0.5}, lambda h: 0.5 * h),
    ("mean", {"means": {1: torch.tensor([1.0, 2.0, 3.0])}}, lambda h: torch.tensor([1.0, 2.0, 3.0]).expand_as(h)),
])
def test_ablation_replaces_columns_and_changes_later_layers(tiny_llama, mode, kwargs, expect):
    model, tok = tiny_llama
    ids = _ids(tok)
    idx = torch.tensor([3, 10, 40])
    with ActivationTracker(model, [1, 3], record_all=True) as tr:
        with torch.no_grad():
            model(input_ids=ids)
    clean = tr.generated()
    before = _layer_hooks(model)
    with NeuronAblation(model, {1: idx}, mode=mode, **kwargs):
        with ActivationTracker(model, [1, 3], record_all=True) as tr:
            with torch.no_grad():
                model(input_ids=ids)
    ablated = tr.generated()
    assert _layer_hooks(model) == before
    torch.testing.assert_close(ablated[1][..., idx], expect(clean[1][..., idx]))
    other = [j for j in range(64) if j not in idx.tolist()]
    torch.testing.assert_close(ablated[1][..., other], clean[1][..., other])  # only the chosen columns move
    assert not torch.allclose(ablated[3], clean[3])  # downstream blocks see the ablation


def test_ablation_during_generation_and_cleanup_on_error(tiny_llama):
    model, tok = tiny_llama
    ids = _ids(tok, "Q: 5+5=")
    before = _layer_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with NeuronAblation(model, {2: list(range(64))}):
            out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
            plain = None
            raise RuntimeError("boom")
    assert _layer_hooks(model) == before
    plain = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == plain.shape and not torch.equal(out, plain)  # zeroing a whole layer changes the text


def test_bad_ablation_input_is_refused_before_hooking(tiny_llama):
    model, _ = tiny_llama
    before = _layer_hooks(model)
    with pytest.raises(ValueError, match="must lie in 0..63"):
        NeuronAblation(model, {1: [5, 64]})
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        NeuronAblation(model, {9: [1]})
    with pytest.raises(ValueError, match="repeat"):
        NeuronAblation(model, {1: [2, 2]})
    with pytest.raises(ValueError, match="needs means"):
        NeuronAblation(model, {1: [2]}, mode="mean")
    assert _layer_hooks(model) == before


def test_controls():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(500, 64, generator=g)
    acts[:, 7] *= 400  # a massive-activation dimension
    assert massive_dims(acts) == [7]
    r = random_set(64, 5, seed=0, exclude={7, 1, 2})
    assert r.numel() == 5 and not {7, 1, 2} & set(r.tolist()) and torch.equal(r, random_set(64, 5, 0, {7, 1, 2}))
    mean_abs = acts.abs().mean(0)
    target = torch.tensor([0, 20, 40])
    matched = matched_random_set(mean_abs, target, seed=0, exclude={7})
    assert matched.numel() == 3 and not set(matched.tolist()) & {0, 20, 40, 7}
    # matched neurons sit in the same magnitude range as their targets
    assert abs(float(mean_abs[matched].mean() - mean_abs[target].mean())) < 0.1
    assert top_magnitude_set(mean_abs, 1).tolist() == [7]


def test_run_ablation_on_a_tiny_model(tiny_llama, tiny_bundle, tmp_path):
    from rpe.ablate import AblateConfig, run_ablation
    from test_probe import _synthetic_trajectories

    model, tok = tiny_llama
    trajs = _synthetic_trajectories(tok, n_problems=30, samples=2)
    cfg = AblateConfig(task="chain_sum_2", n_problems=3, random_seeds=2, batch_size=3,
                       sources=["value", "random", "random_matched", "top_magnitude", "next_token", "wanda", "mc_probe"])
    res = run_ablation(model, tok, tiny_bundle, trajs, cfg, tmp_path, model_name="tiny")
    arms = res["layers"][str(tiny_bundle.layer)]["arms"]
    assert set(arms) == {"value", "random/0", "random/1", "random_matched/0", "random_matched/1", "top_magnitude",
                         "next_token", "wanda", "mc_probe"}
    assert arms["value"]["neurons"] == tiny_bundle.value_neurons.tolist()
    assert all(len(a["neurons"]) == 6 and a["n"] == 3 for a in arms.values())
    base = res["baseline"]["accuracy"]
    assert all(a["drop"] == pytest.approx(base - a["accuracy"]) for a in arms.values())
    assert len({tuple(a["neurons"]) for name, a in arms.items() if name.startswith("random")}) == 4  # 4 distinct sets
    for name, a in arms.items():  # each arm's accuracy is the one its rollout folder records
        manifest = json.loads((tmp_path / f"layer{tiny_bundle.layer}" / name.replace("/", "_") / "manifest.json").read_text())
        assert a["accuracy"] == manifest["accuracy"] and a["n"] == manifest["n_trajectories"]
    assert json.loads((tmp_path / "results.json").read_text())["baseline"]["n"] == 3
    assert (tmp_path / "ablation.png").stat().st_size > 1000
    again = run_ablation(model, tok, tiny_bundle, trajs, cfg, tmp_path, model_name="tiny")  # resumes: same numbers
    assert again["layers"] == res["layers"]


def test_causal_rpe_check_runs_and_reports_each_share(tiny_llama, tiny_bundle, tmp_path):
    import numpy as np

    from rpe.ablate import rpe_causal_check
    from rpe.prompts import PromptConfig
    from rpe.records import read_trajectories
    from rpe.rollouts import RolloutConfig, collect_rollouts
    from rpe.sampling import SamplingConfig

    model, tok = tiny_llama
    cfg = RolloutConfig(task="chain_sum_2", n_problems=24, samples=1, prompt=PromptConfig(shots=1),
                        sampling=SamplingConfig(max_new_tokens=24))
    collect_rollouts(model, tok, cfg, tmp_path / "r", model_name="tiny")
    rng = np.random.default_rng(0)
    values = {t.trajectory_id: rng.random(len(t.steps) + 1).tolist() for t in read_trajectories(tmp_path / "r") if t.steps}
    rewards = {t.trajectory_id: float(i % 2) for i, t in enumerate(read_trajectories(tmp_path / "r"))}
    for tid in values:
        values[tid][-1] = rewards[tid]
    (tmp_path / "r" / "mc_values.json").write_text(json.dumps({"k": values}))
    ranking = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    out = rpe_causal_check(model, tok, tiny_bundle, tmp_path / "r", shares=(0.1, 0.5), upstream=1, seeds=2, threshold=0.0,
                           ranking=ranking)
    assert out["ablation_layer"] == tiny_bundle.layer - 1 and set(out["shares"]) == {"0.1", "0.5"}
    for r in out["shares"].values():
        assert r["n_neurons"] in (6, 32) and len(r["random"]) == 2
        assert r["drop_value"] == pytest.approx(out["baseline"] - r["value"])
    # exact: the Spearman of the signed, standardised dopamine activity of each step (mean over its tokens) with its TD
    # error, recomputed here with the tracker (and the same ablation), equals what the check reports
    from scipy.stats import spearmanr

    from rpe.dopamine import DopamineConfig
    from rpe.probe import td_errors

    trajs = [t for t in read_trajectories(tmp_path / "r") if t.steps]
    mean, std = tiny_bundle.dopamine_stats()
    dop = tiny_bundle.dopamine_neurons

    def independent(ablate):
        act, delta = [], []
        with NeuronAblation(model, {tiny_bundle.layer - 1: ablate}) if ablate is not None else contextlib.nullcontext():
            for t in trajs:
                ids = torch.tensor([t.prompt_token_ids + t.completion_token_ids])
                with ActivationTracker(model, [tiny_bundle.layer], record_all=True) as tr, torch.no_grad():
                    model(input_ids=ids)
                h = tr.generated()[tiny_bundle.layer][0]
                v = values[t.trajectory_id]
                d = td_errors(v, DopamineConfig().gamma, reward=v[-1])
                for k, s in enumerate(t.steps):
                    step = h[t.prompt_len + s.token_start : t.prompt_len + s.token_end][:, dop].mean(0)  # step mean
                    act.append(float(((step - mean) / std * tiny_bundle.dopamine_sign).mean()))
                    delta.append(d[k])
        return float(spearmanr(act, delta).statistic)

    assert out["baseline"] == pytest.approx(independent(None), abs=1e-5)
    assert out["shares"]["0.5"]["value"] == pytest.approx(independent(ranking[:32]), abs=1e-5)
    assert out["shares"]["0.5"]["value"] != pytest.approx(out["baseline"], abs=1e-3)  # the ablation reached it


def test_summary_pools_seeds_into_one_wilson_interval():
    from rpe.ablate import summarise
    from rpe.metrics import wilson_interval

    arms = {"value": {"accuracy": 0.5, "n": 10, "drop": 0.1},
            "random/0": {"accuracy": 0.2, "n": 10, "drop": 0.4}, "random/1": {"accuracy": 0.6, "n": 10, "drop": 0.0}}
    s = summarise(arms)
    assert s["random"]["accuracy"] == pytest.approx(0.4) and s["random"]["n_sets"] == 2
    assert (s["random"]["drop_min"], s["random"]["drop_max"]) == (0.0, 0.4)
    assert s["random"]["ci95"] == list(wilson_interval(8, 20))  # 2 + 6 correct of 20
    assert s["value"]["ci95"] == list(wilson_interval(5, 10))


def test_ablation_share_sets_the_size_of_every_set(tiny_llama, tiny_bundle, tmp_path):
    from rpe.ablate import AblateConfig, run_ablation
    from test_probe import _synthetic_trajectories

    with pytest.raises(ValueError, match="share must lie in"):
        AblateConfig(share=0.1, n_neurons=6)
    with pytest.raises(ValueError, match="share must lie in"):
        AblateConfig(share=1.5)
    model, tok = tiny_llama
    trajs = _synthetic_trajectories(tok, n_problems=30, samples=2)
    cfg = AblateConfig(task="chain_sum_2", n_problems=2, random_seeds=1, batch_size=2, share=0.25,
                       sources=["value", "random"])
    res = run_ablation(model, tok, tiny_bundle, trajs, cfg, tmp_path, model_name="tiny")
    arms = res["layers"][str(tiny_bundle.layer)]["arms"]
    assert res["n_neurons"] == 16 and all(len(a["neurons"]) == 16 for a in arms.values())
    assert set(tiny_bundle.value_neurons.tolist()) != set(arms["value"]["neurons"])  # a 16-neuron set from a probe
    from rpe.ablate import paired_drops

    rows = {r["arm"]: r for r in paired_drops(tmp_path, n_boot=50)}
    assert set(rows) == {"value", "random_0"}
    for name, r in rows.items():  # the mean paired drop is the difference of the accuracies on the same problems
        assert r["drop"] == pytest.approx(res["baseline"]["accuracy"] - arms[name.replace("_", "/")]["accuracy"])
        assert r["low"] <= r["drop"] <= r["high"] and r["n"] == 2
    vs = rows["value"]["vs random_0"]
    assert vs["diff"] == pytest.approx(arms["random/0"]["accuracy"] - arms["value"]["accuracy"])


def test_ablation_arms_take_prompt_sampling_and_task_from_the_fitting_rollouts(tiny_llama, tmp_path):
    from rpe.ablate import AblateConfig, arm_settings
    from rpe.prompts import PromptConfig
    from rpe.rollouts import RolloutConfig, collect_rollouts
    from rpe.sampling import SamplingConfig

    model, tok = tiny_llama
    fitting = RolloutConfig(task="chain_sum_2", n_problems=2, samples=2, sampling=SamplingConfig(max_new_tokens=12,
                            temperature=0.5), prompt=PromptConfig(shots=1), capture_layers=[1])
    collect_rollouts(model, tok, fitting, tmp_path / "fit", model_name="tiny")
    rcfg, task = arm_settings(AblateConfig(n_problems=3), tmp_path / "fit")
    assert task.name == "chain_sum_2" and rcfg.task == "chain_sum_2"
    assert rcfg.prompt.shots == 1 and rcfg.sampling == fitting.sampling  # not the 6-shot, 128-token defaults
    assert (rcfg.n_problems, rcfg.samples, rcfg.seed, rcfg.capture_layers) == (3, 1, 1, None)
    rcfg, task = arm_settings(AblateConfig(task="chain_sum_4"), tmp_path / "fit")  # another task, same settings
    assert task.name == "chain_sum_4" and rcfg.prompt.shots == 1 and rcfg.sampling.max_new_tokens == 12
    rcfg, task = arm_settings(AblateConfig(), [])  # trajectories without a folder: the defaults
    assert task.name == "chain_sum_mix" and rcfg.prompt.shots == PromptConfig().shots


def test_held_out_arms_never_draw_a_fitting_question(tiny_llama, tmp_path):
    """A JSONL task's seed 1 is a shuffle of the same file: without the exclusion 'held-out' problems were
    fitting problems. The arms' problems are disjoint from the fitting run's, and asking for more than remain is
    a clear error."""
    import json

    from rpe.ablate import AblateConfig, arm_settings
    from rpe.prompts import PromptConfig
    from rpe.rollouts import RolloutConfig, collect_rollouts
    from rpe.sampling import SamplingConfig
    from rpe.tasks import draw_problems, question_key

    model, tok = tiny_llama
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(10)))
    fitting = RolloutConfig(task=str(path), n_problems=6, sampling=SamplingConfig(max_new_tokens=4),
                            prompt=PromptConfig(shots=1))
    collect_rollouts(model, tok, fitting, tmp_path / "fit", model_name="tiny")
    fit_keys = {question_key(p) for p in draw_problems(arm_settings(AblateConfig(), tmp_path / "fit")[1], 6, 0)}
    rcfg, task = arm_settings(AblateConfig(n_problems=4, seed=1), tmp_path / "fit")
    assert sorted(fit_keys) == rcfg.exclude_questions
    shuffled = {question_key(p) for p in task.problems(5, seed=1)}
    assert shuffled & fit_keys  # what the arms drew before: the same file's questions again (5 > the 4 left)
    held_out = {question_key(p) for p in draw_problems(task, 4, 1, rcfg.exclude_questions)}
    assert len(held_out) == 4 and not held_out & fit_keys
    with pytest.raises(ValueError, match="only 4 problems whose questions are not among the 6 excluded"):
        draw_problems(task, 5, 1, rcfg.exclude_questions)
