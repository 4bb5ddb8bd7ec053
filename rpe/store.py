"""Activations of reasoning states, captured over existing rollouts and stored as safetensors.

A *state set* holds, for every trajectory, the states s_0 (last prompt token) .. s_T (last token of step T):
one row per state, with its trajectory and step index. ``mode="steps"`` instead averages each step's tokens
(s_0 stays the last prompt token), as the dopamine analysis uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

from rpe.kvcache import batched_cache_kwargs, prefix_cache, right_pad, shared_prefix_len
from rpe.records import Trajectory, atomic_write_bytes
from rpe.tracker import ActivationTracker, check_finite

STORE_VERSION = 1


@dataclass
class StateSet:
    """Activations at reasoning states.

    Attributes:
        acts: ``{layer: (n_states, k)}`` float tensors (k = d_model, or the chosen neurons).
        traj_index: (n_states,) index into ``trajectory_ids`` for each state.
        step_index: (n_states,) 0 for s_0, t for the end of step t.
        trajectory_ids, problem_ids: per trajectory.
        rewards: (n_trajectories,) terminal reward of each trajectory.
        neurons: ``{layer: (k,)}`` neuron indices when only some columns were kept, else None.
    """

    acts: dict[int, torch.Tensor]
    traj_index: torch.Tensor
    step_index: torch.Tensor
    trajectory_ids: list[str]
    problem_ids: list[str]
    rewards: torch.Tensor
    neurons: dict[int, torch.Tensor] | None = None

    @property
    def layers(self) -> list[int]:
        return sorted(self.acts)

    @property
    def n_states(self) -> int:
        return int(self.traj_index.numel())

    def at_layers(self, layers: Sequence[int]) -> StateSet:
        """The same states with only ``layers`` (which must be held) in :attr:`acts`."""
        return StateSet({layer: self.acts[layer] for layer in layers}, self.traj_index, self.step_index,
                        self.trajectory_ids, self.problem_ids, self.rewards,
                        None if self.neurons is None else {layer: self.neurons[layer] for layer in layers})

    def state_rewards(self) -> torch.Tensor:
        """(n_states,) the final reward of each state's trajectory."""
        return self.rewards[self.traj_index]

    def is_terminal(self) -> torch.Tensor:
        """(n_states,) bool: the state is the last one of its trajectory."""
        nxt = torch.cat([self.traj_index[1:], torch.tensor([-1])])
        return nxt != self.traj_index

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        """Write one safetensors file atomically (``dtype=torch.float16`` halves the size)."""
        tensors = {f"layer_{layer}": a.to(dtype).contiguous() for layer, a in self.acts.items()}
        tensors.update(traj_index=self.traj_index, step_index=self.step_index, rewards=self.rewards.float())
        for layer, idx in (self.neurons or {}).items():
            tensors[f"neurons_{layer}"] = idx
        meta = {"store_version": str(STORE_VERSION), "trajectory_ids": json.dumps(self.trajectory_ids),
                "problem_ids": json.dumps(self.problem_ids)}
        from safetensors.torch import save

        atomic_write_bytes(Path(path), save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> StateSet:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as err:
            raise ValueError(f"{path} is not a readable activation store ({err}); re-run the capture") from err
        if meta.get("store_version") != str(STORE_VERSION):
            raise ValueError(f"{path} has store version {meta.get('store_version')}; expected {STORE_VERSION}")
        acts = {int(k.split("_")[1]): v.float() for k, v in tensors.items() if k.startswith("layer_")}
        neurons = {int(k.split("_")[1]): v for k, v in tensors.items() if k.startswith("neurons_")} or None
        return cls(acts, tensors["traj_index"], tensors["step_index"], json.loads(meta["trajectory_ids"]),
                   json.loads(meta["problem_ids"]), tensors["rewards"], neurons)


def capture_states(
    model,
    trajectories: Sequence[Trajectory],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    neurons: dict[int, torch.Tensor] | torch.Tensor | None = None,
    mode: Literal["ends", "steps"] = "ends",
    pad_token_id: int = 0,
    reuse_prefix: bool = True,
    min_prefix: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> StateSet:
    """Activations at s_0..s_T of every trajectory, one right-padded forward per batch.

    Args:
        trajectories: records with token ids (see :mod:`rpe.rollouts`).
        layers: decoder blocks to read.
        neurons: keep only these columns (per layer or shared).
        mode: ``ends`` keeps each step's last token; ``steps`` averages each step's tokens.
        pad_token_id: id used for right padding (masked out; does not affect earlier positions).
        reuse_prefix: when all prompts share a prefix of at least ``min_prefix`` tokens (the few-shot
            examples), compute its KV cache once and run only the rest per batch. Same activations, several
            times faster with long few-shot prompts.

    Raises:
        NonFiniteActivationError: NaN/inf activations, naming the layer and trajectories.
    """
    if not trajectories:
        raise ValueError("no trajectories to capture")
    device = next(model.parameters()).device
    # the shared prefix must end before every s_0 (the last prompt token), so s_0 is computed with hooks on
    prefix_len = shared_prefix_len([t.prompt_token_ids for t in trajectories], min_prefix) if reuse_prefix else 0
    cache = prefix_cache(model, list(trajectories[0].prompt_token_ids[:prefix_len]), device) if prefix_len else None
    chunks: dict[int, list[torch.Tensor]] = {}
    traj_index, step_index = [], []
    with ActivationTracker(model, layers, neurons=neurons) as tracker:
        for start in range(0, len(trajectories), batch_size):
            batch = trajectories[start : start + batch_size]
            seqs = [(t.prompt_token_ids + t.completion_token_ids)[prefix_len:] for t in batch]
            ids, mask = right_pad(seqs, pad_token_id, prefix_len)
            rows, starts, ends = [], [], []
            for r, t in enumerate(batch):
                n = t.prompt_len - prefix_len  # positions below are relative to the suffix
                spans = [(n - 1, n)] + [
                    ((n + s.token_start, n + s.token_end) if mode == "steps" else (n + s.token_end - 1, n + s.token_end))
                    for s in t.steps
                ]
                for k, (a, b) in enumerate(spans):
                    rows.append(r)
                    starts.append(a)
                    ends.append(b)
                    traj_index.append(start + r)
                    step_index.append(k)
            tracker.select(rows, starts, ends)
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if cache is not None:
                inputs.update(batched_cache_kwargs(model, cache, len(seqs)))
            out = tracker.forward(**inputs)
            for layer, acts in out.items():
                chunks.setdefault(layer, []).append(acts)
            if progress:
                progress(min(start + batch_size, len(trajectories)), len(trajectories))
    ids_list = [t.trajectory_id for t in trajectories]
    acts = {layer: torch.cat(c) for layer, c in chunks.items()}
    traj_t = torch.tensor(traj_index)
    for layer, a in acts.items():
        check_finite(a, layer, [ids_list[i] for i in traj_t.tolist()])
    if isinstance(neurons, torch.Tensor):
        neurons = {layer: neurons for layer in acts}
    return StateSet(
        acts=acts,
        traj_index=traj_t,
        step_index=torch.tensor(step_index),
        trajectory_ids=ids_list,
        problem_ids=[t.problem_id for t in trajectories],
        rewards=torch.tensor([t.reward for t in trajectories], dtype=torch.float32),
        neurons=neurons,
    )


def states_from_generation(
    model, recorded: dict[int, torch.Tensor] | Sequence[dict[int, torch.Tensor]], records: Sequence[Trajectory],
    width: int | Sequence[int], neurons, pad_token_id: int, positions: Sequence[Sequence[int]] | None = None,
) -> StateSet:
    """Pick s_0..s_T of each trajectory out of activations recorded while generating.

    Args:
        recorded: ``{layer: (B, width + n_generated - 1, k)}`` from ``ActivationTracker.generated()`` around a
            left-padded ``generate``; or, from the continuous engine, one ``{layer: (T_i, k)}`` per row
            (``GeneratedBatch.activations``).
        width: where completion token 0 sits: the padded prompt length of the batch (one int), or per row the
            number of recorded prompt positions (prompt length minus the shared prefix).
        positions: per row, the positions its recorded rows hold when only some were kept
            (``GeneratedBatch.activation_positions``); None when every position was recorded.

    A state whose token was never fed back into the model (the last token of a completion cut by
    ``max_new_tokens``), or was not kept, is computed with one extra forward over that trajectory alone.
    """
    per_row = not isinstance(recorded, dict)
    layers = sorted(recorded[0] if per_row else recorded)
    widths = list(width) if per_row else [int(width)] * len(records)
    acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    traj_index, step_index = [], []
    for i, t in enumerate(records):
        row = {layer: recorded[i][layer] if per_row else recorded[layer][i] for layer in layers}
        wanted = [widths[i] - 1] + [widths[i] + s.token_end - 1 for s in t.steps]
        index = {p: j for j, p in enumerate(positions[i])} if positions is not None else None
        rows_at = [index.get(p) for p in wanted] if index is not None else wanted
        if all(r is not None and r < row[layers[0]].shape[0] for r in rows_at):
            for layer in layers:
                acts[layer].append(row[layer][rows_at])
        else:
            single = capture_states(model, [t], layers, neurons=neurons, pad_token_id=pad_token_id, reuse_prefix=False)
            for layer in layers:
                acts[layer].append(single.acts[layer])
        traj_index += [i] * len(wanted)
        step_index += list(range(len(wanted)))
    return StateSet(
        acts={layer: torch.cat(a) for layer, a in acts.items()},
        traj_index=torch.tensor(traj_index),
        step_index=torch.tensor(step_index),
        trajectory_ids=[t.trajectory_id for t in records],
        problem_ids=[t.problem_id for t in records],
        rewards=torch.tensor([t.reward for t in records], dtype=torch.float32),
        neurons={layer: neurons for layer in layers} if neurons is not None else None,
    )


def merge_state_sets(parts: Sequence[StateSet]) -> StateSet:
    """Concatenate per-batch state sets (trajectory indices offset accordingly)."""
    offset, traj = 0, []
    for p in parts:
        traj.append(p.traj_index + offset)
        offset += len(p.trajectory_ids)
    return StateSet(
        acts={layer: torch.cat([p.acts[layer] for p in parts]) for layer in parts[0].layers},
        traj_index=torch.cat(traj),
        step_index=torch.cat([p.step_index for p in parts]),
        trajectory_ids=[i for p in parts for i in p.trajectory_ids],
        problem_ids=[i for p in parts for i in p.problem_ids],
        rewards=torch.cat([p.rewards for p in parts]),
        neurons=parts[0].neurons,
    )


__all__ = ["StateSet", "capture_states", "merge_state_sets", "states_from_generation"]
