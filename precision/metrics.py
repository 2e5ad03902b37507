"""Error metrics between a reference tensor and its approximation.

Every metric accumulates in float64 whatever the input dtype, in blocks so
that no full float64 copy of a large tensor is made. Inputs are numpy arrays
or torch tensors of the same shape (any real dtype).

Definitions (x: reference, y: approximation, e = y - x):

* ``mse``: mean(e**2)
* ``rel_error``: ||e||_F / ||x||_F (0 when both are 0, inf when only x is 0)
* ``sqnr_db``: 10 log10(sum x**2 / sum e**2); ``inf`` for an exact result
* ``max_abs_error``: max |e|
* ``cosine``: <x, y> / (||x|| ||y||) over the flattened tensors (1 when both are 0)
* ``zeroed``: how many nonzero x became exactly 0 in y (a quantizer whose range one
  huge outlier stretched flattens everything else to 0 while SQNR still looks fine)

Non-finite values: elements where y is not finite but x is are counted in
``nonfinite`` and make the metrics NaN/inf as arithmetic dictates; nothing
is silently dropped.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._native import Library, threads
from .arrays import contiguous, real_array

def _bind(lib: ctypes.CDLL) -> None:
    p = ctypes.c_void_p
    lib.lowbit_metrics_f32.argtypes = [p, p, ctypes.c_int64, p, p, ctypes.c_int]
    lib.lowbit_metrics_f32.restype = ctypes.c_int64
    lib.lowbit_all_finite_f32.argtypes = [p, ctypes.c_int64, ctypes.c_int]
    lib.lowbit_all_finite_f32.restype = ctypes.c_int
    i64 = ctypes.c_int64
    lib.lowbit_decode_measure.argtypes = [p, ctypes.c_int, p, i64, p, i64, i64, p, i64, p, p, p, ctypes.c_int]
    lib.lowbit_decode_measure.restype = i64


# the one-pass C metrics for float32 data; the numpy blocks below are the fallback (tested equal)
KERNELS = Library(Path(__file__).with_name("_kernels") / "metrics_kernels.c", _bind, fallback="numpy")
_C_MIN = 1 << 12  # below this the call costs more than the numpy passes

_BLOCK = 1 << 20
_LARGE = 2.0 ** 200  # squares of values up to this, summed over up to 2^63 elements, stay far from overflow
_STEP = 2.0 ** 200


def all_finite_c(a: np.ndarray) -> bool | None:
    """Whether the contiguous float32 array ``a`` holds no NaN or inf, in one C pass over its bits;
    None when the kernel is unavailable or ``a`` is not such an array."""
    lib = KERNELS.get() if a.dtype == np.float32 and a.flags.c_contiguous and a.size >= _C_MIN else None
    return None if lib is None else bool(lib.lowbit_all_finite_f32(a.ctypes.data, a.size, threads()))


def decode_measure_c(codes: np.ndarray, table: np.ndarray | None, x: np.ndarray, scale: np.ndarray | None, *,
                     values: bool) -> tuple[np.ndarray | None, np.ndarray, np.ndarray] | None:
    """Decode ``codes`` (uint8 or uint16, ``x``'s shape) through ``table`` (float32, one value per code;
    None for bfloat16 bits in uint16 codes, decoded exactly by a 16-bit shift), times ``scale`` (None,
    one float32, or one per index of axis 0), and measure the result against the float32 array ``x`` in
    one C pass. Returns (values or None, sums, counts) for :meth:`MetricsAccumulator.add_sums`; None when
    the kernel is unavailable or an argument does not fit (a code outside the table included)."""
    lib = KERNELS.get()
    if (lib is None or codes.dtype not in (np.uint8, np.uint16) or x.dtype != np.float32 or codes.shape != x.shape
            or (table is None and codes.dtype != np.uint16) or (table is not None and table.dtype != np.float32)
            or x.size == 0):
        return None
    codes, x = contiguous(codes), contiguous(x)
    table = None if table is None else contiguous(table)
    if scale is None:
        s, nscale, cols = None, 0, min(x.size, _BLOCK)
    else:
        s = contiguous(np.asarray(scale, np.float32)).reshape(-1)
        if s.size == 1:
            nscale, cols = 1, min(x.size, _BLOCK)
        elif x.ndim and s.size == x.shape[0]:
            nscale, cols = s.size, x.size // x.shape[0]
        else:
            return None
    vals = np.empty(x.shape, np.float32) if values else None
    sums, counts = np.zeros(5), np.zeros(2, np.int64)
    rc = lib.lowbit_decode_measure(codes.ctypes.data, codes.itemsize, None if table is None else table.ctypes.data,
                                   0 if table is None else table.size, x.ctypes.data,
                                   x.size, cols, None if s is None else s.ctypes.data, nscale,
                                   None if vals is None else vals.ctypes.data, sums.ctypes.data, counts.ctypes.data,
                                   threads())
    return None if rc != 0 else (vals, sums, counts)


@dataclass(frozen=True)
class ErrorMetrics:
    """All error metrics of one approximation (see the module docstring)."""

    mse: float
    rel_error: float
    sqnr_db: float
    max_abs_error: float
    cosine: float
    nonfinite: int
    zeroed: int = 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class MetricsAccumulator:
    """Error metrics over a tensor given piece by piece (e.g. row blocks), in float64.
    ``add(ref_piece, approx_piece)`` any number of times, then ``result()``."""

    def __init__(self) -> None:
        self.sxx = self.syy = self.sxy = self.see = self.mx = 0.0
        self.n = self.nonfinite = self.zeroed = 0
        # the sums of squares are kept for values divided by ``unit`` (a power of two, 1 unless the data
        # is so large that squares would overflow float64): ratios (SQNR, rel. error, cosine) do not
        # change, and mse is scaled back at the end
        self.unit = 1.0

    def add(self, reference: Any, approx: Any) -> "MetricsAccumulator":
        x, y = real_array(reference, "reference").reshape(-1), real_array(approx, "approx").reshape(-1)
        if x.shape != y.shape:
            raise ValueError(f"reference has {x.size} elements but approx has {y.size}")
        if x.dtype == y.dtype == np.float32 and x.size >= _C_MIN and self._add_c(x, y):
            return self
        with np.errstate(invalid="ignore", over="ignore"):
            for i in range(0, x.size, _BLOCK):
                a = x[i:i + _BLOCK].astype(np.float64)
                b = y[i:i + _BLOCK].astype(np.float64)
                e = b - a
                if a.size and (x.dtype == np.float64 or y.dtype == np.float64):  # only float64 holds such values
                    top = max(float(np.max(np.abs(np.where(np.isfinite(v), v, 0)))) for v in (a, b))
                    if top > _LARGE or self.unit > 1:
                        a, b, e = self._rescaled(a, b, top)
                # einsum, not dot: BLAS splits a dot among its threads, so its last bits would depend on them
                self.sxx += float(np.einsum("i,i->", a, a))
                self.syy += float(np.einsum("i,i->", b, b))
                self.sxy += float(np.einsum("i,i->", a, b))
                self.see += float(np.einsum("i,i->", e, e))
                if e.size:  # fmax: a NaN error is not a maximum (as in the C pass)
                    self.mx = max(self.mx, float(np.fmax.reduce(np.abs(e))) * self.unit)
                self.nonfinite += int(np.count_nonzero(~np.isfinite(b) & np.isfinite(a)))
                self.zeroed += int(np.count_nonzero((b == 0) & (a != 0)))
        self.n += x.size
        return self

    def _add_c(self, x: np.ndarray, y: np.ndarray) -> bool:
        """Add float32 data in the one-pass C kernel; False (nothing added) when it is unavailable."""
        lib = KERNELS.get()
        if lib is None:
            return False
        x, y = contiguous(x), contiguous(y)
        sums, counts = np.zeros(5), np.zeros(2, np.int64)
        if lib.lowbit_metrics_f32(x.ctypes.data, y.ctypes.data, x.size, sums.ctypes.data, counts.ctypes.data,
                                  threads()) != 0:
            return False
        self.add_sums(sums, counts, x.size)
        return True

    def add_sums(self, sums: np.ndarray, counts: np.ndarray, n: int) -> "MetricsAccumulator":
        """Add ``n`` elements whose float32 sums a C pass computed: ``sums`` = (sum x^2, sum y^2,
        sum xy, sum e^2, max |e|) and ``counts`` = (non-finite y where x is finite, zeroed)."""
        f = 1.0 / (self.unit * self.unit)  # float32 data never needs a unit, but earlier float64 blocks may have set one
        self.sxx += float(sums[0]) * f
        self.syy += float(sums[1]) * f
        self.sxy += float(sums[2]) * f
        self.see += float(sums[3]) * f
        self.mx = max(self.mx, float(sums[4]))
        self.nonfinite += int(counts[0])
        self.zeroed += int(counts[1])
        self.n += int(n)
        return self

    def _rescaled(self, a: np.ndarray, b: np.ndarray, top: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The block divided by the running unit, raising the unit (and rescaling the sums) so that
        ``top`` (the block's largest finite magnitude) divided by it stays at most _LARGE."""
        unit = self.unit
        while top / unit > _LARGE:
            unit *= _STEP
        if unit != self.unit:
            f = (self.unit / unit) ** 2
            self.sxx, self.syy, self.sxy, self.see = self.sxx * f, self.syy * f, self.sxy * f, self.see * f
            self.unit = unit
        a, b = a / unit, b / unit
        return a, b, b - a

    def result(self) -> ErrorMetrics:
        see = self.see
        mse = see / max(self.n, 1) * self.unit * self.unit  # a Python float: inf if the true mse is beyond float64
        return ErrorMetrics(
            mse=mse,
            rel_error=_ratio(math.sqrt(see) if see == see else see, math.sqrt(self.sxx)),
            sqnr_db=sqnr_from_powers(self.sxx, see),
            max_abs_error=self.mx,
            cosine=_cos(self.sxy, self.sxx, self.syy),
            nonfinite=self.nonfinite,
            zeroed=self.zeroed,
        )


def error_metrics(reference: Any, approx: Any) -> ErrorMetrics:
    """Compute every metric in one blocked float64 pass."""
    return MetricsAccumulator().add(reference, approx).result()


def _ratio(num: float, den: float) -> float:
    if num != num:
        return float("nan")
    if num == 0:
        return 0.0
    return num / den if den else float("inf")


def _cos(sxy: float, sxx: float, syy: float) -> float:
    if sxx == 0 and syy == 0:
        return 1.0
    if sxx == 0 or syy == 0:
        return 0.0
    return sxy / (math.sqrt(sxx) * math.sqrt(syy))  # two roots: the product of the sums could overflow


def sqnr_from_powers(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB; inf for zero noise, -inf for zero signal with noise."""
    if noise != noise:
        return float("nan")
    if noise == 0:
        return float("inf")
    ratio = signal / noise
    if ratio != ratio:  # inf / inf
        return float("nan")
    if ratio == 0:  # no signal, or noise beyond it by more than float64 spans (an inf error)
        return float("-inf")
    return 10.0 * math.log10(ratio)


def mse(reference: Any, approx: Any) -> float:
    """Mean squared error, float64."""
    return error_metrics(reference, approx).mse


def rel_error(reference: Any, approx: Any) -> float:
    """Relative Frobenius error ||approx - reference|| / ||reference||."""
    return error_metrics(reference, approx).rel_error


def sqnr_db(reference: Any, approx: Any) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    return error_metrics(reference, approx).sqnr_db


def max_abs_error(reference: Any, approx: Any) -> float:
    """Largest absolute elementwise error."""
    return error_metrics(reference, approx).max_abs_error


def cosine(reference: Any, approx: Any) -> float:
    """Cosine similarity of the flattened tensors."""
    return error_metrics(reference, approx).cosine
