"""Seeding torch's global generator for one block without changing the caller's random state.

Library code never reseeds the global generators for good: a user's ``torch.manual_seed(0)`` before a call to
rpe must give the same numbers after it as without the call. Where a torch API draws from the global generator
(``nn.Linear``'s initialisation, ``model.generate``'s sampling) rpe seeds it inside :func:`seeded`, which
restores the state on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int, device: str | torch.device | None = None) -> Iterator[None]:
    """The global CPU generator (and ``device``'s, when it is a CUDA device) seeded ``seed`` inside the block;
    their states are restored on exit, also after an error. Other CUDA devices are not touched."""
    dev = torch.device(device) if device is not None else None
    cuda = [dev] if dev is not None and dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(int(seed))
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(int(seed))
        yield


__all__ = ["seeded"]
