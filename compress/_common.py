"""Input checks shared by pruning and low rank."""

from __future__ import annotations

from typing import Any

import numpy as np

from precision._bridge import as_numpy


def weight_array(w: Any, name: str, *, min_ndim: int = 1) -> np.ndarray:
    """The weight as a numpy array (bf16/fp16 widened to float32); clear errors for bad input."""
    a = as_numpy(w, name)
    if a.dtype.kind not in "fV" and not (a.dtype.kind in "iu"):
        raise TypeError(f"{name}: unsupported dtype {a.dtype}: expected a floating-point tensor")
    if a.dtype.kind != "f" or a.dtype == np.float16:
        a = a.astype(np.float32)
    if a.ndim < min_ndim:
        raise ValueError(f"{name}: needs at least {min_ndim} dimension(s), got shape {a.shape}")
    if a.size and not np.isfinite(a).all():
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise ValueError(f"{name}: {bad} of {a.size} values are NaN or inf; pruning and low rank need finite weights")
    return a


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


def smallest_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` smallest scores; ties broken by position (lower index first).

    A selection (np.partition) finds the k-th value in O(n); only the tied
    values at the threshold are ordered by index.
    """
    n = scores.size
    flat = scores.reshape(-1)
    out = np.zeros(n, bool)
    if k <= 0:
        return out.reshape(scores.shape)
    if k >= n:
        return np.ones(scores.shape, bool)
    thr = np.partition(flat, k - 1)[k - 1]
    below = flat < thr
    out |= below
    need = k - int(below.sum())
    if need > 0:
        ties = np.flatnonzero(flat == thr)[:need]
        out[ties] = True
    return out.reshape(scores.shape)
