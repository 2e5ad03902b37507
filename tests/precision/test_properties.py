"""Rounding invariants as hypothesis properties, aimed at the hard places of each format."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from precision import FloatFormat, decode, encode, get_format, known_formats, round_to

from ._oracle import oracle_round

SIGNED = [n for n in known_formats() if get_format(n).signed and get_format(n).bits <= 16]
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def finite_values(fmt: FloatFormat) -> np.ndarray:
    v = decode(np.arange(fmt.num_codes), fmt).astype(np.float64)
    return np.unique(v[np.isfinite(v)])


@st.composite
def random_formats(draw):
    """Random small formats of every special layout (like brevitas' minifloat strategies)."""
    specials = draw(st.sampled_from(["ieee", "fn", "fnuz", "finite"]))
    e = draw(st.integers(2, 5))
    m = draw(st.integers(0 if specials != "ieee" else 1, 6))
    bias = draw(st.integers(0, (1 << e)))
    return FloatFormat(exponent_bits=e, mantissa_bits=m, bias=bias, specials=specials)


@st.composite
def hard_point(draw, fmt: FloatFormat):
    """A value near a representable value or a midpoint, nudged by 2**-k, or a threshold."""
    vals = finite_values(fmt)
    i = draw(st.integers(0, len(vals) - 1))
    top = vals[-1] + 2.0 ** (fmt.max_exponent - fmt.mantissa_bits)
    nxt = vals[i + 1] if i + 1 < len(vals) else top
    base = draw(st.sampled_from([vals[i], (vals[i] + nxt) / 2, fmt.min_subnormal / 2, fmt.max_finite, top]))
    k = draw(st.integers(10, 60))
    nudge = draw(st.sampled_from([0.0, 1.0, -1.0])) * abs(base) * 2.0**-k
    if base == 0:
        nudge = draw(st.sampled_from([0.0, 1.0, -1.0])) * fmt.min_subnormal * 2.0**-k
    return float(base + nudge)


def formats_and_points():
    return st.sampled_from(SIGNED).map(get_format).flatmap(lambda f: st.tuples(st.just(f), hard_point(f)))


def assert_correctly_rounded(fmt, x, rounding="nearest_even", subnormals="keep"):
    got = float(round_to(np.float64(x), fmt, rounding=rounding, subnormals=subnormals))
    want = oracle_round(Fraction(x), fmt, rounding, subnormals)
    assert got == want or (np.isnan(got) and np.isnan(want))
    assert np.isnan(got) or np.signbit(got) == np.signbit(want)


@SETTINGS
@given(formats_and_points())
def test_nearest_even_is_the_correctly_rounded_value(fp):
    assert_correctly_rounded(*fp)


@SETTINGS
@given(random_formats().flatmap(lambda f: st.tuples(st.just(f), hard_point(f))))
def test_any_user_format_rounds_correctly(fp):
    assert_correctly_rounded(*fp)


@SETTINGS
@given(formats_and_points(), st.sampled_from(["keep", "flush"]))
def test_nearest_away_is_the_correctly_rounded_value(fp, subnormals):
    assert_correctly_rounded(*fp, rounding="nearest_away", subnormals=subnormals)


@SETTINGS
@given(random_formats().flatmap(lambda f: st.tuples(st.just(f), hard_point(f))),
       st.sampled_from(["nearest_even", "nearest_away"]), st.sampled_from(["keep", "flush"]))
def test_any_user_format_rounds_correctly_in_every_nearest_mode(fp, rounding, subnormals):
    assert_correctly_rounded(*fp, rounding=rounding, subnormals=subnormals)


@SETTINGS
@given(formats_and_points())
def test_nearest_away_differs_from_nearest_even_only_at_ties(fp):
    fmt, x = fp
    even = float(round_to(np.float64(x), fmt))
    away = float(round_to(np.float64(x), fmt, rounding="nearest_away"))
    if even != away and not (np.isnan(even) and np.isnan(away)):
        if np.isnan(away):  # the tie just above the largest finite value, rounded past it: NaN without inf
            assert fmt.specials != "ieee" and abs(even) == fmt.max_finite < abs(x)
            return
        assert abs(away) > abs(even)  # the tie went away from zero instead of to the even neighbour
        lo, hi = sorted((abs(even), abs(away)))
        if np.isfinite(hi):
            assert abs(x) - lo == hi - abs(x)  # and it was a tie


@SETTINGS
@given(formats_and_points(), st.floats(-1, 1))
def test_rounding_is_monotone_non_decreasing(fp, d):
    fmt, x = fp
    y = x + d * max(abs(x), fmt.min_subnormal) * 2.0**-3
    lo, hi = sorted([x, y])
    r = round_to(np.array([lo, hi]), fmt, overflow="saturate")
    assert r[0] <= r[1]


@SETTINGS
@given(formats_and_points())
def test_rounding_is_idempotent_and_odd(fp):
    fmt, x = fp
    r = round_to(np.array([x]), fmt)
    np.testing.assert_array_equal(round_to(r, fmt), r)
    neg = round_to(np.array([-x]), fmt)
    if fmt.specials == "fnuz":  # no -0: compare magnitudes only
        np.testing.assert_array_equal(np.abs(neg), np.abs(r))
    else:
        np.testing.assert_array_equal(neg.view(np.uint64) ^ np.uint64(1 << 63), r.view(np.uint64))


@pytest.mark.parametrize("name", SIGNED)
def test_representable_values_are_exact(name):
    v = finite_values(get_format(name))
    for x in (v, v.astype(np.float32)):
        np.testing.assert_array_equal(round_to(x, name), x)


@SETTINGS
@given(formats_and_points())
def test_toward_zero_never_increases_magnitude(fp):
    fmt, x = fp
    r = float(round_to(np.float64(x), fmt, rounding="toward_zero", overflow="saturate"))
    assert abs(r) <= abs(x)
    vals = finite_values(fmt)
    # and it is the largest representable magnitude not above |x| (within range)
    if abs(x) <= fmt.max_finite:
        assert abs(r) == vals[vals <= abs(x)].max()


@SETTINGS
@given(formats_and_points(), st.integers(0, 2**32))
def test_stochastic_result_is_one_of_the_two_neighbours(fp, seed):
    fmt, x = fp
    if abs(x) > fmt.max_finite:
        return
    r = round_to(np.full(64, x), fmt, rounding="stochastic", seed=seed)
    dn = float(round_to(np.float64(x), fmt, rounding="toward_zero"))
    vals = finite_values(fmt)
    bigger = vals[np.abs(vals) >= abs(x)]
    up = np.copysign(np.abs(bigger).min(), x) if abs(x) > abs(dn) else dn
    assert set(np.unique(r)) <= {dn, up}


def test_stochastic_rounding_is_unbiased_and_reproducible():
    """E[round(x)] = x: mean of 200k stochastic roundings within 4 standard errors."""
    for name, x in [("fp8_e4m3fn", 1.0 + 0.3 * 0.125), ("bf16", 3.0e-3), ("fp8_e5m2", -7.3), ("fp16", 1e-6)]:
        n = 200_000
        r = round_to(np.full(n, x), name, rounding="stochastic", seed=1234)
        lo, hi = np.unique(r)[[0, -1]]
        se = (hi - lo) / 2 / np.sqrt(n)
        assert abs(r.mean() - x) < 4 * se, name
        np.testing.assert_array_equal(r, round_to(np.full(n, x), name, rounding="stochastic", seed=1234))
        assert not np.array_equal(r, round_to(np.full(n, x), name, rounding="stochastic", seed=99))
    gen = np.random.default_rng(5)
    a = encode(np.full(100, 1.01), "fp8_e4m3fn", rounding="stochastic", generator=gen)
    assert a.dtype == np.uint8
