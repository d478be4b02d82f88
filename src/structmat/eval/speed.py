"""Wall-clock timing of a module's forward, for same-run ratios (never absolute claims across machines)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3, device=None) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA-synchronized when the device is a GPU)."""
    sync = torch.cuda.synchronize if (device is not None and torch.device(device).type == "cuda") else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
