"""Internal signals of token sequences read through a bundle: value V(s_t), RPE delta_t, dopamine activity.

For a prompt and a completion (token ids), the completion is split into reasoning steps (the bundle's
segmenter, paragraphs by default). The states are s_0 = the last prompt token and s_t = the last token of
step t. Then:

- ``values``: V(s_0..s_T) in [0, 1], the bundle's value probe on the value neurons;
- ``rpe``: delta_t = gamma * V(s_t) - V(s_{t-1}) for t = 1..T (internal reward-prediction error: the model's
  own change of expectation over step t; no external reward enters);
- ``dopamine``: per step, the mean over the step's tokens of the dopamine neurons' activity, each neuron
  standardised with the statistics stored in the bundle and multiplied by its sign (so it rises with RPE).

:class:`SignalReader` gets the activations with one hooked forward per batch (only the bundle's layer, only
the value and dopamine columns, stopped after that layer) or, with no forward at all, from activations
recorded while the same sequences were generated (:class:`GenerationCapture`).

Example (a tiny random Llama and a random bundle for it; use your model and ``SubsystemBundle.load``):
    >>> from rpe.bundle import random_bundle
    >>> from rpe.tiny import tiny_model
    >>> model, tok = tiny_model()
    >>> bundle = random_bundle(model, tok)
    >>> prompt = tok("Question: 2 + 3?\\n", add_special_tokens=False)["input_ids"]
    >>> completion = tok("2 + 3 = 5.\\n\\nThe answer is 5.", add_special_tokens=False)["input_ids"]
    >>> sig = SignalReader(bundle, model, tok).read([prompt], [completion])[0]
    >>> len(sig.values), len(sig.rpe), len(sig.dopamine)      # V(s_0..s_2), delta_1..2, one per step
    (3, 2, 2)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from rpe.bundle import SubsystemBundle
from rpe.models import eval_mode, unwrap_model
from rpe.probe import td_errors
from rpe.segment import Segmenter
from rpe.tracker import check_finite

logger = logging.getLogger(__name__)

SCALAR_SIGNALS: tuple[str, ...] = ("value_s0", "value_final", "rpe_sum", "rpe_abs_mean", "rpe_min", "rpe_max", "rpe_last", "dopamine")
"""Per-sequence summaries :meth:`SequenceSignals.scalar` knows."""

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase



@dataclass
class SequenceSignals:
    """Internal signals of one prompt + completion.

    Attributes:
        values: (T + 1,) V(s_0..s_T) in [0, 1].
        rpe: (T,) delta_t = gamma * V(s_t) - V(s_{t-1}) (:func:`rpe.probe.td_errors` without a reward: the
            model's own signal, which has seen no reward).
        dopamine: (T,) signed standardised dopamine-neuron activity per step (empty when the bundle has no
            dopamine neurons).
        step_spans: T half-open token spans ``(start, end)`` of the steps inside the completion.
        value_acts: (T + 1, k) raw activations of the value neurons at s_0..s_T (what an online critic trains on).
    """

    values: np.ndarray
    rpe: np.ndarray
    dopamine: np.ndarray
    step_spans: list[tuple[int, int]] = field(default_factory=list)
    value_acts: torch.Tensor | None = None

    @property
    def n_steps(self) -> int:
        return len(self.step_spans)

    def scalar(self, name: str) -> float:
        """One number per sequence: ``value_s0``, ``value_final``, ``rpe_sum``, ``rpe_abs_mean``, ``rpe_min``,
        ``rpe_max``, ``rpe_last`` or ``dopamine`` (mean over steps). RPE summaries of a completion with no
        step are 0; dopamine without dopamine neurons or steps is NaN."""
        if name == "value_s0":
            return float(self.values[0])
        if name == "value_final":
            return float(self.values[-1])
        if name.startswith("rpe_"):
            if not self.rpe.size:
                return 0.0
            fn = {"rpe_sum": np.sum, "rpe_abs_mean": lambda r: np.abs(r).mean(), "rpe_min": np.min, "rpe_max": np.max,
                  "rpe_last": lambda r: r[-1]}.get(name)
            if fn is None:
                raise ValueError(f"unknown signal {name!r}; choose one of {', '.join(SCALAR_SIGNALS)}")
            return float(fn(self.rpe))
        if name == "dopamine":
            return float(self.dopamine.mean()) if self.dopamine.size else float("nan")
        raise ValueError(f"unknown signal {name!r}; choose one of {', '.join(SCALAR_SIGNALS)}")


class SignalReader:
    """Reads :class:`SequenceSignals` for (prompt ids, completion ids) pairs through a bundle.

    Args:
        bundle: a :class:`rpe.bundle.SubsystemBundle` fitted on this model, or its folder (checked).
        model: the causal LM (a PEFT wrapper is fine: the base model's blocks are hooked, adapters included).
        tokenizer: its tokenizer (decodes completions to find step boundaries).
        segmenter: how completions split into steps (``paragraph`` as in ``rpe rollouts``).
        pattern: separator regex for ``segmenter="regex"``.
        batch_size: sequences per hooked forward.
        check: verify the bundle's fingerprint against the model (once, here).
    """

    def __init__(self, bundle: SubsystemBundle | str | Path, model: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase, *, segmenter: Segmenter = "paragraph", pattern: str | None = None,
                 batch_size: int = 16, check: bool = True):
        if check or not isinstance(bundle, SubsystemBundle):
            bundle = SubsystemBundle.resolve(bundle, unwrap_model(model), tokenizer)
        self.bundle = bundle
        self.model = model
        self.tokenizer = tokenizer
        self.segmenter = segmenter
        self.pattern = pattern
        self.batch_size = batch_size
        self.k = int(bundle.value_neurons.numel())
        self.columns = torch.cat([bundle.value_neurons.long(), bundle.dopamine_neurons.long()])
        self.gamma = float(bundle.probe_config.gamma)
        self.last_recomputed = 0
        """Rows of the last :meth:`from_recorded` call that needed a forward (last token never fed back)."""

    # -- step boundaries -------------------------------------------------------------------------------
    def step_spans(self, completion_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Token spans of the completion's steps (a trailing EOS is not part of any step, so the last state is the
        last content token, which generation has already fed back to the model)."""
        from rpe.rollouts import make_steps

        ids = list(completion_ids)
        special = set(self.tokenizer.all_special_ids)
        while ids and ids[-1] in special:  # a trailing EOS/pad is not part of the last step
            ids.pop()
        text = self.tokenizer.decode(ids, skip_special_tokens=True)  # as generation decodes it (rpe rollouts)
        steps = make_steps(self.tokenizer, ids, text, self.segmenter, self.pattern, skip_special_tokens=True)
        return [(s.token_start, s.token_end) for s in steps]

    # -- from activations ------------------------------------------------------------------------------
    def _signals(self, point_acts: torch.Tensor, span_acts: torch.Tensor, spans: list[tuple[int, int]]) -> SequenceSignals:
        """``point_acts``: (T + 1, k + m) at s_0..s_T; ``span_acts``: (T, k + m) step means."""
        values = self.bundle.probe.predict(point_acts[:, : self.k]).double().numpy()
        rpe = td_errors(values, self.gamma)  # the model's own signal: no reward seen
        m = self.columns.numel() - self.k
        if m and len(spans):
            d = span_acts[:, self.k :].double()
            mean, std = self.bundle.dopamine_stats()
            dopamine = (((d - mean.double()) / std.double()) * self.bundle.dopamine_sign.double()).mean(1).numpy()
        else:
            dopamine = np.zeros(0)
        return SequenceSignals(values=values, rpe=rpe, dopamine=dopamine, step_spans=spans,
                               value_acts=point_acts[:, : self.k].float().clone())

    def read(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
             spans: Sequence[list[tuple[int, int]]] | None = None, *, reuse_prefix: bool = True,
             min_prefix: int = 32) -> list[SequenceSignals]:
        """Signals of each pair, one hooked forward per ``batch_size`` sequences.

        Args:
            prompt_ids: token ids of each prompt (no padding), tokenised as the bundle's prompts were (a BOS
                where they began with one: :meth:`rpe.bundle.SubsystemBundle.check_prompt_tokens` refuses others).
            completion_ids: token ids of each completion (no padding; a trailing EOS is fine).
            spans: the steps' token spans per completion when already known (e.g. from a rollout record);
                by default the completion is segmented with the reader's segmenter.
            reuse_prefix: when all prompts share a prefix of ``min_prefix`` or more tokens (the few-shot
                examples), encode it once and reuse its KV cache (same activations, several times faster).
        """
        from rpe.kvcache import batched_cache_kwargs, prefix_cache, right_pad, shared_prefix_len
        from rpe.tracker import ActivationTracker

        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
        if any(not p for p in prompt_ids):
            raise ValueError("a prompt has no tokens: s_0 (the last prompt token) is undefined")
        self.bundle.check_prompt_tokens(prompt_ids, self.tokenizer)
        base = unwrap_model(self.model)
        device = next(base.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # the shared prefix must end before every s_0 (the last prompt token), so s_0 is computed with hooks on
        pre = shared_prefix_len([list(p) for p in prompt_ids], min_prefix) if reuse_prefix and len(prompt_ids) > 1 else 0
        out: list[SequenceSignals] = []
        # eval mode (the trainer calls in training mode): no dropout, and no gradient checkpointing, which on
        # older transformers drops the prefix cache while the mask keeps its length
        with eval_mode(base):
            cache = prefix_cache(base, list(prompt_ids[0][:pre]), device) if pre else None
            with ActivationTracker(base, [self.bundle.layer], neurons=self.columns) as tracker:
                for start in range(0, len(prompt_ids), self.batch_size):
                    prompts = [list(p) for p in prompt_ids[start : start + self.batch_size]]
                    comps = [list(c) for c in completion_ids[start : start + self.batch_size]]
                    all_spans = ([list(x) for x in spans[start : start + self.batch_size]] if spans is not None
                                 else [self.step_spans(c) for c in comps])
                    for c, sp in zip(comps, all_spans):
                        if sp and (min(a for a, _ in sp) < 0 or max(b for _, b in sp) > len(c) or any(b <= a for a, b in sp)):
                            raise ValueError(f"step spans {sp} do not fit a completion of {len(c)} tokens")
                    rows, starts, ends, layout = [], [], [], []
                    for r, (p, row_spans) in enumerate(zip(prompts, all_spans)):
                        n = len(p) - pre  # positions are relative to the part after the cached prefix
                        points = [(n - 1, n)] + [(n + e - 1, n + e) for _, e in row_spans]
                        means = [(n + a, n + b) for a, b in row_spans]
                        layout.append((len(rows), len(points), len(means)))
                        for a, b in points + means:
                            rows.append(r)
                            starts.append(a)
                            ends.append(b)
                    ids, mask = right_pad([(p + c)[pre:] for p, c in zip(prompts, comps)], pad, pre)
                    tracker.select(rows, starts, ends)
                    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
                    if cache is not None:
                        inputs.update(batched_cache_kwargs(base, cache, len(prompts)))
                    acts = tracker.forward(**inputs)[self.bundle.layer]
                    check_finite(acts, self.bundle.layer, where=" while reading internal signals")
                    for (first, n_points, n_means), row_spans in zip(layout, all_spans, strict=True):
                        point = acts[first : first + n_points]
                        span = acts[first + n_points : first + n_points + n_means]
                        out.append(self._signals(point, span, row_spans))
        return out

    def from_recorded(self, recorded: torch.Tensor, width: int, completion_ids: Sequence[Sequence[int]],
                      prompt_ids: Sequence[Sequence[int]] | None = None) -> list[SequenceSignals]:
        """Signals from activations recorded during a left-padded ``generate`` (no forward pass).

        Args:
            recorded: (B, width + n_generated - 1, k + m) columns :attr:`columns` of the bundle layer.
            width: padded prompt length (completion token j sits at position ``width + j``).
            completion_ids: the B completions as generated (unpadded).
            prompt_ids: the B prompts, needed only for rows whose last state was never fed back to the model
                (a completion cut at the generation limit); those rows get one hooked forward.
        """
        if prompt_ids is not None:
            self.bundle.check_prompt_tokens(prompt_ids, self.tokenizer)
        out: list[SequenceSignals | None] = []
        redo: list[int] = []
        total = recorded.shape[1]
        for i, comp in enumerate(completion_ids):
            spans = self.step_spans(comp)
            positions = [width - 1] + [width + e - 1 for _, e in spans]
            if positions[-1] >= total:
                redo.append(i)
                out.append(None)
                continue
            row = recorded[i].float()
            check_finite(row[positions], self.bundle.layer, where=" while reading internal signals")
            csum = torch.cat([torch.zeros_like(row[:1]), row.cumsum(0)])
            means = torch.stack([(csum[width + b] - csum[width + a]) / (b - a) for a, b in spans]) if spans else row[:0]
            out.append(self._signals(row[positions], means, spans))
        self.last_recomputed = len(redo)
        if redo:
            if prompt_ids is None:
                raise ValueError("prompt_ids are needed to recompute completions that reached the generation limit")
            again = self.read([prompt_ids[i] for i in redo], [completion_ids[i] for i in redo])
            for i, sig in zip(redo, again):
                out[i] = sig
        return out  # type: ignore[return-value]


@dataclass
class CapturedGeneration:
    """One ``generate`` call seen by :class:`GenerationCapture`.

    Attributes:
        prompt_ids: B unpadded prompts (from the attention mask of the left-padded input).
        completion_ids: (B, n_generated) generated tokens, padded after EOS.
        width: padded prompt length.
        recorded: (B, width + n_generated - 1, k + m) activations of the captured columns.
    """

    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor
    width: int
    recorded: torch.Tensor


class GenerationCapture:
    """Records the bundle layer's value and dopamine columns during every ``model.generate`` call.

    ``generate`` is wrapped on the model *instance* (nothing global); inside the wrapper an
    :class:`rpe.tracker.ActivationTracker` in generation mode is active for exactly that call, so its hooks
    never outlive it. :meth:`remove` (or leaving the ``with`` block) restores the original ``generate``.
    Only left-padded, KV-cached generation is captured exactly; anything else simply does not match in
    :meth:`match` and callers fall back to a hooked forward.

    Args:
        model: the policy (PEFT wrapper or plain transformers model): the object whose ``generate`` the
            trainer calls.
        layer: decoder block to read.
        columns: neuron indices to keep, (k + m,).
    """

    def __init__(self, model, layer: int, columns: torch.Tensor):
        self.model = model
        self.layer = layer
        self.columns = columns
        self.last: CapturedGeneration | None = None
        self._installed = False

    def install(self) -> GenerationCapture:
        if self._installed:
            return self
        original = self.model.generate  # bound method
        capture = self

        def generate(*args, **kwargs):
            from rpe.tracker import ActivationTracker

            input_ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            with ActivationTracker(unwrap_model(capture.model), [capture.layer], neurons=capture.columns,
                                   record_all=True) as tracker:
                result = original(*args, **kwargs)
            sequences = result if isinstance(result, torch.Tensor) else getattr(result, "sequences", None)
            recorded = tracker.generated().get(capture.layer)
            if input_ids is None or sequences is None or recorded is None:
                capture.last = None
                return result
            width = input_ids.shape[1]
            mask = torch.ones_like(input_ids) if mask is None else mask
            prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), mask.cpu())]
            capture.last = CapturedGeneration(prompts, sequences[:, width:].cpu(), width, recorded)
            return result

        self.model.generate = generate  # instance attribute shadows the class method
        self._installed = True
        return self

    def remove(self) -> None:
        """Restore the model's own ``generate`` (idempotent)."""
        if self._installed:
            try:
                del self.model.generate
            except AttributeError:
                pass
            self._installed = False
        self.last = None

    def __enter__(self) -> GenerationCapture:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def match(self, completion_ids: Sequence[Sequence[int]]) -> CapturedGeneration | None:
        """The last capture when it generated exactly these completions (same rows, same order), else None."""
        cap = self.last
        if cap is None or cap.completion_ids.shape[0] != len(completion_ids):
            return None
        for row, comp in zip(cap.completion_ids, completion_ids):
            comp = list(comp)
            if len(comp) > row.numel() or row[: len(comp)].tolist() != comp:
                return None
        return cap


__all__ = ["SCALAR_SIGNALS", "CapturedGeneration", "GenerationCapture", "SequenceSignals", "SignalReader"]
