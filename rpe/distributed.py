"""The processes of a launched run (``torchrun``, ``accelerate launch``): which share of the work each rank
takes, which rank writes, and waiting for the others.

A run started by a launcher has ``WORLD_SIZE`` > 1 in its environment. Data-parallel collection
(:func:`rpe.rollouts.collect_rollouts`) splits its batches by :meth:`Ranks.owns`; every rank writes only the
part files of its own batches, the main rank writes the merged files after a :func:`barrier`. Under a trainer
the process group is accelerate's; the CLI makes one with :func:`process_group` (gloo: the group only
synchronises files and small objects, model tensors never travel through it).

Nothing here holds state: every function reads ``torch.distributed`` (or the launcher's environment) when called.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in its run: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the rank that writes shared files (rank 0)."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """True when work item ``index`` (a batch, a problem) is this rank's: items go round-robin."""
        return index % self.world == self.rank

    def device(self, device: str) -> str:
        """``device`` as this process should use it: ``cuda`` (and ``auto`` on a machine with CUDA) become
        ``cuda:LOCAL_RANK`` when several processes run; an explicit ``cuda:N`` or ``cpu`` is kept."""
        if self.world == 1:
            return device
        if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
            return f"cuda:{self.local_rank}"
        return "cpu" if device == "auto" else device


def current_ranks() -> Ranks:
    """The ranks of this process: from the initialised process group, else from the launcher's environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else a single process."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), local)
    return Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local)


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait until every rank arrives (nothing to wait for in a single process)."""
    if _group_ready():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` in a single process). Picklable objects
    only; meant for small things (buffers of probe states, flags), not model tensors."""
    if not _group_ready():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
    if not _group_ready():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def partitioned_parameters(train_args: Any = None) -> str | None:
    """The setting that partitions the model's parameters over ranks (DeepSpeed ZeRO-3, FSDP), as a user would
    name it, or None. Read from ``train_args`` (a ``transformers.TrainingArguments``: ``deepspeed``, ``fsdp``)
    and from the environment ``accelerate launch`` sets from its config file.

    With partitioned parameters every forward is a collective that every rank must join; rpe's internal reads
    run a rank-dependent number of forwards and may stop a forward part-way, so they refuse such runs."""
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "FSDP (accelerate config distributed_type: FSDP)"
    if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "DeepSpeed ZeRO-3 (accelerate config deepspeed_config.zero_stage: 3)"
    if train_args is None:
        return None
    if getattr(train_args, "fsdp", None):
        return f"FSDP (fsdp: {train_args.fsdp})"
    ds = getattr(train_args, "deepspeed", None)
    if isinstance(ds, (str, os.PathLike)) and os.path.isfile(ds):
        import json

        with open(ds) as f:
            ds = json.load(f)
    if isinstance(ds, dict) and str((ds.get("zero_optimization") or {}).get("stage")) == "3":
        return "DeepSpeed ZeRO-3 (deepspeed config zero_optimization.stage: 3)"
    return None


@contextmanager
def process_group(timeout_s: float = 3600.0) -> Iterator[Ranks]:
    """A gloo process group for the duration of a launched CLI command (none in a single process, and none
    made when one is already initialised); yields this process's :class:`Ranks`. The group is destroyed on
    exit, also after an error.

    Raises:
        RuntimeError: ``WORLD_SIZE`` > 1 without the rendezvous variables a launcher sets.
    """
    ranks = current_ranks()
    made = False
    if ranks.world > 1 and not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={ranks.world} but {', '.join(missing)} unset: start several processes "
                               "with torchrun or accelerate launch, or unset WORLD_SIZE for one process")
        dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world, timeout=timedelta(seconds=timeout_s))
        made = True
    try:
        yield current_ranks()
    finally:
        if made:
            dist.destroy_process_group()


__all__ = ["Ranks", "barrier", "broadcast_object", "current_ranks", "gather_objects", "partitioned_parameters",
           "process_group"]
