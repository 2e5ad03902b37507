"""Magnitude (unstructured, per tensor or global), structured and N:M pruning.

Every function takes numpy arrays or torch tensors and returns the same kind,
with a ``report`` in lowbit's shared ``Report`` type whose bytes are those of
a real storage format (see ``compress.storage``).

Ties are broken deterministically: among equal magnitudes (or norms) the
element (or slice) with the lower flat index is pruned first.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Mapping

import numpy as np

from precision.arrays import as_numpy, like, real_array, require_finite
from precision.report import Report, TensorReport

from ._common import amount_to_count, out_dtype_like, smallest_k
from .storage import NM, Bitmask, Structured


class PruneResult:
    """``weight`` (pruned, or smaller for structured), ``mask`` (kept = True, unstructured and N:M)
    or ``kept`` (indices along ``axis``, structured), the ``storage`` object and the ``report``.

    ``storage`` and ``report`` are computed on first access, so a caller that
    only needs the mask does not pay for the error metrics.
    """

    def __init__(self, weight: Any, *, make_storage: Callable[[], Any], make_report: Callable[[Any], Report],
                 mask: Any = None, kept: Any = None, axis: int | None = None) -> None:
        self.weight, self.mask, self.kept, self.axis = weight, mask, kept, axis
        self._make_storage, self._make_report = make_storage, make_report

    @cached_property
    def storage(self) -> Any:
        return self._make_storage()

    @cached_property
    def report(self) -> Report:
        return self._make_report(self.storage)


def _report_row(name, ref, approx, method, storage, src_nbytes) -> TensorReport:
    return TensorReport.measure(name, ref, approx, method=method, bytes_after=storage.nbytes, bytes_before=src_nbytes)


def _single(title: str, name: str, ref: np.ndarray, method: str, src_nbytes: int) -> Callable[[Any], Report]:
    """A deferred one-row report. ``ref`` is snapshotted now if it is a view of the caller's
    tensor, so later in-place changes to that tensor cannot alter the measured error."""
    ref = ref.copy() if ref.base is not None or not ref.flags.owndata else ref

    def make(storage) -> Report:
        rep = Report(title=title)
        rep.add(_report_row(name, ref, storage.dense(), method, storage, src_nbytes))
        return rep
    return make


def _finite_weight(w: Any, name: str, min_ndim: int = 0) -> np.ndarray:
    a = real_array(w, name, integers="float", min_ndim=min_ndim)
    require_finite(a, name, "pruning")
    return a


def magnitude_prune(w: Any, sparsity: float | None = None, *, count: int | None = None, name: str = "w") -> PruneResult:
    """Zero the ``sparsity`` fraction (or ``count`` elements) of smallest |w|.

    ``sparsity`` is a fraction in [0, 1] (rounded to the nearest element count
    as torch does); an integer number of elements goes in ``count`` — so
    ``sparsity=1`` means everything, never "one element". The mask equals
    ``torch.nn.utils.prune.l1_unstructured`` on inputs without ties.
    Memory: bitmask + kept values (or dense, when smaller).
    """
    a = real_array(w, name, integers="float")
    k = amount_to_count(a.size, sparsity, count)
    mag = np.abs(a)
    require_finite(a, name, "pruning", mag)
    keep = np.asarray(~smallest_k(mag, k))
    # as torch's weight_orig * mask (-0.0 where a negative weight is pruned); cheaper than np.where; asarray: a
    # 0-d product is a numpy scalar, and a 0-d input is one element like any other
    pruned = np.asarray(a * keep)
    return PruneResult(like(out_dtype_like(w, pruned), w), mask=like(keep, w),
                       make_storage=lambda: Bitmask.from_dense(pruned),
                       make_report=_single(f"magnitude pruning {k}/{a.size}", name, a,
                                           f"magnitude {k / max(a.size, 1):.0%}", as_numpy(w).nbytes))


@dataclass
class PruneSet:
    """Results of pruning several tensors at once: ``results[name]`` per tensor, ``report`` for all."""

    results: dict[str, PruneResult]
    report: Report
    threshold: float = 0.0
    weights: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, Any] = field(default_factory=dict)


def global_magnitude_prune(tensors: Mapping[str, Any], sparsity: float | None = None, *,
                           count: int | None = None) -> PruneSet:
    """One magnitude threshold across all ``tensors`` (a mapping name -> tensor), as
    ``torch.nn.utils.prune.global_unstructured`` with L1: the smallest |w| over the union are pruned.
    Ties across tensors break by (order in the mapping, flat index)."""
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError("global_magnitude_prune needs a non-empty mapping of name -> tensor")
    arrays = {n: _finite_weight(t, n) for n, t in tensors.items()}
    flat = np.concatenate([np.abs(a).reshape(-1) for a in arrays.values()]) if arrays else np.zeros(0)
    k = amount_to_count(flat.size, sparsity, count)
    prune = smallest_k(flat, k)
    thr = float(flat[prune].max()) if k else 0.0
    out, rep, off = {}, Report(title=f"global magnitude pruning {k}/{flat.size}"), 0
    for n, a in arrays.items():
        p = prune[off:off + a.size].reshape(a.shape)
        off += a.size
        keep = np.asarray(~p)
        pruned = np.asarray(a * keep)  # 0-d: an array, not a numpy scalar
        src = tensors[n]
        r = PruneResult(like(out_dtype_like(src, pruned), src), mask=like(keep, src),
                        make_storage=functools.partial(Bitmask.from_dense, pruned),
                        make_report=_single("global magnitude pruning", n, a,
                                            f"global magnitude {k / max(flat.size, 1):.0%}", as_numpy(src).nbytes))
        rep.add(r.report.tensors[0])
        out[n] = r
    return PruneSet(out, rep, thr, {n: r.weight for n, r in out.items()}, {n: r.mask for n, r in out.items()})


def slice_norms(a: np.ndarray, axis: int, norm: int) -> np.ndarray:
    red = tuple(i for i in range(a.ndim) if i != axis)
    if norm == 1:
        return np.abs(a).sum(axis=red, dtype=np.float64)
    return np.sqrt(np.square(a, dtype=np.float64).sum(axis=red))


def structured_prune(w: Any, amount: float | None = None, *, axis: int = 0, norm: int = 2, count: int | None = None,
                     name: str = "w", group: int = 1) -> PruneResult:
    """Remove whole slices along ``axis`` (0: rows / output channels, 1: columns / inputs)
    with the smallest L1 or L2 ``norm``; ``group`` > 1 removes consecutive groups of that many
    slices together (e.g. attention heads), ranked by the norm of the whole group.

    Returns the smaller tensor as ``weight`` and the sorted ``kept`` indices.
    ``amount`` is a fraction of slices (or groups) in [0, 1]; ``count`` a number of them.
    Memory: the smaller dense tensor plus a bitmask of kept slices.
    """
    a = _finite_weight(w, name, min_ndim=2)
    if norm not in (1, 2):
        raise ValueError(f"norm must be 1 or 2, got {norm!r}")
    if not -a.ndim <= axis < a.ndim:
        raise ValueError(f"{name}: axis {axis} out of range for shape {a.shape}")
    axis %= a.ndim
    n = a.shape[axis]
    if group < 1 or n % group:
        raise ValueError(f"{name}: group={group} must divide the {n} slices along axis {axis}")
    scores = slice_norms(a, axis, norm)
    gs = scores.reshape(-1, group)
    gscore = gs.sum(1) if norm == 1 else np.sqrt((gs ** 2).sum(1))
    k = amount_to_count(gscore.size, amount, count, "amount")
    drop_g = smallest_k(gscore, k)
    keep = np.repeat(~drop_g, group)
    kept = np.flatnonzero(keep)
    st = Structured.from_kept(a, kept, axis)
    smaller = out_dtype_like(w, st.values)
    return PruneResult(like(smaller, w), kept=like(kept.astype(np.int64), w), axis=axis, make_storage=lambda: st,
                       make_report=_single(f"structured pruning along axis {axis}", name, a,
                                           f"structured L{norm} axis {axis} {k / max(gscore.size, 1):.0%}",
                                           as_numpy(w).nbytes))


def nm_prune(w: Any, n: int = 2, m: int = 4, *, name: str = "w") -> PruneResult:
    """Keep the ``n`` largest |w| in every group of ``m`` consecutive elements along the last
    (input) axis — semi-structured N:M sparsity (2:4 by default). Ties: lower index kept.
    Memory: kept values plus their packed in-group positions."""
    a = _finite_weight(w, name, min_ndim=1)
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer))) or n < 0 or m < 1:
        raise ValueError(f"n and m must be integers with 0 <= n <= m and m >= 1, got n={n!r}, m={m!r}")
    if n > m:
        raise ValueError(f"n={n} > m={m}: N:M keeps n of every m elements, so n must not exceed m")
    if a.shape[-1] % m:
        raise ValueError(f"{name}: the last axis ({a.shape[-1]}) must be a multiple of m={m}")
    g = np.abs(a.reshape(-1, m))
    # stable sort on -|w|: the largest first, lower index first among ties
    order = np.argsort(-g, axis=1, kind="stable")
    pos = np.sort(order[:, :n], axis=1)
    st = NM.from_dense(a, n, m, pos)
    mask = np.zeros(g.shape, bool)
    np.put_along_axis(mask, pos, True, axis=1)
    mask = mask.reshape(a.shape)
    dense = np.where(mask, a, a.dtype.type(0))
    return PruneResult(like(out_dtype_like(w, dense), w), mask=like(mask, w), make_storage=lambda: st,
                       make_report=_single(f"{n}:{m} pruning", name, a, f"{n}:{m}", as_numpy(w).nbytes))
