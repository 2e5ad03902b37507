"""SVD low-rank factorization W ~= A @ B, exact or randomized.

The SVD runs in float64 (fp16/bf16/float32 inputs alike), so the exact
method's error is the Eckart-Young optimum ``sqrt(sum of discarded
sigma**2) / ||W||_F`` to float precision. Factors come back in the input's
dtype (float32 for fp16/bf16 inputs: store them with ``precision.round_to``
if you want half-precision factors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from precision.arrays import contiguous

from precision.arrays import as_numpy, like, real_array, require_finite
from precision.report import Report, TensorReport

from .storage import Factors

METHODS = ("exact", "randomized")


@dataclass
class LowRank:
    """``A`` (m x r) and ``B`` (r x n) with ``W ~= A @ B``; ``applied`` is False when the
    factorization would not save memory (``r >= m n / (m + n)``) and was not forced."""

    A: Any
    B: Any
    rank: int
    report: Report
    storage: Factors
    applied: bool
    singular_values: np.ndarray

    def dense(self) -> Any:
        return self.storage.dense()


def break_even_rank(m: int, n: int) -> float:
    """The rank at which the two factors cost as much as the dense matrix: m n / (m + n)."""
    return m * n / (m + n) if m + n else 0.0


def choose_rank(m: int, n: int, s: np.ndarray | None, rank: int | None, ratio: float | None,
                energy: float | None) -> int:
    given = [x is not None for x in (rank, ratio, energy)]
    if sum(given) != 1:
        raise ValueError("give exactly one of rank=, ratio= (fraction of parameters kept) or energy= "
                         "(fraction of squared singular-value energy kept)")
    full = min(m, n)
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
            raise ValueError(f"rank must be a non-negative integer, got {rank!r}")
        return int(min(rank, full))  # above the true rank the factorization is simply exact
    if ratio is not None:
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be a fraction of parameters in [0, 1], got {ratio}")
        return min(full, int(np.floor(ratio * m * n / (m + n) + 1e-9)))
    assert energy is not None and s is not None  # exactly one of the three is given; energy needs the spectrum
    if not 0 <= energy <= 1:
        raise ValueError(f"energy must be a fraction in [0, 1], got {energy}")
    e = np.cumsum(s.astype(np.float64) ** 2)
    if e.size == 0 or e[-1] == 0:
        return 0
    return min(full, int(np.searchsorted(e / e[-1], energy - 1e-12)) + 1) if energy > 0 else 0


def _randomized_svd(a: np.ndarray, r: int, oversample: int, power_iters: int, seed: int):
    """Halko-Martinsson-Tropp: range finder with power iterations (re-orthonormalised by QR)."""
    m, n = a.shape
    k = min(min(m, n), r + oversample)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(a @ rng.standard_normal((n, k)))
    for _ in range(power_iters):
        q, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ q)
    ub, s, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    return q @ ub, s, vt


def low_rank(w: Any, rank: int | None = None, *, ratio: float | None = None, energy: float | None = None,
             method: str = "exact", force: bool = False, oversample: int = 10, power_iters: int = 4,
             seed: int = 0, name: str = "w") -> LowRank:
    """Factor a 2-D ``w`` (m x n) as ``A @ B`` with ``A = U_r S_r`` and ``B = V_r^T``.

    Rank: ``rank`` directly (clamped to min(m, n)), ``ratio`` = fraction of
    the m n parameters kept (r = floor(ratio m n / (m + n))), or ``energy`` =
    fraction of sum(sigma**2) kept (chosen from the exact spectrum).
    ``method="randomized"`` uses ``oversample`` extra columns and
    ``power_iters`` power iterations with a seeded generator.
    Rank 0 gives empty factors and a zero approximation; zero and
    rank-deficient matrices give exact, NaN-free results; NaN/inf is a
    ValueError naming ``name``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    a = real_array(w, name, integers="float", min_ndim=2)
    require_finite(a, name, "low rank")
    if a.ndim != 2:
        raise ValueError(f"{name}: low_rank factors a 2-D matrix, got shape {a.shape}")
    m, n = a.shape
    a64 = a.astype(np.float64)
    s_full = np.linalg.svd(a64, compute_uv=False) if energy is not None else None
    r = choose_rank(m, n, s_full, rank, ratio, energy)
    if method == "exact":
        u, s, vt = np.linalg.svd(a64, full_matrices=False)
    else:
        u, s, vt = _randomized_svd(a64, r, oversample, power_iters, seed) if r else (
            np.zeros((m, 0)), np.zeros(0), np.zeros((0, n)))
    dt = a.dtype if a.dtype in (np.float32, np.float64) else np.dtype(np.float32)
    A = (u[:, :r] * s[:r]).astype(dt)
    B = vt[:r].astype(dt)
    st = Factors(contiguous(A), contiguous(B))
    applied = force or r < break_even_rank(m, n)
    rep = Report(title=f"low rank {method}")
    src_bytes = as_numpy(w).nbytes
    if applied:
        row = TensorReport.measure(name, a, st.dense(), method=f"svd {method} r={r}", bytes_before=src_bytes,
                                   bytes_after=st.nbytes, details={"rank": r})
    else:
        row = TensorReport.measure(name, a, a, method=f"svd r={r} not applied (r >= mn/(m+n) = "
                                   f"{break_even_rank(m, n):.1f}: no memory saved)", bytes_before=src_bytes,
                                   bytes_after=src_bytes, details={"rank": r, "applied": False})
    rep.add(row)
    return LowRank(like(st.A, w), like(st.B, w), r, rep, st, applied, s)


def eckart_young_error(s: np.ndarray, r: int) -> float:
    """The optimal relative Frobenius error of a rank-r approximation: sqrt(sum_{i>r} s_i^2 / sum s_i^2)."""
    s2 = np.asarray(s, np.float64) ** 2
    tot = s2.sum()
    return float(np.sqrt(s2[r:].sum() / tot)) if tot else 0.0
