"""Value probes: V(s) = P(the reasoning ends correct | text so far), read from one layer's activations.

Per PAPER.md: an MLP ``d -> 1024 -> 1`` on standardised activations (mean/std from the training split),
targets TD(0) (gamma = 1 - 1e-5, bootstrapped with stop-gradient; the last state's target is the reward),
TD(lambda) or Monte-Carlo (the final reward at every state), AdamW (lr 1e-4, weight decay 0.01), about 100
epochs with early stopping on the validation split, split by problem. The output is a probability (sigmoid)
trained with binary cross-entropy against the (soft) targets.

Value neurons: input dimensions ranked by the L1 norm of their first-layer weight columns, from a dense fit
(no sparsity penalty); :meth:`ValueProbe.prune` returns the top fraction, and a probe refitted on only those
dimensions measures how much value signal they carry.

Example:
    >>> probe = ValueProbe(ProbeConfig(target="mc")).fit(states, layer=12)  # doctest: +SKIP
    >>> probe.metrics["test_auroc_s0"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from rpe.metrics import auroc, brier, ece
from rpe.store import StateSet

logger = logging.getLogger(__name__)

Target = Literal["td0", "td_lambda", "mc"]


class SingleClassError(ValueError):
    """All trajectories have the same outcome: a value probe would learn nothing."""


@dataclass
class ProbeConfig:
    """Value-probe training options (defaults from PAPER.md)."""

    target: Target = "td0"
    """``td0`` (bootstrapped), ``td_lambda`` (lambda-returns) or ``mc`` (final reward at every state)."""
    gamma: float = 1 - 1e-5
    """Discount per step."""
    td_lambda: float = 0.9
    """Lambda of ``td_lambda`` (0 = TD(0), 1 = Monte-Carlo)."""
    hidden: int = 1024
    """Hidden width of the MLP; 0 gives a linear probe."""
    lr: float = 1e-4
    weight_decay: float = 0.01
    epochs: int = 100
    batch_size: int = 256
    patience: int = 15
    """Epochs without validation improvement before stopping."""
    val_frac: float = 0.15
    """Share of problems used for early stopping and layer choice."""
    test_frac: float = 0.3
    """Share of problems held out for the reported metrics (30%: a few hundred problems leave a usable test set)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in ("td0", "td_lambda", "mc"):
            raise ValueError(f"target {self.target!r} is not one of td0, td_lambda, mc")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if not 0 <= self.td_lambda <= 1:
            raise ValueError(f"td_lambda must be in [0, 1], got {self.td_lambda}")
        if not (0 < self.val_frac < 1 and 0 < self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ValueError(f"val_frac + test_frac must leave a training split; got {self.val_frac}, {self.test_frac}")
        if self.epochs < 1 or self.batch_size < 1 or self.hidden < 0:
            raise ValueError("epochs and batch_size must be >= 1 and hidden >= 0")

    @property
    def lam(self) -> float:
        return {"td0": 0.0, "mc": 1.0}.get(self.target, self.td_lambda)


def split_by_problem(problem_ids: list[str], val_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """Assign each trajectory to 0 (train), 1 (val) or 2 (test) by a seeded hash of its problem id, so all
    samples of a problem land in one split. Returns (n_trajectories,) int array."""
    uniq = sorted(set(problem_ids))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    n_test = max(1, round(test_frac * len(uniq)))
    n_val = max(1, round(val_frac * len(uniq)))
    if n_test + n_val >= len(uniq):
        raise ValueError(f"only {len(uniq)} distinct problems: too few to split into train/val/test; collect more")
    split_of = {}
    for rank, i in enumerate(order):
        split_of[uniq[i]] = 2 if rank < n_test else 1 if rank < n_test + n_val else 0
    return np.array([split_of[p] for p in problem_ids])


def lambda_returns(values: torch.Tensor, rewards: torch.Tensor, traj_index: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Lambda-return targets for ordered states of several trajectories (terminal reward only).

    G_T = r; G_t = gamma * ((1 - lam) * V(s_{t+1}) + lam * G_{t+1}). lam = 0 gives TD(0), lam = 1 gives
    gamma^(T-t) * r (Monte-Carlo).

    Args:
        values: (n_states,) current estimates V(s), treated as constants.
        rewards: (n_trajectories,) terminal rewards.
        traj_index: (n_states,) trajectory of each state, states of a trajectory contiguous and in order.
    """
    n = values.numel()
    if n and (traj_index[1:] < traj_index[:-1]).any():
        raise ValueError("states must be grouped by trajectory in increasing trajectory order")
    counts = torch.bincount(traj_index, minlength=int(traj_index.max()) + 1 if n else 0)
    last_of_traj = torch.cumsum(counts, 0) - 1
    dist = last_of_traj[traj_index] - torch.arange(n)  # (n_states,) steps until the trajectory's last state
    targets = torch.empty(n, dtype=values.dtype)
    last = dist == 0
    targets[last] = rewards[traj_index[last]].to(values.dtype)
    for d in range(1, int(dist.max()) + 1 if n else 0):
        idx = (dist == d).nonzero().flatten()
        targets[idx] = gamma * ((1 - lam) * values[idx + 1] + lam * targets[idx + 1])
    return targets


class _MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 1)) if hidden else nn.Linear(d_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N,) logits
        return self.net(x).squeeze(-1)

    @property
    def first(self) -> nn.Linear:
        return self.net[0] if isinstance(self.net, nn.Sequential) else self.net


@dataclass
class ProbeState:
    """What a fitted probe needs to predict (saved in bundles)."""

    layer: int
    neurons: torch.Tensor | None
    """(k,) input dimensions used, or None for all."""
    mean: torch.Tensor
    std: torch.Tensor
    weights: dict[str, torch.Tensor]
    hidden: int


class ValueProbe:
    """An MLP value probe on one layer's activations.

    Attributes (after :meth:`fit`):
        state: :class:`ProbeState` (layer, neurons, standardisation, weights).
        metrics: test/val AUROC at s_0, at the final state, per step, Brier, ECE, split sizes, epochs.
        split: (n_trajectories,) 0/1/2 train/val/test assignment.
    """

    def __init__(self, cfg: ProbeConfig | None = None):
        self.cfg = cfg or ProbeConfig()
        self.state: ProbeState | None = None
        self.metrics: dict[str, float] = {}
        self.split: np.ndarray | None = None
        self._model: _MLP | None = None

    # -- training --------------------------------------------------------------------------------------
    def fit(self, states: StateSet, layer: int, neurons: torch.Tensor | None = None) -> ValueProbe:
        """Fit on ``states.acts[layer]`` (optionally only the columns ``neurons``).

        Raises:
            SingleClassError: all trajectories share one outcome (the task is too easy or too hard).
        """
        cfg = self.cfg
        rewards = states.rewards
        n_pos = int((rewards >= 0.5).sum())
        if n_pos in (0, rewards.numel()):
            which = "correct" if n_pos else "wrong"
            raise SingleClassError(
                f"all {rewards.numel()} trajectories are {which}: a value probe needs both outcomes. The task is too "
                f"{'easy' if n_pos else 'hard'} for this model; recalibrate (e.g. a {'harder' if n_pos else 'easier'} "
                "preset or difficulty options, more or fewer few-shot examples) until accuracy is between 20% and 80%."
            )
        if layer not in states.acts:
            raise ValueError(f"layer {layer} was not captured; captured layers: {states.layers}")
        x_all = states.acts[layer]
        if neurons is not None:
            x_all = x_all[:, neurons]
        torch.manual_seed(cfg.seed)
        split = split_by_problem(states.problem_ids, cfg.val_frac, cfg.test_frac, cfg.seed)
        state_split = torch.as_tensor(split)[states.traj_index]
        train = state_split == 0
        mean = x_all[train].mean(0)
        std = x_all[train].std(0).clamp_min(1e-6)
        x = (x_all - mean) / std  # (n_states, k) standardised
        model = _MLP(x.shape[1], cfg.hidden)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        y_final = states.state_rewards()
        val = state_split == 1
        train_idx = train.nonzero().flatten()
        gen = torch.Generator().manual_seed(cfg.seed)
        best, best_state, stale, epochs = math.inf, None, 0, 0
        for epoch in range(cfg.epochs):
            epochs = epoch + 1
            with torch.no_grad():
                values = torch.sigmoid(model(x))
            targets = lambda_returns(values, rewards, states.traj_index, cfg.gamma, cfg.lam)
            model.train()
            perm = train_idx[torch.randperm(train_idx.numel(), generator=gen)]
            for i in range(0, perm.numel(), cfg.batch_size):
                b = perm[i : i + cfg.batch_size]
                loss = nn.functional.binary_cross_entropy_with_logits(model(x[b]), targets[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                # model selection: Brier of V against the final outcome on validation states
                val_loss = float(((torch.sigmoid(model(x[val])) - y_final[val]) ** 2).mean())
            if val_loss < best - 1e-6:
                best, best_state, stale = val_loss, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        self._model = model
        self.split = split
        self.state = ProbeState(layer, neurons, mean, std, {k: v.detach().clone() for k, v in model.state_dict().items()}, cfg.hidden)
        self.metrics = self.evaluate(states, split)
        self.metrics["epochs"] = epochs
        return self

    # -- inference -------------------------------------------------------------------------------------
    def predict(self, acts: torch.Tensor) -> torch.Tensor:
        """V(s) in [0, 1] for raw activations of the probe's layer.

        Args:
            acts: (n, d_model) full activations, or (n, k) already restricted to the probe's neurons.

        Returns:
            (n,) probabilities.
        """
        st = self._require()
        if st.neurons is not None and acts.shape[1] != st.neurons.numel():
            acts = acts[:, st.neurons]
        if acts.shape[1] != st.mean.numel():
            raise ValueError(f"probe expects {st.mean.numel()} input dimensions, got {acts.shape[1]}")
        with torch.no_grad():
            return torch.sigmoid(self._net()((acts.float() - st.mean) / st.std))

    def _net(self) -> _MLP:
        if self._model is None:
            st = self._require()
            self._model = _MLP(st.mean.numel(), st.hidden)
            self._model.load_state_dict(st.weights)
            self._model.eval()
        return self._model

    def _require(self) -> ProbeState:
        if self.state is None:
            raise RuntimeError("the probe is not fitted; call fit() or load a bundle")
        return self.state

    @classmethod
    def from_state(cls, state: ProbeState, cfg: ProbeConfig | None = None) -> ValueProbe:
        probe = cls(cfg)
        probe.state = state
        return probe

    # -- neurons ---------------------------------------------------------------------------------------
    def neuron_scores(self) -> torch.Tensor:
        """(k,) L1 norm of each input dimension's first-layer weight column (inputs are standardised)."""
        w = self._net().first.weight.detach()  # (hidden, k)
        return w.abs().sum(0)

    def prune(self, top_frac: float) -> torch.Tensor:
        """Indices (into d_model) of the top ``top_frac`` input dimensions by first-layer L1 norm: the value
        neurons. At least one is kept."""
        if not 0 < top_frac <= 1:
            raise ValueError(f"top_frac must be in (0, 1], got {top_frac}")
        scores = self.neuron_scores()
        k = max(1, round(top_frac * scores.numel()))
        top = torch.topk(scores, k).indices
        st = self._require()
        base = st.neurons if st.neurons is not None else torch.arange(scores.numel())
        return base[top].sort().values

    # -- metrics ---------------------------------------------------------------------------------------
    def evaluate(self, states: StateSet, split: np.ndarray | None = None) -> dict[str, float]:
        """AUROC at s_0, at the final state and per step index, Brier and ECE, on val and test splits (or on
        all states when ``split`` is None)."""
        st = self._require()
        values = self.predict(states.acts[st.layer]).numpy()
        y = states.state_rewards().numpy()
        step = states.step_index.numpy()
        final = states.is_terminal().numpy()
        out: dict[str, float] = {}
        splits = {"val": 1, "test": 2} if split is not None else {"all": None}
        for name, code in splits.items():
            mask = np.ones_like(y, dtype=bool) if code is None else (split[states.traj_index.numpy()] == code)
            out[f"{name}_auroc_s0"] = auroc(y[mask & (step == 0)], values[mask & (step == 0)])
            out[f"{name}_auroc_final"] = auroc(y[mask & final], values[mask & final])
            out[f"{name}_auroc_all"] = auroc(y[mask], values[mask])
            out[f"{name}_brier"] = brier(y[mask], values[mask])
            out[f"{name}_ece"] = ece(y[mask], values[mask])
            for t in range(int(step.max()) + 1):
                m = mask & (step == t)
                if m.sum() >= 10:
                    out[f"{name}_auroc_step{t}"] = auroc(y[m], values[m])
            out[f"{name}_n_traj"] = float(len(np.unique(states.traj_index.numpy()[mask])))
        return out


__all__ = ["ProbeConfig", "ProbeState", "SingleClassError", "ValueProbe", "lambda_returns", "split_by_problem"]
