"""Shared-prefix attention: one physical copy of a prompt prefix that every row of a batch attends to.

Rows that share a prompt (the few-shot examples of every rollout, the N continuations of one state, the
completions of one GRPO prompt) all attend to the same keys and values for that prefix. Copying the prefix's
cache into every row, as :func:`rpe.kvcache.batched_cache_kwargs` does, makes each decode step read it once per
row: at batch 32 with a 600-token few-shot prefix that is most of a step's memory traffic on SmolLM2
(docs/benchmarks.md). Here the prefix's keys and values are stored once (batch dimension 1, a
:class:`SharedPrefix`) and each row's cache holds its own tokens only; at every step attention is computed over
the two parts separately and merged exactly, by the log-sum-exp of the two partial softmaxes (the cascade
attention of FlashInfer, the shared blocks of vLLM's prefix caching):

    o = exp(lse_p - lse) * softmax(q K_p^T) V_p + exp(lse_s - lse) * softmax(q K_s^T + mask) V_s,
    lse = log(exp(lse_p) + exp(lse_s)),   lse_x = logsumexp of the scaled scores over part x,

where every row attends to the whole prefix (the prefix is never padded) and the row part carries the usual
causal and padding mask. The prefix part is one matrix product per key-value head with the batch folded into
the query rows, so the prefix is read once per step, whatever the batch size. On CPU both parts go through
torch's fused flash kernel (which returns the log-sum-exp); elsewhere they are written out in float32 (correct,
not fused: a fused GPU kernel with its log-sum-exp is the next step where GPUs matter).

It plugs into transformers through its attention interface: :func:`prefix_attention` switches a model to the
attention function ``rpe_shared_prefix`` for the duration of a ``with`` block (and back, always), and a
forward given ``shared_prefix=`` (passed down to every attention layer with the model's keyword arguments)
attends to that prefix besides its cache. The row cache is a plain ``transformers.DynamicCache`` whose
positions start after the prefix: position ids must be given explicitly (they start at the prefix length) and
the 2-D attention mask covers the row part only. A forward without ``shared_prefix=`` inside the block is plain
attention over its cache.

Supported where every cache layer is full attention (:func:`rpe.kvcache.plain_cache_refusal`) and attention
has no logit soft-capping or sinks: Llama, Qwen2, Qwen3, Mistral, Phi-3 (tests/test_prefix_attention.py). The
registration of ``rpe_shared_prefix`` in transformers' attention registries is global but inert: nothing uses it
unless a model is switched to it inside :func:`prefix_attention`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rpe.kvcache import plain_cache_refusal

ATTENTION_NAME = "rpe_shared_prefix"
"""The name ``rpe_shared_prefix`` is registered under in transformers' attention and mask interfaces."""


@dataclass
class SharedPrefix:
    """The keys and values of a prefix every row shares, stored once.

    Attributes:
        keys: per decoder layer, (1, kv_heads, P, head_dim) keys (rotary positions 0..P-1 applied).
        values: per decoder layer, (1, kv_heads, P, head_dim) values.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def from_cache(cls, cache) -> SharedPrefix:
        """The prefix held by a batch-1 ``transformers`` cache (e.g. :func:`rpe.kvcache.prefix_cache`)."""
        keys = [layer.keys for layer in cache.layers]
        if any(k is None or k.shape[0] != 1 for k in keys):
            raise ValueError("SharedPrefix.from_cache needs a filled cache of batch size 1 (one prefix)")
        return cls(keys, [layer.values for layer in cache.layers])

    @property
    def length(self) -> int:
        """P, the prefix's length in tokens."""
        return int(self.keys[0].shape[2])

    @property
    def nbytes(self) -> int:
        """Bytes of the stored keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def prefix_attention_refusal(model) -> str | None:
    """Why shared-prefix attention cannot serve ``model``, or None when it can."""
    refusal = plain_cache_refusal(model)
    if refusal is not None:
        return refusal
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(cfg, "attn_logit_softcapping", None):
        return "its attention soft-caps the logits"
    if any(name.endswith("sinks") for name, _ in model.named_parameters()):
        return "its attention has sink logits"
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
    if ATTENTION_NAME not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)  # an additive (B, 1, q, kv) mask, always built


@contextmanager
def prefix_attention(model) -> Iterator[None]:
    """Run ``model``'s attention through :func:`shared_prefix_attention` inside the block; its attention
    implementation is restored on exit, also after an error.

    Raises:
        ValueError: the model's attention cannot be served (sliding windows, soft-capping, sinks), naming why.
    """
    refusal = prefix_attention_refusal(model)
    if refusal is not None:
        raise ValueError(f"shared-prefix attention cannot serve this {model.config.model_type} model ({refusal}); "
                         f"generate with the prefix copied into every row (share_prefix=False)")
    with switched_attention(model):
        yield


@contextmanager
def switched_attention(model) -> Iterator[None]:
    """:func:`prefix_attention` without its check, for callers that ran :func:`prefix_attention_refusal` already."""
    _register()
    configs = {id(c): c for c in (model.config, *(m.config for m in model.modules() if hasattr(m, "config")))}
    before = {key: c._attn_implementation for key, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = ATTENTION_NAME
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = before[key]


def _fused_cpu_attention():
    """torch's fused CPU attention that also returns the log-sum-exp (a flash kernel, bf16 and fp32), or None."""
    return getattr(getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None), "default", None)


def _partial(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(scale q k^T + mask) v in float32, logsumexp of the scaled, masked scores) for (N, H, L, d)
    ``query`` against (N, H, S, d) ``key``/``value``; ``mask`` additive, (N, 1, L, S) or None. On CPU through
    torch's fused flash kernel, elsewhere written out (scores in float32)."""
    fused = _fused_cpu_attention() if query.device.type == "cpu" else None
    if fused is not None:
        out, lse = fused(query, key, value, attn_mask=None if mask is None else mask.to(query.dtype), scale=scale)
        return out.float(), lse.float()
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).to(value.dtype)
    return torch.matmul(probs, value).float(), lse


def shared_prefix_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            shared_prefix: SharedPrefix | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention over a shared prefix and each row's own keys, merged by log-sum-exp (the module docstring).

    Args:
        module: the attention layer (its ``layer_idx`` picks the prefix's layer).
        query: (B, heads, q, head_dim), rotary positions applied.
        key, value: (B, kv_heads, S, head_dim), the rows' own part (their cache and the new tokens).
        attention_mask: (B, 1, q, S) additive mask of the rows' part (``eager_mask``), or None (no masking).
        scaling: the score scale (default head_dim ** -0.5).
        shared_prefix: the prefix every row attends to in full; None attends to ``key`` only.

    Returns:
        ``(output (B, q, heads, head_dim) in the query's dtype, None)``, as transformers' attention functions.
    """
    if dropout:
        raise ValueError("shared-prefix attention is for inference: attention dropout must be 0 (call model.eval())")
    b, heads, q, d = query.shape
    kv_heads = key.shape[1]
    rep = heads // kv_heads
    scale = d**-0.5 if scaling is None else scaling
    grouped = query.reshape(b, kv_heads, rep * q, d)  # the query heads that read one key-value head, side by side
    mask = None
    if attention_mask is not None:  # (B, 1, q, S) -> (B, 1, rep * q, S), the rows of ``grouped``
        mask = attention_mask[:, :, -q:, -key.shape[2]:].repeat(1, 1, rep, 1)
    out, lse = _partial(grouped, key, value, mask, scale)  # (B, kv_heads, rep * q, d), (B, kv_heads, rep * q)
    if shared_prefix is not None:
        pk, pv = shared_prefix.keys[module.layer_idx], shared_prefix.values[module.layer_idx]
        folded = grouped.transpose(0, 1).reshape(1, kv_heads, b * rep * q, d)  # every row's queries, one prefix
        p_out, p_lse = _partial(folded, pk, pv, None, scale)
        p_out = p_out[0].view(kv_heads, b, rep * q, d).transpose(0, 1)
        p_lse = p_lse[0].view(kv_heads, b, rep * q).transpose(0, 1)
        total = torch.logaddexp(lse, p_lse)
        out = torch.exp(lse - total).unsqueeze(-1) * out + torch.exp(p_lse - total).unsqueeze(-1) * p_out
    out = out.view(b, kv_heads, rep, q, d).reshape(b, heads, q, d).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


__all__ = ["ATTENTION_NAME", "SharedPrefix", "prefix_attention", "prefix_attention_refusal", "shared_prefix_attention",
           "switched_attention"]
