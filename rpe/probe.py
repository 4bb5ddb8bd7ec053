"""Value probes: V(s) = P(the reasoning ends correct | text so far), read from one layer's activations.

Per PAPER.md: an MLP ``d -> 1024 -> 1`` on standardised activations (mean/std from the training split),
targets TD(0) (gamma = 1 - 1e-5, bootstrapped with stop-gradient; the last state's target is the reward),
TD(lambda) or Monte-Carlo (the final reward at every state), AdamW (weight decay 0.01; lr 1e-3 here, the
paper's 1e-4 is an option), up to 100 epochs with early stopping on the validation split (not before 30),
split by problem. The output is a probability (sigmoid)
trained with binary cross-entropy against the (soft) targets.

Two probe families, same targets, same standardisation, same splits:
- ``mlp`` (PAPER.md): the network above, trained with AdamW and early stopping;
- ``linear``: an L2-regularised logistic probe ``sigmoid(w.x + b)`` fitted to convergence (:mod:`rpe.logistic`:
  damped Newton steps up to d 1024, L-BFGS above);
  TD targets by fitted-value iteration (bootstrap the current V, refit, repeat). The L2 strength is picked from
  ``l2_grid`` by validation log-loss against the final outcome. Deterministic and cheap: the control family
  of ``rpe fit --compare-probes`` and the quick option ``--family linear``.

Value neurons: input dimensions ranked by the L1 norm of their first-layer weight columns (for the linear family
``|w|``), from a dense fit (no sparsity penalty); :meth:`ValueProbe.prune` returns the top fraction, and a probe
refitted on only those dimensions measures how much value signal they carry.

Example:
    >>> probe = ValueProbe(ProbeConfig(target="mc")).fit(states, layer=12)  # doctest: +SKIP
    >>> probe.metrics["test_auroc_s0"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from rpe.logistic import fit_logistic
from rpe.metrics import auroc, brier, ece
from rpe.seeding import seeded
from rpe.store import StateSet

logger = logging.getLogger(__name__)

Target = Literal["td0", "td_lambda", "mc"]
Family = Literal["linear", "mlp"]
FAMILIES = ("linear", "mlp")
TARGETS = ("td0", "td_lambda", "mc")


class SingleClassError(ValueError):
    """All trajectories have the same outcome: a value probe would learn nothing."""


@dataclass
class ProbeConfig:
    """Value-probe training options (defaults from PAPER.md)."""

    target: Target = "td0"
    """``td0`` (bootstrapped), ``td_lambda`` (lambda-returns) or ``mc`` (final reward at every state)."""
    family: Family = "mlp"
    """``mlp`` (PAPER.md's ``d -> hidden -> 1``, the default) or ``linear`` (L2 logistic, damped Newton: fast and
    deterministic; on SmolLM2 its dense probe matches the MLP but its 1% refit is weaker, docs/results.md)."""
    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    """Linear family: L2 strengths tried (loss = mean BCE + l2/2 * |w|^2); the best on validation is kept."""
    td_iterations: int = 20
    """Linear family with a TD target: fitted-value iterations (stops early once targets move < 1e-4)."""
    gamma: float = 1 - 1e-5
    """Discount per step."""
    td_lambda: float = 0.9
    """Lambda of ``td_lambda`` (0 = TD(0), 1 = Monte-Carlo)."""
    hidden: int = 1024
    """Hidden width of the MLP; 0 gives a linear probe."""
    lr: float = 1e-3
    """MLP learning rate. PAPER.md uses 1e-4; on a few thousand states that moves the first layer so little in
    100 epochs that early stopping keeps a near-random network (tests/test_discovery.py); 1e-4 stays available."""
    weight_decay: float = 0.01
    epochs: int = 100
    batch_size: int = 256
    patience: int = 15
    """Epochs without validation improvement before stopping."""
    min_epochs: int = 30
    """MLP: never stop before this many epochs (a noisy validation split must not stop training at the init)."""
    val_frac: float = 0.15
    """Share of problems used for early stopping and layer choice."""
    test_frac: float = 0.3
    """Share of problems held out for the reported metrics (30%: a few hundred problems leave a usable test set)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target {self.target!r} is not one of {', '.join(TARGETS)}")
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        self.l2_grid = tuple(float(v) for v in self.l2_grid)
        if not self.l2_grid or min(self.l2_grid) < 0:
            raise ValueError(f"l2_grid needs at least one strength >= 0, got {self.l2_grid}")
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


def td_errors(values: Sequence[float], gamma: float, reward: float | None = None) -> np.ndarray:
    """The TD errors (internal reward-prediction errors) of one episode of T steps: every rpe number is this one.

    Args:
        values: (T + 1,) V(s_0..s_T): the value before each step and after the last one.
        gamma: discount per step.
        reward: the episode's reward, delivered with the last step, after which nothing follows: with it the
            last error is ``r - V(s_{T-1})`` (the reward replaces the bootstrap gamma V(s_T) and is not
            discounted); without it (the model's own signal, no reward seen) ``gamma V(s_T) - V(s_{T-1})``.

    Returns:
        (T,) delta_t = gamma V(s_t) - V(s_{t-1}) for t = 1..T, the last one as above.

    Example (V(s_0..s_2) = 0.25, 0.5, 0.8; the answer was right):
        >>> td_errors([0.25, 0.5, 0.8], gamma=0.9, reward=1.0).round(3).tolist()
        [0.2, 0.5]
        >>> td_errors([0.25, 0.5, 0.8], gamma=0.9).round(3).tolist()
        [0.2, 0.22]

    Discounting the reward as if it were V(s_T) would make delta_T = -1e-5 where r = V(s_{T-1}) = 1 and 0 where
    r = V(s_{T-1}) = 0: among many exact predictions that turns a tie into an order opposite to the reward's, and
    a rank correlation over all steps follows it.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 1:
        raise ValueError(f"values must be V(s_0..s_T), a 1-D sequence of T + 1 >= 1 numbers; got shape {v.shape}")
    deltas = gamma * v[1:] - v[:-1]
    if reward is not None and deltas.size:
        deltas[-1] = float(reward) - v[-2]
    return deltas


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


def _require_both_outcomes(rewards: torch.Tensor, what: str) -> None:
    n_pos = int((rewards >= 0.5).sum())
    if n_pos in (0, rewards.numel()):
        which = "correct" if n_pos else "wrong"
        raise SingleClassError(
            f"all {rewards.numel()} {what} are {which}: a value probe needs both outcomes. The task is too "
            f"{'easy' if n_pos else 'hard'} for this model; recalibrate (e.g. a {'harder' if n_pos else 'easier'} "
            "preset or difficulty options, more or fewer few-shot examples) until accuracy is between 20% and 80%, "
            "or collect more trajectories."
        )


class ProbeNet(nn.Module):
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
        self._model: ProbeNet | None = None
        self.chosen_l2: float | None = None
        """Linear family: the L2 strength picked on validation."""
        self._init_first: torch.Tensor | None = None
        """MLP fitted here: the first layer's initial weights (neurons are ranked by what training changed)."""

    # -- training --------------------------------------------------------------------------------------
    def fit(
        self, states: StateSet, layer: int, neurons: torch.Tensor | None = None, *, split: np.ndarray | None = None
    ) -> ValueProbe:
        """Fit on ``states.acts[layer]`` (optionally only the columns ``neurons``).

        Args:
            split: (n_trajectories,) 0 = train, 1 = validation (early stopping, L2 choice), 2 = test (reported),
                -1 = unused; default :func:`split_by_problem` with the config's fractions. Cross-validation
                passes its folds here.

        Raises:
            SingleClassError: all trajectories (or all training trajectories) share one outcome.
        """
        cfg = self.cfg
        rewards = states.rewards
        _require_both_outcomes(rewards, "trajectories")
        if layer not in states.acts:
            raise ValueError(f"layer {layer} was not captured; captured layers: {states.layers}")
        x_all = states.acts[layer]
        if neurons is not None:
            x_all = x_all[:, neurons]
        with seeded(cfg.seed):  # the nets' initialisation; the caller's random state is kept
            if split is None:
                split = split_by_problem(states.problem_ids, cfg.val_frac, cfg.test_frac, cfg.seed)
            split = np.asarray(split)
            if split.shape != (len(states.trajectory_ids),):
                raise ValueError(f"split has shape {split.shape}; expected ({len(states.trajectory_ids)},), one code per trajectory")
            _require_both_outcomes(rewards[torch.as_tensor(split == 0)], "training trajectories")
            state_split = torch.as_tensor(split)[states.traj_index]
            train, val = state_split == 0, state_split == 1
            if not val.any():
                raise ValueError("the split has no validation trajectories (code 1): early stopping and L2 choice need them")
            mean = x_all[train].mean(0)
            std = x_all[train].std(0).clamp_min(1e-6)
            x = (x_all - mean) / std  # (n_states, k) standardised
            if cfg.family == "linear":
                model, epochs = self._fit_linear(x, states, train, val)
            else:
                model, epochs = self._fit_mlp(x, states, train, val)
            model.eval()
            self._model = model
            self.split = split
            hidden = 0 if cfg.family == "linear" else cfg.hidden
            self.state = ProbeState(layer, neurons, mean, std, {k: v.detach().clone() for k, v in model.state_dict().items()}, hidden)
            self.metrics = self.evaluate(states, split)
            self.metrics["epochs"] = epochs
            return self

    def _mc_targets(self, states: StateSet) -> torch.Tensor:
        """(n_states,) Monte-Carlo targets: gamma^(steps to the end) x the trajectory's reward."""
        return lambda_returns(torch.zeros(states.n_states), states.rewards, states.traj_index, self.cfg.gamma, 1.0)

    def _targets(self, model: ProbeNet, x: torch.Tensor, states: StateSet) -> torch.Tensor:
        """(n_states,) the configured target for every state, bootstrapped from ``model``'s current V."""
        if self.cfg.lam == 1.0:
            return self._mc_targets(states)
        with torch.no_grad():
            values = torch.sigmoid(model(x))
        return lambda_returns(values, states.rewards, states.traj_index, self.cfg.gamma, self.cfg.lam)

    def _fit_linear(self, x: torch.Tensor, states: StateSet, train: torch.Tensor, val: torch.Tensor) -> tuple[ProbeNet, int]:
        """L2 logistic probe for each strength in ``l2_grid`` (strongest first, each warm-started from the last);
        TD targets by fitted-value iteration, warm-started from the Monte-Carlo fit. The strength with the lowest
        validation log-loss against the final outcome wins. Returns (model, TD iterations used)."""
        cfg = self.cfg
        y_final = states.state_rewards()
        mc_targets = self._mc_targets(states)
        model = ProbeNet(x.shape[1], 0)
        nn.init.zeros_(model.first.weight)
        nn.init.zeros_(model.first.bias)
        best_loss, best_state, best_iters = math.inf, None, 0
        for l2 in sorted(cfg.l2_grid, reverse=True):
            fit_logistic(model.first, x[train], mc_targets[train], l2)
            used = 1
            if cfg.lam < 1.0:
                targets = self._targets(model, x, states)
                for used in range(1, cfg.td_iterations + 1):
                    fit_logistic(model.first, x[train], targets[train], l2, refine=True)
                    new = self._targets(model, x, states)
                    moved = float((new - targets).abs().max())
                    targets = new
                    if moved < 1e-4:
                        break
            with torch.no_grad():
                loss = float(nn.functional.binary_cross_entropy_with_logits(model(x[val]), y_final[val]))
            if loss < best_loss - 1e-9:
                best_loss, best_state, best_iters = loss, copy.deepcopy(model.state_dict()), used
                self.chosen_l2 = l2
        assert best_state is not None
        model.load_state_dict(best_state)
        return model, best_iters

    def _fit_mlp(self, x: torch.Tensor, states: StateSet, train: torch.Tensor, val: torch.Tensor) -> tuple[ProbeNet, int]:
        """PAPER.md's MLP: AdamW on mini-batches, targets recomputed every epoch, early stopping on validation
        Brier against the final outcome. Returns (model, epochs run)."""
        cfg = self.cfg
        model = ProbeNet(x.shape[1], cfg.hidden)
        y_final = states.state_rewards()
        # An untrained MLP is a random projection of the activations, and on states with a strong difficulty
        # direction a random projection can rank outcomes well or inverted (seen: validation AUROC 0.19). So the
        # output layer starts at zero (V = base rate everywhere until training writes something) and neurons are
        # ranked by what training wrote into the first layer (|W - W_init|), never by the random init itself.
        rate = float(y_final[train].mean().clamp(1e-3, 1 - 1e-3))
        with torch.no_grad():
            model.net[2].weight.zero_()
            model.net[2].bias.fill_(math.log(rate / (1 - rate)))
        self._init_first = model.first.weight.detach().clone()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        train_idx = train.nonzero().flatten()
        gen = torch.Generator().manual_seed(cfg.seed)
        best, best_state, stale, epochs = math.inf, None, 0, 0
        for epoch in range(cfg.epochs):
            epochs = epoch + 1
            model.eval()
            targets = self._targets(model, x, states)
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
                if stale >= cfg.patience and epochs >= cfg.min_epochs:
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        return model, epochs

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

    def _net(self) -> ProbeNet:
        if self._model is None:
            st = self._require()
            self._model = ProbeNet(st.mean.numel(), st.hidden)
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
        """(k,) L1 norm of each input dimension's first-layer weight column (inputs are standardised). For an MLP
        fitted here the column's change from its random initialisation is used: what training wrote, not the
        init (with the paper's lr 1e-4 the learned part can be small beside the init)."""
        w = self._net().first.weight.detach()  # (hidden, k)
        init = self._init_first
        if init is not None and init.shape == w.shape and self.state is not None and self.state.hidden:
            w = w - init
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
            if not mask.any():
                continue  # e.g. no test split: the bundle's own probe is scored by cross-validation instead
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


__all__ = ["ProbeConfig", "ProbeState", "SingleClassError", "ValueProbe", "lambda_returns", "split_by_problem",
           "td_errors"]
