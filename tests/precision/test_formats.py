import ml_dtypes
import numpy as np
import pytest

from precision import FloatFormat, decode, get_format, known_formats

ML = {
    "fp16": np.float16, "bf16": ml_dtypes.bfloat16, "fp32": np.float32,
    "fp8_e4m3fn": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "fp8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "fp8_e4m3b11fnuz": ml_dtypes.float8_e4m3b11fnuz, "fp8_e3m4": ml_dtypes.float8_e3m4,
    "fp8_e4m3": ml_dtypes.float8_e4m3, "fp8_e8m0fnu": ml_dtypes.float8_e8m0fnu,
    "fp6_e2m3fn": ml_dtypes.float6_e2m3fn, "fp6_e3m2fn": ml_dtypes.float6_e3m2fn,
    "fp4_e2m1fn": ml_dtypes.float4_e2m1fn,
}


def test_registry_covers_every_ml_dtypes_small_float():
    assert set(known_formats()) == set(ML)


@pytest.mark.parametrize("name", sorted(ML))
def test_derived_limits_equal_ml_dtypes_finfo(name):
    fmt, fi = get_format(name), ml_dtypes.finfo(ML[name])
    assert fmt.bits == fi.bits
    assert fmt.max_finite == float(fi.max)
    assert fmt.min_normal == float(fi.smallest_normal)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)
    assert fmt.eps == float(fi.eps)
    assert fmt.storage_dtype.itemsize * 8 >= fmt.bits


@pytest.mark.parametrize("name", [n for n in sorted(ML) if get_format(n).bits <= 16])
def test_num_finite_counts_the_finite_patterns(name):
    fmt = get_format(name)
    v = decode(np.arange(fmt.num_codes), fmt)
    assert fmt.num_finite == int(np.isfinite(v).sum())


def test_unknown_name_lists_known_formats():
    with pytest.raises(ValueError, match="fp8_e4m3fn.*fp8_e5m2"):
        get_format("fp7")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(exponent_bits=0, mantissa_bits=2), "exponent_bits"),
        (dict(exponent_bits=3, mantissa_bits=-1), "mantissa_bits"),
        (dict(exponent_bits=3, mantissa_bits=2, specials="weird"), "specials"),
        (dict(exponent_bits=3, mantissa_bits=2, specials="fnu"), "mantissa_bits=0"),
        (dict(exponent_bits=8, mantissa_bits=2, bias=200), "does not fit float32"),
    ],
)
def test_bad_format_is_a_value_error_that_says_why(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FloatFormat(**kwargs)


def test_custom_format_is_frozen_and_derives_limits():
    f = FloatFormat(exponent_bits=3, mantissa_bits=2)
    assert f.bias == 3 and f.max_finite == 14.0 and f.min_normal == 0.25 and f.min_subnormal == 0.0625
    with pytest.raises(Exception):
        f.bias = 4  # type: ignore[misc]
