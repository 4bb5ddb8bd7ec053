"""TRL integration on a tiny random model: every recipe runs a few steps, logs the rpe keys, leaves no hook."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

if os.environ.get("RPE_REQUIRE_TRL"):  # `make test`: a broken TRL install fails the suite instead of skipping it
    import trl  # noqa: F401
else:
    pytest.importorskip("trl")

from conftest import make_tiny_bundle  # noqa: E402
from grpo_batches import batch_ids, keep_advantages, record_batches  # noqa: E402

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


def _hooks(model):
    """Hooks on the decoder blocks (where rpe hooks; transformers adds its own on the embeddings)."""
    from rpe.tracker import decoder_layers

    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in decoder_layers(model))


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from rpe.tiny import tiny_model

    model, tok = tiny_model()
    return make_tiny_bundle(model, tok).save(tmp_path_factory.mktemp("tb") / "bundle")


def _tiny_recipe(tmp_path, bundle_dir, trainer, **extra):
    recipe = {
        "model": "tiny", "task": "chain_sum_2", "trainer": trainer, "bundle": str(bundle_dir), "shots": 1,
        "n_train_problems": 8, "n_eval_problems": 4, "eval_max_new_tokens": 12, "output_dir": str(tmp_path / trainer),
        "seed": 0, "max_steps": 2, "learning_rate": 1e-4, "per_device_train_batch_size": 4, "num_generations": 2,
        "max_completion_length": 12, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "use_cpu": True, "bf16": False, **extra,
    }
    path = tmp_path / f"{trainer}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


TINY_EOS = 2  # the tiny tokenizer's EOS id
EOS_AT_LIMIT = {"generation_kwargs": {"forced_eos_token_id": TINY_EOS}}  # every completion ends with EOS
NEVER_EOS = {"generation_kwargs": {"suppress_tokens": [TINY_EOS]}}  # every completion is cut at the limit


@pytest.mark.parametrize("trainer,extra,captured", [
    ("grpo", {"internal_rewards": ["rpe_sum", "value_final"], "internal_reward_weights": [0.1, 0.0], **EOS_AT_LIMIT}, 1.0),
    ("rloo", {"beta": 0.0, **NEVER_EOS}, 0.0),
    ("internal_critic", {"baseline_mix": 0.5, **EOS_AT_LIMIT}, 1.0),
])
def test_recipe_runs_and_logs_internal_signals(tmp_path, bundle_dir, trainer, extra, captured):
    from rpe.trainers.callback import LOGGED_KEYS
    from rpe.trainers.recipes import parse_recipe, train

    rpe_args, train_args, model_args = parse_recipe(_tiny_recipe(tmp_path, bundle_dir, trainer, **extra))
    summary = train(rpe_args, train_args, model_args).summary
    assert summary["steps"] == 2
    history = json.loads((Path(train_args.output_dir) / "log_history.json").read_text())
    steps = [h for h in history if "rpe/value_s0" in h]
    assert len(steps) == 2
    for h in steps:
        assert set(LOGGED_KEYS) <= set(h)
        assert 0 <= h["rpe/value_s0"] <= 1 and 0 <= h["rpe/value_final"] <= 1
        assert h["rpe/rpe_min"] is None or -1 <= h["rpe/rpe_min"] <= h["rpe/rpe_max"] <= 1
        # share of rows read from the capture: EOS-terminated rows come from it, length-cut rows need a forward
        assert h["rpe/captured"] == captured
    if trainer == "grpo":
        assert all("rewards/internal_rpe_sum/mean" in h and "rewards/correct/mean" in h for h in steps)
    if trainer == "internal_critic":
        assert all("critic/loss" in h and "critic/adv_abs_mean" in h for h in steps)
    reads = summary["signal_reads"]  # every batch matched the trainer's own generation: no batch-wide forward
    assert reads["forward"] == 0 and reads["captured"] == 2
    assert reads["rows_recomputed"] == (0 if captured == 1.0 else 2 * 4)  # 2 steps x 4 completions
    for key in ("eval_before", "eval_after"):
        assert 0 <= summary[key]["accuracy"] <= 1 and summary[key]["n"] == 4


def test_recipe_selects_prompts_by_internal_value_before_training(tmp_path, bundle_dir):
    """`select_prompts`: the training set keeps the prompts whose V(s_0) lies in the band, each value the one
    `bundle.value` reads on the prompt text; training then runs on what was kept."""
    from rpe.bundle import SubsystemBundle
    from rpe.tiny import tiny_model
    from rpe.trainers.recipes import build_dataset, parse_recipe, train
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.selection import SelectionConfig, prompt_text, select_dataset
    from rpe.tasks import load_task

    model, tok = tiny_model()
    bundle = SubsystemBundle.load(bundle_dir)
    task = load_task("chain_sum_2")
    ds, _ = build_dataset(task, PromptBuilder(task, tok, PromptConfig(shots=1)), 12, 0, chat=True)
    values = bundle.value(model, tok, [prompt_text(p, tok) for p in ds["prompt"]]).numpy()
    mid = float(np.median(values))
    kept, summary = select_dataset(ds, model, tok, bundle, SelectionConfig(low=mid, high=1.0, explore=0.0))
    assert summary["kept"] == int((values >= mid).sum()) < 12 and len(kept) == summary["kept"]
    np.testing.assert_allclose(sorted(kept["rpe_value_s0"]), sorted(values[values >= mid]), atol=1e-6)
    with pytest.raises(ValueError, match="kept none of 12 prompts"):
        select_dataset(ds, model, tok, bundle, SelectionConfig(low=1.0, high=1.0, explore=0.0))
    # the controls keep as many prompts: the band skipped only hopeless ones (V below), so the length control skips
    # as many of the longest questions; or a seeded random draw
    questions = [f"q{'x' * i}" for i in range(12)]
    by_length, s_len = select_dataset(ds, model, tok, bundle, SelectionConfig(low=mid, high=1.0, explore=0.0),
                                      select_by="length", questions=questions)
    assert s_len["kept"] == summary["kept"] and s_len["select_by"] == "length"
    assert sorted(by_length["problem_id"]) == sorted(ds["problem_id"][i] for i in range(summary["kept"]))
    by_chance, s_rand = select_dataset(ds, model, tok, bundle, SelectionConfig(low=mid, high=1.0, explore=0.0, seed=3),
                                       select_by="random")
    assert s_rand["kept"] == summary["kept"] and len(by_chance) == summary["kept"]
    with pytest.raises(ValueError, match="select_by 'entropy' is not one of value, length, random"):
        select_dataset(ds, model, tok, bundle, SelectionConfig(), select_by="entropy")
    path = _tiny_recipe(tmp_path, bundle_dir, "grpo", select_prompts=True, select_low=0.0, select_high=1.0,
                        select_explore=0.0, max_steps=1, select_by="random", **EOS_AT_LIMIT)
    outcome = train(*parse_recipe(path))
    assert outcome.summary["prompt_selection"]["n"] == 8 and outcome.summary["steps"] == 1
    assert outcome.summary["prompt_selection"]["select_by"] == "random"


def test_no_hook_or_wrapper_survives_training(tmp_path, bundle_dir):
    from trl import GRPOConfig, GRPOTrainer

    from rpe.tiny import tiny_model
    from rpe.trainers import RPECallback
    from rpe.trainers.recipes import build_dataset
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.tasks import load_task

    model, tok = tiny_model()
    before = _hooks(model)
    task = load_task("chain_sum_2")
    ds, problems = build_dataset(task, PromptBuilder(task, tok, PromptConfig(shots=1)), 4, 0, chat=True)
    cb = RPECallback(str(bundle_dir))
    args = GRPOConfig(output_dir=str(tmp_path / "o"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[lambda completions, **k: [0.0] * len(completions)],
                          args=args, train_dataset=ds, callbacks=[cb])
    seen = {}

    def on_step_end(*args, **kwargs):
        seen.setdefault("attached", cb.trainer is trainer and "generate" in vars(model))

    cb.on_step_end = on_step_end
    trainer.train()
    assert seen["attached"]  # wired in by the one line above
    assert _hooks(model) == before and "generate" not in vars(model) and "_calculate_rewards" not in vars(trainer)


def test_gae_and_token_spread():
    import numpy as np

    from rpe.trainers.critic import gae_per_step, token_advantages

    # lambda = 1: A_t = r - V(s_t); lambda = 0: one-step TD errors
    v = np.array([0.2, 0.5, 0.9])
    np.testing.assert_allclose(gae_per_step(v, 1.0, 1.0, 1.0), 1.0 - v)
    np.testing.assert_allclose(gae_per_step(v, 0.0, 1.0, 0.0), [0.3, 0.4, -0.9])
    # gamma 0.9, lambda 0.5 by hand: deltas 0.9*0.5-0.2 = 0.25, 0.9*0.6-0.5 = 0.04, 1-0.6 = 0.4;
    # A_2 = 0.4, A_1 = 0.04 + 0.45*0.4 = 0.22, A_0 = 0.25 + 0.45*0.22 = 0.349
    np.testing.assert_allclose(gae_per_step(np.array([0.2, 0.5, 0.6]), 1.0, 0.9, 0.5), [0.349, 0.22, 0.4])
    adv = token_advantages(np.array([1.0, 2.0]), [(0, 3), (5, 8)], 10)
    assert adv.tolist() == [1, 1, 1, 2, 2, 2, 2, 2, 2, 2]  # separator tokens 3-4 join step 2, EOS joins the last


def test_every_recipe_loads(bundle_dir):
    from rpe.trainers.recipes import DEFAULT_LORA_TARGETS, RPEArguments, parse_recipe

    assert RECIPES, "recipes/ holds no YAML"
    for path in RECIPES:
        if path.name.startswith("accelerate"):
            continue
        gpu = ["--bf16", "false", "--use_cpu", "true"] if "multi_gpu" in path.name else []  # CPU-only CI
        rpe_args, train_args, model_args = parse_recipe(path, ["--bundle", str(bundle_dir), *gpu])
        assert isinstance(rpe_args, RPEArguments) and train_args.max_steps >= 100
        assert model_args.dtype == "auto" and model_args.lora_target_modules == DEFAULT_LORA_TARGETS
        if "multi_gpu" in path.name:
            assert train_args.use_vllm and train_args.vllm_mode == "colocate"


def test_unknown_recipe_key_names_the_nearest(tmp_path, bundle_dir):
    from rpe.trainers.recipes import RecipeError, read_recipe

    path = _tiny_recipe(tmp_path, bundle_dir, "grpo", lerning_rate=1e-5)
    with pytest.raises(RecipeError, match="unknown key 'lerning_rate'; did you mean 'learning_rate'"):
        read_recipe(path)


def test_unknown_command_line_override_names_the_nearest(tmp_path, bundle_dir):
    from rpe.trainers.recipes import RecipeError, parse_recipe

    path = _tiny_recipe(tmp_path, bundle_dir, "grpo")
    with pytest.raises(RecipeError, match="unknown command-line option --max_stepz; did you mean 'max_steps'"):
        parse_recipe(path, ["--max_stepz", "2"])
    rpe_args, train_args, model_args = parse_recipe(path, ["--max_steps", "3"])  # a valid override goes through
    assert train_args.max_steps == 3


def test_bundle_for_another_model_is_refused(tmp_path, bundle_dir):
    from rpe.bundle import BundleMismatchError
    from rpe.tiny import TinyModelConfig, tiny_model
    from rpe.trainers import InternalSignals

    other, tok = tiny_model(TinyModelConfig(hidden_size=32))
    with pytest.raises(BundleMismatchError, match="hidden_size"):
        InternalSignals(str(bundle_dir), other, tok)


def test_nan_reward_skips_the_update_with_a_warning(tmp_path, bundle_dir, caplog):
    from trl import GRPOConfig

    from rpe.tiny import tiny_model
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.tasks import load_task
    from rpe.trainers import InternalCriticGRPOTrainer

    model, tok = tiny_model()
    task = load_task("chain_sum_2")
    ds, _ = build = __import__("rpe.trainers.recipes", fromlist=["x"]).build_dataset(
        task, PromptBuilder(task, tok, PromptConfig(shots=1)), 4, 0, chat=True)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(completions, **kwargs):
        return [float("nan")] * len(completions)

    args = GRPOConfig(output_dir=str(tmp_path / "o"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, report_to="none", use_cpu=True, save_strategy="no", learning_rate=1e-2,
                      logging_steps=1)
    trainer = InternalCriticGRPOTrainer(model=model, processing_class=tok, reward_funcs=[broken], args=args,
                                        train_dataset=ds, bundle=str(bundle_dir))
    critic_start = {k: v.clone() for k, v in trainer.critic_net.state_dict().items()}
    with caplog.at_level("WARNING"):
        trainer.train()
    trainer.rpe_signals.close()
    for k, v in trainer.critic_net.state_dict().items():  # the critic skipped its update too (it trained on 0s before)
        assert torch.equal(v, critic_start[k]), k
    assert "critic/loss" not in trainer.state.log_history[0]
    assert "returned NaN/inf for 4 of 4 completions" in caplog.text
    assert trainer.state.log_history[0]["critic/skipped_updates"] == 1.0
    for k, v in model.state_dict().items():  # zero advantages: the policy did not move
        assert torch.equal(v, start[k]), k


def test_two_process_data_parallel_run_logs_once_with_gathered_metrics(tmp_path):
    import os
    import subprocess
    import sys

    script = Path(__file__).with_name("dist_callback.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                          str(script), str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    history = json.loads((tmp_path / "log_history.json").read_text())
    steps = [h for h in history if "rpe/value_s0" in h]
    assert len(steps) == 2
    assert all(h["rpe/n_completions"] == 8 for h in steps)  # 4 per process, gathered from both
    printed = run.stdout + run.stderr
    assert printed.count("'rpe/value_s0'") == 2  # the trainer printed each step's logs once (main process only)
    assert "RANK 0" in printed and "RANK 1" in printed
    # the gathered metrics equal an independent read of both ranks' completions, each with its own rewards
    # (a wrong per-process slice pairs rank 1's values with rank 0's rewards)
    from rpe.bundle import random_bundle
    from rpe.metrics import auroc
    from rpe.tiny import tiny_model
    from rpe.signals import SignalReader

    model, tok = tiny_model()
    reader = SignalReader(random_bundle(model, tok), model, tok)
    ranks = [json.loads((tmp_path / f"batches_rank{r}.json").read_text()) for r in (0, 1)]
    for step, logged in enumerate(steps):
        v0, vf, y = [], [], []
        for batches in ranks:
            b = batches[step]
            sigs = reader.read(b["prompts"], b["completions"])
            v0 += [s.values[0] for s in sigs]
            vf += [s.values[-1] for s in sigs]
            y += [sum(c) % 2 == 1 for c in b["completions"]]
        assert 0 < sum(y) < len(y), "the run needs both outcomes"
        assert logged["rpe/value_s0"] == pytest.approx(np.mean(v0), abs=1e-5)
        assert logged["rpe/value_final"] == pytest.approx(np.mean(vf), abs=1e-5)
        assert logged["rpe/auroc_value_final"] == pytest.approx(auroc(np.array(y), np.round(vf, 4)), abs=1e-6)


def test_online_refit_saves_the_bundle_with_checkpoints_and_rewards_have_one_value_per_completion(tmp_path, bundle_dir):
    from trl import GRPOConfig, GRPOTrainer

    from rpe.bundle import SubsystemBundle
    from rpe.tiny import tiny_model
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.tasks import load_task
    from rpe.trainers import InternalSignals, RPECallback
    from rpe.trainers.recipes import build_dataset

    model, tok = tiny_model()
    task = load_task("chain_sum_2")
    ds, _ = build_dataset(task, PromptBuilder(task, tok, PromptConfig(shots=1)), 16, 0, chat=True)
    signals = InternalSignals(str(bundle_dir), model, tok)
    before = {k: v.clone() for k, v in signals.bundle.probe_state.weights.items()}
    lengths = []

    def parity(completions, **kwargs):  # both outcomes occur, so the probe can be refitted
        return [float(len(c[0]["content"]) % 2) for c in completions]

    def rpe_sum(prompts, completions, **kwargs):
        out = signals.reward("rpe_sum")(prompts, completions, **kwargs)
        lengths.append((len(out), len(completions)))
        return out

    rpe_sum.rpe_internal = True
    cb = RPECallback(signals.bundle, signals=signals, refit_every=2, refit_window=8, refit_epochs=2)
    args = GRPOConfig(output_dir=str(tmp_path / "o"), max_steps=4, per_device_train_batch_size=8, num_generations=2,
                      max_completion_length=8, report_to="none", use_cpu=True, save_strategy="steps", save_steps=4,
                      logging_steps=1, seed=0)
    GRPOTrainer(model=model, processing_class=tok, reward_funcs=[parity, rpe_sum], args=args, train_dataset=ds,
                callbacks=[cb]).train()
    signals.close()
    assert lengths and all(a == b == 8 for a, b in lengths)
    saved = SubsystemBundle.load(tmp_path / "o" / "checkpoint-4" / "rpe_bundle", model=model, tokenizer=tok)
    assert saved.metrics["online_refits"] and [r["step"] for r in saved.metrics["online_refits"]] == [2, 4]
    assert any(not torch.equal(saved.probe_state.weights[k], before[k]) for k in before)  # the probe was refitted


def _readme_advantages(values_per_row, spans_per_row, n_tokens, rewards, group_adv, gamma, lam, mix):
    """The internal-critic algorithm as docs/guides/internal-rewards.md states it, written out independently."""
    width = max(n_tokens)
    adv = torch.zeros(len(n_tokens), width)
    for i, (v, spans, n, r) in enumerate(zip(values_per_row, spans_per_row, n_tokens, rewards)):
        v = list(v[:-1]) if spans else [v[0]]  # V(s_0..s_{T-1}): the states an action is taken from
        deltas = [gamma * v[t + 1] - v[t] for t in range(len(v) - 1)] + [r - v[-1]]
        a = [sum((gamma * lam) ** k * deltas[t + k] for k in range(len(deltas) - t)) for t in range(len(deltas))]
        for j in range(n):  # token j: the step whose span ends after it (separators join the next step)
            step = next((s for s, (_, end) in enumerate(spans) if j < end), len(spans) - 1)
            adv[i, j] = a[max(step, 0)]
    mask = torch.zeros(len(n_tokens), width, dtype=torch.bool)
    for i, n in enumerate(n_tokens):
        mask[i, :n] = True
    mu, sd = adv[mask].mean(), adv[mask].std()
    adv = torch.where(mask, (adv - mu) / sd, torch.zeros_like(adv))
    return (1 - mix) * adv + mix * group_adv.unsqueeze(1) * mask


def test_internal_critic_advantages_follow_the_documented_algorithm(tmp_path, bundle_dir, monkeypatch):
    """Per-token (B, T) advantages inside the trainer: GAE over steps with gamma, lambda < 1, step-to-token
    placement, whitening over completion tokens and the baseline mix, against an independent computation from
    a separate SignalReader read of the same completions and TRL's own group advantages."""
    from trl import GRPOConfig, GRPOTrainer

    from rpe.bundle import SubsystemBundle
    from rpe.tiny import tiny_model
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.signals import SignalReader
    from rpe.tasks import load_task
    from rpe.trainers import InternalCriticGRPOTrainer
    from rpe.trainers.critic import CriticConfig
    from rpe.trainers.recipes import build_dataset

    model, tok = tiny_model()
    task = load_task("chain_sum_2")
    ds, _ = build_dataset(task, PromptBuilder(task, tok, PromptConfig(shots=1)), 4, 0, chat=True)
    newline = tok.convert_tokens_to_ids("\n")

    def parity(completion_ids, **kwargs):  # varies within the batch
        return [float(sum(c) % 2) for c in completion_ids]

    seen = {}
    original = GRPOTrainer._generate_and_score_completions

    def record(self, inputs):
        out = original(self, inputs)
        seen["group"] = out["advantages"].clone()
        seen["completion_ids"] = out["completion_ids"].clone()
        seen["mask"] = out["completion_mask"].clone()
        seen["prompts"] = batch_ids(out)["prompts"]
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", record)
    args = GRPOConfig(output_dir=str(tmp_path / "o"), max_steps=1, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=24, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                      generation_kwargs={"sequence_bias": {(newline,): 3.0}}, seed=0)  # paragraphs: several steps
    cfg = CriticConfig(gamma=0.9, lam=0.7, baseline_mix=0.3, critic_updates=1)
    trainer = InternalCriticGRPOTrainer(model=model, processing_class=tok, reward_funcs=[parity], args=args,
                                        train_dataset=ds, bundle=str(bundle_dir), critic=cfg)
    computed = keep_advantages(trainer)
    trainer.train()
    trainer.rpe_signals.close()

    mask = seen["mask"].bool()
    comps = [row[m].tolist() for row, m in zip(seen["completion_ids"], mask)]
    reader = SignalReader(SubsystemBundle.load(bundle_dir, model=model, tokenizer=tok), model, tok)  # the critic
    sigs = reader.read(seen["prompts"], comps)  # before its update
    assert max(s.n_steps for s in sigs) >= 2, "the batch needs multi-step completions to test the placement"
    rewards = [float(sum(c) % 2) for c in comps]
    assert 0 < sum(rewards) < len(rewards)
    expected = _readme_advantages([s.values for s in sigs], [s.step_spans for s in sigs], [len(c) for c in comps],
                                  rewards, seen["group"].float(), cfg.gamma, cfg.lam, cfg.baseline_mix)
    got = computed["advantages"].float()
    assert got.shape == mask.shape  # (B, T): per-token advantages
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_internal_critic_ends_its_td_errors_and_trains_its_targets_on_the_same_reward(tmp_path, bundle_dir, monkeypatch):
    """One convention: the reward GAE's last TD error ends on and the critic's lambda-return targets are the same
    number, the weighted reward clipped to [0, 1] (the values are probabilities); the old code trained the
    critic on r >= 0.5 while GAE used the raw r."""
    from trl import GRPOConfig

    import rpe.trainers.critic as critic
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.tasks import load_task
    from rpe.tiny import tiny_model
    from rpe.trainers.critic import CriticConfig, InternalCriticGRPOTrainer
    from rpe.trainers.recipes import build_dataset

    model, tok = tiny_model()
    task = load_task("chain_sum_2")
    ds, _ = build_dataset(task, PromptBuilder(task, tok, PromptConfig(shots=1)), 4, 0, chat=True)

    def graded(completion_ids, **kwargs):  # 0.3 or 1.7: one inside [0, 1], one above it
        return [0.3 if sum(c) % 2 else 1.7 for c in completion_ids]

    ends, targets = [], []
    gae, returns = critic.gae_per_step, critic.lambda_returns
    monkeypatch.setattr(critic, "gae_per_step", lambda v, r, g, l: ends.append(r) or gae(v, r, g, l))
    monkeypatch.setattr(critic, "lambda_returns", lambda v, y, t, g, l: targets.append(y.clone()) or returns(v, y, t, g, l))
    args = GRPOConfig(output_dir=str(tmp_path / "o"), max_steps=1, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=12, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, seed=0)
    trainer = InternalCriticGRPOTrainer(model=model, processing_class=tok, reward_funcs=[graded], args=args,
                                        train_dataset=ds, bundle=str(bundle_dir), critic=CriticConfig(critic_updates=1))
    trainer.train()
    trainer.rpe_signals.close()
    assert sorted(set(ends)) == [pytest.approx(0.3), 1.0] and len(ends) == 8  # both kinds in the batch
    assert targets[0].tolist() == pytest.approx(ends)  # the same numbers, in the same order
    logged = [h for h in trainer.state.log_history if "critic/reward_clipped" in h]
    assert logged and logged[0]["critic/reward_clipped"] == pytest.approx(ends.count(1.0) / 8)


def test_callback_logs_the_numbers_an_independent_read_gives(tmp_path, bundle_dir, monkeypatch):
    """The logged rpe/* values equal SignalReader.read of the same completions, with a verifiable reward that
    varies within the batch, two weighted verifiable functions (the internal one is left out of the AUROC
    target) and the AUROC keys exercised."""
    from trl import GRPOConfig, GRPOTrainer

    from rpe.bundle import SubsystemBundle
    from rpe.metrics import auroc
    from rpe.tiny import tiny_model
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.signals import SignalReader
    from rpe.tasks import load_task
    from rpe.trainers import InternalSignals, RPECallback
    from rpe.trainers.recipes import build_dataset

    model, tok = tiny_model()
    task = load_task("chain_sum_2")
    ds, _ = build_dataset(task, PromptBuilder(task, tok, PromptConfig(shots=1)), 4, 0, chat=True)
    newline = tok.convert_tokens_to_ids("\n")

    def parity(completion_ids, **kwargs):
        return [float(sum(c) % 2) for c in completion_ids]

    def has_newline(completion_ids, **kwargs):
        return [float(newline in c) for c in completion_ids]

    batches = record_batches(monkeypatch.setattr)
    signals = InternalSignals(str(bundle_dir), model, tok)
    args = GRPOConfig(output_dir=str(tmp_path / "o"), max_steps=1, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=24, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                      reward_weights=[0.6, 0.4, 1.0], generation_kwargs={"sequence_bias": {(newline,): 3.0}}, seed=0)
    cb = RPECallback(signals.bundle, signals=signals)
    GRPOTrainer(model=model, processing_class=tok, reward_funcs=[parity, has_newline, signals.reward("value_final")],
                args=args, train_dataset=ds, callbacks=[cb]).train()
    signals.close()
    assert len(batches) == len(cb.history) == 1
    b, logged = batches[0], cb.history[0]
    sigs = SignalReader(SubsystemBundle.load(bundle_dir, model=model, tokenizer=tok), model, tok).read(
        b["prompts"], b["completions"])
    v0 = np.array([s.values[0] for s in sigs])
    vf = np.array([s.values[-1] for s in sigs])
    rpe = [s.rpe for s in sigs if s.n_steps]
    reward = 0.6 * np.array(parity(b["completions"])) + 0.4 * np.array(has_newline(b["completions"]))
    y = reward >= 0.5
    assert 0 < y.sum() < len(y), "the test needs both outcomes in the batch"
    assert logged["rpe/value_s0"] == pytest.approx(v0.mean(), abs=1e-5)
    assert logged["rpe/value_final"] == pytest.approx(vf.mean(), abs=1e-5)
    assert logged["rpe/rpe_mean"] == pytest.approx(np.mean([r.mean() for r in rpe]), abs=1e-5)
    assert logged["rpe/rpe_abs_mean"] == pytest.approx(np.mean([np.abs(r).mean() for r in rpe]), abs=1e-5)
    assert logged["rpe/rpe_min"] == pytest.approx(min(r.min() for r in rpe), abs=1e-5)
    assert logged["rpe/rpe_max"] == pytest.approx(max(r.max() for r in rpe), abs=1e-5)
    assert logged["rpe/dopamine"] == pytest.approx(np.nanmean([s.scalar("dopamine") for s in sigs]), abs=1e-4)
    assert logged["rpe/auroc_value_final"] == pytest.approx(auroc(y, vf.round(4)), abs=1e-6)
    assert logged["rpe/auroc_value_s0"] == pytest.approx(auroc(y, v0.round(4)), abs=1e-6)  # tied within a group
    assert logged["rpe/n_completions"] == 8
    for k in range(1, 7):  # mean RPE by step position, over the completions that have that step
        at_k = [s.rpe[k - 1] for s in sigs if s.n_steps >= k]
        want = np.mean(at_k) if at_k else float("nan")
        assert logged[f"rpe/rpe_step{k}"] == pytest.approx(want, abs=1e-5, nan_ok=True)
    terminal = [r - s.values[-2] for r, s in zip(reward, sigs) if s.n_steps]
    assert logged["rpe/rpe_terminal"] == pytest.approx(np.mean(terminal), abs=1e-5)


class _FakeTrainer:
    """The private surface rpe.trainers.trl_adapter reads, with a reward step that scores 1 per completion."""

    def __init__(self):
        import collections

        self._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
        self.reward_funcs, self.reward_weights, self.accelerator, self.state = [], None, None, None
        self.model = torch.nn.Linear(1, 1)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        return torch.ones(len(prompts), 1)


def test_trl_adapter_taps_reward_scoring_and_removes_the_tap():
    from rpe.trainers.trl_adapter import RewardTap, log_to_trainer

    trainer, seen = _FakeTrainer(), []
    with RewardTap(trainer, lambda p, ids, r: seen.append((p, ids, r.shape))):
        out = trainer._calculate_rewards(None, ["a", "b"], ["x", "y"], [[1], [2]])
        assert "_calculate_rewards" in vars(trainer)  # on this instance only
    assert out.tolist() == [[1.0], [1.0]] and seen == [(["a", "b"], [[1], [2]], (2, 1))]
    assert "_calculate_rewards" not in vars(trainer)  # the class method is back
    log_to_trainer(trainer, {"rpe/x": 0.5})
    trainer.model.eval()
    log_to_trainer(trainer, {"rpe/x": 0.25})
    assert trainer._metrics["train"]["rpe/x"] == [0.5] and trainer._metrics["eval"]["rpe/x"] == [0.25]


def test_trl_adapter_names_what_changed_in_trl(caplog, monkeypatch):
    import rpe.trainers.trl_adapter as adapter

    class Renamed(_FakeTrainer):
        def _calculate_rewards(self, inputs, prompts, completions, completion_ids):  # a parameter renamed
            return torch.ones(len(prompts), 1)

    with pytest.raises(adapter.TRLChangedError, match=r"takes \(inputs, prompts, completions, completion_ids\).*tested with TRL 1\.16\.x"):
        adapter.check_trainer(Renamed())
    no_metrics = _FakeTrainer()
    del no_metrics._metrics
    with pytest.raises(adapter.TRLChangedError, match="has no _metrics.*rpe reads"):
        adapter.RewardTap(no_metrics, lambda *a: None)
    assert "_calculate_rewards" not in vars(no_metrics)  # nothing wired when the check fails
    with pytest.raises(TypeError, match="needs a TRL GRPOTrainer or RLOOTrainer.*Linear"):
        adapter.check_trainer(torch.nn.Linear(1, 1))
    monkeypatch.setattr(adapter, "trl_version", lambda: "9.0.0")
    with caplog.at_level("WARNING"):
        adapter.check_trainer(_FakeTrainer())  # an untested version with the same surface: works, says so
    assert "TRL 9.0.0 is not among the tested versions (1.16.x)" in caplog.text
    import trl

    assert adapter.trl_version() == "9.0.0" and ".".join(trl.__version__.split(".")[:2]) in adapter.TESTED_TRL_VERSIONS


def test_recipe_model_config_sets_dtype_and_device(tmp_path, bundle_dir):
    """TRL's ModelConfig keys reach the policy: dtype (auto = fp32 on a CPU, or as given), on the trainer's device."""
    from rpe.trainers.recipes import load_policy, parse_recipe

    path = _tiny_recipe(tmp_path, bundle_dir, "grpo")
    rpe_args, train_args, model_args = parse_recipe(path)
    assert model_args.dtype == "auto" and model_args.lora_dropout == 0.0  # rpe's defaults where the recipe is silent
    model, _ = load_policy(rpe_args, model_args, train_args.device)
    assert next(model.parameters()).dtype == torch.float32 and train_args.device.type == "cpu"
    rpe_args, train_args, model_args = parse_recipe(path, ["--dtype", "bfloat16", "--lora_dropout", "0.1"])
    assert model_args.lora_dropout == 0.1
    model, _ = load_policy(rpe_args, model_args, train_args.device)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_rpe_train_command_runs_a_recipe_with_model_config_overrides(tmp_path, bundle_dir):
    """`rpe train --config X.yaml --key value`: TRL ModelConfig keys on the command line, the summary table printed."""
    from typer.testing import CliRunner

    from rpe.cli import app

    path = _tiny_recipe(tmp_path, bundle_dir, "grpo", max_steps=1)
    r = CliRunner().invoke(app, ["train", "--config", str(path), "--dtype", "float32", "--attn_implementation", "eager"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["recipe"]["model"]["attn_implementation"] == "eager"
    flat = "".join(r.output.split())  # rich wraps lines at the terminal width
    assert "eval_before" in flat and "eval_after" in flat and "grpo/log_history.json" in flat


def test_reads_render_chat_prompts_with_the_trainers_template_settings(tmp_path, bundle_dir):
    """Qwen3's enable_thinking and the like: TRL renders prompts with args.chat_template_kwargs; the read under
    vLLM (and of cut completions) rendered them without, so it saw other prompt tokens than generation did."""
    from trl import GRPOConfig, GRPOTrainer

    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.tasks import load_task
    from rpe.tiny import tiny_model
    from rpe.trainers import RPECallback
    from rpe.trainers.recipes import build_dataset

    model, tok = tiny_model()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                         "{% if enable_thinking %}<think>\n{% endif %}")
    task = load_task("chain_sum_2")
    ds, _ = build_dataset(task, PromptBuilder(task, tok, PromptConfig(shots=1)), 4, 0, chat=True)
    args = GRPOConfig(output_dir=str(tmp_path / "o"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, report_to="none", use_cpu=True, save_strategy="no",
                      chat_template_kwargs={"enable_thinking": True})
    cb = RPECallback(str(bundle_dir))
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[lambda completions, **k: [0.0] * len(completions)],
                          args=args, train_dataset=ds, callbacks=[cb])
    cb.attach(trainer)
    try:
        prompt = ds[0]["prompt"]
        want = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       enable_thinking=True)["input_ids"]
        plain = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert list(want) != list(plain)  # the setting changes the tokens
        assert cb.signals.prompt_ids([prompt]) == [list(want)]
    finally:
        cb.close()


def test_a_matched_control_skips_as_many_from_each_end_as_the_band():
    from rpe.selection import SelectionConfig, band_cut, select_by_value, select_matched

    values = np.array([0.01, 0.5, 0.99, 0.02, 0.6, 0.4, 0.98, 0.03])
    cfg = SelectionConfig(low=0.05, high=0.95, explore=0.0)
    keep = select_by_value(values, cfg)
    assert band_cut(values, keep, cfg) == (3, 2)  # 3 hopeless, 2 solved skipped
    easiness = -np.array([9.0, 1, 2, 8, 3, 4, 5, 7])  # minus question length: 9 and 8 and 7 longest, 1 and 2 shortest
    assert np.flatnonzero(select_matched(easiness, 3, 2)).tolist() == [4, 5, 6]
    with pytest.raises(ValueError, match="cannot drop 5 \\+ 4 of 8"):
        select_matched(easiness, 5, 4)


def test_selection_sampler_is_trls_order_when_all_kept_and_skips_what_the_selection_drops():
    from trl.trainer.utils import RepeatSampler

    from rpe.selection import LiveSelection, SelectionConfig, SelectionSampler

    live = LiveSelection(np.full(11, 0.5), SelectionConfig(low=0.1, high=0.9, explore=0.0))
    ours = SelectionSampler(live, mini_repeat_count=2, batch_size=3, repeat_count=2, seed=4)
    theirs = RepeatSampler(list(range(11)), mini_repeat_count=2, batch_size=3, repeat_count=2, seed=4)
    assert list(ours) == list(theirs) and len(ours) == len(theirs)
    drawn = iter(SelectionSampler(live, mini_repeat_count=2, batch_size=1, seed=4))
    first = [next(drawn), next(drawn)]
    assert first[0] == first[1]  # one group of two completions of one prompt
    values = np.full(11, 0.5)
    values[:6] = 0.99  # predicted solved: skipped from the next draw on
    live.update(values)
    rest = list(drawn)
    assert rest and all(i >= 6 for i in rest) and live.updates == 2
    with pytest.raises(ValueError, match="kept none of 11 prompts"):
        live.update(np.full(11, 0.0))
    assert live.keep.sum() == 5  # a failed update keeps the last kept set


def test_recipe_refreshes_the_selection_with_the_trained_policy(tmp_path, bundle_dir, monkeypatch):
    """`select_refresh_every`: V(s_0) is read again with the policy as trained, every step, and the trainer draws
    from the refreshed set; the values read are the current policy's, not the base model's."""
    import rpe.trainers.selection as selection_module
    from rpe.trainers.recipes import parse_recipe, train

    reads = []
    real = selection_module.prompt_values

    def spy(model, tok, bundle, prompts, **kw):
        reads.append(real(model, tok, bundle, prompts, **kw))
        return reads[-1]

    monkeypatch.setattr(selection_module, "prompt_values", spy)
    path = _tiny_recipe(tmp_path, bundle_dir, "grpo", select_prompts=True, select_low=0.0, select_high=1.0,
                        select_explore=0.0, select_refresh_every=1, max_steps=2, learning_rate=5e-2,
                        internal_rewards=["value_final"], internal_reward_weights=[1.0],  # rewards that vary: it learns
                        **EOS_AT_LIMIT)
    outcome = train(*parse_recipe(path))
    sel = outcome.summary["prompt_selection"]
    assert sel["refresh_every"] == 1 and [r["step"] for r in sel["refreshes"]] == [1, 2]
    assert len(reads) == 2 and len(reads[0]) == 8
    assert not np.allclose(reads[0], reads[1])  # the policy moved between the reads (lr 5e-2)
    assert sel["refreshes"][1]["value_shift"] == pytest.approx(np.abs(reads[1] - reads[0]).mean(), rel=1e-5)
    assert sel["refreshes"][1]["band_changed"] == 0.0  # the band [0, 1] holds every value
    history = json.loads((tmp_path / "grpo" / "log_history.json").read_text())
    assert any("selection/kept_share" in h for h in history)
    with pytest.raises(ValueError, match="select_refresh_every needs select_by: value"):
        parse_recipe(_tiny_recipe(tmp_path, bundle_dir, "grpo", select_prompts=True, select_by="random",
                                  select_refresh_every=2))
