"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import time
from typing import Callable


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` runs of ``fn`` after one warm-up run (seconds)."""
    fn()
    best = float("inf")
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def best_pair(f_ref: Callable[[], object], f_new: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Best times of two functions measured alternately, so machine noise hits both alike."""
    f_ref(), f_new()
    a = b = float("inf")
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        f_ref()
        a = min(a, time.perf_counter() - t)
        t = time.perf_counter()
        f_new()
        b = min(b, time.perf_counter() - t)
    return a, b
