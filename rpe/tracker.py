"""Capture residual-stream activations at chosen positions with forward hooks (no ``output_hidden_states``).

A *neuron* is one coordinate of the output of decoder block ``l`` (PAPER.md). :class:`ActivationTracker` is a
context manager that hooks the chosen blocks, keeps only the requested positions (or token spans, averaged)
and, when given, only the chosen neuron columns. Hooks are removed on exit, also when the block raises.

Two modes:
- over existing text (:func:`capture_states`): one padding-aware forward per batch; the forward stops right
  after the deepest hooked block, so the unused blocks and the LM head are never computed;
- during generation (``ActivationTracker(..., record_all=True)`` around ``model.generate``): every prefill and
  decode call appends its (batch, tokens, neurons) slice; :meth:`ActivationTracker.generated` returns them
  joined along time, so rollouts can keep step-end states with no second forward pass.

Example (a tiny random Llama, d_model = 64; any transformers causal LM works the same way):
    >>> from rpe.tiny import tiny_model
    >>> model, tok = tiny_model()
    >>> ids = tok(["4 + 1 = 5.\\n\\n5 + 3 = 8."], return_tensors="pt")
    >>> with ActivationTracker(model, layers=[2]) as tr:
    ...     tr.select(rows=[0, 0], starts=[0, 5], ends=[5, 6])   # a 5-token span (averaged) and one position
    ...     acts = tr.forward(**ids)
    >>> tuple(acts[2].shape)                                       # (spans, d_model)
    (2, 64)
    >>> any(m._forward_hooks for m in decoder_layers(model))       # hooks removed on exit
    False
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


class _StopForward(Exception):
    """Raised inside the deepest hook to skip the rest of the network."""


class NonFiniteActivationError(ValueError):
    """NaN or inf in captured activations; the message names the layer and the rows."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a transformers causal LM (Llama, Qwen2, Gemma3, GPT-2 style)."""
    for path in ("model.layers", "model.language_model.layers", "language_model.model.layers", "base_model.model.model.layers",
                 "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}; supported layouts: model.layers, "
        "model.language_model.layers, transformer.h, gpt_neox.layers"
    )


def check_layers(model: nn.Module, layers: Sequence[int]) -> list[int]:
    """Validate layer indices (negative counts from the end) and return them as non-negative ints."""
    n = len(decoder_layers(model))
    out = []
    for layer in layers:
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} does not exist: the model has {n} decoder layers (0..{n - 1})")
        out.append(layer % n)
    if not out:
        raise ValueError("choose at least one layer")
    return out


@dataclass
class Selection:
    """Token spans to keep: row ``rows[i]``, positions ``[starts[i], ends[i])`` averaged (a single position
    when ``ends[i] == starts[i] + 1``). Shapes: (N,) each, long."""

    rows: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor


class BlockHooks:
    """Base of the hook context managers: one forward hook per chosen decoder block, all removed on exit (also
    when entering fails half-way or the body raises). Subclasses set ``self.model``, ``self._hook_layers`` and
    ``self._handles = []`` and implement ``_make_hook(layer)``."""

    model: nn.Module
    _hook_layers: list[int]
    _handles: list[torch.utils.hooks.RemovableHandle]

    def __enter__(self):
        if self._handles:
            raise RuntimeError(f"this {type(self).__name__} is already active")
        blocks = decoder_layers(self.model)
        try:
            for layer in self._hook_layers:
                self._handles.append(blocks[layer].register_forward_hook(self._make_hook(layer)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook registered here (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _make_hook(self, layer: int):
        raise NotImplementedError


class ActivationTracker(BlockHooks):
    """Forward hooks on decoder blocks that keep only chosen positions and neurons.

    Args:
        model: a transformers causal LM.
        layers: decoder block indices whose outputs are captured.
        neurons: optional neuron indices per layer (``{layer: LongTensor(k,)}``) or one index tensor for all
            layers; None keeps all ``d_model`` columns.
        record_all: keep every token of every forward call (generation mode) instead of a selection.
        stop_early: in selection mode, stop the forward after the deepest hooked block.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int],
        *,
        neurons: dict[int, torch.Tensor] | torch.Tensor | None = None,
        record_all: bool = False,
        stop_early: bool = True,
    ):
        self.model = model
        self.layers = check_layers(model, layers)
        if isinstance(neurons, torch.Tensor) or neurons is None:
            self.neurons = {layer: neurons for layer in self.layers}
        else:
            missing = set(self.layers) - set(neurons)
            if missing:
                raise ValueError(f"neuron indices missing for layers {sorted(missing)}")
            self.neurons = {layer: torch.as_tensor(neurons[layer], dtype=torch.long) for layer in self.layers}
        hidden = hidden_size_of(model)
        for layer, idx in self.neurons.items():
            if idx is not None and idx.numel() and (idx.min() < 0 or idx.max() >= hidden):
                raise ValueError(
                    f"neuron indices for layer {layer} must lie in 0..{hidden - 1}; got min {int(idx.min())}, max {int(idx.max())}"
                )
        self.record_all = record_all
        self.stop_early = stop_early and not record_all
        self._hook_layers = self.layers
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._selection: Selection | None = None
        self.captured: dict[int, torch.Tensor] = {}
        self._recorded: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self.prefix_tokens = 0
        """Positions of a batch-1 shared-prefix prefill found by :meth:`generated`."""

    # -- capture ---------------------------------------------------------------------------------------
    def select(self, rows: Sequence[int], starts: Sequence[int], ends: Sequence[int] | None = None) -> None:
        """Set the spans kept by the next forward (``ends`` defaults to ``starts + 1``: single positions)."""
        starts_t = torch.as_tensor(starts, dtype=torch.long)
        ends_t = starts_t + 1 if ends is None else torch.as_tensor(ends, dtype=torch.long)
        if (ends_t <= starts_t).any():
            raise ValueError("every span needs end > start")
        self._selection = Selection(torch.as_tensor(rows, dtype=torch.long), starts_t, ends_t)

    def forward(self, **inputs) -> dict[int, torch.Tensor]:
        """Run the model on ``inputs`` and return ``{layer: (N, k)}`` for the current selection."""
        if not self.active:
            raise RuntimeError("use the tracker as a context manager: `with ActivationTracker(...) as tr:`")
        if self._selection is None and not self.record_all:
            raise RuntimeError("call select(...) before forward(...)")
        self.captured = {}
        inputs.setdefault("use_cache", "past_key_values" in inputs or "cache" in inputs)
        with torch.inference_mode():
            try:
                self.model(**inputs)
            except _StopForward:
                pass
        return self.captured

    def take_last(self) -> dict[int, torch.Tensor]:
        """``{layer: (B, T, k)}`` of the last forward recorded in ``record_all`` mode, forgetting everything
        recorded so far (for decode loops whose batch changes between forwards)."""
        out = {layer: chunks[-1] for layer, chunks in self._recorded.items()}
        for chunks in self._recorded.values():
            chunks.clear()
        return out

    def generated(self, *, drop_prefix: bool = False) -> dict[int, torch.Tensor]:
        """Generation mode: ``{layer: (batch, total_tokens, k)}``, prefill and decode steps joined in time.

        A batch-1 call recorded before a batched one is a shared-prefix KV-cache prefill (the few-shot
        examples, see :func:`rpe.generation.generate_from_ids`): it is repeated for every row, so position ``i``
        of the result is position ``i`` of the padded ``prefix + suffix`` input. With ``drop_prefix`` those
        positions are left out instead (their count is :attr:`prefix_tokens`; every state lies after them).

        Raises:
            ValueError: calls of other batch sizes were recorded (one tracker per ``generate`` call).
        """
        out = {}
        self.prefix_tokens = 0
        for layer, chunks in self._recorded.items():
            if not chunks:
                continue
            batch = chunks[-1].shape[0]
            sizes = [c.shape[0] for c in chunks]
            n_prefix = next((i for i, b in enumerate(sizes) if b == batch), len(sizes))
            if any(b != 1 for b in sizes[:n_prefix]) or any(b != batch for b in sizes[n_prefix:]):
                raise ValueError(
                    f"the tracker recorded forward calls of batch sizes {sorted(set(sizes))}: only one generate call "
                    "(after at most a batch-1 shared-prefix prefill) can be joined in time. Use one "
                    "ActivationTracker(record_all=True) per generate call."
                )
            self.prefix_tokens = sum(c.shape[1] for c in chunks[:n_prefix])
            head = [] if drop_prefix else [c.expand(batch, -1, -1) for c in chunks[:n_prefix]]
            out[layer] = torch.cat(head + chunks[n_prefix:], dim=1)
        return out

    def _make_hook(self, layer: int):
        deepest = max(self.layers)

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # (B, T, d)
            idx = self.neurons[layer]
            if self.record_all:
                kept = hidden.detach()
                kept = kept[..., idx] if idx is not None else kept
                self._recorded[layer].append(kept.cpu().float())  # moved in the model's dtype, then widened
                return None
            sel = self._selection
            assert sel is not None
            h = hidden.detach()
            if idx is not None:
                h = h[..., idx]  # (B, T, k), still in the model's dtype: only the kept columns are widened
            rows, starts, ends = (x.to(h.device) for x in (sel.rows, sel.starts, sel.ends))  # on the block's device
            if bool(((sel.ends - sel.starts) == 1).all()):
                out = h[rows, starts].float()  # (N, k): the selected positions only, not (B, T, d), in float32
            else:
                h = h.float()  # the running sums need float32
                zero = torch.zeros_like(h[:, :1])
                csum = torch.cat([zero, h.cumsum(dim=1)], dim=1)  # (B, T+1, k)
                span = (ends - starts).unsqueeze(1).to(h.dtype)  # (N, 1)
                out = (csum[rows, ends] - csum[rows, starts]) / span
            self.captured[layer] = out.cpu()
            if self.stop_early and layer == deepest:
                raise _StopForward
            return None

        return hook


def hidden_size_of(model: nn.Module) -> int:
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(cfg.hidden_size)


def check_finite(acts: torch.Tensor, layer: int, ids: Sequence[str] | None = None, *, where: str = "") -> None:
    """Raise :class:`NonFiniteActivationError` naming the layer and, with ``ids`` (one per row of ``acts``), the
    offending trajectories; ``where`` says what was being read."""
    bad = ~torch.isfinite(acts).all(dim=-1)
    if bad.any():
        rows = sorted({ids[i] for i in bad.nonzero().flatten().tolist()}) if ids is not None else []
        which = f" in trajectories {rows[:5]}{' ...' if len(rows) > 5 else ''}" if rows else ""
        raise NonFiniteActivationError(
            f"NaN/inf activations at layer {layer}{which}{where}; float16 overflows in many models: load in "
            "bfloat16 or float32 (--dtype), else check the inputs"
        )
