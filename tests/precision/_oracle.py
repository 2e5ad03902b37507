"""An exact rational oracle for rounding to a FloatFormat (ties to even or away from zero, or toward
zero; ieee overflow; subnormal results kept or flushed to zero)."""

from __future__ import annotations

import bisect
from fractions import Fraction
from functools import lru_cache

from precision.formats import FloatFormat


@lru_cache(maxsize=None)
def _table(fmt: FloatFormat):
    vals = []
    for code in range(fmt.num_codes):
        if fmt.signed and code & fmt.sign_mask:
            continue
        v = fmt.exact_value(code)
        if isinstance(v, Fraction) or isinstance(v, int):
            vals.append((Fraction(v), code))
    vals.sort()
    return [v for v, _ in vals], [c for _, c in vals]


def oracle_round(x: Fraction, fmt: FloatFormat, rounding: str = "nearest_even", subnormals: str = "keep") -> float:
    """Correctly rounded value of exact ``x`` in ``fmt`` as a float (inf/nan for overflow)."""
    out = _oracle_round(x, fmt, rounding)
    if subnormals == "flush" and fmt.has_subnormals and out == out and 0 < abs(out) < fmt.min_normal:
        out = -0.0 if out < 0 else 0.0
    if out == 0 and (fmt.specials == "fnuz" or not fmt.signed):  # a single zero, without a sign
        return 0.0
    return out


def _oracle_round(x: Fraction, fmt: FloatFormat, rounding: str) -> float:
    neg = x < 0
    ax = -x if neg else x
    values, codes = _table(fmt)
    if fmt.specials == "fnu":
        if x <= 0:
            return float("nan")
        if ax < values[0]:
            return float(values[0])
    i = bisect.bisect_left(values, ax)
    if i < len(values) and values[i] == ax:
        res = values[i]
    else:
        lo_i = i - 1
        lo = values[lo_i]
        lo_code = codes[lo_i]
        if i < len(values):
            hi = values[i]
        else:  # beyond max_finite: the next value would be max + ulp
            hi = lo + Fraction(2) ** (fmt.max_exponent - fmt.mantissa_bits)
        # parity of the significand: with no mantissa bits every nonzero value's is the implicit 1
        lo_odd = (lo_code & 1) if fmt.mantissa_bits > 0 else int(lo != 0)
        if rounding == "toward_zero":
            res = lo
        elif ax - lo < hi - ax or (ax - lo == hi - ax and rounding == "nearest_even" and not lo_odd):
            res = lo
        else:
            res = hi
        if i >= len(values) and res == hi:
            if fmt.specials == "finite":
                res = values[-1]
            elif fmt.has_inf:
                return float("-inf") if neg else float("inf")
            else:
                return float("nan")
    out = float(res)
    return -out if neg else out
