"""``rpe train --config recipes/X.yaml``: recipes in TRL's config style, parsed with ``TrlParser``.

A recipe is one YAML file holding the fields of :class:`RPEArguments` (what to train on, which trainer, which
internal signals), of TRL's ``GRPOConfig`` / ``RLOOConfig`` (how to train) and of TRL's ``ModelConfig`` (how
to load the policy: ``dtype``, ``attn_implementation``, ``model_revision``, and PEFT: ``use_peft``, ``lora_r``,
``lora_target_modules``, ...), parsed together by ``TrlParser`` as TRL's own example scripts do. Command-line
flags override the file (``rpe train --config X.yaml --max_steps 5 --dtype bfloat16``). An unknown key is
refused with the nearest valid key.

Where a recipe leaves a ``ModelConfig`` key out, rpe's default applies instead of TRL's: ``dtype`` auto (bf16 on
CUDA, fp32 on a CPU; :func:`rpe.models.resolve_dtype`), ``lora_dropout`` 0, ``lora_target_modules``
:data:`DEFAULT_LORA_TARGETS` (every attention projection, separate or fused). The policy is loaded on the
trainer's device (``train_args.device``: the process's own GPU under ``accelerate launch``, the CPU with
``use_cpu``). ``model_name_or_path``, when set, names the policy instead of ``model``.

Arms:
- ``trainer: grpo``: TRL's GRPOTrainer with the verifiable reward (and optional internal auxiliary rewards);
- ``trainer: rloo``: TRL's RLOOTrainer, same rewards;
- ``trainer: internal_critic``: :class:`rpe.trainers.critic.InternalCriticGRPOTrainer`;
- ``trainer: dense_rpe``: :class:`rpe.trainers.dense.DenseRPEGRPOTrainer` (GRPO + per-step internal credit on
  each step's tokens; ``dense_weight``, ``dense_clip``, ``dense_scale``, ``dense_source``).

Outputs in ``output_dir``: TRL's checkpoints, ``log_history.json`` (every logged step), ``eval_before`` /
``eval_after`` rollout folders and ``summary.json`` (held-out accuracy before and after with Wilson intervals).

Under ``accelerate launch`` / ``torchrun`` every rank trains; the evaluations are data-parallel (each rank
generates its share of the held-out problems on its own device, :func:`rpe.rollouts.collect_rollouts`), and
only the main rank writes ``log_history.json``, ``rpe_bundle/`` and ``summary.json``. Probe refits and the
internal critic's updates are shared, so every rank holds the same probe. DeepSpeed ZeRO-3 and FSDP are
refused when a bundle is used (:func:`rpe.trainers.trl_adapter.refuse_partitioned`).
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import yaml

logger = logging.getLogger(__name__)

TRAINERS = ("grpo", "rloo", "internal_critic", "dense_rpe")

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"]
"""LoRA targets when a recipe names none: the attention projections of Llama, Qwen, Mistral and Gemma
(``q/k/v/o_proj``) and Phi-3's fused ``qkv_proj`` (PEFT adapts the names a model has)."""

#: ModelConfig keys whose rpe default differs from TRL's (used when the recipe and the command line omit them).
MODEL_CONFIG_DEFAULTS: dict[str, Any] = {"dtype": "auto", "lora_dropout": 0.0, "lora_target_modules": DEFAULT_LORA_TARGETS}


@dataclass
class RPEArguments:
    """rpe's part of a recipe (TRL's trainer config holds the rest)."""

    model: str = "smollm2-135m-instruct"
    """Registry name, local folder, or ``tiny`` (random tiny Llama, for tests); TRL's ``model_name_or_path``
    wins when set."""
    task: str = "chain_sum"
    """Task name (see ``rpe tasks``)."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """The task's own options (as ``rpe rollouts --task-option KEY=VALUE``), e.g. ``{min_terms: 2}``."""
    n_train_problems: int = 256
    """Training prompts drawn from the task with seed ``seed`` (TRL's seed)."""
    n_eval_problems: int = 100
    """Held-out problems evaluated before and after training (one greedy sample each)."""
    eval_seed: int = 7_000_003
    """Held-out problems come from this seed (disjoint from training problems, seed = ``seed``)."""
    shots: int = 6
    """Worked examples in each few-shot prompt (drawn apart from the training and held-out questions)."""
    trainer: str = "grpo"
    """``grpo``, ``rloo``, ``internal_critic`` (the PPO whose critic is the value neurons) or ``dense_rpe``
    (GRPO with per-step internal credit)."""
    bundle: str | None = None
    """Bundle folder (needed by the callback, internal rewards and the internal critic)."""
    rpe_callback: bool = True
    """Log internal value/RPE with :class:`RPECallback` (when a bundle is given)."""
    refit_every: int = 0
    """Refit the callback's value probe every this many optimizer steps (0 = never; shared by all ranks)."""
    internal_rewards: list[str] = field(default_factory=list)
    """Internal reward functions added after the verifiable one, e.g. ``[rpe_sum]``."""
    internal_reward_weights: list[float] = field(default_factory=list)
    """Their weights (the verifiable reward has ``correctness_weight``); 0 monitors only."""
    correctness_weight: float = 1.0
    """Weight of the verifiable (correctness) reward."""
    critic_gamma: float = 1.0
    """``internal_critic``: discount per reasoning step."""
    critic_lambda: float = 0.95
    """``internal_critic``: GAE lambda."""
    baseline_mix: float = 0.0
    """``internal_critic``: weight of GRPO's group-relative advantage in the final advantage (0 = critic only)."""
    critic_lr: float = 1e-3
    """``internal_critic``: AdamW learning rate of the critic (the probe on the value neurons)."""
    critic_updates: int = 4
    """``internal_critic``: critic steps per generated batch (0 freezes it)."""
    dense_weight: float = 0.1
    """``dense_rpe``: scale of the per-step internal credit added to the group advantage."""
    dense_clip: float = 0.5
    """``dense_rpe``: each step's credit (after ``dense_scale``) is clipped to [-clip, clip] first."""
    dense_scale: str = "raw"
    """``dense_rpe``: ``raw`` or ``batch_std`` (the credit divided by the standard deviation of the batch's
    per-step credits, so ``dense_weight`` compares with GRPO's standardised group advantages)."""
    dense_source: str = "value_diff"
    """``dense_rpe``: ``value_diff`` (the model's own TD errors), ``dopamine``, or ``random_direction`` (control)."""
    dense_gamma: float = 1.0
    """``dense_rpe``: discount of the TD errors that make the credit."""
    select_prompts: bool = False
    """Skip training prompts whose internal value V(s_0) predicts that all samples fail or all succeed (zero
    advantage), read once before training with the bundle (:mod:`rpe.selection`); needs ``bundle``."""
    select_low: float = 0.05
    """``select_prompts``: prompts with V(s_0) below this are skipped."""
    select_high: float = 0.95
    """``select_prompts``: prompts with V(s_0) above this are skipped."""
    select_explore: float = 0.1
    """``select_prompts``: share of the skipped prompts kept anyway, at random."""
    select_by: str = "value"
    """``select_prompts``: ``value`` (the V(s_0) band above), or a control that keeps as many prompts as the band
    would: ``length`` (the same cut by question length: the longest skipped for the hopeless, the shortest for
    the solved) or ``random``."""
    select_refresh_every: int = 0
    """``select_prompts`` by ``value``: re-read V(s_0) of every training prompt with the policy as trained so far
    every this many optimizer steps and draw from the new kept set (``rpe.trainers.selection``; with
    ``refit_every`` the refitted probe reads it); 0 selects once, before training."""
    eval_before_after: bool = True
    """Evaluate the held-out problems before and after training (``eval_before/``, ``eval_after/``)."""
    eval_max_new_tokens: int = 128
    """Completion budget of those evaluations."""
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
        if (self.internal_rewards or self.trainer in ("internal_critic", "dense_rpe")) and not self.bundle:
            raise ValueError("internal rewards, the internal critic and dense credit need `bundle:` (run `rpe fit` first)")
        from rpe.selection import SELECT_BY

        if self.select_by not in SELECT_BY:
            raise ValueError(f"select_by {self.select_by!r} is not one of {', '.join(SELECT_BY)}")
        if self.select_refresh_every < 0 or (self.select_refresh_every and self.select_by != "value"):
            raise ValueError("select_refresh_every needs select_by: value and a value >= 1 (0 = select once)")
        if self.select_prompts and not self.bundle:
            raise ValueError("select_prompts reads V(s_0) with the bundle: give `bundle:` (run `rpe reproduce` first)")


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
    from trl import ModelConfig

    return ({f.name for f in fields(RPEArguments)} | {f.name for f in fields(trainer_config_class(trainer))}
            | {f.name for f in fields(ModelConfig)})


def _nearest(key: str, valid: set[str]) -> str:
    near = difflib.get_close_matches(key, sorted(valid), n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def override_keys(overrides: list[str]) -> list[str]:
    """The recipe keys that ``--key value`` / ``--key=value`` command-line overrides name (dashes as underscores)."""
    return [arg[2:].split("=", 1)[0].replace("-", "_") for arg in overrides if arg.startswith("--")]


def model_config_defaults() -> dict[str, Any]:
    """A fresh copy of :data:`MODEL_CONFIG_DEFAULTS` (its lists are not shared with the configs they fill)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in MODEL_CONFIG_DEFAULTS.items()}


def check_overrides(overrides: list[str], trainer: str) -> None:
    """Refuse a command-line ``--key`` that is no recipe field, naming the nearest valid key (HfArgumentParser
    would only say "arguments are not used").

    Raises:
        RecipeError: naming the unknown flag and the nearest valid key.
    """
    valid = _valid_keys(trainer)
    for key in override_keys(overrides):
        if key not in valid and key != "config":
            raise RecipeError(f"unknown command-line option --{key}{_nearest(key, valid)} (recipe keys are valid flags)")


class Recipe(NamedTuple):
    """A parsed recipe: rpe's arguments, the trainer config, TRL's ``ModelConfig``."""

    rpe: RPEArguments
    trainer: Any
    model: Any


def parse_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """``(RPEArguments, trainer config, ModelConfig)`` from a recipe file and ``--key value`` overrides, via
    ``TrlParser``; ``ModelConfig`` keys given nowhere take :data:`MODEL_CONFIG_DEFAULTS`."""
    from trl import ModelConfig, TrlParser

    data = read_recipe(path)
    trainer = data.get("trainer", "grpo")
    check_overrides(overrides or [], trainer)
    cls = trainer_config_class(trainer)
    parser = TrlParser((RPEArguments, cls, ModelConfig))
    rpe_args, train_args, model_args = parser.parse_args_and_config(args=["--config", str(path), *(overrides or [])])
    given = set(data) | set(override_keys(overrides or []))
    for key, value in model_config_defaults().items():
        if key not in given:
            setattr(model_args, key, value)
    return Recipe(rpe_args, train_args, model_args)


def build_dataset(task, builder, n: int, seed: int, chat: bool):
    """A ``datasets.Dataset`` with ``prompt`` (chat messages or text) and ``problem_id``; and the problems."""
    from datasets import Dataset

    problems = list(task.problems(n, seed=seed))
    rows = []
    for p in problems:
        if chat:  # the turns PromptBuilder renders for rpe rollouts, as a conversation TRL renders itself
            messages = [{"role": "system", "content": builder.cfg.system}] if builder.cfg.system else []
            for q, sol in builder.shots:
                messages += [{"role": "user", "content": builder.question_text(q)}, {"role": "assistant", "content": sol}]
            messages.append({"role": "user", "content": builder.question(p)})
            rows.append({"prompt": messages, "problem_id": p.id})
        else:
            rows.append({"prompt": builder(p), "problem_id": p.id})
    return Dataset.from_list(rows), {p.id: p for p in problems}


def training_prompts(rpe_args: RPEArguments, tokenizer, seed: int):
    """What a recipe trains on: ``(task, prompt builder, dataset, problems by id)``; the few-shot examples are
    never training questions."""
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.tasks import load_task, question_key

    task = load_task(rpe_args.task, **rpe_args.task_options)
    asked = [question_key(p) for p in task.problems(rpe_args.n_train_problems, seed=seed)]
    builder = PromptBuilder(task, tokenizer, PromptConfig(shots=rpe_args.shots), seed=seed, exclude_questions=asked)
    dataset, problems = build_dataset(task, builder, rpe_args.n_train_problems, seed, builder.style == "chat")
    return task, builder, dataset, problems


def load_policy(rpe_args: RPEArguments, model_args, device) -> tuple[Any, Any]:
    """The policy and its tokenizer as ``model_args`` (TRL's ``ModelConfig``) asks: dtype (``auto`` = bf16 on
    CUDA, fp32 on a CPU), attention implementation and revision, on ``device``. ``tiny`` is the random tiny
    Llama of the tests."""
    from rpe.models import load_model, resolve_dtype

    name = model_args.model_name_or_path or rpe_args.model
    dtype = resolve_dtype(model_args.dtype or "auto", device)
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise ValueError("load_in_4bit / load_in_8bit are not supported by rpe train yet; load the policy in bf16")
    if name == "tiny":
        from rpe.tiny import tiny_model

        model, tok = tiny_model()
        return model.to(device=device, dtype=dtype), tok
    return load_model(name, dtype=dtype, device=device, attn_implementation=model_args.attn_implementation,
                      revision=model_args.model_revision)


def evaluate(model, tokenizer, rpe_args: RPEArguments, out: Path, name: str, overwrite: bool = False,
             exclude: list[str] | None = None) -> dict[str, Any]:
    """Held-out accuracy (one sample per problem, T=0.7, fixed seed) as a rollout folder ``out`` (a finished
    folder with the same configuration is reused unless ``overwrite``); ``exclude``: question keys never drawn
    (the training problems', :func:`rpe.tasks.question_key`)."""
    from rpe.prompts import PromptConfig
    from rpe.sampling import SamplingConfig
    from rpe.rollouts import RolloutConfig, collect_rollouts

    from rpe.tasks import load_task

    cfg = RolloutConfig(task=rpe_args.task, n_problems=rpe_args.n_eval_problems,
                        samples=1, seed=rpe_args.eval_seed, prompt=PromptConfig(shots=rpe_args.shots),
                        sampling=SamplingConfig(max_new_tokens=rpe_args.eval_max_new_tokens), exclude_questions=exclude)
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
    bundle: Any = None
    """The bundle as training left it (refitted probe, or the internal critic's), None without a bundle."""


def train(rpe_args: RPEArguments, train_args, model_args=None) -> TrainOutcome:
    """Run one recipe (``model_args``: TRL's ``ModelConfig``; default: its defaults with
    :data:`MODEL_CONFIG_DEFAULTS`)."""
    from trl import ModelConfig, get_peft_config
    from rpe.tasks import question_key

    from .callback import RPECallback
    from .critic import CriticConfig, InternalCriticGRPOTrainer
    from .rewards import InternalSignals, correctness_reward, nan_guard

    from rpe.distributed import barrier, current_ranks

    from .trl_adapter import refuse_partitioned

    if rpe_args.bundle:  # before anything is loaded: ZeRO-3 / FSDP cannot run the internal reads
        refuse_partitioned(train_args, f"trainer {rpe_args.trainer!r} with bundle {rpe_args.bundle}")
    out = Path(train_args.output_dir)
    if model_args is None:
        model_args = ModelConfig(**model_config_defaults())
    model, tok = load_policy(rpe_args, model_args, train_args.device)  # the process group is up from here
    ranks = current_ranks()
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
    task, builder, dataset, problems = training_prompts(rpe_args, tok, train_args.seed)
    held_out_from = sorted({question_key(p) for p in problems.values()})  # evaluation never sees a training question
    summary: dict[str, Any] = {"recipe": {"rpe": _jsonable(vars(rpe_args)), "model": _jsonable(vars(model_args)),
                                          "trainer_class": type(train_args).__name__}}
    if rpe_args.select_prompts:  # one prefill per prompt, on the base policy, before anything is generated
        from rpe.bundle import SubsystemBundle
        from rpe.selection import SelectionConfig, select_dataset

        chosen = SelectionConfig(low=rpe_args.select_low, high=rpe_args.select_high, explore=rpe_args.select_explore,
                                 seed=train_args.seed)
        selection_bundle = SubsystemBundle.load(rpe_args.bundle, model=model, tokenizer=tok)
        if rpe_args.select_refresh_every:  # the whole set stays; the sampler takes what the live selection keeps
            from rpe.selection import LiveSelection, prompt_text, prompt_values

            prompt_texts = [prompt_text(p, tok) for p in dataset["prompt"]]
            live = LiveSelection(prompt_values(model, tok, selection_bundle, prompt_texts), chosen)
            summary["prompt_selection"] = {"n": len(live.keep), "kept": int(live.keep.sum()),
                                           "kept_share": float(live.keep.mean()), "select_by": "value",
                                           "refresh_every": rpe_args.select_refresh_every}
        else:
            dataset, summary["prompt_selection"] = select_dataset(
                dataset, model, tok, selection_bundle, chosen,
                select_by=rpe_args.select_by, questions=[problems[i].prompt for i in dataset["problem_id"]])
        logger.info("prompt selection: %s", summary["prompt_selection"])
    if rpe_args.eval_before_after:
        before_dir = Path(rpe_args.eval_before_dir) if rpe_args.eval_before_dir else out / "eval_before"
        # data-parallel under a launcher: each rank its share on its own device, the main rank merges
        summary["eval_before"] = evaluate(model, tok, rpe_args, before_dir, rpe_args.model, exclude=held_out_from)
        logger.info("held-out accuracy before: %s", summary["eval_before"])
    peft_config = get_peft_config(model_args)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    signals = InternalSignals(rpe_args.bundle, model, tok) if rpe_args.bundle else None
    reward_funcs = [nan_guard(correctness_reward(task, problems))]
    weights = [rpe_args.correctness_weight]
    for kind, w in zip(rpe_args.internal_rewards, rpe_args.internal_reward_weights or [1.0] * len(rpe_args.internal_rewards)):
        reward_funcs.append(nan_guard(signals.reward(kind)))
        weights.append(w)
    train_args.reward_weights = weights
    callbacks = ([RPECallback(signals.bundle, signals=signals, refit_every=rpe_args.refit_every)]
                 if signals is not None and rpe_args.rpe_callback else [])
    refresh = None
    if rpe_args.select_prompts and rpe_args.select_refresh_every:
        from .selection import SelectionRefresh

        refresh = SelectionRefresh(live, prompt_texts, signals, rpe_args.select_refresh_every)
        callbacks.append(refresh)
    common = dict(model=model, processing_class=tok, reward_funcs=reward_funcs, args=train_args,
                  train_dataset=dataset, callbacks=callbacks)
    trainer = None
    try:
        if rpe_args.trainer == "internal_critic":
            critic = CriticConfig(gamma=rpe_args.critic_gamma, lam=rpe_args.critic_lambda, baseline_mix=rpe_args.baseline_mix,
                                  critic_lr=rpe_args.critic_lr, critic_updates=rpe_args.critic_updates)
            trainer = InternalCriticGRPOTrainer(critic=critic, signals=signals, **common)
        elif rpe_args.trainer == "dense_rpe":
            from .dense import DenseCreditConfig, DenseRPEGRPOTrainer

            dense = DenseCreditConfig(weight=rpe_args.dense_weight, clip=rpe_args.dense_clip, scale=rpe_args.dense_scale,
                                      source=rpe_args.dense_source, gamma=rpe_args.dense_gamma, seed=train_args.seed)
            # random_direction: the trainer reads through its own copy of this bundle with a random probe
            trainer = DenseRPEGRPOTrainer(dense=dense, signals=signals, **common)
        elif rpe_args.trainer == "rloo":
            from trl import RLOOTrainer

            trainer = RLOOTrainer(**common)
        else:
            from trl import GRPOTrainer

            trainer = GRPOTrainer(**common)
        if refresh is not None:
            refresh.attach(trainer)
        trainer.train()
    finally:
        for cb in callbacks:
            cb.close()
        if signals is not None:
            signals.close()
        if hasattr(trainer, "close"):  # DenseRPEGRPOTrainer: its reward tap (and its control's signals)
            trainer.close()
    history = trainer.state.log_history
    if ranks.is_main:  # the others hold the same history, bundle (refits are shared) and policy
        (out / "log_history.json").write_text(json.dumps(history, indent=2, default=str))
        if signals is not None:
            signals.bundle.save(out / "rpe_bundle")
    if signals is not None:
        summary["signal_reads"] = dict(signals.stats)
    policy = model.merge_and_unload() if peft_config is not None else model
    if rpe_args.eval_before_after:  # every rank takes its share of the held-out problems
        summary["eval_after"] = evaluate(policy, tok, rpe_args, out / "eval_after", rpe_args.model, overwrite=True,
                                         exclude=held_out_from)
        logger.info("held-out accuracy after: %s", summary["eval_after"])
    summary["steps"] = trainer.state.global_step
    if refresh is not None:
        summary["prompt_selection"]["refreshes"] = refresh.history
    if ranks.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    barrier()  # no rank returns before the files are written
    return TrainOutcome(summary, policy, tok, signals.bundle if signals is not None else None)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


__all__ = ["DEFAULT_LORA_TARGETS", "MODEL_CONFIG_DEFAULTS", "RPEArguments", "Recipe", "RecipeError", "TRAINERS",
           "TrainOutcome", "check_overrides", "load_policy", "model_config_defaults", "override_keys", "parse_recipe",
           "read_recipe", "train"]
