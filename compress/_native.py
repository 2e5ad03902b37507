"""Magnitude pruning of float32 data in C (``_kernels/prune_kernels.c``, built by :mod:`precision._native`).

The numpy path takes a pass each for ``|x|``, the finite check, the bracketing
counts and gathers of the selection, the mask, its negation, the pruned copy,
the bit packing, the gather of the kept values, the dense result and the error
metrics. The kernel finds the same threshold exactly in one pass where a sample
of the magnitudes brackets it, else by a radix select on the magnitude bits (two
histogram passes), and does the rest in two passes, with
ties pruned in index order as :func:`compress.prune.smallest_k` does; the
tests compare the stored parts with the numpy path's bit for bit.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from precision._native import Library, threads


def _bind(lib: ctypes.CDLL) -> None:
    p, i64, u32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int
    lib.lowbit_magnitude_histogram.argtypes = [p, i64, c_int, u32, p, c_int]
    lib.lowbit_magnitude_histogram.restype = c_int
    lib.lowbit_magnitude_apply.argtypes = [p, i64, u32, i64, p, p, i64, p, p, p, c_int]
    lib.lowbit_magnitude_apply.restype = i64
    lib.lowbit_magnitude_select.argtypes = [p, i64, i64, p, p, c_int]
    lib.lowbit_magnitude_select.restype = c_int


KERNELS = Library(Path(__file__).with_name("_kernels") / "prune_kernels.c", _bind, fallback="numpy")
_BINS = 1 << 16


@dataclass
class Pruned:
    """The result of :func:`magnitude_prune_c`: ``mask`` (packed bits, 1 = kept, numpy's packbits
    order), ``values`` (the kept values in order), ``dense`` (kept values and +0, or None), and
    ``sums``/``counts`` for :meth:`precision.metrics.MetricsAccumulator.add_sums` (None without metrics)."""

    mask: np.ndarray
    values: np.ndarray
    dense: np.ndarray | None
    sums: np.ndarray | None
    counts: np.ndarray | None


def magnitude_threshold(lib: ctypes.CDLL, x: np.ndarray, k: int) -> tuple[int, int] | None:
    """(magnitude bits of the k-th smallest |x|, how many elements equal to it are pruned); (0, 0) for
    k = 0 (nothing pruned). None without memory. One pass when a sample of the magnitudes brackets the
    k-th smallest, else two radix-select histogram passes: the same exact answer either way."""
    if k <= 0:
        return 0, 0
    thr, need = ctypes.c_uint32(), ctypes.c_int64()
    found = lib.lowbit_magnitude_select(x.ctypes.data, x.size, k, ctypes.byref(thr), ctypes.byref(need), threads())
    if found == 1:
        return thr.value, need.value
    if found < 0:
        return None
    return magnitude_threshold_by_histograms(lib, x, k)


def magnitude_threshold_by_histograms(lib: ctypes.CDLL, x: np.ndarray, k: int) -> tuple[int, int] | None:
    """:func:`magnitude_threshold` by two full histogram passes, whatever a sample says (1 <= k <= x.size)."""
    hist = np.empty(_BINS, np.int64)
    if lib.lowbit_magnitude_histogram(x.ctypes.data, x.size, 1, 0, hist.ctypes.data, threads()) != 0:
        return None
    cum = np.cumsum(hist)
    high = int(np.searchsorted(cum, k))
    below = int(cum[high] - hist[high])
    if lib.lowbit_magnitude_histogram(x.ctypes.data, x.size, 0, high, hist.ctypes.data, threads()) != 0:
        return None
    cum = np.cumsum(hist)
    low = int(np.searchsorted(cum, k - below))
    below += int(cum[low] - hist[low])
    return (high << 16) | low, k - below


def magnitude_prune_c(x: np.ndarray, k: int, *, dense: bool, metrics: bool) -> Pruned | None:
    """Prune the ``k`` smallest |x| of the finite float32 array ``x`` (ties: lowest index first); None
    when the kernel is unavailable or ``x`` is not a contiguous float32 array (use the numpy path)."""
    lib = KERNELS.get()
    if lib is None or x.dtype != np.float32 or not x.flags.c_contiguous or not 0 <= k <= x.size:
        return None
    found = magnitude_threshold(lib, x, k)
    if found is None:
        return None
    thr, need = found
    mask = np.empty((x.size + 7) // 8, np.uint8)
    values = np.empty(x.size - k, np.float32)
    out = np.empty(x.shape, np.float32) if dense else None
    sums, counts = (np.zeros(5), np.zeros(2, np.int64)) if metrics else (None, None)
    kept = lib.lowbit_magnitude_apply(x.ctypes.data, x.size, thr, need, mask.ctypes.data, values.ctypes.data,
                                      values.size, None if out is None else out.ctypes.data,
                                      None if sums is None else sums.ctypes.data,
                                      None if counts is None else counts.ctypes.data, threads())
    if kept != values.size:  # out of memory, or a count that does not add up: the numpy path decides
        return None
    return Pruned(mask, values, out, sums, counts)
