"""Internal-critic PPO: GRPO's machinery with PPO-style GAE advantages whose critic is the policy's own value
neurons.

Algorithm (per generated batch):

1. Generate and score completions exactly as ``GRPOTrainer`` does (same generation backends, accelerate,
   DeepSpeed, PEFT); the verifiable reward r is the weighted sum of the reward functions, clipped to [0, 1]:
   the critic's values are probabilities, so the reward its TD errors end on and the targets it is trained on
   are the same number on the same scale (one convention for both; the share clipped is logged as
   ``critic/reward_clipped``).
2. Split each completion into steps; read V(s_0..s_{T-1}) from the policy's hidden states at the bundle's
   layer and value neurons through the value probe (recorded during generation: no separate value model and
   no extra forward pass).
3. TD errors with the reward at the end: delta_t = gamma * V(s_{t+1}) - V(s_t) for t < T-1 and
   delta_{T-1} = r - V(s_{T-1}); GAE A_t = sum_l (gamma * lambda)^l delta_{t+l}.
4. Every token of step t+1 (and the separator before it) gets A_t; tokens after the last step (EOS) get
   A_{T-1}; a completion with no step gets r - V(s_0). Advantages are whitened over the batch's tokens and
   optionally mixed with GRPO's group-relative advantage: A = (1 - mix) * A_gae + mix * A_group. Under several
   processes the whitening uses the mean and spread of every process's tokens.
5. GRPO's clipped surrogate loss is applied with these per-token advantages (shape (B, T)).
6. The critic (the probe on the value neurons, neurons fixed) takes ``critic_updates`` AdamW steps on the
   TD(lambda) targets of the batch (binary cross-entropy, as the probe was trained); under several processes
   each step follows the gradient of the loss over every process's states (gradients summed across
   processes), so every process holds the same critic.

A reward function returning NaN/inf skips the whole update (advantages set to 0) with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from trl import GRPOTrainer

from rpe.metrics import auroc
from rpe.probe import ProbeState, lambda_returns, td_errors

from .rewards import InternalSignals, nan_guard
from .trl_adapter import check_trainer, refuse_partitioned

if TYPE_CHECKING:
    from rpe.bundle import SubsystemBundle

logger = logging.getLogger(__name__)


@dataclass
class CriticConfig:
    """Options of the internal critic (also fields of ``rpe train`` recipes)."""

    gamma: float = 1.0
    """Discount per reasoning step."""
    lam: float = 0.95
    """GAE lambda."""
    baseline_mix: float = 0.0
    """Weight of GRPO's group-relative advantage in the final advantage (0 = pure internal critic)."""
    critic_lr: float = 1e-3
    critic_updates: int = 4
    """AdamW steps on the probe per generated batch (0 freezes the critic)."""
    whiten: bool = True
    """Standardise the GAE advantages over the batch's completion tokens."""

    def __post_init__(self) -> None:
        if not 0 < self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"need 0 < gamma <= 1 and 0 <= lam <= 1; got {self.gamma}, {self.lam}")
        if not 0 <= self.baseline_mix <= 1:
            raise ValueError(f"baseline_mix must be in [0, 1], got {self.baseline_mix}")


def gae_per_step(values: np.ndarray, reward: float, gamma: float, lam: float) -> np.ndarray:
    """GAE advantages of the T actions (steps) of one completion.

    Args:
        values: (T,) V(s_0..s_{T-1}), the states before each step.
        reward: terminal reward after the last step.

    Returns:
        (T,) A_t.
    """
    T = len(values)
    deltas = td_errors(np.append(values, reward), gamma, reward=reward)
    adv = np.zeros(T)
    running = 0.0
    for t in range(T - 1, -1, -1):
        running = deltas[t] + gamma * lam * running
        adv[t] = running
    return adv


def token_advantages(step_adv: np.ndarray, spans: list[tuple[int, int]], n_tokens: int) -> np.ndarray:
    """Spread per-step advantages over completion tokens: token j belongs to the first step whose span ends
    after j (separators join the next step; tokens after the last step join the last). Shape (n_tokens,)."""
    if not spans:
        return np.full(n_tokens, float(step_adv[0]) if len(step_adv) else 0.0)
    ends = np.array([e for _, e in spans])
    idx = np.searchsorted(ends, np.arange(n_tokens), side="right")
    return step_adv[np.minimum(idx, len(spans) - 1)]


class InternalCriticGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose advantages come from GAE over reasoning steps with the policy's own value neurons
    as the critic (see the module docstring).

    Args:
        bundle: a bundle (or folder) fitted on the policy's base model; its probe is the critic.
        critic: :class:`CriticConfig`.
        signals: share an :class:`InternalSignals` (e.g. with an :class:`RPECallback`).
        *args: passed to ``GRPOTrainer`` (as are all other keyword arguments).
        **kwargs: ``GRPOTrainer``'s keyword arguments; every reward function is wrapped in :func:`nan_guard`.
    """

    def __init__(self, *args: Any, bundle: SubsystemBundle | str | Path | None = None,
                 critic: CriticConfig | None = None, signals: InternalSignals | None = None, **kwargs: Any):
        self._skip_update = False
        if "reward_funcs" in kwargs:
            funcs = kwargs["reward_funcs"] if isinstance(kwargs["reward_funcs"], list) else [kwargs["reward_funcs"]]
            kwargs["reward_funcs"] = [f if not callable(f) or isinstance(f, nn.Module) or isinstance(f, str)
                                      else nan_guard(f, self._mark_skip) for f in funcs]
        super().__init__(*args, **kwargs)
        check_trainer(self, also=("_generate_and_score_completions",))
        refuse_partitioned(self.args, "InternalCriticGRPOTrainer")
        if signals is None and bundle is None:
            raise ValueError("InternalCriticGRPOTrainer needs bundle= (the value probe is the critic)")
        self.critic_cfg = critic or CriticConfig()
        self.rpe_signals = (signals or InternalSignals(bundle, self.model, self.processing_class)).follow_trainer(self)
        probe = self.rpe_signals.bundle.probe
        self.critic_net = probe._net()
        self.critic_net.train()
        self.critic_opt = torch.optim.AdamW(self.critic_net.parameters(), lr=self.critic_cfg.critic_lr, weight_decay=0.0)
        self._last: tuple | None = None

    def _mark_skip(self, name: str, n_bad: int, n: int) -> None:
        self._skip_update = True

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last = (prompts, completion_ids_list, rewards_per_func)
        return rewards_per_func

    def _global_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (a CPU tensor) summed over every process (itself in one process)."""
        if self.accelerator.num_processes == 1:
            return values
        return self.accelerator.reduce(values.to(self.accelerator.device), reduction="sum").cpu()

    def _critic_values(self, acts: torch.Tensor) -> torch.Tensor:
        st = self.rpe_signals.bundle.probe_state
        return torch.sigmoid(self.critic_net((acts.float() - st.mean) / st.std))

    def _generate_and_score_completions(self, inputs):
        self._skip_update = False
        out = super()._generate_and_score_completions(inputs)
        prompts, completion_ids_list, rewards_per_func = self._last
        n_local = len(prompts)
        pi = self.accelerator.process_index
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(1)
        rewards = rewards[pi * n_local : (pi + 1) * n_local].float().cpu().numpy()
        clipped = np.clip(rewards, 0.0, 1.0)  # NaN stays NaN (nan_guard skipped the update already)
        n_clipped = int((np.abs(clipped - rewards) > 1e-12).sum())
        rewards = clipped
        sigs = self.rpe_signals.signals(completion_ids_list, prompts)
        cfg = self.critic_cfg
        width = out["completion_ids"].shape[1]
        mask = out["completion_mask"].float().cpu()
        adv = torch.zeros(n_local, width)
        all_acts, traj, v_first = [], [], []
        with torch.no_grad():
            for i, (s, r) in enumerate(zip(sigs, rewards)):
                acts = s.value_acts  # (T + 1, k): s_0..s_T
                values = self._critic_values(acts).double().numpy()
                v_first.append(values[0])
                step_adv = gae_per_step(values[:-1] if s.n_steps else values[:1], float(r), cfg.gamma, cfg.lam)
                n = len(completion_ids_list[i])
                adv[i, :n] = torch.from_numpy(token_advantages(step_adv, s.step_spans, n)).float()
                all_acts.append(acts)
                traj += [i] * acts.shape[0]
        # a NaN reward on any process skips the update on every process (they must take the same steps)
        self._skip_update = bool(self._global_sum(torch.tensor([float(self._skip_update)])) > 0)
        if cfg.whiten:  # over the global batch's completion tokens
            valid = mask.bool()
            a = adv[valid].double()
            n, total, squares = self._global_sum(torch.stack([torch.tensor(float(a.numel()), dtype=torch.float64),
                                                              a.sum(), (a * a).sum()])).tolist()
            mu = total / max(n, 1.0)
            sd = max(((squares - n * mu * mu) / (n - 1)) ** 0.5, 1e-6) if n > 1 else 1.0
            adv = torch.where(valid, (adv - mu) / sd, torch.zeros_like(adv))
        group = out["advantages"].float().cpu()
        group = group.unsqueeze(1) if group.dim() == 1 else group
        adv = (1 - cfg.baseline_mix) * adv + cfg.baseline_mix * group * mask
        if self._skip_update:
            adv.zero_()
            self._metrics["train"]["critic/skipped_updates"].append(1.0)
        out["advantages"] = adv.to(out["completion_ids"].device)
        # critic update on TD(lambda) targets of this batch
        x = torch.cat(all_acts)
        traj_t = torch.tensor(traj)
        y = torch.tensor(np.nan_to_num(rewards, nan=0.0).astype(np.float32))  # the reward GAE ends on, soft targets
        losses = []
        n_states = float(self._global_sum(torch.tensor([float(x.shape[0])])))
        # a NaN reward skips the whole update, the critic's too (its targets would be NaN read as 0)
        for _ in range(0 if self._skip_update else cfg.critic_updates):
            with torch.no_grad():
                targets = lambda_returns(self._critic_values(x).reshape(-1), y, traj_t, cfg.gamma, cfg.lam)
            st = self.rpe_signals.bundle.probe_state
            logits = self.critic_net((x - st.mean) / st.std).reshape(-1)
            loss_sum = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
            self.critic_opt.zero_grad()
            loss_sum.backward()
            # the gradient of the mean loss over every process's states: every process takes the same step
            params = [p for p in self.critic_net.parameters() if p.grad is not None]
            flat = self._global_sum(torch.cat([p.grad.reshape(-1) for p in params])) / n_states
            for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
                p.grad.copy_(g.reshape(p.shape))
            self.critic_opt.step()
            losses.append(float(self._global_sum(loss_sum.detach().reshape(1))) / n_states)
        st = self.rpe_signals.bundle.probe_state
        self.rpe_signals.bundle.probe_state = ProbeState(
            st.layer, st.neurons, st.mean, st.std, {k: v.detach().clone() for k, v in self.critic_net.state_dict().items()},
            st.hidden)
        m = self._metrics["train"]
        if losses:
            m["critic/loss"].append(float(np.mean(losses)))
        m["critic/value_s0"].append(float(np.mean(v_first)))
        m["critic/reward_clipped"].append(n_clipped / max(1, n_local))
        m["critic/auroc_s0"].append(auroc((rewards >= 0.5), np.array(v_first)))
        m["critic/adv_abs_mean"].append(float(adv.abs()[mask.bool()].mean()) if mask.any() else 0.0)
        return out


__all__ = ["CriticConfig", "InternalCriticGRPOTrainer", "gae_per_step", "token_advantages"]
