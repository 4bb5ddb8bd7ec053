"""``rpe train --config recipes/X.yaml``: recipes in TRL's config style, parsed with ``TrlParser``.

A recipe is one YAML file holding the fields of :class:`RPEArguments` (what to train on, which trainer, which
internal signals) and of TRL's ``GRPOConfig`` / ``RLOOConfig`` (how to train), plus optional PEFT fields from
:class:`RPEArguments`. Command-line flags override the file (``rpe train --config X.yaml --max_steps 5``).
An unknown key is refused with the nearest valid key.

Arms:
- ``trainer: grpo``: TRL's GRPOTrainer with the verifiable reward (and optional internal auxiliary rewards);
- ``trainer: rloo``: TRL's RLOOTrainer, same rewards;
- ``trainer: internal_critic``: :class:`rpe.trainers.critic.InternalCriticGRPOTrainer`.

Outputs in ``output_dir``: TRL's checkpoints, ``log_history.json`` (every logged step), ``eval_before`` /
``eval_after`` rollout folders and ``summary.json`` (held-out accuracy before and after with Wilson intervals).
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

TRAINERS = ("grpo", "rloo", "internal_critic")


@dataclass
class RPEArguments:
    """rpe's part of a recipe (TRL's trainer config holds the rest)."""

    model: str = "smollm2-135m-instruct"
    """Registry name, local folder, or ``tiny`` (random tiny Llama, for tests)."""
    task: str = "chain_sum"
    """Task name (see ``rpe tasks``)."""
    task_options: dict[str, Any] = field(default_factory=dict)
    n_train_problems: int = 256
    n_eval_problems: int = 100
    eval_seed: int = 7_000_003
    """Held-out problems come from this seed (disjoint from training problems, seed = ``seed``)."""
    shots: int = 6
    trainer: str = "grpo"
    """``grpo``, ``rloo`` or ``internal_critic``."""
    bundle: str | None = None
    """Bundle folder (needed by the callback, internal rewards and the internal critic)."""
    rpe_callback: bool = True
    """Log internal value/RPE with :class:`RPECallback` (when a bundle is given)."""
    internal_rewards: list[str] = field(default_factory=list)
    """Internal reward functions added after the verifiable one, e.g. ``[rpe_sum]``."""
    internal_reward_weights: list[float] = field(default_factory=list)
    """Their weights (the verifiable reward has ``correctness_weight``); 0 monitors only."""
    correctness_weight: float = 1.0
    critic_gamma: float = 1.0
    critic_lambda: float = 0.95
    baseline_mix: float = 0.0
    critic_lr: float = 1e-3
    critic_updates: int = 4
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    eval_before_after: bool = True
    eval_max_new_tokens: int = 128
    eval_before_dir: str | None = None
    """Where the before-training evaluation goes (default ``output_dir/eval_before``); arms that share the
    model, task and seed can share it (a finished folder is reused, not recomputed)."""

    def __post_init__(self) -> None:
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer {self.trainer!r} is not one of {', '.join(TRAINERS)}")
        if self.internal_reward_weights and len(self.internal_reward_weights) != len(self.internal_rewards):
            raise ValueError(
                f"internal_reward_weights has {len(self.internal_reward_weights)} entries for "
                f"{len(self.internal_rewards)} internal_rewards"
            )
        if (self.internal_rewards or self.trainer == "internal_critic") and not self.bundle:
            raise ValueError("internal rewards and the internal critic need `bundle:` (run `rpe fit` first)")


class RecipeError(ValueError):
    """A recipe file that cannot be used (unknown key, bad YAML)."""


def trainer_config_class(trainer: str):
    from trl import GRPOConfig, RLOOConfig

    return RLOOConfig if trainer == "rloo" else GRPOConfig


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe's YAML as a dict, with every key checked against the known fields.

    Raises:
        RecipeError: not a mapping, or an unknown key (named with the nearest valid one).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a mapping of recipe keys, got {type(data).__name__}")
    trainer = data.get("trainer", "grpo")
    if trainer not in TRAINERS:
        raise RecipeError(f"{path}: trainer {trainer!r} is not one of {', '.join(TRAINERS)}")
    valid = _valid_keys(trainer)
    for key in data:
        if key not in valid:
            raise RecipeError(f"{path}: unknown key {key!r}{_nearest(key, valid)}")
    return data


def _valid_keys(trainer: str) -> set[str]:
    return {f.name for f in fields(RPEArguments)} | {f.name for f in fields(trainer_config_class(trainer))}


def _nearest(key: str, valid: set[str]) -> str:
    near = difflib.get_close_matches(key, sorted(valid), n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def check_overrides(overrides: list[str], trainer: str) -> None:
    """Refuse a command-line ``--key`` that is no recipe field, naming the nearest valid key (HfArgumentParser
    would only say "arguments are not used").

    Raises:
        RecipeError: naming the unknown flag and the nearest valid key.
    """
    valid = _valid_keys(trainer)
    for arg in overrides:
        if not arg.startswith("--"):
            continue
        key = arg[2:].split("=", 1)[0].replace("-", "_")
        if key not in valid and key != "config":
            raise RecipeError(f"unknown command-line option --{key}{_nearest(key, valid)} (recipe keys are valid flags)")


def parse_recipe(path: str | Path, overrides: list[str] | None = None):
    """``(RPEArguments, trainer config)`` from a recipe file and ``--key value`` overrides, via TrlParser."""
    from trl import TrlParser

    data = read_recipe(path)
    trainer = data.get("trainer", "grpo")
    check_overrides(overrides or [], trainer)
    cls = trainer_config_class(trainer)
    parser = TrlParser((RPEArguments, cls))
    rpe_args, train_args = parser.parse_args_and_config(args=["--config", str(path), *(overrides or [])])
    return rpe_args, train_args


def build_dataset(task, builder, n: int, seed: int, chat: bool):
    """A ``datasets.Dataset`` with ``prompt`` (chat messages or text) and ``problem_id``; and the problems."""
    from datasets import Dataset

    problems = list(task.problems(n, seed=seed))
    rows = []
    for p in problems:
        if chat:
            messages = []
            for q, sol in builder.shots:
                messages += [{"role": "user", "content": builder.question_text(q)}, {"role": "assistant", "content": sol}]
            messages.append({"role": "user", "content": builder.question(p)})
            rows.append({"prompt": messages, "problem_id": p.id})
        else:
            rows.append({"prompt": builder(p), "problem_id": p.id})
    return Dataset.from_list(rows), {p.id: p for p in problems}


def _load(model_name: str):
    if model_name == "tiny":
        from rpe.models import tiny_model

        return tiny_model()
    from rpe.models import load_model

    return load_model(model_name)


def evaluate(model, tokenizer, rpe_args: RPEArguments, out: Path, name: str, overwrite: bool = False) -> dict[str, Any]:
    """Held-out accuracy (one sample per problem, T=0.7, fixed seed) as a rollout folder ``out`` (a finished
    folder with the same configuration is reused unless ``overwrite``)."""
    from rpe.prompts import PromptConfig
    from rpe.sampling import SamplingConfig
    from rpe.rollouts import RolloutConfig, collect_rollouts

    from rpe.tasks import load_task

    cfg = RolloutConfig(task=rpe_args.task, n_problems=rpe_args.n_eval_problems,
                        samples=1, seed=rpe_args.eval_seed, prompt=PromptConfig(shots=rpe_args.shots),
                        sampling=SamplingConfig(max_new_tokens=rpe_args.eval_max_new_tokens))
    was_training = model.training
    model.eval()
    task = load_task(rpe_args.task, **rpe_args.task_options)
    res = collect_rollouts(model, tokenizer, cfg, out, task=task, model_name=name, overwrite=overwrite)
    model.train(was_training)
    m = res.manifest
    return {"accuracy": m["accuracy"], "ci95": m["accuracy_ci95"], "n": res.n_trajectories}


@dataclass
class TrainOutcome:
    """What :func:`train` returns: the summary (also in ``output_dir/summary.json``), the trained policy
    (LoRA merged) and its tokenizer."""

    summary: dict[str, Any]
    model: Any
    tokenizer: Any


def train(rpe_args: RPEArguments, train_args) -> TrainOutcome:
    """Run one recipe."""
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.tasks import load_task

    from .callback import RPECallback
    from .critic import CriticConfig, InternalCriticGRPOTrainer
    from .rewards import InternalSignals, correctness_reward, nan_guard

    out = Path(train_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = _load(rpe_args.model)
    task = load_task(rpe_args.task, **rpe_args.task_options)
    builder = PromptBuilder(task, tok, PromptConfig(shots=rpe_args.shots), seed=train_args.seed)
    chat = builder.style == "chat"
    dataset, problems = build_dataset(task, builder, rpe_args.n_train_problems, train_args.seed, chat)
    summary: dict[str, Any] = {"recipe": {"rpe": _jsonable(vars(rpe_args)), "trainer_class": type(train_args).__name__}}
    if rpe_args.eval_before_after:
        before_dir = Path(rpe_args.eval_before_dir) if rpe_args.eval_before_dir else out / "eval_before"
        summary["eval_before"] = evaluate(model, tok, rpe_args, before_dir, rpe_args.model)
        logger.info("held-out accuracy before: %s", summary["eval_before"])
    if rpe_args.use_peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rpe_args.lora_r, lora_alpha=rpe_args.lora_alpha,
                                                 lora_dropout=rpe_args.lora_dropout,
                                                 target_modules=rpe_args.lora_target_modules, task_type="CAUSAL_LM"))
    signals = InternalSignals(rpe_args.bundle, model, tok) if rpe_args.bundle else None
    reward_funcs = [nan_guard(correctness_reward(task, problems))]
    weights = [rpe_args.correctness_weight]
    for kind, w in zip(rpe_args.internal_rewards, rpe_args.internal_reward_weights or [1.0] * len(rpe_args.internal_rewards)):
        reward_funcs.append(nan_guard(signals.reward(kind)))
        weights.append(w)
    train_args.reward_weights = weights
    callbacks = [RPECallback(signals.bundle, signals=signals)] if signals is not None and rpe_args.rpe_callback else []
    common = dict(model=model, processing_class=tok, reward_funcs=reward_funcs, args=train_args,
                  train_dataset=dataset, callbacks=callbacks)
    try:
        if rpe_args.trainer == "internal_critic":
            critic = CriticConfig(gamma=rpe_args.critic_gamma, lam=rpe_args.critic_lambda, baseline_mix=rpe_args.baseline_mix,
                                  critic_lr=rpe_args.critic_lr, critic_updates=rpe_args.critic_updates)
            trainer = InternalCriticGRPOTrainer(critic=critic, signals=signals, **common)
        elif rpe_args.trainer == "rloo":
            from trl import RLOOTrainer

            trainer = RLOOTrainer(**common)
        else:
            from trl import GRPOTrainer

            trainer = GRPOTrainer(**common)
        trainer.train()
    finally:
        for cb in callbacks:
            cb.close()
        if signals is not None:
            signals.close()
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=2, default=str))
    if signals is not None:
        signals.bundle.save(out / "rpe_bundle")
        summary["signal_reads"] = dict(signals.stats)
    policy = model.merge_and_unload() if rpe_args.use_peft else model
    if rpe_args.eval_before_after:
        summary["eval_after"] = evaluate(policy, tok, rpe_args, out / "eval_after", rpe_args.model, overwrite=True)
        logger.info("held-out accuracy after: %s", summary["eval_after"])
    summary["steps"] = trainer.state.global_step
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return TrainOutcome(summary, policy, tok)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


__all__ = ["RPEArguments", "RecipeError", "TRAINERS", "TrainOutcome", "parse_recipe", "read_recipe", "train"]
