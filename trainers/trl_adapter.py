"""Where rpe reaches past TRL's public surface, and the TRL versions that reach is tested against.

TRL's public surface gives a callback the model and processing class (``on_*`` keyword arguments) and a reward
function the completion ids, dataset columns and trainer state; what it does not give a callback is the trainer
itself or the per-completion scores of every reward function after a batch is scored. :class:`RPECallback`
needs both, so this module:

- finds the trainer that holds a callback by looking up the call stack for the ``Trainer`` whose callback
  handler lists it (:func:`find_trainer`; callbacks are called from the trainer's own methods);
- wraps the trainer's ``_calculate_rewards`` on that instance only (:class:`RewardTap`, undone on close);
- appends to the trainer's ``_metrics`` so rpe's numbers are averaged and reported with ``reward`` and ``kl``
  (:func:`log_to_trainer`).

:func:`check_trainer` checks every private name this uses, and the signature of ``_calculate_rewards``, before
anything is wired, and fails with :class:`TRLChangedError` naming what changed and the tested versions; an
untested TRL version that still has them all works with one logged warning. The internal critic
(:class:`rpe.trainers.critic.InternalCriticGRPOTrainer`) is a ``GRPOTrainer`` subclass, TRL's own extension
point; it overrides ``_calculate_rewards`` and ``_generate_and_score_completions`` and runs the same check.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

TESTED_TRL_VERSIONS = ("1.16",)
"""TRL major.minor versions the private surface below is tested against (``make test`` installs one of them)."""

REWARD_HOOK = "_calculate_rewards"
REWARD_HOOK_PARAMS = ("inputs", "prompts", "completions", "completion_ids_list")
"""Parameters of ``GRPOTrainer._calculate_rewards`` / ``RLOOTrainer._calculate_rewards`` in the tested versions;
it returns the (N, n_reward_funcs) scores of the whole (gathered) batch."""

TRAINER_ATTRIBUTES = ("_metrics", "reward_funcs", "reward_weights", "accelerator", "state", "model")
"""Attributes of the trainer rpe reads: ``_metrics[mode][key]`` lists, the reward functions and weights, the
accelerator (process index, gather), the trainer state (global step)."""


class TRLChangedError(RuntimeError):
    """The installed TRL lacks a private name rpe relies on (see :mod:`rpe.trainers.trl_adapter`)."""


def trl_version() -> str:
    """The installed TRL's version string (``"unknown"`` when it has none)."""
    import trl

    return str(getattr(trl, "__version__", "unknown"))


def check_trainer(trainer: Any, also: tuple[str, ...] = ()) -> None:
    """Check that ``trainer`` has the private surface rpe uses (and the methods named in ``also``).

    Raises:
        TypeError: ``trainer`` is not a GRPO/RLOO-style trainer (it has no reward-scoring step).
        TRLChangedError: it is, but a name or signature rpe uses changed (names the TRL version and the fix).
    """
    version = trl_version()
    tested = ", ".join(f"{v}.x" for v in TESTED_TRL_VERSIONS)
    if not hasattr(trainer, REWARD_HOOK):
        raise TypeError(f"RPECallback needs a TRL GRPOTrainer or RLOOTrainer (tested with TRL {tested}); got "
                        f"{type(trainer).__name__}, which has no {REWARD_HOOK}")
    fix = f"install a tested TRL (pip install 'trl~={TESTED_TRL_VERSIONS[-1]}.0') or update rpe.trainers.trl_adapter"
    missing = [name for name in (*TRAINER_ATTRIBUTES, *also) if not hasattr(trainer, name)]
    if missing:
        raise TRLChangedError(f"{type(trainer).__name__} of TRL {version} has no {', '.join(missing)}, which "
                              f"rpe reads (tested with TRL {tested}); {fix}")
    params = tuple(inspect.signature(getattr(trainer, REWARD_HOOK)).parameters)
    if params != REWARD_HOOK_PARAMS:
        raise TRLChangedError(f"{type(trainer).__name__}.{REWARD_HOOK} of TRL {version} takes ({', '.join(params)}); "
                              f"rpe calls it as ({', '.join(REWARD_HOOK_PARAMS)}) (tested with TRL {tested}); {fix}")
    if ".".join(version.split(".")[:2]) not in TESTED_TRL_VERSIONS:
        logger.warning("rpe.trainers: TRL %s is not among the tested versions (%s); its private names still match", version, tested)


class PartitionedParametersError(ValueError):
    """Internal reads asked for where the model's parameters are partitioned over ranks (ZeRO-3, FSDP)."""


def refuse_partitioned(train_args: Any, who: str) -> None:
    """Raise :class:`PartitionedParametersError` when ``train_args`` (or the accelerate launch) partitions the
    parameters (:func:`rpe.distributed.partitioned_parameters`): there, every forward is a collective every
    rank must join, and the internal reads run a rank-dependent number of forwards (a re-read only for
    completions cut at the limit, the prefix prefill only where local prompts share a prefix) and stop a
    forward after the bundle's layer. ZeRO-2 and DDP keep whole parameters on every rank and work."""
    from rpe.distributed import partitioned_parameters

    setting = partitioned_parameters(train_args)
    if setting:
        raise PartitionedParametersError(
            f"{who} reads the policy's hidden states with forwards of its own, which cannot run under {setting}: "
            "ranks would wait on each other's parameter gathers. Use DeepSpeed ZeRO-2 (zero_stage: 2, "
            "recipes/accelerate_deepspeed_zero2.yaml) or plain DDP, or train without a bundle")


def find_trainer(callback: Any, max_depth: int = 12) -> Any | None:
    """The ``transformers.Trainer`` whose callback handler holds ``callback``, found on the call stack (the
    callback is being called from that trainer's ``__init__`` or ``train``); None when none is found."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer) and callback in getattr(obj.callback_handler, "callbacks", []):
                return obj
    finally:
        del frame
    return None


class RewardTap:
    """Calls ``observe(prompts, completion_ids_list, rewards_per_func)`` after every batch ``trainer`` scores.

    The wrap is an instance attribute (only this trainer is affected) and :meth:`close` (or leaving the
    ``with`` block) removes it; :func:`check_trainer` runs first.

    Args:
        observe: receives the local prompts, the local completion ids and the (N, n_reward_funcs) scores of
            the gathered batch; its return value is ignored.
    """

    def __init__(self, trainer: Any, observe: Callable[[list, list, Any], None]):
        check_trainer(trainer)
        self.trainer = trainer
        original = getattr(trainer, REWARD_HOOK)

        def calculate_rewards(inputs, prompts, completions, completion_ids_list):
            rewards_per_func = original(inputs, prompts, completions, completion_ids_list)
            observe(prompts, completion_ids_list, rewards_per_func)
            return rewards_per_func

        setattr(trainer, REWARD_HOOK, calculate_rewards)
        self._open = True

    def close(self) -> None:
        """Remove the wrap (idempotent)."""
        if self._open:
            self._open = False
            try:
                delattr(self.trainer, REWARD_HOOK)
            except AttributeError:
                pass

    def __enter__(self) -> RewardTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prompt_template(trainer: Any) -> dict[str, Any]:
    """The keyword arguments ``trainer`` passes to ``apply_chat_template`` when it tokenises chat prompts
    (TRL 1.16: ``tools``, ``chat_template`` and ``args.chat_template_kwargs``); only those it sets."""
    out: dict[str, Any] = dict(getattr(trainer, "chat_template_kwargs", None) or {})
    if getattr(trainer, "tools", None):
        out["tools"] = trainer.tools
    if getattr(trainer, "chat_template", None):
        out["chat_template"] = trainer.chat_template
    return out


def log_to_trainer(trainer: Any, metrics: dict[str, float]) -> None:
    """Append ``metrics`` to the trainer's own per-mode metric lists (averaged and reported at its next log)."""
    mode = "train" if trainer.model.training else "eval"
    for key, value in metrics.items():
        trainer._metrics[mode][key].append(value)


__all__ = [
    "REWARD_HOOK", "REWARD_HOOK_PARAMS", "TESTED_TRL_VERSIONS", "TRAINER_ATTRIBUTES", "PartitionedParametersError",
    "RewardTap", "TRLChangedError", "check_trainer", "find_trainer", "log_to_trainer", "prompt_template",
    "refuse_partitioned", "trl_version",
]
