"""Assertions that run a user's function against the exact reference and explain what went wrong."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable

import numpy as np

from ..arrays import as_numpy
from ..codec import decode, encode
from ..formats import FloatFormat, get_format
from .oracle import _float_table, neighbours, reference_round

SMALL_INPUTS = {"float16": np.float16, "bfloat16": None}  # 16-bit input dtypes: every bit pattern is checked


class RoundingMismatch(AssertionError):
    """A function disagreed with the reference; ``cases`` holds the first mismatches (dicts)."""

    def __init__(self, message: str, cases: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.cases = cases


def _bits(v: Any, dtype: np.dtype) -> str:
    a = np.asarray(v, dtype=dtype).reshape(1)
    return f"0x{int(a.view(np.dtype(f'u{dtype.itemsize}'))[0]):0{2 * dtype.itemsize}x}"


def _code(value: float, fmt: FloatFormat) -> str:
    """The code of ``value`` in ``fmt``, or why it has none."""
    if math.isnan(value):
        return "NaN" if fmt.has_nan else "none (NaN)"
    with np.errstate(all="ignore"):
        c = int(np.asarray(encode(np.array([value], np.float64), fmt))[0])
    back = float(np.asarray(decode(np.array([c], fmt.storage_dtype), fmt), np.float64)[0])
    if back != value:
        return f"none ({value!r} is not a value of {fmt.name})"
    return f"0x{c:0{max(1, (fmt.bits + 3) // 4)}x}"


def case_class(x: float, fmt: FloatFormat, rounding: str = "nearest_even") -> str:
    """The kind of input ``x`` is for ``fmt``: nan, inf, zero, exact, tie, overflow, subnormal, normal."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return "zero"
    ax = abs(x)
    if fmt.bits <= 16:
        values, _, top = _float_table(fmt)
        i = int(np.searchsorted(values, ax))
        if i < values.size and values[i] == ax:
            return "exact"
        hi = values[i] if i < values.size else top
        if ax == (values[i - 1] + hi) / 2:
            return "tie" + (" at the overflow threshold" if i >= values.size else "")
        if i >= values.size:
            return "overflow"
    if fmt.has_subnormals and ax < fmt.min_normal:
        return "subnormal"
    return "normal" if ax <= fmt.max_finite else "overflow"


def _same(want: np.ndarray, got: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    ok = (want == got) | (np.isnan(want) & np.isnan(got))
    if fmt.signed and fmt.specials != "fnuz":  # the sign of zero matters where the format has -0
        ok &= ~((want == 0) & (got == 0) & (np.signbit(want) != np.signbit(got)))
    return ok


def _inputs(fmt: FloatFormat, dtype: np.dtype) -> tuple[np.ndarray, str]:
    """Every bit pattern of a 16-bit dtype, or for float32/float64 the neighbourhood of every value,
    midpoint and threshold of ``fmt`` plus a fixed sample."""
    if dtype.itemsize <= 2:  # float16, bfloat16, and 8-bit input formats (ml_dtypes' fp8): every code
        return (np.arange(1 << (8 * dtype.itemsize), dtype=np.dtype(f"u{dtype.itemsize}")).view(dtype),
                f"every {dtype.name} bit pattern")
    values, _, top = _float_table(fmt) if fmt.bits <= 16 else (np.array([0.0, fmt.min_normal, fmt.max_finite]), None,
                                                               float(fmt.max_finite) * 2)
    pts = np.concatenate([values, (values[:-1] + values[1:]) / 2, [(values[-1] + top) / 2, top, fmt.min_normal / 2]])
    pts = np.concatenate([pts, -pts])
    uint = np.dtype(f"u{dtype.itemsize}")
    with np.errstate(all="ignore"):
        base = pts.astype(dtype)
        b = base.view(uint).astype(np.int64)
        near = np.concatenate([(b + d) for d in (-2, -1, 0, 1, 2)])
        near = near[(near >= 0) & (near < (1 << (8 * dtype.itemsize - 1)) * 2)].astype(uint).view(dtype)
        rng = np.random.default_rng(0)
        sample = rng.integers(0, np.iinfo(uint).max, 20_000, dtype=uint, endpoint=True).view(dtype)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan], dtype)
    return np.concatenate([near, sample, special]), f"neighbourhoods of {fmt.name}'s values and midpoints, a sample"


def assert_rounds_like(fn: Callable[[np.ndarray], Any], fmt: "FloatFormat | str", *, rounding: str = "nearest_even",
                       overflow: str = "ieee", subnormals: str = "keep", dtype: Any = np.float32,
                       inputs: Any = None, nan: bool | None = None, show: int = 5) -> int:
    """Check that ``fn`` rounds to ``fmt`` as the exact reference does (:func:`reference_round` with the
    same ``rounding``, ``overflow`` and ``subnormals``): ``fn`` takes a numpy array of ``dtype`` and returns
    the rounded values (any float dtype, or a torch tensor), of the same shape.

    The inputs are exhaustive where the domain is small: every bit pattern of a 16-bit or 8-bit ``dtype``
    (float16, bfloat16, ml_dtypes' fp8 types); for float32/float64 every value, midpoint and threshold of ``fmt`` and their
    neighbours two ulps either way, plus a fixed sample of bit patterns. ``inputs`` replaces them. NaN
    inputs are left out for formats that have no NaN (``nan=False`` leaves them out always). Values are
    compared bit for bit (NaN equals NaN; the sign of zero counts where the format has -0).

    Returns the number of inputs checked. On a mismatch raises :class:`RoundingMismatch`, whose message
    lists the first ``show`` mismatches with the input's bits, the expected and actual values and codes,
    and the class of case (tie, subnormal, overflow ...), and a count per class.
    """
    fmt = get_format(fmt)
    dt = np.dtype(dtype)
    if inputs is None:
        x, how = _inputs(fmt, dt)
    else:
        x, how = np.asarray(inputs).astype(dt).reshape(-1), "the given inputs"
    if nan is False or not fmt.has_nan:
        x = x[~np.isnan(x.astype(np.float64))]
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf are inputs here, not accidents
        want = np.asarray(reference_round(x, fmt, rounding=rounding, overflow=overflow, subnormals=subnormals),
                          np.float64)
        got = np.asarray(as_numpy(fn(x.copy())), dtype=np.float64).reshape(-1)
    if got.shape != want.shape:
        raise AssertionError(f"{getattr(fn, '__name__', 'fn')} returned {got.size} values for {x.size} inputs")
    bad = np.flatnonzero(~_same(want, got, fmt))
    if not bad.size:
        return int(x.size)
    xs = x.astype(np.float64)
    cases = [{"input": float(xs[i]), "bits": _bits(x[i], dt), "expected": float(want[i]), "actual": float(got[i]),
              "expected_code": _code(float(want[i]), fmt), "actual_code": _code(float(got[i]), fmt),
              "case": case_class(float(xs[i]), fmt, rounding)} for i in bad[:show]]
    counts: dict[str, int] = {}
    for i in bad:
        kind = case_class(float(xs[i]), fmt, rounding)
        counts[kind] = counts.get(kind, 0) + 1
    lines = [f"{getattr(fn, '__name__', 'fn')} disagrees with the exact reference ({fmt.name}, rounding={rounding}, "
             f"overflow={overflow}, subnormals={subnormals}) on {bad.size} of {x.size} inputs ({how}); "
             f"by case: {', '.join(f'{k} {v}' for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))}"]
    for case in cases:
        c: dict[str, Any] = case
        lines.append(f"  {c['case']:<10} input {c['input']!r} ({dt.name} {c['bits']}): expected {c['expected']!r} "
                     f"(code {c['expected_code']}), got {c['actual']!r} (code {c['actual_code']})")
    raise RoundingMismatch("\n".join(lines), cases)


@dataclass(frozen=True)
class UnbiasedResult:
    """What :func:`assert_unbiased` measured."""

    x: float
    lo: float
    hi: float
    p_up: float  # fraction of draws that rounded up
    mean: float
    z: float  # the mean's distance from x in standard errors
    draws: int


def assert_unbiased(fn: Callable[[np.ndarray], Any], x: float, fmt: "FloatFormat | str", *, draws: int = 100_000,
                    false_failure: float = 1e-6) -> UnbiasedResult:
    """Check that ``fn``, a stochastic rounding to ``fmt``, is unbiased at ``x``: ``fn`` gets a float64
    array of ``draws`` copies of ``x`` and returns the rounded values. Each must be one of the two
    neighbours of ``x`` in ``fmt``, and the mean must equal ``x`` within the two-sided normal bound of
    ``false_failure`` (a z-test on the mean of ``draws`` independent Bernoulli choices: a correct
    unbiased rounding fails with probability ``false_failure``, up to the normal approximation, which
    holds when ``draws * p * (1 - p)`` is large). Returns the measurement."""
    fmt = get_format(fmt)
    lo, hi = neighbours(float(x), fmt)
    got = np.asarray(as_numpy(fn(np.full(draws, float(x), np.float64))), np.float64).reshape(-1)
    if got.size != draws:
        raise AssertionError(f"{getattr(fn, '__name__', 'fn')} returned {got.size} values for {draws} inputs")
    if lo == hi:
        if not (got == lo).all():
            raise AssertionError(f"{x!r} is a value of {fmt.name}; stochastic rounding must keep it, got "
                                 f"{sorted(set(got[got != lo].tolist()))[:5]}")
        return UnbiasedResult(float(x), lo, hi, 0.0, lo, 0.0, draws)
    other = ~((got == lo) | (got == hi))
    if other.any():
        raise AssertionError(f"stochastic rounding of {x!r} to {fmt.name} must give {lo!r} or {hi!r}; got "
                             f"{sorted(set(got[other].tolist()))[:5]}")
    p = (float(x) - lo) / (hi - lo)
    p_up = float(np.mean(got == hi))
    mean = lo + p_up * (hi - lo)
    se = math.sqrt(p * (1 - p) / draws) * abs(hi - lo)
    z = abs(mean - float(x)) / se if se > 0 else 0.0
    bound = NormalDist().inv_cdf(1 - false_failure / 2)
    if z > bound:
        raise AssertionError(f"stochastic rounding of {x!r} to {fmt.name} is biased: it rounded up {p_up:.5f} of "
                             f"{draws} times where {p:.5f} is unbiased ({z:.1f} standard errors; the bound for a "
                             f"false-failure rate of {false_failure:g} is {bound:.2f})")
    return UnbiasedResult(float(x), lo, hi, p_up, mean, z, draws)
