"""The exact reference: what rounding to a format, a block format or an integer scheme must give.

Every answer comes from the rational value of each input, never from a float computation that could
round on the way: floats (float16, bfloat16, float32, float64 and lowbit's small formats) are exact in
float64, integers up to 2**53 too, and larger integers take the scalar path in :class:`fractions.Fraction`.
A format's finite values are tabulated once (formats up to 16 bits; wider ones go through the scalar
path), and each input is placed between its two neighbours: below the midpoint, above it, or on it (a
tie). Midpoints of formats up to 16 bits are exact in float64, so every comparison is exact.

The conventions are lowbit's contract (see :func:`precision.round_to`): NaN in gives NaN (a ValueError
for formats without NaN, fp6/fp4); overflow is ``"ieee"`` (inf where the format has it, else NaN;
formats with neither saturate) or ``"saturate"``; ``subnormals="flush"`` makes results that round to a
subnormal a zero of the same sign; negative zero only where the format has one; the exponent-only
``e8m0`` has no zero (0 and below give NaN, tiny values its smallest value) and, its significands all
being 1, breaks ties upward.
"""

from __future__ import annotations

import bisect
import math
from fractions import Fraction
from functools import lru_cache
from typing import Any

import numpy as np

from ..arrays import as_numpy, is_torch, like, torch
from ..codec import check_modes
from ..formats import FloatFormat, get_format

def _check(rounding: str, overflow: str, subnormals: str) -> None:
    if rounding == "stochastic":
        raise ValueError("the reference is deterministic: test stochastic rounding with assert_unbiased")
    check_modes(rounding, overflow, subnormals)


@lru_cache(maxsize=None)
def _exact_table(fmt: FloatFormat) -> tuple[list[Fraction], list[bool]]:
    """The format's non-negative finite values, sorted, exactly, with the parity of each significand."""
    vals: dict[Fraction, bool] = {}
    for code in range(fmt.num_codes):
        if fmt.signed and code & fmt.sign_mask:
            continue
        v = fmt.exact_value(code)
        if isinstance(v, (Fraction, int)):
            # parity of the significand; with no mantissa bits every nonzero value's is the implicit 1
            vals[Fraction(v)] = bool(code & 1) if fmt.mantissa_bits > 0 else v != 0
    keys = sorted(vals)
    return keys, [vals[k] for k in keys]


@lru_cache(maxsize=None)
def _float_table(fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray, float]:
    """(values, odd, the overflow step) as float64 arrays for formats up to 16 bits (exact in float64)."""
    values, odd = _exact_table(fmt)
    top = values[-1] + Fraction(2) ** (fmt.max_exponent - fmt.mantissa_bits)  # the value after the largest
    return np.array([float(v) for v in values]), np.array(odd, bool), float(top)


def reference_round_scalar(x: Fraction | float, fmt: FloatFormat, rounding: str = "nearest_even",
                           overflow: str = "ieee", subnormals: str = "keep") -> float:
    """The reference for one exact value (a Fraction, any size) or a special float (inf, NaN, -0.0), as a
    Python float: the scalar path of :func:`reference_round`."""
    if isinstance(x, float) and math.isnan(x):
        if not fmt.has_nan:
            raise ValueError(f"input contains NaN, which {fmt.name} cannot represent (it has no NaN encoding)")
        return math.nan
    neg = x < 0 or (isinstance(x, float) and math.copysign(1.0, x) < 0)
    if fmt.specials == "fnu" and (x <= 0):
        return math.nan
    if isinstance(x, float) and math.isinf(x):
        return _overflowed(fmt, overflow, neg)
    ax = abs(Fraction(x))
    rounded = _round_abs(ax, fmt, rounding)
    if rounded is None:
        return _overflowed(fmt, overflow, neg)
    out = float(rounded)
    if subnormals == "flush" and fmt.has_subnormals and 0 < out < fmt.min_normal:
        out = 0.0
    return _signed(out, neg, fmt)


def _round_abs(ax: Fraction, fmt: FloatFormat, rounding: str) -> Fraction | None:
    """``ax >= 0`` rounded to ``fmt``'s magnitudes, exactly; None where it rounds past the largest."""
    if fmt.bits > 16:  # too many codes to tabulate: the arithmetic of a binary format
        if ax == 0:
            return Fraction(0)
        e = ax.numerator.bit_length() - ax.denominator.bit_length()
        if Fraction(2) ** e > ax:
            e -= 1  # now 2**e <= ax < 2**(e + 1)
        quantum = Fraction(2) ** (max(e, fmt.min_exponent) - fmt.mantissa_bits)
        q, rem = divmod(ax, quantum)
        if rem and rounding != "toward_zero":
            half = quantum / 2
            if rem > half or (rem == half and (rounding == "nearest_away" or q % 2 == 1)):
                q += 1
        res = q * quantum
        return None if res > Fraction(fmt.max_finite) else res
    values, odd = _exact_table(fmt)
    if fmt.specials == "fnu" and ax < values[0]:
        return values[0]
    i = bisect.bisect_left(values, ax)
    if i < len(values) and values[i] == ax:
        return values[i]
    lo, lo_odd = values[i - 1], odd[i - 1]
    hi = values[i] if i < len(values) else values[-1] + Fraction(2) ** (fmt.max_exponent - fmt.mantissa_bits)
    if rounding == "toward_zero":
        res = lo
    elif ax - lo < hi - ax or (ax - lo == hi - ax and rounding == "nearest_even" and not lo_odd):
        res = lo
    else:
        res = hi
    return None if i >= len(values) and res == hi else res


def round_fraction(x: Fraction, fmt: "FloatFormat | str", rounding: str = "nearest_even") -> Fraction:
    """An exact finite value rounded to ``fmt`` (saturating), as an exact Fraction: the building block of
    the block and integer references (e.g. a float32 product, correctly rounded)."""
    fmt = get_format(fmt)
    r = _round_abs(abs(Fraction(x)), fmt, rounding)
    r = Fraction(fmt.max_finite) if r is None else r
    return -r if x < 0 else r


def _overflowed(fmt: FloatFormat, overflow: str, neg: bool) -> float:
    if overflow == "saturate" or fmt.specials == "finite":
        out = float(fmt.max_finite)
    elif fmt.has_inf:
        out = math.inf
    else:
        return math.nan
    return -out if neg and fmt.signed else out


def _signed(out: float, neg: bool, fmt: FloatFormat) -> float:
    if out == 0 and (fmt.specials == "fnuz" or not fmt.signed):
        return 0.0
    return -out if neg else out


def _vector(a: np.ndarray, fmt: FloatFormat, rounding: str, overflow: str, subnormals: str) -> np.ndarray:
    """The reference for float64 values (each exact) in a format of at most 16 bits, vectorized."""
    values, odd, top = _float_table(fmt)
    nan = np.isnan(a)
    if nan.any() and not fmt.has_nan:
        raise ValueError(f"input contains NaN, which {fmt.name} cannot represent (it has no NaN encoding)")
    neg = np.signbit(a)
    ax = np.abs(a)
    inf = np.isinf(ax)
    n = values.size
    i = np.searchsorted(values, np.where(inf | nan, 0.0, ax), side="left")
    ic = np.minimum(i, n - 1)
    exact = values[ic] == ax
    lo_i = np.maximum(i - 1, 0)
    lo, lo_odd = values[lo_i], odd[lo_i]
    hi = np.where(i < n, values[ic], top)
    mid = (lo + hi) / 2  # exact: both have at most 12 significant bits here
    if rounding == "toward_zero":
        up = np.zeros(a.shape, bool)
    else:
        tie_up = lo_odd if rounding == "nearest_even" else np.ones(a.shape, bool)
        up = (ax > mid) | ((ax == mid) & tie_up)
    res = np.where(exact, ax, np.where(up, hi, lo))
    over = (~exact & up & (i >= n)) | inf
    if fmt.specials == "fnu":
        res = np.where(ax < values[0], values[0], res)
    if subnormals == "flush" and fmt.has_subnormals:
        res = np.where((res > 0) & (res < fmt.min_normal), 0.0, res)
    if overflow == "saturate" or fmt.specials == "finite":
        res = np.where(over, float(fmt.max_finite), res)
    else:
        res = np.where(over, np.inf if fmt.has_inf else np.nan, res)
    if fmt.specials == "fnuz" or not fmt.signed:
        res = np.where(neg & (res != 0), -res, res) if fmt.signed else res
    else:
        res = np.where(neg, -res, res)
    if fmt.specials == "fnu":
        res = np.where(neg | (a == 0), np.nan, res)
    return np.where(nan, np.nan, res)


def _exact_values(x: Any) -> tuple[np.ndarray | None, list[Fraction | float] | None, np.dtype]:
    """``x`` as exact float64 values, or (for integers beyond 2**53) as a list of Fractions."""
    a = np.asarray(as_numpy(x))
    if a.dtype == np.bool_ or a.dtype.kind == "c":
        raise TypeError(f"reference_round takes real numbers, got {a.dtype}")
    if a.dtype.kind in "iu":
        if a.size and (int(a.max()) > 2**53 or int(a.min()) < -(2**53)):
            return None, [Fraction(int(v)) for v in a.reshape(-1).tolist()], a.dtype
        return a.astype(np.float64), None, a.dtype
    if a.dtype.kind == "f" and a.dtype.itemsize <= 8:
        return a.astype(np.float64), None, a.dtype
    if a.dtype.kind == "V":  # ml_dtypes' bfloat16 and small floats
        try:
            return a.astype(np.float64), None, a.dtype
        except (TypeError, ValueError):
            pass
    raise TypeError(f"reference_round takes real numbers (floats of at most 64 bits or integers), got {a.dtype}")


def _out_dtype(src: np.dtype, fmt: FloatFormat) -> np.dtype:
    """The input's float dtype where it holds every value of ``fmt`` exactly, else float64."""
    if src.kind != "f" and src.name != "bfloat16":
        return np.dtype(np.float64)
    info = {np.dtype(np.float16): (5, 10, -14), np.dtype(np.float32): (8, 23, -126), np.dtype(np.float64): (11, 52, -1022)}
    if src.name == "bfloat16":
        e_bits, m_bits, emin = 8, 7, -126
    elif src in info:
        e_bits, m_bits, emin = info[src]
    else:
        return np.dtype(np.float64)
    fits = (fmt.mantissa_bits <= m_bits and fmt.max_exponent <= (1 << (e_bits - 1)) - 1
            and fmt.min_exponent - fmt.mantissa_bits >= emin - m_bits)
    return src if fits else np.dtype(np.float64)


def reference_round(x: Any, fmt: "FloatFormat | str", *, rounding: str = "nearest_even", overflow: str = "ieee",
                    subnormals: str = "keep") -> Any:
    """``x`` rounded to ``fmt`` exactly, once, from each input's rational value: the answer
    :func:`precision.round_to` (and any correct cast) must give.

    ``x``: numpy array, scalar or torch tensor of any real dtype (float64, float32, float16, bfloat16,
    lowbit's small floats, integers of any size). ``rounding``: ``nearest_even``, ``nearest_away`` or
    ``toward_zero``; ``overflow``: ``ieee`` or ``saturate``; ``subnormals``: ``keep`` or ``flush`` (see
    the module docstring for NaN, inf, zero signs and ``e8m0``). Returns the same kind (a torch tensor on
    its device for a tensor), in the input's float dtype where that holds every value of ``fmt`` exactly,
    else float64. NaN into a format without NaN raises ValueError, as ``round_to`` does.
    """
    fmt = get_format(fmt)
    _check(rounding, overflow, subnormals)
    a, big, src = _exact_values(x)
    if big is not None:
        out = np.array([reference_round_scalar(v, fmt, rounding, overflow, subnormals) for v in big]).reshape(np.shape(as_numpy(x)))
    elif fmt.bits <= 16:
        assert a is not None
        with np.errstate(invalid="ignore"):
            out = _vector(a, fmt, rounding, overflow, subnormals)
    else:
        assert a is not None
        flat = [(Fraction(v) if math.isfinite(v) else v) for v in a.reshape(-1).tolist()]
        neg0 = np.signbit(a.reshape(-1))
        vals = [(reference_round_scalar(-0.0, fmt, rounding, overflow, subnormals) if (v == 0 and s) else
                 reference_round_scalar(v, fmt, rounding, overflow, subnormals)) for v, s in zip(flat, neg0)]
        out = np.array(vals, np.float64).reshape(a.shape)
    keep = _out_dtype(np.dtype(src), fmt) == np.dtype(src)
    if is_torch(x):
        t = torch.from_numpy(np.ascontiguousarray(out, np.float64))
        return t.to(device=x.device, dtype=x.dtype if keep and x.is_floating_point() else torch.float64)
    res = out.astype(src if keep else np.float64)
    return like(res, x) if isinstance(x, np.ndarray) else (res[()] if res.ndim == 0 else res)


def neighbours(x: float, fmt: "FloatFormat | str") -> tuple[float, float]:
    """The two values of ``fmt`` around the finite ``x`` (``lo <= |x| <= hi``, signed like ``x``); equal
    when ``x`` is a value of ``fmt``. The pair stochastic rounding must choose from."""
    fmt = get_format(fmt)
    lo = float(reference_round(np.float64(x), fmt, rounding="toward_zero", overflow="saturate"))
    if lo == x:
        return lo, lo
    values, _ = _exact_table(fmt)
    i = bisect.bisect_right(values, Fraction(abs(lo)))
    hi = float(values[i]) if i < len(values) else float(values[-1] + Fraction(2) ** (fmt.max_exponent - fmt.mantissa_bits))
    return (lo, -hi) if x < 0 else (lo, hi)
