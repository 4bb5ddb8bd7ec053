"""TRL integration (``rpe.trainers``): the only place that imports TRL.

Planned here (issue 6): ``RPECallback`` for GRPO/RLOO trainers, internal-value reward functions, and the
internal-critic PPO. The core package (``import rpe``) never imports this module or TRL.
"""

from __future__ import annotations


def require_trl() -> None:
    """Raise a clear error when TRL is missing (install with ``pip install 'rpe[train]'``)."""
    try:
        import trl  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("rpe.trainers needs TRL >= 1.16: pip install 'rpe[train]'") from err
