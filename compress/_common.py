"""Amounts, selection and dtype rules shared by pruning and low rank."""

from __future__ import annotations

from typing import Any

import numpy as np

from precision.arrays import as_numpy


def out_dtype_like(src: Any, arr: np.ndarray) -> np.ndarray:
    """Cast a result back to the source dtype when that is a numpy float dtype numpy can hold."""
    s = as_numpy(src)
    return arr.astype(s.dtype) if s.dtype.kind == "f" else arr


def amount_to_count(n: int, sparsity: float | None, count: int | None, what: str = "sparsity") -> int:
    """How many of ``n`` items to remove: from a fraction in [0, 1] or an explicit integer count."""
    if (sparsity is None) == (count is None):
        raise ValueError(f"give exactly one of {what}= (a fraction in [0, 1]) or count= (a number of elements)")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
            raise TypeError(f"count must be an integer, got {count!r}; use {what}= for a fraction")
        if not 0 <= count <= n:
            raise ValueError(f"count must be in [0, {n}], got {count}")
        return int(count)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (float, int, np.floating, np.integer)):
        raise TypeError(f"{what} must be a fraction in [0, 1], got {sparsity!r}")
    if isinstance(sparsity, (int, np.integer)) and sparsity not in (0, 1):
        raise ValueError(f"{what}={sparsity} is an integer: {what} is a fraction in [0, 1]; "
                         "pass count= to remove a number of elements")
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"{what} must be a fraction in [0, 1], got {sparsity}")
    return int(round(float(sparsity) * n))


def kth_smallest(flat: np.ndarray, k: int) -> tuple[float, np.ndarray | None]:
    """The k-th smallest value (1-based) of a 1-D array, by selection, and (for large arrays)
    the sorted positions of every element equal to it (None: not computed).

    Large arrays first bracket the answer with quantiles of a fixed-seed
    sample, count what lies below the bracket and select only inside it
    (about 1% of the data), falling back to a full ``np.partition`` if the
    bracket misses. Exact either way.
    """
    n = flat.size
    if n > (1 << 20):
        rng = np.random.default_rng(0)
        sample = np.sort(flat[rng.integers(0, n, 1 << 16)])
        q = k / n
        lo = sample[max(0, int((q - 0.005) * sample.size) - 1)]
        hi = sample[min(sample.size - 1, int((q + 0.005) * sample.size) + 1)]
        below = int(np.count_nonzero(flat < lo))
        where = np.flatnonzero((flat >= lo) & (flat <= hi))
        if below < k <= below + where.size:
            inside = flat[where]
            thr = np.partition(inside, k - below - 1)[k - below - 1]
            return float(thr), where[inside == thr]
    return float(np.partition(flat, k - 1)[k - 1]), None


def smallest_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` smallest scores; ties broken by position (lower index first).

    A selection finds the k-th value in O(n) (see ``kth_smallest``); only the
    values tied at the threshold are ordered by index.
    """
    n = scores.size
    flat = scores.reshape(-1)
    if k <= 0:
        return np.zeros(scores.shape, bool)
    if k >= n:
        return np.ones(scores.shape, bool)
    thr, ties = kth_smallest(flat, k)
    thr = flat.dtype.type(thr)
    out = flat < thr
    need = k - int(np.count_nonzero(out))
    if need > 0:
        if ties is None:
            ties = np.flatnonzero(flat == thr)
        out[ties[:need]] = True
    return out.reshape(scores.shape)
