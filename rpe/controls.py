"""Neuron sets to ablate, all of the same size: value neurons and the controls they must beat.

Sources (PAPER.md's controls):
- ``value``: the value neurons (a bundle, or a probe fitted at that layer);
- ``random``: uniform over the layer's neurons, several seeds;
- ``random_matched``: random, matched in mean |activation| (for each value neuron, a random neuron from the
  same quantile bin of mean |activation|);
- ``top_magnitude``: the neurons of largest mean |activation|;
- ``next_token``: the top neurons of a linear next-token-prediction probe (first-layer L1 norm);
- ``wanda``: Wanda-style importance |W| x ||x||: the activation norm of the neuron times the L1 norm of the
  weights that read it in the next block (its attention and MLP input projections; the LM head after the last);
- ``mc_probe``: the top neurons of a reward-only (Monte-Carlo target) value probe.

Attention-sink / massive-activation dimensions (:func:`massive_dims`) are excluded from the random controls and
reported: zeroing one of them breaks any model, which would make a random control look strong by accident.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rpe.seeding import seeded
from rpe.store import StateSet
from rpe.tracker import decoder_layers

SOURCES: tuple[str, ...] = ("value", "random", "random_matched", "top_magnitude", "next_token", "wanda", "mc_probe")


def massive_dims(acts: torch.Tensor, ratio: float = 50.0) -> list[int]:
    """Dimensions whose largest |activation| exceeds ``ratio`` x the median |activation| of the whole matrix
    (Sun et al., "Massive activations"). ``acts``: (n, d)."""
    a = acts.abs().float()
    med = float(a.median())
    peak = a.max(0).values
    return sorted(int(j) for j in torch.nonzero(peak > ratio * max(med, 1e-8)).flatten())


def random_set(d: int, k: int, seed: int, exclude: set[int]) -> torch.Tensor:
    """``k`` distinct neurons uniformly from ``range(d)`` minus ``exclude``."""
    pool = np.array([j for j in range(d) if j not in exclude])
    if len(pool) < k:
        raise ValueError(f"cannot draw {k} neurons from {len(pool)} allowed ones")
    rng = np.random.default_rng(seed)
    return torch.as_tensor(np.sort(rng.choice(pool, size=k, replace=False)), dtype=torch.long)


def matched_random_set(mean_abs: torch.Tensor, targets: torch.Tensor, seed: int, exclude: set[int],
                       n_bins: int = 20) -> torch.Tensor:
    """For each target neuron, a random other neuron from the same quantile bin of mean |activation|
    (falling back to neighbouring bins when a bin runs out)."""
    d = mean_abs.numel()
    edges = torch.quantile(mean_abs.float(), torch.linspace(0, 1, n_bins + 1))
    bins = torch.bucketize(mean_abs.float(), edges[1:-1])
    rng = np.random.default_rng(seed)
    taken = set(exclude) | {int(t) for t in targets}
    out = []
    for t in targets.tolist():
        b = int(bins[t])
        for radius in range(n_bins):
            cands = [j for j in range(d) if abs(int(bins[j]) - b) <= radius and j not in taken]
            if cands:
                j = int(rng.choice(cands))
                out.append(j)
                taken.add(j)
                break
        else:
            raise ValueError("not enough neurons left for a matched random set")
    return torch.as_tensor(sorted(out), dtype=torch.long)


def top_magnitude_set(mean_abs: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(mean_abs, k).indices.sort().values


READER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj")
"""Linear layers of a block that read the residual stream: separate (Llama, Qwen, Mistral, Gemma) or fused
(Phi-3's ``qkv_proj`` and ``gate_up_proj``); the L1 norm over their outputs is the same either way."""


def wanda_scores(model: nn.Module, layer: int, acts: torch.Tensor) -> torch.Tensor:
    """(d,) ||x_j||_2 over the given activations x (n, d) times the L1 norm of the weights that read
    dimension j of the residual stream after block ``layer``."""
    blocks = decoder_layers(model)
    readers: list[torch.Tensor] = []
    if layer + 1 < len(blocks):
        for name, mod in blocks[layer + 1].named_modules():
            if isinstance(mod, nn.Linear) and name.split(".")[-1] in READER_PROJECTIONS:
                readers.append(mod.weight.detach().abs().sum(0))  # (d,)
    else:
        head = model.get_output_embeddings()
        readers.append(head.weight.detach().abs().sum(0))
    if not readers:
        raise ValueError(f"no input projections found in block {layer + 1}; Wanda scores need one of "
                         f"{', '.join(READER_PROJECTIONS)}")
    w = torch.stack([r.to(readers[0].device) for r in readers]).sum(0).float()
    return acts.float().norm(dim=0) * w.to(acts.device)


def next_token_scores(acts: torch.Tensor, next_tokens: torch.Tensor, top_tokens: int = 50, epochs: int = 200,
                      seed: int = 0) -> torch.Tensor:
    """(d,) first-layer L1 norms of a linear probe predicting the next token (among the ``top_tokens`` most
    frequent; the rest form one "other" class) from standardised activations (n, d)."""
    vocab, counts = torch.unique(next_tokens, return_counts=True)
    keep = vocab[torch.argsort(counts, descending=True)[:top_tokens]]
    lookup = {int(t): i for i, t in enumerate(keep)}
    y = torch.tensor([lookup.get(int(t), len(keep)) for t in next_tokens])
    x = (acts.float() - acts.float().mean(0)) / acts.float().std(0).clamp_min(1e-6)
    with seeded(seed):
        lin = nn.Linear(x.shape[1], len(keep) + 1)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(lin(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lin.weight.detach().abs().sum(0)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


def mc_probe_set(states: StateSet, layer: int, k: int, seed: int = 0) -> torch.Tensor:
    """Top-``k`` neurons of a dense Monte-Carlo (reward-only) value probe at ``layer``."""
    from rpe.probe import ProbeConfig, ValueProbe

    probe = ValueProbe(ProbeConfig(target="mc", seed=seed)).fit(states, layer)
    return top_k(probe.neuron_scores(), k)


__all__ = ["READER_PROJECTIONS", "SOURCES", "massive_dims", "matched_random_set", "mc_probe_set", "next_token_scores", "random_set",
           "top_k", "top_magnitude_set", "wanda_scores"]
