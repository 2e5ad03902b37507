"""precision.testing: the exact reference against its own scalar path and lowbit's codecs, the
assertions on planted bugs and on the references, the strategies, and the pytest plugin."""

from __future__ import annotations

import itertools
import time
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from precision import get_format, known_formats, round_to
from precision.blocks import BLOCK_FORMATS, round_to_block
from precision.testing import (RoundingMismatch, assert_rounds_like, assert_unbiased, neighbours, reference_quantize,
                               reference_round, reference_round_block)
from precision.testing.oracle import reference_round_scalar as _scalar
from precision.testing.strategies import arrays, float_formats, floats_near_boundaries, quant_specs, tensors
from quant import calibrate, dequantize, fake_quantize, quantize

SMALL = [n for n in known_formats() if get_format(n).bits <= 16]
MODES = list(itertools.product(["nearest_even", "nearest_away", "toward_zero"], ["ieee", "saturate"], ["keep", "flush"]))
HALVES = np.arange(1 << 16, dtype=np.uint16).view(np.float16)


def _same(a, b) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.all((a == b) & (np.signbit(a) == np.signbit(b)) | (np.isnan(a) & np.isnan(b))))


@pytest.mark.parametrize("name", SMALL)
def test_the_vectorized_reference_equals_its_exact_scalar_path(name):
    fmt = get_format(name)
    x = HALVES.astype(np.float64)
    x = x[~np.isnan(x)] if not fmt.has_nan else x
    pick = np.random.default_rng(0).choice(x.size, 1500, replace=False)
    for rounding, overflow, subnormals in MODES:
        got = reference_round(x[pick], fmt, rounding=rounding, overflow=overflow, subnormals=subnormals)
        want = [_scalar(Fraction(v) if np.isfinite(v) and v != 0 else float(v), fmt, rounding, overflow, subnormals)
                for v in x[pick].tolist()]
        assert _same(got, want), (rounding, overflow, subnormals)


@pytest.mark.parametrize("name", SMALL)
def test_round_to_equals_the_reference_on_every_float16_input(name):
    fmt = get_format(name)
    x = HALVES if fmt.has_nan else HALVES[~np.isnan(HALVES)]
    for rounding, overflow, subnormals in MODES:
        # float32 in: round_to casts its result back to a float16 input's dtype, where bf16's largest is inf
        n = assert_rounds_like(lambda a: round_to(a.astype(np.float32), fmt, rounding=rounding, overflow=overflow,
                                                  subnormals=subnormals),
                               fmt, rounding=rounding, overflow=overflow, subnormals=subnormals, dtype=np.float16,
                               inputs=x)
        assert n == x.size


def test_the_reference_is_exact_where_float32_would_round_twice():
    assert reference_round(np.float64(-431.99999959766865), "fp8_e4m3fn") == -416.0
    assert reference_round(np.array([2**62 + 2**40 + 1]), "bf16")[0] == float(2**62)
    assert reference_round(np.array([16842753]), "bf16")[0] == 16908288
    t = reference_round(torch.tensor([1.0 + 2**-8], dtype=torch.float64), "bf16", rounding="nearest_away")
    assert isinstance(t, torch.Tensor) and t.item() == 1.0078125


def test_a_planted_half_up_bug_is_caught_with_a_readable_message():
    fmt = get_format("fp8_e4m3fn")

    def my_cast(x):  # a user's kernel that rounds ties up instead of to even
        return round_to(x, fmt, rounding="nearest_away")

    with pytest.raises(RoundingMismatch) as e:
        assert_rounds_like(my_cast, fmt, dtype=np.float16)
    msg = str(e.value)
    assert "my_cast disagrees" in msg and "tie" in msg and "float16 0x" in msg and "expected" in msg
    assert all(c["case"].startswith("tie") for c in e.value.cases)


def test_ml_dtypes_float32_casts_pass_and_the_exhaustive_check_is_fast():
    for name, dt in (("fp8_e4m3fn", ml_dtypes.float8_e4m3fn), ("fp8_e5m2", ml_dtypes.float8_e5m2)):
        assert_rounds_like(lambda x, dt=dt: x.astype(dt).astype(np.float32), name, dtype=np.float32)
    t0 = time.perf_counter()
    n = assert_rounds_like(lambda x: x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), "fp8_e4m3fn",
                           dtype=np.float16)
    assert n == 65536 - 2046 or n > 60000  # every float16 pattern (NaN payloads count once each)
    assert time.perf_counter() - t0 < 2.0


def test_assert_unbiased_accepts_stochastic_rounding_and_rejects_a_biased_one():
    res = assert_unbiased(lambda x: round_to(x, "fp8_e4m3fn", rounding="stochastic", seed=5), 1.0 + 2**-5, "fp8_e4m3fn")
    assert (res.lo, res.hi) == (1.0, 1.125) and abs(res.p_up - 0.25) < 0.01

    def biased(x):
        rng = np.random.default_rng(0)
        return np.where(rng.random(x.size) < 0.3, 1.125, 1.0)

    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(biased, 1.0 + 2**-5, "fp8_e4m3fn")
    assert neighbours(-1.03125, "fp8_e4m3fn") == (-1.0, -1.125)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(spec=quant_specs(max_group=8), data=st.data())
def test_quantize_and_fake_quantize_equal_the_reference(spec, data):
    shape = (4, 8 * data.draw(st.integers(1, 3)))
    x = data.draw(arrays("fp8_e4m3fn", np.float32, shape, nan=False, inf=False))
    qp = calibrate(x, spec)
    want = reference_quantize(x, qp)
    assert np.array_equal(np.asarray(quantize(x, qp)).astype(np.int64), want)
    ft = fake_quantize(torch.from_numpy(x), qp)
    assert np.array_equal(ft.numpy(), np.asarray(dequantize(want.astype(spec.code_dtype), qp)))


@pytest.mark.parametrize("name", sorted(BLOCK_FORMATS))
@pytest.mark.parametrize("rounding", ["nearest_even", "nearest_away", "toward_zero"])
def test_round_to_block_equals_the_reference(name, rounding):
    if name in ("q8_0", "q4_0") and rounding != "nearest_even":
        pytest.skip("GGUF blocks have ggml's one rounding")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 64)) * np.exp2(rng.integers(-20, 20, (16, 1)))).astype(np.float32)
    x[0, :32] = 0
    x[1, :32] = np.float32([0.75, 1.5, 3.0, 6.0] * 8) * 2.0 ** -3  # ties at the scale's edges
    x[2, :32] = 1e-40
    want = reference_round_block(x, name, rounding=rounding)
    got = round_to_block(x, name, rounding=rounding) if name not in ("q8_0", "q4_0") else round_to_block(x, name)
    assert _same(got, want)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(fmt=float_formats(max_bits=8), data=st.data())
def test_round_to_equals_the_reference_on_random_formats_and_hard_inputs(fmt, data):
    x = data.draw(arrays(fmt, np.float64, nan=fmt.has_nan))
    mode = data.draw(st.sampled_from(MODES))
    kw = dict(rounding=mode[0], overflow=mode[1], subnormals=mode[2])
    with np.errstate(all="ignore"):
        assert _same(round_to(x, fmt, **kw), reference_round(x, fmt, **kw))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(t=tensors("fp8_e5m2", nan=False))
def test_round_to_equals_the_reference_on_tensors_of_any_layout(t):
    assert _same(round_to(t, "fp8_e5m2").double().numpy(), reference_round(t, "fp8_e5m2").double().numpy())


@given(v=floats_near_boundaries("fp4_e2m1fn", np.float32, nan=False))
@settings(max_examples=200, deadline=None, derandomize=True)
def test_boundary_floats_are_floats_of_the_asked_dtype(v):
    assert np.float32(v) == v or np.isnan(v)


def test_the_pytest_plugin_parametrizes_over_formats(pytester):
    pytester.makepyfile("""
        import numpy as np
        from precision import round_to
        from precision.testing import assert_rounds_like, lowbit_formats

        @lowbit_formats(max_bits=8, random=3)
        def test_round_to(lowbit_format):
            if lowbit_format.specials == "fnu":
                return
            assert_rounds_like(lambda x: round_to(x.astype(np.float32), lowbit_format), lowbit_format,
                               dtype=np.float16)
    """)
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    n = len([f for f in known_formats() if get_format(f).bits <= 8]) + 3
    result.assert_outcomes(passed=n)
