"""What every benchmark reports beside its ratios: the machine it ran on, and a median wall time."""

from __future__ import annotations

import time
from typing import Any


def machine_info() -> dict[str, Any]:
    """The machine a benchmark ran on (numbers from different machines must never be compared as one):
    CPU model, logical cores, torch threads and version, whether the CPU has native bf16 instructions, GPU."""
    import os
    import platform

    import torch

    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    return {
        "cpu": cpu, "platform": platform.platform(), "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu_bf16": any(f in flags.split() for f in ("avx512_bf16", "amx_bf16")) if flags else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }



def timeit(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    import statistics

    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)



__all__ = ["machine_info", "timeit"]
