"""Range estimation: from data to QParams.

``calibrate(data, spec, method)`` where ``data`` is one tensor/array or an
iterable of batches. Methods:

``minmax``
    the observed min and max per block (identical to torch.ao's
    ``MinMaxObserver`` / ``PerChannelMinMaxObserver`` for the same scheme).
``moving_average``
    min/max averaged over batches with ``momentum`` (torch's
    ``MovingAverageMinMaxObserver`` with ``averaging_constant=momentum``).
``percentile``
    clip at the ``percentile`` of |x| per block (affine: of x at both ends).
``mse``
    search the clipping ratio (a grid of ``grid`` points, then a finer grid
    around the best) that minimises the quantization MSE, per block.
``entropy``
    TensorRT's KL-divergence calibration on a 2048-bin histogram of |x|;
    per tensor only (activations).

Scales follow torch.ao: symmetric ``amax / ((qmax - qmin) / 2)``, affine
``(max - min) / (qmax - qmin)``, both at least float32 eps (torch's floor: a
block whose range is below ~1.5e-5 gets scale eps); the range always includes
0. One deliberate difference: a *constant* nonzero block gets
``scale = |c| / qmax`` (symmetric, floored at the smallest normal float32) so
that it reconstructs to within one float32 rounding, where torch's scale
clips it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterable

import numpy as np

from precision.arrays import is_torch, real_array, require_finite, torch

from .quantize import QParams, blocked, fake_quantize_array
from .spec import PerChannel, QuantSpec

METHODS = ("minmax", "moving_average", "percentile", "mse", "entropy")
_EPS = np.finfo(np.float32).eps
# Python floats for the torch paths: a numpy scalar met inside torch.compile becomes a tensor, and its
# value a data-dependent graph break
_EPS_F = float(_EPS)
_TINY_F = float(np.finfo(np.float32).tiny)


def _is_single(data: Any) -> bool:
    return is_torch(data) or isinstance(data, (np.ndarray, np.generic, float, int))


def batches_of(data: Any, name: str) -> list[np.ndarray]:
    if _is_single(data):
        items = [data]
    elif isinstance(data, Iterable):
        items = list(data)
    else:
        raise TypeError(f"{name}: expected a tensor, an array or an iterable of them, got {type(data).__name__}")
    if not items:
        raise ValueError(f"{name}: no calibration data (an empty iterable of batches)")
    out = []
    for i, b in enumerate(items):
        a = real_array(b, f"{name}[{i}]" if len(items) > 1 else name, integers="float")
        require_finite(a, f"{name}[{i}]" if len(items) > 1 else name, "quantization")
        if a.size == 0:
            raise ValueError(f"{name}: calibration batch {i} is empty")
        out.append(a)
    return out


def blocks_2d(a: Any, spec: QuantSpec, name: str = "x") -> Any:
    """``a`` (numpy or torch) as (number of blocks, elements per block), blocks in params order."""
    block = spec.block_shape(a.shape, name)
    v: Any = blocked(a, block)
    nd = a.ndim
    order = [2 * i for i in range(nd)] + [2 * i + 1 for i in range(nd)]
    v = v.permute(order) if is_torch(v) else v.transpose(order)
    nblocks = math.prod([s // b for s, b in zip(a.shape, block)])
    return v.reshape(nblocks, -1)


def qparams_from_range(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec, shape: tuple[int, ...]) -> QParams:
    """torch.ao's scale/zero-point formulas for per-block ranges ``lo <= 0 <= hi`` (float32)."""
    pshape = spec.params_shape(shape)
    with np.errstate(over="ignore"):
        scale, zp = scale_zero_point(np.asarray(lo, np.float32).reshape(pshape), np.asarray(hi, np.float32).reshape(pshape),
                                     spec)
    if not np.all(np.isfinite(scale)):
        raise ValueError("calibrate: the value range is too wide for a float32 scale")
    return QParams(scale, zp, spec, tuple(shape))


def scale_zero_point(lo: Any, hi: Any, spec: QuantSpec) -> tuple[Any, Any]:
    """(float32 scale, int32 zero point) of each block's range ``[lo, hi]`` (float32, widened to include
    0), numpy arrays or torch tensors alike (torch stays on its device and compiles): the formulas of
    torch.ao (module docstring)."""
    qmin, qmax = spec.qmin, spec.qmax
    if is_torch(lo):
        lo_n, hi_p = lo.clamp_max(0.0), hi.clamp_min(0.0)
        if spec.symmetric:
            scale = constant_block_scale(lo, hi, symmetric_scale(torch.maximum(-lo_n, hi_p), spec), spec)
            return scale, torch.full_like(lo, spec.symmetric_zero_point, dtype=torch.int32)
        scale = ((hi_p - lo_n) / float(qmax - qmin)).clamp_min(_EPS_F)
        return scale, torch.clamp(qmin - torch.round(lo_n / scale), qmin, qmax).to(torch.int32)
    lo_n = np.minimum(lo, np.float32(0))
    hi_p = np.maximum(hi, np.float32(0))
    if spec.symmetric:
        amax = np.maximum(-lo_n, hi_p)
        scale = constant_block_scale(lo, hi, symmetric_scale(amax, spec), spec).astype(np.float32)
        return scale, np.full(np.shape(lo), spec.symmetric_zero_point, np.int32)
    scale = np.maximum((hi_p - lo_n) / np.float32(qmax - qmin), np.float32(_EPS)).astype(np.float32)
    return scale, np.clip(qmin - np.rint(lo_n / scale), qmin, qmax).astype(np.int32)


def symmetric_scale(amax: Any, spec: QuantSpec) -> Any:
    """torch.ao's symmetric scale ``max(amax / ((qmax - qmin) / 2), eps)`` in float32, for numpy or torch."""
    half_range = (spec.qmax - spec.qmin) / 2
    if is_torch(amax):
        return (amax / half_range).clamp_min(_EPS_F)
    return np.maximum(amax / np.float32(half_range), np.float32(_EPS)).astype(np.float32)


def constant_block_scale(lo: Any, hi: Any, scale: Any, spec: QuantSpec) -> Any:
    """``scale``, except where a block's values are all one nonzero ``c`` (``lo == hi != 0``): there
    the symmetric scale that maps ``c`` exactly onto the end code of its sign, floored at the
    smallest normal float32 rather than torch's eps so that tiny constants stay exact. Numpy or torch."""
    zp = spec.symmetric_zero_point
    pos, neg = float(spec.qmax - zp), float(zp - spec.qmin)
    tiny = _TINY_F
    const = (lo == hi) & (lo != 0)
    if is_torch(lo):  # no early return: a data-dependent branch would break a compiled graph
        end = (lo > 0).to(lo.dtype) * (pos - neg) + neg  # exact: small integers
        return (lo.abs() / end).clamp_min(tiny).where(const, scale)
    if not bool(const.any()):
        return scale
    end = np.where(lo > 0, np.float32(pos), np.float32(neg))
    return np.where(const, np.maximum(np.abs(lo) / end, np.float32(tiny)), scale)


def _stats(batches: list[np.ndarray], spec: QuantSpec, name: str):
    shape = batches[0].shape
    pshape = spec.params_shape(shape, name)
    for i, b in enumerate(batches[1:], 1):
        if spec.params_shape(b.shape, name) != pshape:
            raise ValueError(f"{name}: batch {i} has shape {b.shape}, which gives {spec.describe()} params of shape "
                             f"{spec.params_shape(b.shape, name)} instead of {pshape}")
    return shape, pshape


def _entropy_threshold(absx: np.ndarray, bits: int, bins: int = 2048) -> float:
    """TensorRT's KL calibration: the |x| threshold whose quantized histogram is closest to the data's."""
    amax = float(absx.max())
    if amax == 0:
        return 0.0
    hist, edges = np.histogram(absx, bins=bins, range=(0, amax))
    hist = hist.astype(np.float64)
    nq = 1 << (bits - 1)
    best_kl, best_i = np.inf, bins
    for i in range(nq, bins + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nz = hist[:i] != 0
        # merge the i reference bins into nq quantized bins, then spread each back over its nonzero bins
        idx = (np.arange(i) * nq) // i
        qsum = np.bincount(idx, weights=hist[:i], minlength=nq)
        qcnt = np.bincount(idx, weights=nz.astype(np.float64), minlength=nq)
        q = np.where(nz, qsum[idx] / np.maximum(qcnt[idx], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        p_, q_ = p / ps, q / qs
        m = p_ > 0
        if np.any(m & (q_ == 0)):
            kl = np.inf
        else:
            kl = float(np.sum(p_[m] * np.log(p_[m] / q_[m])))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(edges[best_i])


def _mse_search(x2d: np.ndarray, lo: np.ndarray, hi: np.ndarray, spec: QuantSpec, grid: int):
    """Per-block clipping ratio in (0, 1] that minimises the fake-quant MSE (coarse grid, then fine)."""
    nb = x2d.shape[0]
    flat_spec = replace(spec, granularity=PerChannel(kept_axis=0))  # one block per row of x2d
    best_err = np.full(nb, np.inf)
    best_a = np.ones(nb)

    def try_ratios(ratios: np.ndarray) -> None:
        for r in ratios:
            a = np.broadcast_to(r, (nb,)) if np.ndim(r) == 0 else r
            qp = qparams_from_range((lo * a).astype(np.float32), (hi * a).astype(np.float32), flat_spec, x2d.shape)
            fq, _ = fake_quantize_array(x2d, qp)
            err = np.einsum("ij,ij->i", fq - x2d, fq - x2d, dtype=np.float64)
            better = err < best_err
            best_err[better] = err[better]
            best_a[better] = a[better]

    try_ratios(np.linspace(1.0, 0.05, grid))
    step = 0.95 / (grid - 1)
    centre = best_a.copy()
    try_ratios(np.stack([np.clip(centre + d, 0.01, 1.0) for d in np.linspace(-step, step, 11)]))
    return best_a


def calibrate(data: Any, spec: QuantSpec, method: str = "minmax", *, momentum: float = 0.01,
              percentile: float = 99.99, grid: int = 40, bins: int = 2048, name: str = "x") -> QParams:
    """Estimate QParams for ``spec`` from one tensor or an iterable of batches.

    ``data``: numpy array / torch tensor, or an iterable of them (every batch
    must give the same params shape). NaN/inf or empty batches are a
    ValueError naming the batch. See the module docstring for the methods.
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if method not in METHODS:
        raise ValueError(f"calibrate: method must be one of {METHODS}, got {method!r}")
    batches = batches_of(data, name)
    shape, pshape = _stats(batches, spec, name)
    if method in ("minmax", "moving_average"):
        lo, hi = None, np.empty(0)
        for b in batches:
            x2d = blocks_2d(b, spec, name)
            bl, bh = x2d.min(axis=1), x2d.max(axis=1)
            if lo is None:
                lo, hi = bl, bh
            elif method == "minmax":
                lo, hi = np.minimum(lo, bl), np.maximum(hi, bh)
            else:
                if not 0 < momentum <= 1:
                    raise ValueError(f"calibrate: momentum must be in (0, 1], got {momentum}")
                lo = (lo + np.float32(momentum) * (bl - lo)).astype(np.float32)
                hi = (hi + np.float32(momentum) * (bh - hi)).astype(np.float32)
        assert lo is not None  # batches_of refuses an empty iterable
        return qparams_from_range(lo, hi, spec, shape)
    x2d = np.concatenate([blocks_2d(b, spec, name) for b in batches], axis=1)
    if method == "percentile":
        if not 0 < percentile <= 100:
            raise ValueError(f"calibrate: percentile must be in (0, 100], got {percentile}")
        if spec.symmetric:
            t = np.percentile(np.abs(x2d), percentile, axis=1)
            return qparams_from_range(-t, t, spec, shape)
        lo = np.percentile(x2d, 100 - percentile, axis=1)
        hi = np.percentile(x2d, percentile, axis=1)
        return qparams_from_range(lo, hi, spec, shape)
    if method == "mse":
        if grid < 2:
            raise ValueError(f"calibrate: grid must be at least 2, got {grid}")
        lo, hi = x2d.min(axis=1), x2d.max(axis=1)
        if spec.symmetric:
            amax = np.maximum(-lo, hi)
            lo, hi = -amax, amax
        ratio = _mse_search(x2d.astype(np.float32), lo.astype(np.float64), hi.astype(np.float64), spec, grid)
        return qparams_from_range(lo * ratio, hi * ratio, spec, shape)
    # entropy
    if int(np.prod(pshape)) != 1:
        raise ValueError("calibrate: method='entropy' estimates one range per tensor; use PerTensor() "
                         "(or 'percentile'/'mse' for per-channel ranges)")
    t = _entropy_threshold(np.abs(x2d.reshape(-1)), spec.bits, bins)
    has_neg = bool((x2d < 0).any())
    return qparams_from_range(np.array([-t if has_neg else 0.0]), np.array([t]), spec, shape)
