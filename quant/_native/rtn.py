"""Integer round-to-nearest of contiguous blocks in one C pass (``rtn_kernels.c``).

The checkpoint path of :class:`quant.IntQuant` with minmax calibration: the
numpy path takes a pass each for the block minimum and maximum, the product
with the inverse scale, the rounding, two clamps, the zero point, the cast to
codes, the dequantized values and the error metrics. ``rtn_kernels.c`` reads
each block once for its range and once more for everything else, with the
same float32 operations in the same order as :func:`quant.calibrate` and
:func:`quant.quantize`, so codes, scales and zero points are bit-identical
(the tests compare them), and it accumulates the error metrics of
:mod:`precision.metrics` on the way.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from precision._native import Library, threads

from ..spec import QuantSpec


def _bind(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    lib.lowbit_rtn_f32.argtypes = [p, i64, i64, i32, i32, ctypes.c_int, i32, f32, f32, p, p, p, p, p, p, ctypes.c_int]
    lib.lowbit_rtn_f32.restype = i64
    lib.lowbit_pack_nibbles.argtypes = [p, i64, i32, p, ctypes.c_int]
    lib.lowbit_pack_nibbles.restype = None


KERNELS = Library(Path(__file__).with_name("rtn_kernels.c"), _bind, fallback="numpy")


@dataclass
class Blocks:
    """The result of :func:`rtn_blocks`: ``codes`` (the input's shape, ``spec.code_dtype``),
    ``scale`` (float32) and ``zero_point`` (int32), one per block in block order, ``values``
    (float32 dequantized values, or None), and ``sums``/``counts`` for
    :meth:`precision.metrics.MetricsAccumulator.add_sums` (None without metrics)."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    values: np.ndarray | None
    sums: np.ndarray | None
    counts: np.ndarray | None


def contiguous_blocks(shape: tuple[int, ...], block: tuple[int, ...]) -> int | None:
    """The block length when blocks of ``block`` tile a C-ordered array of ``shape`` as consecutive
    runs of memory in block order (leading block dims 1, one partial dim, full dims after), else None."""
    k = next((i for i, b in enumerate(block) if b != 1), len(block))
    if any(b != s for b, s in zip(block[k + 1:], shape[k + 1:])):
        return None
    return int(np.prod(block, dtype=np.int64))


def rtn_blocks(x: np.ndarray, spec: QuantSpec, *, values: bool, metrics: bool) -> Blocks | None:
    """minmax-calibrated round-to-nearest of the finite float32 array ``x`` under ``spec`` in one C
    pass; None when the kernel is unavailable, the blocks are not contiguous runs of ``x``, or a
    block's scale is not finite (the caller's numpy path then gives the result or the error)."""
    lib = KERNELS.get()
    if lib is None or x.dtype != np.float32 or not x.flags.c_contiguous or x.size == 0:
        return None
    length = contiguous_blocks(tuple(x.shape), spec.block_shape(tuple(x.shape)))
    if not length:
        return None
    nblocks = x.size // length
    codes = np.empty(x.shape, spec.code_dtype)
    scale = np.empty(nblocks, np.float32)
    zp = np.empty(nblocks, np.int32)
    vals = np.empty(x.shape, np.float32) if values else None
    sums, counts = (np.zeros(5), np.zeros(2, np.int64)) if metrics else (None, None)
    rc = lib.lowbit_rtn_f32(x.ctypes.data, nblocks, length, spec.qmin, spec.qmax, int(spec.symmetric),
                            spec.symmetric_zero_point, (spec.qmax - spec.qmin) / 2, float(np.finfo(np.float32).eps),
                            codes.ctypes.data, scale.ctypes.data, zp.ctypes.data,
                            None if vals is None else vals.ctypes.data,
                            None if sums is None else sums.ctypes.data,
                            None if counts is None else counts.ctypes.data, threads())
    if rc != 0:
        return None
    return Blocks(codes, scale, zp, vals, sums, counts)


def pack_nibbles_c(codes: np.ndarray, qmin: int) -> np.ndarray | None:
    """``code - qmin`` of 4-bit-or-narrower codes (int8 or uint8), two per byte, low nibble first, in one
    C pass; None when the kernel is unavailable (the numpy packing is the reference)."""
    lib = KERNELS.get()
    if lib is None or codes.dtype not in (np.int8, np.uint8):
        return None
    flat = np.ascontiguousarray(codes).reshape(-1)
    out = np.empty((flat.size + 1) // 2, np.uint8)
    lib.lowbit_pack_nibbles(flat.ctypes.data, flat.size, qmin, out.ctypes.data, threads())
    return out
