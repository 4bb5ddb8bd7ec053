"""KV caches for prompts that share a prefix: the few-shot examples encoded once and their cache copied into every
row, right-padded batches after a cached prefix, and the cache surgery the decode loops need (crop, stack).

Every generation engine (:mod:`rpe.generation`, :mod:`rpe.decoding`, :class:`rpe.envs.LLMPolicy`) and every
forward-only read (:mod:`rpe.store`, :mod:`rpe.signals`, :mod:`rpe.baselines`) builds on it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch


def plain_cache_refusal(model) -> str | None:
    """Why the generation paths that edit a cache cannot serve ``model``, or None when they can.

    The continuous engine, prefix reuse under ``model.generate`` and :class:`rpe.envs.LLMPolicy` copy, pad,
    stack and crop a cache's keys and values as plain (batch, heads, length, dim) tensors that grow with the
    sequence, with padding between a shared prefix and each row's tokens. That is exact for full-attention
    layers (transformers' ``DynamicLayer``): positions come from the attention mask. A sliding-window layer
    keeps only its last ``window`` positions and masks by cache index, so padding inside the cache would move
    real tokens out of its window: such models (Gemma-3's local layers, Mistral or Qwen2 with a sliding window)
    generate with plain ``model.generate``, whose cache transformers manages.

    Forward-only reads (:func:`rpe.store.capture_states`, :class:`rpe.signals.SignalReader`, the baselines)
    reuse a shared prefix on every architecture: their rows are padded on the right, after the cached prefix,
    which a sliding-window layer handles exactly (tests/test_architectures.py: Gemma-3 with a window of 16 and a
    43-token prefix equals a plain forward).

    The decision is read from the cache layers ``DynamicCache(config=model.config)`` builds, not from the
    model's name.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception as err:  # a config transformers cannot lay a cache out for
        return f"transformers cannot lay out a cache for its config ({type(err).__name__}: {err})"
    other = [layer for layer in layers if type(layer) is not DynamicLayer]
    if not other:
        return None
    kinds = sorted({type(layer).__name__ for layer in other})
    windows = sorted({int(w) for layer in other if (w := getattr(layer, "sliding_window", None))})
    window = f" (window {', '.join(map(str, windows))} tokens)" if windows else ""
    return (f"{len(other)} of its {len(layers)} cache layers are {', '.join(kinds)}{window}, not plain full-attention "
            f"layers")


def cache_is_plain(model) -> bool:
    """True when every layer of ``model``'s cache is plain full attention (:func:`plain_cache_refusal`)."""
    return plain_cache_refusal(model) is None



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
    """KV cache of a shared prompt prefix (e.g. the few-shot examples), computed once, batch size 1 (sliding-window
    layers keep their window; rows that follow must be padded on the right, see :func:`plain_cache_refusal`)."""
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


def crop_cache(cache, keep: int) -> None:
    """Keep the first ``keep`` positions of every layer's keys and values (in place; transformers' own ``crop``
    changed meaning across versions)."""
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, :keep]
        layer.values = layer.values[:, :, :keep]



def stack_caches(caches: Sequence, pads: Sequence[int]):
    """One batch cache from ``caches`` (each of any batch size), the rows of cache i left-padded by ``pads[i]``
    masked positions: one allocation per layer (padding, then appending caches one at a time, copies the growing
    batch again for every cache). The result reuses the first cache object; the others are left as they were."""
    first = caches[0]
    for idx, layer in enumerate(first.layers):
        for name in ("keys", "values"):
            parts = [getattr(c.layers[idx], name) for c in caches]
            width = max(t.shape[2] + pad for t, pad in zip(parts, pads))
            ref = parts[0]
            out = ref.new_zeros(sum(t.shape[0] for t in parts), ref.shape[1], width, ref.shape[3])
            row = 0
            for t, pad in zip(parts, pads):
                out[row : row + t.shape[0], :, pad : pad + t.shape[2]] = t
                row += t.shape[0]
            setattr(layer, name, out)
    return first



def cache_nbytes(cache) -> int:
    """Bytes held by a cache's keys and values (every layer; layers not filled yet count 0)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def cache_len(cache) -> int:
    return int(cache.layers[0].keys.shape[2])



__all__ = ["batched_cache_kwargs", "cache_kwarg", "cache_len", "cache_nbytes", "common_prefix_len", "crop_cache",
           "cache_is_plain", "plain_cache_refusal", "prefix_cache", "right_pad", "shared_prefix_len", "stack_caches"]
