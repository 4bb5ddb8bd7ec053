"""Sampling: the settings of a run, each row's own random stream, the logits warping (temperature, top-k,
top-p) and the draw of the next token, stop strings and end-of-sequence ids, and the generated-batch record.

:mod:`rpe.generation` (one padded ``model.generate`` per batch), :mod:`rpe.decoding` (continuous batching) and
:class:`rpe.envs.LLMPolicy` sample through it; KV-cache helpers live in :mod:`rpe.kvcache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rpe.segment import token_char_ends


@dataclass
class SamplingConfig:
    """Generation settings shared by every rollout of a run."""

    temperature: float = 0.7
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 50
    """Sample among the k most likely tokens (0 = no limit); 50 is transformers' default."""
    max_new_tokens: int = 128
    """Completion budget in tokens; a completion that hits it is marked truncated."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
        }


# --------------------------------------------------------------------------------------------------------
# shared-prefix KV cache


@dataclass
class GeneratedBatch:
    """Raw output of one batched generation.

    Attributes:
        prompt_ids: per sequence, the prompt token ids (no padding).
        completion_ids: per sequence, generated ids up to and excluding EOS / padding, cut at a stop string.
        texts: decoded completions (special tokens removed, stop string removed).
        finish_reasons: ``eos``, ``stop``, ``length`` or ``value`` (stopped by its internal value) per sequence.
        stop_ids: per sequence, the generated ids cut off after ``completion_ids`` up to the one that completes
            the stop string (empty unless stopped): ``completion_ids + stop_ids`` is the model's own
            tokenisation of the text through the stop string (re-tokenising the stop string can differ, e.g.
            one ``"\n\n"`` token where the model wrote two ``"\n"``).
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    prompt_truncated: list[bool]
    stop_ids: list[list[int]] = field(default_factory=list)
    token_logprobs: list[list[float]] = field(default_factory=list)
    """Per sequence, the log-probability of each token of ``completion_ids`` under the model's raw (untempered)
    distribution; filled only when asked for (``generate_from_ids(..., token_logprobs=True)``)."""
    activations: list[dict[int, torch.Tensor]] = field(default_factory=list)
    """Per sequence, ``{layer: (T, k)}`` block outputs recorded while generating (continuous engine with
    ``record_layers``): the prompt's tokens after the shared prefix, then each generated token that was fed back."""
    prefix_len: int = 0
    """Length of the prompt prefix shared by all rows and encoded once (``activations`` start after it)."""
    activation_positions: list[list[int]] | None = None
    """With boundary-only recording, per sequence the positions (in the coordinates above: prompt tokens after
    the shared prefix, then generated tokens) of the rows of ``activations``; None when every position is kept."""
    stop_values: list[list[float]] | None = None
    """With early stopping (:class:`rpe.rollout_stop.ValueStop`), per sequence the internal value after each step
    it was judged at; its ``finish_reasons`` entry is ``value`` where it was stopped."""


def cut_at_stop(tokenizer, ids: list[int], stop_strings: Sequence[str]) -> tuple[list[int], str, bool]:
    """Cut a completion before the first stop string: ``(ids, text, stopped)``. Tokens whose text ends at or
    before the cut are kept (the last content token stays); a token reaching into the stop string is dropped."""
    return split_at_stop(tokenizer, ids, stop_strings)[:3]


def split_at_stop(tokenizer, ids: list[int], stop_strings: Sequence[str]) -> tuple[list[int], str, bool, list[int]]:
    """:func:`cut_at_stop` plus the cut-off ids up to the one whose text completes the stop string (empty
    unless stopped): ``kept + tail`` is the model's own tokenisation of the text through the stop string."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [(text.find(stop), stop) for stop in stop_strings if stop in text]
    if not hits:
        return ids, text, False, []
    cut, stop = min(hits)  # the earliest stop string
    ends = token_char_ends(tokenizer, ids)
    kept = next((i for i, e in enumerate(ends) if e > cut), len(ids))
    last = next((i for i, e in enumerate(ends) if e >= cut + len(stop)), len(ids) - 1)
    return ids[:kept], text[:cut], True, ids[kept : last + 1]


def eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end a completion: the generation config's EOS ids, the tokenizer's EOS and its pad."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        ids.add(tokenizer.pad_token_id)
    return ids


def logits_device(model) -> torch.device:
    """Where ``model``'s logits appear: its output embedding's device (under a ``device_map`` that is the last
    shard's, not the first parameter's)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


def row_generator(seed: int, index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The sampling stream of row ``index`` under ``seed``, on ``device`` (the device of the logits it will sample:
    ``torch.multinomial`` refuses a generator on another device).

    The contract, per device: the same ``(seed, index)`` gives the same completion on one device type whatever the
    batch, and CPU and CUDA streams differ from each other (torch's CPU and CUDA generators are different
    algorithms), so rollouts record the device they sampled on.
    """
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(index))


def stream_seed(*key: object) -> int:
    """A sampling seed named by ``key`` (e.g. ``(run seed, trajectory id, state, continuation)``): the same key
    gives the same seed in any process, batch or order, and two keys collide with probability 2^-63 (sha256 of
    the key's text). A row's entry in ``row_seeds`` of :func:`rpe.generation.generate_from_ids` seeds that
    row's generator directly."""
    import hashlib

    digest = hashlib.sha256("\x1f".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # [0, 2**63): a valid torch.Generator seed



def warp_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """(B, V) logits -> (B, V) float32 sampling probabilities through transformers' own warpers (temperature, then
    top-k, then top-p: ``model.generate``'s order and tie rules)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return LogitsProcessorList(warpers)(None, logits.float()).softmax(-1)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """One device: the same type and, but for the CPU (one device, any index), the same index."""
    return a.type == b.type and (a.type == "cpu" or a.index == b.index)


def next_tokens(logits: torch.Tensor, sampling: SamplingConfig, generators: Sequence[torch.Generator]) -> list[int]:
    """One token per row of (B, V) ``logits``: the argmax at temperature 0, else a draw from the warped
    distribution with row ``j``'s own generator."""
    if sampling.temperature <= 0:
        return logits.argmax(-1).tolist()
    probs = warp_logits(logits, sampling)
    wrong = {str(g.device) for g in generators if not _same_device(g.device, probs.device)}
    if wrong:
        raise ValueError(f"sampling generators on {', '.join(sorted(wrong))} for logits on {probs.device}: make them "
                         f"with row_generator(seed, index, device=logits.device)")
    return [int(torch.multinomial(probs[j], 1, generator=g)) for j, g in enumerate(generators)]



def hits_stop(tokenizer, generated: Sequence[int], stop_strings: Sequence[str]) -> bool:
    """Whether the text of the last generated tokens contains a stop string (checked after every token)."""
    longest = max((len(s) for s in stop_strings), default=0)
    if not longest:
        return False
    tail = tokenizer.decode(list(generated[-(longest + 8):]), skip_special_tokens=True)
    return any(s in tail for s in stop_strings)



__all__ = ["GeneratedBatch", "SamplingConfig", "cut_at_stop", "eos_ids", "hits_stop", "logits_device", "next_tokens",
           "row_generator", "stream_seed",
           "split_at_stop", "warp_logits"]
