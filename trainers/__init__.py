"""TRL integration (``rpe.trainers``): the only place that imports TRL.

- :class:`RPECallback` (``rpe.trainers.callback``): one line in a GRPO/RLOO script logs internal value and RPE;
- :class:`InternalSignals` (``rpe.trainers.rewards``): internal signals as TRL reward functions;
- :class:`InternalCriticGRPOTrainer` (``rpe.trainers.critic``): PPO-style GAE with the value neurons as critic;
- ``rpe.trainers.recipes``: ``rpe train --config recipes/X.yaml``;
- ``rpe.trainers.trl_adapter``: the one place TRL's private surface is reached, with the TRL versions it is
  tested against.

The core package (``import rpe``) never imports this module or TRL. Names are imported lazily so that
``require_trl`` can give a clear message when TRL is missing.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "RPECallback": "callback",
    "InternalSignals": "rewards",
    "correctness_reward": "rewards",
    "nan_guard": "rewards",
    "InternalCriticGRPOTrainer": "critic",
    "CriticConfig": "critic",
    "DenseRPEGRPOTrainer": "dense",
    "DenseCreditConfig": "dense",
}


def require_trl() -> None:
    """Raise a clear error when TRL is missing (install with ``pip install 'rpe[train]'``)."""
    try:
        import trl  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("rpe.trainers needs TRL >= 1.16: pip install 'rpe[train]'") from err


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        require_trl()
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["require_trl", *_EXPORTS]
