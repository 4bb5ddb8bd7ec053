"""The whole pipeline in bf16 on the real default model, on CPU (slow: about two minutes on 2 cores).

Rollouts with capture -> fit -> ablation with a control -> ``RPECallback`` in a GRPO step -> ``InternalRPE``, every
stage in bf16; and the s_0 AUROC of the bf16 states within 0.03 of fp32 states of the same trajectories.
Skipped, with the reason, on a CPU without bf16 kernels (there bf16 runs through a slow reference GEMM).
"""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rpe.cli import app
from rpe.models import DEFAULT_MODEL, cpu_has_bf16

runner = CliRunner()
BF16 = ["--device", "cpu", "--dtype", "bfloat16"]


@pytest.mark.slow
def test_pipeline_in_bf16_on_the_real_model(real_model, tmp_path):
    if not cpu_has_bf16():
        pytest.skip(f"this CPU has no bf16 kernels (torch capability {torch.backends.cpu.get_cpu_capability()})")
    from rpe.crossval import cross_validate, kfold_by_problem
    from rpe.probe import ProbeConfig
    from rpe.records import read_trajectories
    from rpe.rollouts import STATES_FILE
    from rpe.store import StateSet, capture_states

    out = tmp_path / "run"
    r = runner.invoke(app, ["rollouts", "--n-problems", "24", "--samples", "2", "--max-new-tokens", "64", "--capture-layers",
                            "8,14", "--out", str(out), *BF16])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["dtype"] == "bfloat16" and 0 < manifest["accuracy"] < 1

    # the same trajectories' states in fp32 (the fixture's model) and in bf16 (captured while generating)
    trajs = read_trajectories(out)
    bf16_states = StateSet.load(out / STATES_FILE)
    fp32_states = capture_states(real_model[0], trajs, [8, 14], batch_size=16)
    folds = kfold_by_problem(fp32_states.problem_ids, 4, 0)
    s0 = fp32_states.step_index.numpy() == 0
    y = fp32_states.state_rewards().numpy()[s0]
    from rpe.metrics import auroc

    for layer in (8, 14):
        cos = torch.nn.functional.cosine_similarity(bf16_states.acts[layer][bf16_states.step_index == 0].float(),
                                                    fp32_states.acts[layer][fp32_states.step_index == 0].float())
        assert cos.min() > 0.99, (layer, float(cos.min()))
        # a fixed L2 and the Monte-Carlo target: on 48 trajectories an L2 chosen on validation (or TD's fitted-
        # value iterations) flips with any perturbation, and the comparison would measure that, not the dtype
        cfg = ProbeConfig(family="linear", target="mc", l2_grid=(0.1,))
        a32 = auroc(y, cross_validate(fp32_states, layer, cfg, folds)[1.0].values[s0])
        a16 = auroc(y, cross_validate(bf16_states, layer, cfg, folds)[1.0].values[s0])
        print(f"layer {layer}: s_0 AUROC fp32 {a32:.3f}, bf16 {a16:.3f}, min cosine {float(cos.min()):.5f}")
        assert abs(a32 - a16) <= 0.03, (layer, a32, a16)

    r = runner.invoke(app, ["fit", "--rollouts", str(out), "--out", str(out / "bundle"), "--epochs", "10", *BF16])
    assert r.exit_code == 0, r.output
    bundle_json = json.loads((out / "bundle" / "bundle.json").read_text())
    assert bundle_json["model"]["dtype"] == "bfloat16"

    r = runner.invoke(app, ["ablate", "--bundle", str(out / "bundle"), "--rollouts", str(out), "--out",
                            str(out / "ablate"), "--n-problems", "8", "--controls", "value,random", "--seeds", "1", *BF16])
    assert r.exit_code == 0, r.output
    results = json.loads((out / "ablate" / "results.json").read_text())
    arms = results["layers"][str(bundle_json["layer"])]["arms"]
    assert set(arms) == {"value", "random/0"} and results["baseline"]["n"] == 8
    assert results["arm_settings"]["sampling"]["max_new_tokens"] == 64  # the rollouts' budget, not the default
    assert all(len(a["neurons"]) == bundle_json["n_value_neurons"] for a in arms.values())

    # search reads model, task, prompt and completion budget from the rollouts it is given
    r = runner.invoke(app, ["search", "--rollouts", str(out), "--bundle", str(out / "bundle"), "--n-problems", "2", "--methods",
                            "greedy,value", "--candidates", "2", "--max-step-tokens", "16", "--out",
                            str(tmp_path / "search.json"), *BF16])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["model"] == DEFAULT_MODEL and saved["task"] == manifest["task"]["name"]
    assert 0 < saved["methods"]["greedy"]["tokens_per_problem"] <= 64 and set(saved["methods"]) == {"greedy", "value"}

    _grpo_step_and_env_in_bf16(out / "bundle", tmp_path)


def _grpo_step_and_env_in_bf16(bundle_dir, tmp_path):
    import gymnasium
    from trl import GRPOConfig, GRPOTrainer

    from rpe.envs import InternalRPE
    from rpe.models import load_model
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.tasks import load_task
    from rpe.trainers import RPECallback
    from rpe.trainers.recipes import build_dataset
    from rpe.trainers.rewards import correctness_reward

    model, tok = load_model(DEFAULT_MODEL, device="cpu", dtype="bfloat16")
    task = load_task("chain_sum_mix")
    ds, problems = build_dataset(task, PromptBuilder(task, tok, PromptConfig(shots=2)), 4, 0, chat=True)
    cb = RPECallback(str(bundle_dir))
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=24, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                      logging_steps=1)
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[correctness_reward(task, problems)],
                          args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["rpe/n_completions"] == 4 and np.isfinite(logged["rpe/value_s0"])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    env = InternalRPE(gymnasium.make("rpe/ChainSum-v0", max_steps=4), str(bundle_dir), model=model, tokenizer=tok)
    obs, info = env.reset(seed=0)
    _, _, _, _, step_info = env.step("4 + 1 = 5.")
    assert np.isfinite(info["internal_value"]) and np.isfinite(step_info["internal_rpe"])
