"""The one timing rule of the benchmarks: the median of repeated runs after a warm-up run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (at least one), after a warm-up run (JIT
    compilation, cuDNN's kernel choice, the allocator, the CUDA context).

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the clock starts and before it stops, so
    work a GPU still has queued is counted in its own run.
    """
    fn()
    times = []
    for _ in range(max(1, repeats)):
        if sync is not None:
            sync()
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
