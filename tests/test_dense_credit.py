"""Dense internal credit for GRPO (rpe.trainers.dense): the (B, T) advantages inside the trainer equal GRPO's
group advantage plus weight x clip(the model's own TD error of each step) on that step's tokens, computed
independently from a separate read of the same completions; the control's probe; the step checker."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from conftest import make_tiny_bundle  # noqa: E402
from grpo_batches import batch_ids, keep_advantages  # noqa: E402


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from rpe.tiny import tiny_model

    model, tok = tiny_model()
    bundle = make_tiny_bundle(model, tok)
    for key in ("net.2.weight", "net.0.weight"):  # a steeper random probe: values (and credits) differ by step
        bundle.probe_state.weights[key] = bundle.probe_state.weights[key] * 8
    return bundle.save(tmp_path_factory.mktemp("dense") / "bundle")


def _run(tmp_path, bundle_dir, monkeypatch, dense):
    from trl import GRPOConfig, GRPOTrainer

    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.tasks import load_task
    from rpe.tiny import tiny_model
    from rpe.trainers import DenseRPEGRPOTrainer
    from rpe.trainers.recipes import build_dataset

    model, tok = tiny_model()
    task = load_task("chain_sum_2")
    ds, _ = build_dataset(task, PromptBuilder(task, tok, PromptConfig(shots=1)), 4, 0, chat=True)
    newline = tok.convert_tokens_to_ids("\n")
    seen = {}
    original = GRPOTrainer._generate_and_score_completions

    def record(self, inputs):
        out = original(self, inputs)
        seen.update(group=out["advantages"].clone(), completion_ids=out["completion_ids"].clone(),
                    mask=out["completion_mask"].clone(), prompts=batch_ids(out)["prompts"])
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", record)

    def parity(completion_ids, **kwargs):
        return [float(sum(c) % 2) for c in completion_ids]

    args = GRPOConfig(output_dir=str(tmp_path / "o"), max_steps=1, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=24, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                      generation_kwargs={"sequence_bias": {(newline,): 3.0}}, seed=0, learning_rate=0.0)
    trainer = DenseRPEGRPOTrainer(model=model, processing_class=tok, reward_funcs=[parity], args=args, train_dataset=ds,
                                  bundle=str(bundle_dir), dense=dense)
    computed = keep_advantages(trainer)
    try:
        trainer.train()
    finally:
        trainer.close()
    return model, tok, seen, computed["advantages"].float(), trainer.state.log_history[0]


def _expected(values_per_row, spans_per_row, n_tokens, group, weight, clip, gamma, width, z=1.0):
    """The documented formula, written out independently of rpe.trainers.dense (z: the credit's divisor)."""
    adv = torch.zeros(len(n_tokens), width)
    for i, (values, spans, n) in enumerate(zip(values_per_row, spans_per_row, n_tokens)):
        adv[i, :n] = float(group[i])
        if not spans:
            continue
        credit = [weight * min(max((gamma * values[t] - values[t - 1]) / z, -clip), clip) for t in range(1, len(values))]
        for j in range(n):
            step = next((s for s, (_, end) in enumerate(spans) if j < end), len(spans) - 1)
            adv[i, j] += credit[step]
    return adv


def test_dense_advantages_follow_the_documented_formula(tmp_path, bundle_dir, monkeypatch):
    from rpe.bundle import SubsystemBundle
    from rpe.signals import SignalReader
    from rpe.trainers import DenseCreditConfig

    cfg = DenseCreditConfig(weight=0.3, clip=0.05, gamma=0.9)
    model, tok, seen, got, logged = _run(tmp_path, bundle_dir, monkeypatch, cfg)
    mask = seen["mask"].bool()
    comps = [row[m].tolist() for row, m in zip(seen["completion_ids"], mask)]
    sigs = SignalReader(SubsystemBundle.load(bundle_dir, model=model, tokenizer=tok), model, tok).read(seen["prompts"], comps)
    assert max(s.n_steps for s in sigs) >= 2, "the batch needs multi-step completions to test the placement"
    credits = np.concatenate([np.diff(s.values) for s in sigs if s.n_steps])
    assert (np.abs(credits) > cfg.clip).any() and (np.abs(credits) < cfg.clip).any()  # the clip is exercised both ways
    expected = _expected([s.values for s in sigs], [s.step_spans for s in sigs], [len(c) for c in comps],
                         seen["group"].float(), cfg.weight, cfg.clip, cfg.gamma, mask.shape[1])
    assert got.shape == mask.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert logged["dense/abs_mean"] > 0 and 0 < logged["dense/clipped"] < 1


def test_batch_std_scale_divides_the_credit_by_its_spread_over_the_batch(tmp_path, bundle_dir, monkeypatch):
    from rpe.bundle import SubsystemBundle
    from rpe.signals import SignalReader
    from rpe.trainers import DenseCreditConfig

    cfg = DenseCreditConfig(weight=0.5, clip=1.5, gamma=1.0, scale="batch_std")
    model, tok, seen, got, logged = _run(tmp_path, bundle_dir, monkeypatch, cfg)
    mask = seen["mask"].bool()
    comps = [row[m].tolist() for row, m in zip(seen["completion_ids"], mask)]
    sigs = SignalReader(SubsystemBundle.load(bundle_dir, model=model, tokenizer=tok), model, tok).read(seen["prompts"], comps)
    credits = np.concatenate([np.diff(s.values) for s in sigs if s.n_steps])
    z = float(credits.std())
    assert 0 < z < 0.5 and logged["dense/scale"] == pytest.approx(z, rel=1e-3)  # raw credits are small: scaling matters
    assert (np.abs(credits / z) > cfg.clip).any()  # the clip acts on the scaled credit
    expected = _expected([s.values for s in sigs], [s.step_spans for s in sigs], [len(c) for c in comps],
                         seen["group"].float(), cfg.weight, cfg.clip, cfg.gamma, mask.shape[1], z=z)
    # the trainer's read and this one differ by ~1e-5 in V; dividing by z ~ 0.05 magnifies that 20x
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="dense scale 'zscore' is not one of raw, batch_std"):
        DenseCreditConfig(scale="zscore")


def test_zero_weight_is_grpo(tmp_path, bundle_dir, monkeypatch):
    from rpe.trainers import DenseCreditConfig

    _, _, seen, got, _ = _run(tmp_path, bundle_dir, monkeypatch, DenseCreditConfig(weight=0.0))
    torch.testing.assert_close(got, seen["group"].float().unsqueeze(1) * seen["mask"].float())


def test_random_direction_control_keeps_the_norm_and_changes_the_direction(bundle_dir):
    from rpe.bundle import SubsystemBundle
    from rpe.trainers.dense import random_direction_state

    state = SubsystemBundle.load(bundle_dir).probe_state
    control = random_direction_state(state, seed=3)
    w, r = state.weights["net.0.weight"], control.weights["net.0.weight"]
    assert torch.allclose(w.norm(), r.norm()) and not torch.allclose(w, r)
    cos = float((w.flatten() @ r.flatten()) / (w.norm() * r.norm()))
    assert abs(cos) < 0.5
    assert torch.equal(control.weights["net.2.weight"], state.weights["net.2.weight"])  # only the direction moves
    assert torch.equal(random_direction_state(state, seed=3).weights["net.0.weight"], r)  # seeded



def test_dense_recipe_runs_with_the_control(tmp_path, bundle_dir):
    import yaml

    from rpe.trainers.recipes import parse_recipe, train

    for source in ("value_diff", "random_direction"):
        recipe = {"model": "tiny", "task": "chain_sum_2", "trainer": "dense_rpe", "bundle": str(bundle_dir), "shots": 1,
                  "n_train_problems": 8, "n_eval_problems": 2, "eval_max_new_tokens": 8, "dense_source": source,
                  "output_dir": str(tmp_path / source), "seed": 0, "max_steps": 1, "per_device_train_batch_size": 4,
                  "num_generations": 2, "max_completion_length": 8, "logging_steps": 1, "save_strategy": "no",
                  "report_to": "none", "use_cpu": True, "bf16": False}
        path = tmp_path / f"{source}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        outcome = train(*parse_recipe(path))
        assert outcome.summary["steps"] == 1
        history = json.loads((tmp_path / source / "log_history.json").read_text())
        assert history[0]["dense/abs_mean"] > 0
