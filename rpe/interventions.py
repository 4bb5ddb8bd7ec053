"""Neuron interventions: ablate chosen neurons (residual-stream coordinates) at a decoder block.

:class:`NeuronAblation` is a context manager of forward hooks on any transformers causal LM. The output of each
chosen block has the chosen columns replaced at every position of every forward call, so it works for a plain
forward, for ``generate`` (prefill and each decode step), and composes with :class:`rpe.tracker.ActivationTracker`
(hooks registered after the ablation see the ablated output). Hooks are removed on exit, also on error.

Modes: ``zero`` (set to 0, default), ``mean`` (set to a given per-neuron mean, e.g. over a rollout set) and
``scale`` (multiply by ``scale``). Indices and layers are checked before any hook is added.

Example (a tiny random Llama; with a bundle, ``{bundle.layer: bundle.value_neurons}``):
    >>> import torch
    >>> from rpe.tiny import tiny_model
    >>> model, tok = tiny_model()
    >>> inputs = tok(["2 + 2 ="], return_tensors="pt")
    >>> with torch.no_grad():
    ...     plain = model(**inputs).logits
    ...     with NeuronAblation(model, {2: [3, 17, 40]}):
    ...         ablated = model(**inputs).logits
    ...     again = model(**inputs).logits
    >>> bool((plain != ablated).any()), torch.equal(plain, again)
    (True, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from rpe.tracker import BlockHooks, hidden_size_of, check_layers

AblationMode = Literal["zero", "mean", "scale"]


class NeuronAblation(BlockHooks):
    """Replace chosen neuron columns of chosen decoder blocks' outputs.

    Args:
        model: a transformers causal LM.
        neurons: ``{layer: (k,) indices}``.
        mode: ``zero``, ``mean`` or ``scale``.
        means: for ``mean``: ``{layer: (k,) values}`` in the order of ``neurons[layer]``.
        scale: for ``scale``: the multiplier (0 is the same as ``zero``).

    Raises:
        ValueError: a layer the model does not have, indices out of range or repeated, or missing means.
    """

    def __init__(self, model: nn.Module, neurons: Mapping[int, torch.Tensor | list[int]], *, mode: AblationMode = "zero",
                 means: Mapping[int, torch.Tensor] | None = None, scale: float = 0.0):
        if mode not in ("zero", "mean", "scale"):
            raise ValueError(f"ablation mode {mode!r} is not one of zero, mean, scale")
        self.model = model
        self.mode = mode
        self.scale = float(scale)
        hidden = hidden_size_of(model)
        layers = check_layers(model, list(neurons))
        self.neurons: dict[int, torch.Tensor] = {}
        for given, layer in zip(neurons, layers):
            idx = torch.as_tensor(neurons[given], dtype=torch.long).flatten()
            if idx.numel() and (idx.min() < 0 or idx.max() >= hidden):
                raise ValueError(
                    f"neuron indices for layer {layer} must lie in 0..{hidden - 1}; got min {int(idx.min())}, "
                    f"max {int(idx.max())}"
                )
            if idx.unique().numel() != idx.numel():
                raise ValueError(f"neuron indices for layer {layer} repeat")
            self.neurons[layer] = idx
        self.means: dict[int, torch.Tensor] = {}
        if mode == "mean":
            if means is None:
                raise ValueError("mode 'mean' needs means={layer: per-neuron values}")
            for given, layer in zip(neurons, layers):
                m = torch.as_tensor(means[given] if given in means else means[layer], dtype=torch.float32).flatten()
                if m.numel() != self.neurons[layer].numel():
                    raise ValueError(f"layer {layer}: {m.numel()} means for {self.neurons[layer].numel()} neurons")
                self.means[layer] = m
        self._hook_layers = list(self.neurons)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _make_hook(self, layer: int):
        idx = self.neurons[layer]
        cache: dict[torch.device, torch.Tensor] = {}

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            dev = hidden.device
            if dev not in cache:
                cache[dev] = idx.to(dev)
            i = cache[dev]
            if self.mode == "zero" or (self.mode == "scale" and self.scale == 0.0):
                hidden.index_fill_(-1, i, 0.0)
            elif self.mode == "scale":
                hidden[..., i] = hidden[..., i] * self.scale
            else:
                hidden[..., i] = self.means[layer].to(dev, hidden.dtype)
            return output

        return hook


__all__ = ["AblationMode", "NeuronAblation"]
