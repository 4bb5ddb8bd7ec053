"""Internal signals as TRL reward functions, sharing one read per batch.

:class:`InternalSignals` owns a :class:`rpe.signals.SignalReader` and a :class:`rpe.signals.GenerationCapture`
on the policy. When the trainer generates with ``model.generate`` (TRL's default, non-vLLM path), the value
and dopamine columns of the bundle layer are recorded during that generation and the signals cost no extra
forward pass; otherwise (vLLM, tools, continuous batching) one hooked forward over prompt + completion is run,
once per batch, however many reward functions and callbacks ask. ``stats`` counts which path served.

Every reward function has TRL's signature ``f(prompts, completions, completion_ids=..., **kwargs) -> list[float]``
and carries ``rpe_internal = True`` so :class:`rpe.trainers.callback.RPECallback` can tell the verifiable reward
from the internal ones.

Example (GRPO with an auxiliary RPE reward, monitor-only value):
    >>> signals = InternalSignals("runs/demo/bundle", model, tokenizer)  # doctest: +SKIP
    >>> trainer = GRPOTrainer(model=model, reward_funcs=[correct, signals.reward("rpe_sum"),
    ...                       signals.reward("value_final")], args=GRPOConfig(reward_weights=[1.0, 0.1, 0.0]))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rpe.bundle import SubsystemBundle
from rpe.models import unwrap_model
from rpe.signals import SCALAR_SIGNALS, GenerationCapture, SequenceSignals, SignalReader

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase



class InternalSignals:
    """Per-batch internal value / RPE / dopamine of the policy's completions, shared by reward functions,
    :class:`~rpe.trainers.callback.RPECallback` and the internal-critic trainer.

    Args:
        bundle: a bundle (or its folder) fitted on the policy's base model.
        model: the policy being trained (the object whose ``generate`` the trainer calls).
        tokenizer: its tokenizer.
        segmenter: step segmentation of completions (as in ``rpe rollouts``).
        capture: record activations during ``generate`` (no extra forward when the batch matches).
    """

    def __init__(self, bundle: SubsystemBundle | str | Path, model: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase, *, segmenter: str = "paragraph",
                 capture: bool = True):
        self.bundle = SubsystemBundle.resolve(bundle, unwrap_model(model), tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.reader = SignalReader(self.bundle, model, tokenizer, segmenter=segmenter, check=False)
        self.capture = GenerationCapture(model, self.bundle.layer, self.reader.columns).install() if capture else None
        self.stats = {"captured": 0, "forward": 0, "rows_recomputed": 0}
        self.last_captured_fraction = 0.0
        """Share of the last batch's rows read from the generation capture (rows cut at the generation limit
        need one forward of their own: their last token was never fed back to the model)."""
        self._key: tuple | None = None
        self._signals: list[SequenceSignals] = []
        self.last_source: str | None = None
        self.template: dict[str, Any] = {}
        """How chat prompts are rendered, as the trainer renders them (``chat_template_kwargs`` such as Qwen3's
        ``enable_thinking``, ``tools``, ``chat_template``): set by :meth:`follow_trainer`."""

    def follow_trainer(self, trainer: Any) -> InternalSignals:
        """Render chat prompts as ``trainer`` does (its ``chat_template_kwargs``, tools and chat template), so a
        read (the vLLM path, completions cut at the limit) sees the prompt tokens generation saw. Called by the
        callback and rpe's trainers."""
        from .trl_adapter import prompt_template

        self.template = prompt_template(trainer)
        return self

    def close(self) -> None:
        """Remove the generation wrapper (idempotent)."""
        if self.capture is not None:
            self.capture.remove()

    def __enter__(self) -> InternalSignals:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def prompt_ids(self, prompts: Sequence[Any]) -> list[list[int]]:
        """Token ids of prompts as TRL tokenizes them (chat template for message lists, with the trainer's
        template settings :attr:`template`; plain text with the tokenizer's special tokens otherwise)."""
        out = []
        for p in prompts:
            if isinstance(p, list):
                out.append(list(self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                                                   return_dict=True, **self.template)["input_ids"]))
            else:
                out.append(list(self.tokenizer(text=p)["input_ids"]))
        return out

    def signals(self, completion_ids: Sequence[Sequence[int]], prompts: Sequence[Any] | None = None) -> list[SequenceSignals]:
        """Signals of this batch's completions (computed once per batch, then served from the cache)."""
        key = tuple(tuple(c) for c in completion_ids)
        if key == self._key:
            return self._signals
        cap = self.capture.match(completion_ids) if self.capture is not None else None
        if cap is not None:
            sig = self.reader.from_recorded(cap.recorded, cap.width, completion_ids, cap.prompt_ids)
            self.stats["captured"] += 1
            self.stats["rows_recomputed"] += self.reader.last_recomputed
            self.last_source = "captured"
            self.last_captured_fraction = 1.0 - self.reader.last_recomputed / max(1, len(completion_ids))
        else:
            if prompts is None:
                raise ValueError("the completions were not captured during generation; pass the prompts")
            sig = self.reader.read(self.prompt_ids(prompts), completion_ids)
            self.stats["forward"] += 1
            self.last_source = "forward"
            self.last_captured_fraction = 0.0
        self._key, self._signals = key, sig
        return sig

    def reward(self, kind: str, scale: float = 1.0) -> Callable[..., list[float]]:
        """A TRL reward function returning ``scale * signal`` per completion.

        Args:
            kind: one of ``value_s0``, ``value_final``, ``rpe_sum``, ``rpe_abs_mean``, ``rpe_min``, ``rpe_max``,
                ``rpe_last``, ``dopamine``.
            scale: multiplier (use TRL's ``reward_weights`` for weighting; weight 0 monitors only).
        """
        if kind not in SCALAR_SIGNALS:
            raise ValueError(f"unknown internal reward {kind!r}; choose one of {', '.join(SCALAR_SIGNALS)}")
        if kind == "dopamine" and self.bundle.dopamine_neurons.numel() == 0:
            raise ValueError("the bundle has no dopamine neurons; run `rpe dopamine` on it first")

        def reward_fn(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
            if completion_ids is None:
                completion_ids = [self.tokenizer(_text(c), add_special_tokens=False)["input_ids"] for c in completions]
            values = []
            for s in self.signals(completion_ids, prompts):
                v = s.scalar(kind)
                values.append(scale * v if math.isfinite(v) else None)
            return values

        reward_fn.__name__ = f"internal_{kind}"
        reward_fn.rpe_internal = True  # type: ignore[attr-defined]
        return reward_fn


def _text(completion: Any) -> str:
    """The text of a completion (plain string or TRL's conversational ``[{"role", "content"}]``)."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def correctness_reward(task, problems: dict[str, Any]) -> Callable[..., list[float]]:
    """The verifiable reward: 1.0 when the task's verifier accepts the completion's answer, else 0.0.

    The dataset needs a ``problem_id`` column (TRL passes dataset columns to reward functions).
    """

    def correct(prompts, completions, problem_id=None, **kwargs) -> list[float]:
        if problem_id is None:
            raise ValueError("the training dataset needs a 'problem_id' column for the correctness reward")
        return [float(task.score(problems[pid], _text(c))) for pid, c in zip(problem_id, completions)]

    correct.__name__ = "correct"
    return correct


def nan_guard(fn: Callable[..., list[float]], on_skip: Callable[[str, int, int], None] | None = None) -> Callable[..., list[float]]:
    """Wrap a reward function so NaN/inf values never reach the advantages.

    Non-finite values become None (TRL's "no reward for this row"), a warning names the function and the
    count, and ``on_skip(name, n_bad, n)`` is called (rpe's trainers then skip the whole update).
    """
    name = getattr(fn, "__name__", "reward")

    def guarded(*args, **kwargs):
        out = list(fn(*args, **kwargs))
        bad = [i for i, v in enumerate(out) if v is not None and not math.isfinite(float(v))]
        if bad:
            logger.warning("reward function %r returned NaN/inf for %d of %d completions; skipping this update",
                           name, len(bad), len(out))
            for i in bad:
                out[i] = None
            if on_skip is not None:
                on_skip(name, len(bad), len(out))
        return out

    guarded.__name__ = name
    for attr in ("rpe_internal",):
        if hasattr(fn, attr):
            setattr(guarded, attr, getattr(fn, attr))
    return guarded


__all__ = ["InternalSignals", "correctness_reward", "nan_guard"]
