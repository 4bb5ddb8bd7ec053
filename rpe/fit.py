"""The discovery pipeline behind ``rpe fit``: capture states, sweep layers, find value neurons, bundle them.

Steps: capture s_0..s_T at the chosen layers (one forward per batch) -> fit a dense probe per layer and keep
the best layer by validation AUROC -> rank neurons by first-layer L1 norm, keep ``top_frac`` -> refit on those
only -> pruning curve -> test AUROC with bootstrap intervals beside the controls (probe on all neurons,
question length) -> :class:`rpe.bundle.SubsystemBundle`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from rpe.baselines import mean_prompt_logprob, question_length
from rpe.bundle import SubsystemBundle
from rpe.metrics import bootstrap_auroc
from rpe.models import fingerprint
from rpe.probe import ProbeConfig, ValueProbe
from rpe.rollouts import Trajectory
from rpe.store import StateSet, capture_states
from rpe.tracker import decoder_layers

logger = logging.getLogger(__name__)


@dataclass
class FitConfig:
    """Options of ``rpe fit``."""

    layers: list[int] | None = None
    """Layers to sweep; None = every ``layer_stride``-th layer."""
    layer_stride: int = 2
    """Stride of the default sweep."""
    top_frac: float = 0.01
    """Fraction of d_model kept as value neurons (PAPER.md: 1%)."""
    prune_fracs: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.1, 0.05, 0.01, 0.005])
    """Fractions of the pruning curve."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    batch_size: int = 16
    n_boot: int = 1000

    def __post_init__(self) -> None:
        if isinstance(self.probe, dict):
            self.probe = ProbeConfig(**self.probe)
        if not 0 < self.top_frac <= 1:
            raise ValueError(f"top_frac must be in (0, 1], got {self.top_frac}")
        if self.layer_stride < 1:
            raise ValueError(f"layer_stride must be >= 1, got {self.layer_stride}")


def _auroc_with_ci(values: np.ndarray, y: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    point, lo, hi = bootstrap_auroc(y, values, groups=groups, n_boot=n_boot, seed=seed)
    return {"auroc": point, "low": lo, "high": hi}


def fit_bundle(
    model,
    tokenizer,
    trajectories: Sequence[Trajectory],
    cfg: FitConfig | None = None,
    *,
    model_name: str | None = None,
    states: StateSet | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[SubsystemBundle, StateSet]:
    """Run the discovery pipeline and return the bundle (metrics inside) and the captured states.

    Args:
        states: activations already captured for ``trajectories`` (e.g. during generation, the rollout
            folder's ``states.safetensors``); they must hold every layer to sweep with all neurons.
    """
    cfg = cfg or FitConfig()
    say = progress or (lambda msg: logger.info(msg))
    n_layers = len(decoder_layers(model))
    if states is not None:
        if states.trajectory_ids != [t.trajectory_id for t in trajectories]:
            raise ValueError("the given states were captured for other trajectories; capture them again")
        if states.neurons is not None:
            raise ValueError("the given states hold only some neurons; the layer sweep needs all of d_model")
        layers = cfg.layers if cfg.layers is not None else states.layers
        missing = sorted(set(layers) - set(states.layers))
        if missing:
            raise ValueError(f"layers {missing} were not captured (captured: {states.layers}); drop them or re-capture")
        states = StateSet({layer: states.acts[layer] for layer in layers}, states.traj_index, states.step_index,
                          states.trajectory_ids, states.problem_ids, states.rewards)
    else:
        layers = cfg.layers if cfg.layers is not None else list(range(0, n_layers, cfg.layer_stride))
        say(f"capturing {len(trajectories)} trajectories at {len(layers)} layers")
        states = capture_states(model, trajectories, layers, batch_size=cfg.batch_size, pad_token_id=tokenizer.pad_token_id or 0)

    sweep: dict[int, dict[str, float]] = {}
    probes: dict[int, ValueProbe] = {}
    for layer in states.layers:
        say(f"layer sweep: fitting layer {layer}")
        probes[layer] = ValueProbe(cfg.probe).fit(states, layer)
        sweep[layer] = probes[layer].metrics

    def score(layer: int) -> float:
        v = sweep[layer]["val_auroc_all"]
        return -1.0 if math.isnan(v) else v

    best = max(states.layers, key=score)
    dense = probes[best]
    say(f"best layer {best}: pruning curve")
    curve = []
    for frac in cfg.prune_fracs:
        neurons = dense.prune(frac) if frac < 1 else None
        p = dense if neurons is None else ValueProbe(cfg.probe).fit(states, best, neurons)
        curve.append({"frac": frac, "n_neurons": int(neurons.numel()) if neurons is not None else states.acts[best].shape[1],
                      "test_auroc_s0": p.metrics["test_auroc_s0"], "test_auroc_final": p.metrics["test_auroc_final"],
                      "test_auroc_all": p.metrics["test_auroc_all"]})
    value_neurons = dense.prune(cfg.top_frac)
    sparse = ValueProbe(cfg.probe).fit(states, best, value_neurons)

    # headline numbers on the test split, each beside its controls, with problem-clustered bootstrap CIs
    split = sparse.split
    assert split is not None
    test_traj = np.flatnonzero(split == 2)
    tidx = states.traj_index.numpy()
    step = states.step_index.numpy()
    final = states.is_terminal().numpy()
    y = states.state_rewards().numpy()
    pids = np.array(states.problem_ids)[tidx]
    in_test = np.isin(tidx, test_traj)
    headline: dict[str, Any] = {}
    v_sparse = sparse.predict(states.acts[best]).numpy()
    v_dense = dense.predict(states.acts[best]).numpy()
    q_len = question_length(trajectories).numpy()[tidx]
    say("baseline: mean prompt log-probability")
    logprob = mean_prompt_logprob(model, trajectories, batch_size=cfg.batch_size, pad_token_id=tokenizer.pad_token_id or 0).numpy()[tidx]
    for where, mask in (("s0", in_test & (step == 0)), ("final", in_test & final)):
        headline[where] = {
            f"value_neurons_{cfg.top_frac:g}": _auroc_with_ci(v_sparse[mask], y[mask], pids[mask], cfg.n_boot, 0),
            "all_neurons": _auroc_with_ci(v_dense[mask], y[mask], pids[mask], cfg.n_boot, 0),
            "question_length (shorter = more confident)": _auroc_with_ci(-q_len[mask], y[mask], pids[mask], cfg.n_boot, 0),
            "mean prompt log-prob": _auroc_with_ci(logprob[mask], y[mask], pids[mask], cfg.n_boot, 0),
        }
    metrics = {
        "best_layer": best,
        "n_trajectories": len(trajectories),
        "accuracy": float(states.rewards.mean()),
        "target": cfg.probe.target,
        "headline_test": headline,
        "value_probe": sparse.metrics,
        "dense_probe": dense.metrics,
        "pruning_curve": curve,
        "layer_sweep": {str(k): {m: v[m] for m in ("val_auroc_all", "val_auroc_s0", "test_auroc_all")} for k, v in sweep.items()},
    }
    assert sparse.state is not None
    bundle = SubsystemBundle(
        model=fingerprint(model, tokenizer, model_name),
        layer=best,
        value_neurons=value_neurons,
        probe_state=sparse.state,
        probe_config=cfg.probe,
        metrics=metrics,
        created_with={"fit": asdict(cfg)},
    )
    return bundle, states


def td_vs_mc(states: StateSet, layer: int, base: ProbeConfig | None = None) -> dict[str, dict[str, float]]:
    """Fit TD(0) and Monte-Carlo probes on the same states and layer; returns their test metrics."""
    base = base or ProbeConfig()
    out = {}
    for target in ("td0", "mc"):
        cfg = ProbeConfig(**{**asdict(base), "target": target})
        m = ValueProbe(cfg).fit(states, layer).metrics
        out[target] = {k: m[k] for k in ("test_auroc_s0", "test_auroc_final", "test_auroc_all", "test_brier", "test_ece")}
    return out


__all__ = ["FitConfig", "fit_bundle", "td_vs_mc"]
