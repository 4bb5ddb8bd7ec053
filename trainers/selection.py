"""Prompt selection refreshed as the policy moves: V(s_0) re-read every few steps with the current policy.

Static selection (``select_prompts`` without ``select_refresh_every``) narrows the training set once, before
training. Here the whole training set stays and the trainer draws its prompt groups through
:class:`rpe.selection.SelectionSampler`, which takes only what a :class:`rpe.selection.LiveSelection` keeps at
each draw; every ``every`` optimizer steps :class:`SelectionRefresh` reads V(s_0) of every training prompt again
(one prefill each, the policy as trained so far, the bundle as the :class:`~rpe.trainers.RPECallback` refit left
it when both share an :class:`~rpe.trainers.rewards.InternalSignals`) and updates the kept set. Logged at each
refresh: ``selection/kept_share`` and ``selection/changed`` (the share of prompts whose decision changed, the
explore draw's redraw included); the history also keeps ``band_changed`` (the share that moved into or out of
the band: what the policy's movement changed) and ``value_shift`` (mean absolute change of V(s_0)).

The sampler is attached by replacing the trainer's ``_get_train_sampler`` on the instance
(:meth:`SelectionRefresh.attach`, :func:`use_live_selection`, after :func:`~rpe.trainers.trl_adapter.check_trainer` has checked that TRL still
has it). Under a launcher every rank reads the same values from the same weights, so the ranks keep the same
prompts.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import TrainerCallback

from rpe.selection import LiveSelection, SelectionSampler, in_band, prompt_values
from rpe.models import unwrap_model

from .trl_adapter import check_trainer, log_to_trainer


def use_live_selection(trainer, selection: LiveSelection) -> None:
    """Make ``trainer`` (GRPO / RLOO) draw its training prompts through a :class:`SelectionSampler` of
    ``selection``, with the group layout its own sampler would use."""
    check_trainer(trainer, also=("_get_train_sampler",))

    def sampler(self, dataset=None):
        return SelectionSampler(selection, mini_repeat_count=self.num_generations,
                                batch_size=self.args.generation_batch_size // self.num_generations,
                                repeat_count=self.num_iterations * self.args.steps_per_generation,
                                shuffle=self.shuffle_dataset, seed=self.args.seed)

    trainer._get_train_sampler = types.MethodType(sampler, trainer)


class SelectionRefresh(TrainerCallback):
    """Every ``every`` optimizer steps, V(s_0) of each of ``prompts`` with the current policy updates
    ``selection`` (see the module docstring).

    Args:
        selection: the live kept set the trainer's sampler reads.
        prompts: the training prompts' model input texts, in dataset order.
        signals: the :class:`~rpe.trainers.rewards.InternalSignals` whose bundle reads the value (shared with an
            ``RPECallback`` that refits, the refitted probe is used).
        every: optimizer steps between refreshes (>= 1).
    """

    def __init__(self, selection: LiveSelection, prompts: Sequence[str], signals, every: int):
        if every < 1:
            raise ValueError(f"SelectionRefresh needs every >= 1, got {every}")
        if len(prompts) != len(selection.keep):
            raise ValueError(f"{len(prompts)} prompts for a selection over {len(selection.keep)}")
        self.selection, self.prompts, self.signals, self.every = selection, list(prompts), signals, every
        self.history: list[dict[str, float]] = []
        self.trainer = None

    def attach(self, trainer) -> SelectionRefresh:
        """Make ``trainer`` draw through the live selection (:func:`use_live_selection`) and log to it."""
        use_live_selection(trainer, self.selection)
        self.trainer = trainer
        return self

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs: Any):
        if state.global_step % self.every or model is None:
            return control
        base = unwrap_model(model)
        was_training = base.training
        base.eval()
        try:
            values = prompt_values(base, processing_class or self.signals.tokenizer, self.signals.bundle, self.prompts)
        finally:
            base.train(was_training)
        before, old_values = self.selection.keep.copy(), self.selection.values
        keep = self.selection.update(values)
        cfg = self.selection.cfg
        self.history.append({"step": state.global_step, "kept_share": float(keep.mean()),
                             "changed": float((keep != before).mean()),
                             "band_changed": float((in_band(self.selection.values, cfg) != in_band(old_values, cfg)).mean()),
                             "value_shift": float(np.abs(self.selection.values - old_values).mean())})
        if self.trainer is not None:  # reported with the trainer's next log
            log_to_trainer(self.trainer, {"selection/kept_share": self.history[-1]["kept_share"],
                                          "selection/changed": self.history[-1]["changed"]})
        return control

    def close(self) -> None:
        """Nothing to release (the recipes close every callback)."""


__all__ = ["SelectionRefresh", "use_live_selection"]
