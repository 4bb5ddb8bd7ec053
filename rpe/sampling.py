"""What every generation engine shares: sampling settings, the generated-batch record, stop strings, end-of-
sequence ids, and the KV-cache helpers for a prompt prefix shared by a batch (the few-shot examples encoded once).

:mod:`rpe.generation` (one padded ``model.generate`` per batch) and :mod:`rpe.decoding` (continuous batching)
both build on it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rpe.segment import token_char_ends

#: Architectures on which generating from a shared-prefix KV cache was checked to give identical tokens
#: (tests/test_rollouts.py). Others (e.g. Gemma3's sliding-window layers) take the plain padded path.
PREFIX_REUSE_MODEL_TYPES = frozenset({"llama", "qwen2"})


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


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all ``seqs``."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        tok = first[i]
        if any(s[i] != tok for s in seqs):
            return i
    return n


def right_pad(seqs: Sequence[Sequence[int]], pad_token_id: int, prefix_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token sequences for one forward pass.

    Args:
        seqs: token ids per row (after a cached prefix of ``prefix_len`` tokens, when there is one).
        prefix_len: length of a KV-cached prefix shared by every row; the mask covers it.

    Returns:
        ``(input_ids (B, T), attention_mask (B, prefix_len + T))``, long tensors.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), prefix_len + width), dtype=torch.long)
    mask[:, :prefix_len] = 1
    for r, seq in enumerate(seqs):
        ids[r, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[r, prefix_len : prefix_len + len(seq)] = 1
    return ids, mask


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument of ``model.forward``: ``cache`` (transformers >= 5.2x) or the older
    ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def shared_prefix_len(seqs: Sequence[Sequence[int]], min_prefix: int = 1) -> int:
    """Length of the prefix all ``seqs`` share that leaves every row at least one token of its own (so the
    row's last token is computed after the cache), or 0 when that is shorter than ``min_prefix``."""
    n = min(common_prefix_len(seqs), min(len(s) for s in seqs) - 1)
    return n if n >= min_prefix else 0


def prefix_cache(model, prefix: list[int], device):
    """KV cache of a shared prompt prefix (e.g. the few-shot examples), computed once, batch size 1."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([prefix], device=device), use_cache=True, **{cache_kwarg(model): cache})
    return cache


def batched_cache_kwargs(model, cache, batch_size: int, *, keep_original: bool = True) -> dict:
    """Forward/generate keyword arguments carrying a batch-1 prefix ``cache`` repeated for ``batch_size``
    rows. With ``keep_original`` the cache is copied first, so it can serve the next batch too."""
    batch = copy.deepcopy(cache) if keep_original else cache
    batch.batch_repeat_interleave(batch_size)
    return {cache_kwarg(model): batch, "use_cache": True}


@dataclass
class GeneratedBatch:
    """Raw output of one batched generation.

    Attributes:
        prompt_ids: per sequence, the prompt token ids (no padding).
        completion_ids: per sequence, generated ids up to and excluding EOS / padding, cut at a stop string.
        texts: decoded completions (special tokens removed, stop string removed).
        finish_reasons: ``eos``, ``stop`` or ``length`` per sequence.
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


__all__ = [
    "PREFIX_REUSE_MODEL_TYPES", "GeneratedBatch", "SamplingConfig", "batched_cache_kwargs", "cache_kwarg", "common_prefix_len", "cut_at_stop", "eos_ids", "prefix_cache", "right_pad", "shared_prefix_len", "split_at_stop",
]
