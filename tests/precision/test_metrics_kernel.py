"""The one-pass C metrics (precision/_kernels/metrics_kernels.c) against the numpy fallback and an exact sum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import precision.metrics as pm
from precision import error_metrics

pytestmark = pytest.mark.skipif(pm.KERNELS.get() is None, reason="the metrics C pass is unavailable here")


def _numpy_only(x, y):
    old = pm._C_MIN
    pm._C_MIN = 1 << 62
    try:
        return error_metrics(x, y)
    finally:
        pm._C_MIN = old


def _data(n, seed, specials=False):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 20, n))).astype(np.float32)
    y = (x + rng.standard_normal(n).astype(np.float32) * np.float32(1e-3) * x).astype(np.float32)
    y[rng.integers(0, n, n // 50)] = 0
    if specials:
        y[rng.integers(0, n, 7)] = np.inf
        y[rng.integers(0, n, 5)] = np.nan
        x[rng.integers(0, n, 3)] = np.inf
    return x, y


@pytest.mark.parametrize("n", [4096, 65536 * 3 + 17, 1 << 21])
def test_c_metrics_equal_the_numpy_fallback_and_the_exact_sums(n):
    x, y = _data(n, n)
    c, ref = error_metrics(x, y), _numpy_only(x, y)
    for f in ("mse", "rel_error", "sqnr_db", "cosine"):
        assert getattr(c, f) == pytest.approx(getattr(ref, f), rel=1e-12, abs=1e-15), f
    assert (c.max_abs_error, c.nonfinite, c.zeroed) == (ref.max_abs_error, ref.nonfinite, ref.zeroed)
    a, b = x.astype(np.float64), y.astype(np.float64)
    exact_see = math.fsum(((b - a) ** 2).tolist())  # products of float32 values are exact in float64
    assert c.mse * n == pytest.approx(exact_see, rel=1e-13)
    assert c.cosine == pytest.approx(math.fsum((a * b).tolist()) / math.sqrt(math.fsum((a * a).tolist()) *
                                                                             math.fsum((b * b).tolist())), rel=1e-13)


def test_c_metrics_count_non_finite_and_zeroed_values_as_numpy_does():
    x, y = _data(200_000, 3, specials=True)
    c, ref = error_metrics(x, y), _numpy_only(x, y)
    assert (c.nonfinite, c.zeroed) == (ref.nonfinite, ref.zeroed) and c.nonfinite > 0
    assert math.isnan(c.mse) and math.isnan(ref.mse)
    assert c.max_abs_error == ref.max_abs_error  # NaN errors are not maxima; inf ones are


def test_c_metrics_do_not_depend_on_the_thread_count():
    x, y = _data(1 << 20, 5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = error_metrics(x, y)
        torch.set_num_threads(max(2, before))
        many = error_metrics(x, y)
    finally:
        torch.set_num_threads(before)
    assert one == many


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2", "fp6_e3m2fn", "fp4_e2m1fn"])
@pytest.mark.parametrize("scaling", ["none", "tensor", "channel"])
def test_float_cast_measured_in_one_pass_equals_encode_then_measure(fmt, scaling):
    from precision.cast import FloatCast

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((97, 300)) * np.exp(rng.uniform(-8, 8, (97, 1)))).astype(np.float32)
    x[3] = 0
    x[5, :7] = 7e4  # overflows fp16 unscaled: inf values, counted as non-finite
    method = FloatCast(fmt, scaling=scaling)
    plain = method.encode(x)
    acc = pm.MetricsAccumulator()
    fused = method.encode_measured(x, acc, values=True)
    np.testing.assert_array_equal(fused.codes, plain.codes)
    assert fused.side.keys() == plain.side.keys()
    for k in plain.side:
        np.testing.assert_array_equal(fused.side[k], plain.side[k])
    np.testing.assert_array_equal(fused.values.view(np.uint32), plain.values.view(np.uint32))
    got, ref = acc.result(), _numpy_only(x.astype(np.float64), plain.values.astype(np.float64))
    assert (got.nonfinite, got.zeroed) == (ref.nonfinite, ref.zeroed)
    for f in ("mse", "rel_error", "sqnr_db", "cosine", "max_abs_error"):
        g, r = getattr(got, f), getattr(ref, f)
        assert (math.isnan(g) and math.isnan(r)) or g == pytest.approx(r, rel=1e-12), f
    lean = method.encode_measured(x, pm.MetricsAccumulator(), values=False)
    assert lean.values.size == 0 and np.array_equal(lean.codes, plain.codes)


def test_decode_measure_refuses_what_does_not_fit():
    from precision.codec import decode_table

    x = np.ones((4, 8), np.float32)
    table = decode_table("fp8_e4m3fn")
    assert pm.decode_measure_c(np.zeros((4, 8), np.int8), table, x, None, values=False) is None  # signed codes
    assert pm.decode_measure_c(np.zeros((4, 8), np.uint8), table, x, np.ones(3, np.float32), values=False) is None
    assert pm.decode_measure_c(np.full((4, 8), 200, np.uint16), decode_table("fp4_e2m1fn"), x, None,
                               values=False) is None  # codes beyond the table


def test_numpy_metrics_do_not_depend_on_the_blas_thread_count():
    from threadpoolctl import threadpool_limits

    x, y = _data(3 << 20, 11)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)  # float64: always the numpy path
    got = []
    for t in (1, 2):
        with threadpool_limits(t, "blas"):
            got.append(error_metrics(x64, y64))
    assert got[0] == got[1]


def _same_bits(a, b):
    """The same bits, but for which NaN a sum holds (the operand order of an add picks among NaN inputs)."""
    np.testing.assert_array_equal(a, b)
    assert a[~np.isnan(a)].tobytes() == b[~np.isnan(b)].tobytes()


def test_the_avx512_and_scalar_bodies_give_the_same_bits(scalar_build):
    from precision.codec import decode_table

    scalar, vector = scalar_build(pm.KERNELS), pm.KERNELS.get()
    for n in (1000, 65536 * 3 + 17, 1 << 20):
        x, y = _data(n, n, specials=n == 1000)
        got = []
        for lib in (scalar, vector):
            sums, counts = np.zeros(5), np.zeros(2, np.int64)
            assert lib.lowbit_metrics_f32(x.ctypes.data, y.ctypes.data, n, sums.ctypes.data, counts.ctypes.data, 2) == 0
            got.append((sums, counts.tolist()))
        _same_bits(got[0][0], got[1][0])
        assert got[0][1] == got[1][1]
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((37, 999)) * 50).astype(np.float32)
    scale = rng.uniform(0.5, 2, 37).astype(np.float32)
    for codes, table in ((rng.integers(0, 256, x.shape).astype(np.uint8), decode_table("fp8_e4m3fn")),
                         (rng.integers(0, 64, x.shape).astype(np.uint8), decode_table("fp6_e3m2fn")),
                         (rng.integers(0, 1 << 16, x.shape).astype(np.uint16), decode_table("fp16")),
                         (rng.integers(0, 1 << 16, x.shape).astype(np.uint16), None)):
        got = []
        for lib in (scalar, vector):
            old = pm.KERNELS._lib
            pm.KERNELS._lib = lib
            try:
                vals, sums, counts = pm.decode_measure_c(codes, table, x, scale, values=True)
            finally:
                pm.KERNELS._lib = old
            got.append((vals, sums, counts.tolist()))
        np.testing.assert_array_equal(got[0][0].view(np.uint32), got[1][0].view(np.uint32))
        _same_bits(got[0][1], got[1][1])
        assert got[0][2] == got[1][2]


def test_bfloat16_decoded_by_shift_equals_the_table_for_every_code():
    from precision.codec import decode_table

    codes = np.arange(1 << 16, dtype=np.uint16).reshape(64, 1024)
    x = np.random.default_rng(1).standard_normal(codes.shape).astype(np.float32)
    for scale in (None, np.float32(3.0), np.linspace(0.5, 2, 64, dtype=np.float32)):
        by_table = pm.decode_measure_c(codes, decode_table("bf16"), x, scale, values=True)
        by_shift = pm.decode_measure_c(codes, None, x, scale, values=True)
        np.testing.assert_array_equal(by_shift[0].view(np.uint32), by_table[0].view(np.uint32))
        assert by_shift[1].tobytes() == by_table[1].tobytes() and by_shift[2].tolist() == by_table[2].tolist()
