"""A gymnasium wrapper that reads the model's internal value, RPE and dopamine activity at every step.

``InternalRPE(env, bundle, model=..., tokenizer=...)`` wraps a :class:`~rpe.envs.ReasoningEnv` (or anything whose
``unwrapped`` has ``prompt`` and ``completion`` text). ``reset`` puts V(s_0) in ``info["internal_value"]``; each
``step`` puts in ``info``:

- ``internal_value``: V(s_t), the bundle's value probe at the last token of the step;
- ``internal_rpe``: delta_t = gamma V(s_t) - V(s_{t-1}); on the terminal step the reward-time error
  r - V(s_{T-1}) (the value before the last step; an episode cut by a limit keeps gamma V(s_T) - V(s_{T-1}));
- ``dopamine``: the dopamine neurons' signed, standardised activity averaged over the step's tokens (0.0 when the
  bundle has none);
- ``reward_unshaped``: the environment's reward (the returned reward includes the shaping below).

With ``policy=`` (an :class:`~rpe.envs.LLMPolicy` acting in the environment) the signals come from the activations
the policy recorded while it generated the step: no forward of the wrapper's own (the step's separator, which the
policy left unfed, goes with its next batch). An action that came from
elsewhere (a person, another model) is fed through the policy's cache: one incremental forward over that step's
tokens only. Without a policy (``model=``, ``tokenizer=``), the wrapper keeps its own KV cache of the transcript
(the prompt is encoded once at ``reset``) and each step costs one incremental forward over that step's tokens. The
values equal :meth:`rpe.signals.SignalReader.read` on the whole transcript, in the tokens the model saw (tested to
1e-4).

``shaping=beta`` adds potential-based shaping beta * (gamma V(s') - V(s)) to every reward, with potential 0 after a
terminal step (Ng, Harada and Russell 1999: the optimal policy is unchanged).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium
import numpy as np
import torch

from rpe.bundle import SubsystemBundle
from rpe.models import unwrap_model
from rpe.probe import td_errors
from rpe.signals import SignalReader
from rpe.tracker import ActivationTracker

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rpe.envs.policy import LLMPolicy


class InternalRPE(gymnasium.Wrapper):
    """Adds internal value, RPE and dopamine activity to each step's ``info`` (see the module docstring).

    Args:
        env: a text environment whose ``unwrapped`` has ``prompt``, ``completion`` and ``steps`` (a ``ReasoningEnv``).
        bundle: a bundle fitted on the policy's (or ``model``'s) model, or its folder (checked).
        policy: the :class:`~rpe.envs.LLMPolicy` that acts in ``env``: signals are read from what it recorded while
            generating (it is set to record the bundle's neurons; every wrapper of a vector environment can share
            it).
        model: without a policy, the causal LM whose internal signals are read.
        tokenizer: its tokenizer.
        shaping: beta of the potential-based shaping added to the reward (0 = none).
        gamma: discount of the TD error (default: the bundle's, as :class:`SignalReader` uses).
    """

    def __init__(self, env: gymnasium.Env, bundle: SubsystemBundle | str | Path, policy: LLMPolicy | None = None, *,
                 model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 shaping: float = 0.0, gamma: float | None = None):
        super().__init__(env)
        if policy is not None:
            if model is not None and unwrap_model(model) is not unwrap_model(policy.model):
                raise ValueError("InternalRPE got a policy and a different model=: the signals are read from the "
                                 "policy's model; drop model= (and tokenizer=)")
            model, tokenizer = policy.model, tokenizer or policy.tokenizer
        if model is None or tokenizer is None:
            raise TypeError("InternalRPE needs policy= (an rpe.envs.LLMPolicy acting in the environment) or "
                            "model= and tokenizer=")
        self.reader = SignalReader(bundle, model, tokenizer)
        bundle = self.reader.bundle  # loaded when a folder was given
        self.policy = policy
        if policy is not None:
            policy.record(bundle.layer, self.reader.columns)
        if gamma is not None:
            self.reader.gamma = gamma
        self.bundle = bundle
        self.model = unwrap_model(model)
        self.tokenizer = tokenizer
        self.shaping = float(shaping)
        self._prompt_ids: list[int] = []
        self._fed: list[int] = []
        self._acts: torch.Tensor | None = None
        self._cache = None
        self._values: list[float] = []

    # -- incremental reading -----------------------------------------------------------------------------
    def _feed(self, ids: list[int]) -> None:
        """Bring the cache and the recorded columns up to ``ids`` (re-feeding from where they differ)."""
        from transformers import DynamicCache

        from rpe.decoding import feed_tokens
        from rpe.kvcache import cache_is_plain, common_prefix_len, crop_cache

        keep = common_prefix_len([self._fed, ids])
        if keep == len(ids):  # nothing new (an empty step): the last token must still be recomputed
            keep -= 1
        # a sliding-window cache cannot be cut back to a shorter prefix (it no longer holds the early tokens)
        must_refeed = keep < len(self._fed) and not cache_is_plain(self.model)
        if self._cache is None or keep == 0 or must_refeed:
            self._cache, keep = DynamicCache(config=self.model.config), 0
        elif keep < len(self._fed):
            crop_cache(self._cache, keep)
        with ActivationTracker(self.model, [self.bundle.layer], neurons=self.reader.columns, record_all=True) as tr, \
                torch.inference_mode():
            feed_tokens(self.model, self._cache, ids[keep:], keep)
        got = tr.generated()[self.bundle.layer][0].float().cpu()
        self._acts = got if keep == 0 or self._acts is None else torch.cat([self._acts[:keep], got])
        self._fed = list(ids)

    def _text(self) -> str:
        """The transcript as the next step's context (the observation a policy acts on; its separator unread)."""
        from rpe.envs.reasoning_env import STEP_SEPARATOR

        u = self.env.unwrapped
        return u.prompt + (u.completion + STEP_SEPARATOR if u.steps else "")

    def _read(self):
        """Signals of the transcript so far (from recorded columns: the policy's, or the wrapper's own forward)."""
        if self.policy is not None:  # what the policy recorded while writing the step (it feeds anything else)
            text = self._text()
            ids = self.policy.encode(text)
            if not self._prompt_ids:
                self.bundle.check_prompt_tokens([ids], self.tokenizer)  # LLMPolicy(add_special_tokens=...) fixes it
                self._prompt_ids = ids
            if ids[: len(self._prompt_ids)] != self._prompt_ids:
                raise RuntimeError("the policy's tokens of this transcript do not start with its prompt's tokens; was "
                                   "the observation cut by max_chars?")
            comp_ids = ids[len(self._prompt_ids):]
            spans = self.reader.step_spans(comp_ids) if comp_ids else []
            # activations through the last step's last token (V(s_t) and the step's dopamine mean)
            _, self._acts = self.policy.observe(text, upto=len(self._prompt_ids) + (spans[-1][1] if spans else 0))
        else:
            completion = self.env.unwrapped.completion
            comp_ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"] if completion else []
            self._feed(self._prompt_ids + comp_ids)
            spans = self.reader.step_spans(comp_ids) if comp_ids else []
        p = len(self._prompt_ids)
        assert self._acts is not None
        points = self._acts[[p - 1] + [p + e - 1 for _, e in spans]]
        means = torch.stack([self._acts[p + a : p + b].mean(0) for a, b in spans]) if spans else self._acts[:0]
        return self.reader._signals(points, means, spans)

    # -- gymnasium -----------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._prompt_ids = ([] if self.policy is not None  # the policy's tokens, set by the first read
                            else self.bundle.encode_text(self.tokenizer, self.env.unwrapped.prompt))
        self._fed, self._acts, self._cache = [], None, None
        sig = self._read()
        self._values = [float(sig.values[0])]
        return obs, {**info, "internal_value": self._values[0]}

    def step(self, action: str):
        obs, reward, terminated, truncated, info = self.env.step(action)
        sig = self._read()
        v_prev, v = self._values[-1], float(sig.values[-1])
        self._values.append(v)
        gamma = self.reader.gamma
        delta = float(td_errors([v_prev, v], gamma, reward=float(reward) if terminated else None)[-1])
        dopamine = float(sig.dopamine[-1]) if len(sig.dopamine) else 0.0
        potential_next = 0.0 if terminated else v
        shaped = float(reward) + self.shaping * (gamma * potential_next - v_prev)
        info = {**info, "internal_value": v, "internal_rpe": delta, "dopamine": dopamine,
                "reward_unshaped": float(reward)}
        return obs, shaped, terminated, truncated, info

    @property
    def internal_values(self) -> np.ndarray:
        """V(s_0..s_t) of the current episode."""
        return np.array(self._values)


__all__ = ["InternalRPE"]
