"""Gymnasium environments of rpe, registered on import as ``rpe/NAME-vN``.

- ``rpe/ChainSum-v0``: the calibrated default task (3 one-digit terms).
- ``rpe/ChainSum4-v0``: 4 one-digit terms (harder, more steps).
- ``rpe/Reasoning-v0``: any task: ``gymnasium.make("rpe/Reasoning-v0", task="rg:leg_counting")``.

:class:`LLMPolicy` is a language model acting in them (one step per call, one episode or a vector of them);
:class:`InternalRPE` wraps any of them and puts the model's internal value, RPE and dopamine activity into each
step's ``info``.
"""

from gymnasium.envs.registration import register, registry

from rpe.envs.internal_rpe import InternalRPE
from rpe.envs.policy import LLMPolicy
from rpe.envs.reasoning_env import ReasoningEnv, TextSpace

_ENTRY = "rpe.envs.reasoning_env:ReasoningEnv"
_IDS = {
    "rpe/ChainSum-v0": {"task": "chain_sum"},
    "rpe/ChainSum4-v0": {"task": "chain_sum_4"},
    "rpe/Reasoning-v0": {},
}
for _id, _kwargs in _IDS.items():
    if _id not in registry:
        register(id=_id, entry_point=_ENTRY, kwargs=_kwargs)

__all__ = ["InternalRPE", "LLMPolicy", "ReasoningEnv", "TextSpace"]
