"""Dense internal credit for GRPO: the model's own per-step RPE added to each step's tokens.

GRPO gives every token of a completion the same advantage, the group-normalised outcome. A sum of internal
RPEs as a sequence reward (``rpe_sum``) does not change that: it telescopes to V(s_T) - V(s_0), so within a
group it ranks completions by their final internal value (docs/concepts.md). This trainer gives each *step*
credit of its own, the process-reward use of the value subsystem:

    A[i, j] = A_group[i] + weight * clip(c_{i, t(j)} / z, -clip, clip)      for completion tokens j

where t(j) is the step token j belongs to (separators join the next step, tokens after the last step join
the last: the internal critic's placement, :func:`rpe.trainers.critic.token_advantages`) and c_t is

- ``value_diff``: the model's own TD error of step t, gamma V(s_t) - V(s_{t-1}) (:func:`rpe.probe.td_errors`
  without the reward: the outcome is already in A_group);
- ``dopamine``: the signed, standardised dopamine-neuron activity of step t;
- ``random_direction``: ``value_diff`` through a probe whose first-layer weights are a random direction of the
  same norm (the control: does any dense term help, or this one?).

and z is 1 (``scale="raw"``) or the standard deviation of the batch's per-step credits (``scale="batch_std"``:
the credit in units of its own spread, so ``weight`` compares with the group advantages, which GRPO divides by
the group's reward standard deviation; a batch whose credits are all equal gets no dense term).

GRPO's clipped surrogate then takes the (B, T) advantages (TRL's ``_compute_loss`` accepts them). Logged:
``dense/abs_mean`` (mean |weight x clipped credit| over completion tokens), ``dense/clipped`` (share of steps
clipped) and, where the steps are arithmetic (``a + b = c``), the mean credit of the steps before the first
wrong step and after it (``dense/credit_before_error``, ``dense/credit_after_error``): hidden-state step
rewards are reported to degrade once an earlier step is wrong ("prefix contamination").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from trl import GRPOTrainer

from rpe.contamination import first_wrong_step
from rpe.probe import ProbeState, td_errors
from rpe.models import unwrap_model

from .critic import token_advantages
from .rewards import InternalSignals
from .trl_adapter import RewardTap, check_trainer, refuse_partitioned

if TYPE_CHECKING:
    from rpe.bundle import SubsystemBundle

logger = logging.getLogger(__name__)

DENSE_SOURCES = ("value_diff", "dopamine", "random_direction")
DENSE_SCALES = ("raw", "batch_std")


@dataclass
class DenseCreditConfig:
    """Options of the dense internal credit (also fields of ``rpe train`` recipes, prefixed ``dense_``)."""

    weight: float = 0.1
    """Scale of the per-step credit added to the group advantage."""
    clip: float = 0.5
    """Each step's credit (after scaling) is clipped to [-clip, clip] before weighting."""
    scale: str = "raw"
    """``raw`` (the credit as read) or ``batch_std`` (divided by the standard deviation of the batch's per-step
    credits; the random-direction control is scaled by its own, so both arms add a term of the same size)."""
    source: str = "value_diff"
    """``value_diff``, ``dopamine`` or ``random_direction`` (the control)."""
    gamma: float = 1.0
    """Discount of the value differences."""
    seed: int = 0
    """Seed of the random direction (``random_direction`` only)."""

    def __post_init__(self) -> None:
        if self.source not in DENSE_SOURCES:
            raise ValueError(f"dense source {self.source!r} is not one of {', '.join(DENSE_SOURCES)}")
        if self.scale not in DENSE_SCALES:
            raise ValueError(f"dense scale {self.scale!r} is not one of {', '.join(DENSE_SCALES)}")
        if self.clip <= 0 or self.weight < 0:
            raise ValueError(f"need clip > 0 and weight >= 0; got clip {self.clip}, weight {self.weight}")


def random_direction_state(state: ProbeState, seed: int) -> ProbeState:
    """``state`` with its first layer's weights replaced by a random Gaussian direction of the same Frobenius
    norm (every other weight kept): a probe that reads as much of the activations, along no learned direction."""
    weights = {k: v.clone() for k, v in state.weights.items()}
    first = "net.0.weight" if "net.0.weight" in weights else next(k for k in weights if k.endswith("weight"))
    g = torch.Generator().manual_seed(int(seed))
    w = weights[first]
    r = torch.randn(w.shape, generator=g, dtype=w.dtype)
    weights[first] = r * (w.norm() / r.norm().clamp_min(1e-12))
    return replace(state, weights=weights)


def step_credit(values: np.ndarray, dopamine: np.ndarray, cfg: DenseCreditConfig) -> np.ndarray:
    """(T,) raw per-step credit of one completion: its value differences (no reward) or dopamine activity."""
    if cfg.source == "dopamine":
        return np.asarray(dopamine, dtype=np.float64)
    return td_errors(values, cfg.gamma)


def credit_scale(credits: list[np.ndarray], scale: str) -> float:
    """The divisor z of the batch's per-step credits (one (T_i,) array per completion): 1 for ``raw``; for
    ``batch_std`` the standard deviation over every step of the batch (0 when fewer than two steps or all equal,
    and then the batch gets no dense term)."""
    if scale == "raw":
        return 1.0
    pooled = np.concatenate([c.ravel() for c in credits]) if credits else np.zeros(0)
    return float(pooled.std()) if pooled.size >= 2 else 0.0


class DenseRPEGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose per-token advantages add the model's own per-step RPE to GRPO's group advantage
    (see the module docstring).

    Args:
        bundle: a bundle (or folder) fitted on the policy's base model.
        dense: :class:`DenseCreditConfig`.
        signals: share an :class:`InternalSignals` (e.g. with an :class:`RPECallback`); with
            ``random_direction`` its bundle is copied with a random probe and read through signals of its own.
        **kwargs: ``GRPOTrainer``'s arguments.
    """

    def __init__(self, *args: Any, bundle: SubsystemBundle | str | Path | None = None,
                 dense: DenseCreditConfig | None = None, signals: InternalSignals | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        check_trainer(self, also=("_generate_and_score_completions",))
        refuse_partitioned(self.args, "DenseRPEGRPOTrainer")
        self.dense_cfg = dense or DenseCreditConfig()
        if signals is None and bundle is None:
            raise ValueError("DenseRPEGRPOTrainer needs bundle= (its probe gives the per-step credit)")
        if self.dense_cfg.source == "random_direction":
            from rpe.bundle import SubsystemBundle

            real = (signals.bundle if signals is not None
                    else SubsystemBundle.resolve(bundle, unwrap_model(self.model), self.processing_class))
            control = replace(real, probe_state=random_direction_state(real.probe_state, self.dense_cfg.seed))
            signals = InternalSignals(control, self.model, self.processing_class)
        self.rpe_signals = (signals or InternalSignals(bundle, self.model, self.processing_class)).follow_trainer(self)
        if self.dense_cfg.source == "dopamine" and self.rpe_signals.bundle.dopamine_neurons.numel() == 0:
            raise ValueError("dense source 'dopamine' needs a bundle with dopamine neurons; run `rpe dopamine` first")
        self._batch: tuple[list, list] | None = None
        self._tap = RewardTap(self, lambda prompts, ids, _: setattr(self, "_batch", (prompts, ids)))

    def close(self) -> None:
        """Remove the reward tap and the generation wrapper (idempotent)."""
        self._tap.close()
        self.rpe_signals.close()

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        prompts, completion_ids_list = self._batch
        cfg = self.dense_cfg
        sigs = self.rpe_signals.signals(completion_ids_list, prompts)
        mask = out["completion_mask"].float().cpu()
        dense = torch.zeros_like(mask)
        clipped, steps, before, after = 0, 0, [], []
        credits = [step_credit(s.values, s.dopamine, cfg) for s in sigs]
        z = credit_scale(credits, cfg.scale)
        for i, s in enumerate(sigs):
            credit = credits[i] / z if z > 0 else np.zeros_like(credits[i])
            if not credit.size:
                continue
            steps += credit.size
            clipped += int((np.abs(credit) > cfg.clip).sum())
            credit = cfg.weight * np.clip(credit, -cfg.clip, cfg.clip)
            n = len(completion_ids_list[i])
            dense[i, :n] = torch.from_numpy(token_advantages(credit, s.step_spans, n)).float()
            texts = [self.processing_class.decode(list(completion_ids_list[i])[a:b]) for a, b in s.step_spans]
            wrong = first_wrong_step(texts)
            if wrong is not None:
                before += credit[:wrong].tolist()
                after += credit[wrong:].tolist()
        dense = dense * mask
        group = out["advantages"].float().cpu()
        group = group.unsqueeze(1) if group.dim() == 1 else group
        out["advantages"] = (group * mask + dense).to(out["completion_ids"].device)
        m = self._metrics["train"]
        m["dense/scale"].append(z)
        m["dense/abs_mean"].append(float(dense.abs()[mask.bool()].mean()) if mask.any() else 0.0)
        m["dense/clipped"].append(clipped / steps if steps else 0.0)
        if before:
            m["dense/credit_before_error"].append(float(np.mean(before)))
        if after:
            m["dense/credit_after_error"].append(float(np.mean(after)))
        return out


__all__ = ["DENSE_SCALES", "DENSE_SOURCES", "DenseCreditConfig", "DenseRPEGRPOTrainer", "credit_scale",
           "random_direction_state", "step_credit"]
