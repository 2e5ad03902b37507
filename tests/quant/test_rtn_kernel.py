"""The one-pass C round-to-nearest (quant/_native/rtn_kernels.c) against the numpy path it replaces:
codes, scales, zero points and values bit for bit, metrics against the float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit.checkpoint import Chain, compress_tensor
from precision.metrics import MetricsAccumulator, error_metrics
from quant import IntQuant, PerChannel, PerGroup, PerTensor, QuantSpec
from quant._native import rtn

pytestmark = pytest.mark.skipif(rtn.KERNELS.get() is None, reason="the RTN C pass is unavailable here")

SPECS = [QuantSpec(bits=b, symmetric=sym, signed=signed, narrow_range=narrow, granularity=g)
         for b in (8, 4, 3, 2) for sym in (True, False) for signed in (True, False)
         for narrow in ((False, True) if signed and sym else (False,))
         for g in (PerChannel(0), PerGroup(16, reduced_axis=1), PerTensor())]


def _weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Normal weights at scales from 1e-30 to 1e30, with the rows that take special paths: all zero,
    one constant (positive, negative, tiny), a single outlier, values that land on exact ties."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-69, 69, (rows, 1)))).astype(np.float32)
    w[0] = 0
    w[1] = 3.5
    w[2] = -1e-39  # subnormal constant
    w[3, :] = 1e-3
    w[3, 5] = 1e3
    w[4] = np.arange(cols, dtype=np.float32) - cols / 2  # integers and halves: ties at unit scales
    w[5, : cols // 2] = 0.0
    return w


def _numpy_path(x: np.ndarray, method: IntQuant):
    enc = method.encode(x)
    return enc.codes, enc.side, enc.values


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_c_rtn_equals_the_numpy_quantizer_bit_for_bit(spec):
    x = _weights(24, 64, seed=spec.bits)
    method = IntQuant(spec)
    acc = MetricsAccumulator()
    fused = method.encode_measured(x, acc, values=True)
    assert rtn.rtn_blocks(x, spec, values=True, metrics=True) is not None  # the C pass took it
    codes, side, values = _numpy_path(x, method)
    np.testing.assert_array_equal(fused.codes, codes)
    assert fused.codes.dtype == codes.dtype
    assert fused.side.keys() == side.keys()
    for k in side:
        np.testing.assert_array_equal(fused.side[k], side[k])
        assert fused.side[k].dtype == side[k].dtype and fused.side[k].shape == side[k].shape
    np.testing.assert_array_equal(fused.values.view(np.uint32), values.view(np.uint32))


@pytest.mark.parametrize("spec", [QuantSpec(bits=8, granularity=PerChannel(0)),
                                  QuantSpec(bits=4, symmetric=False, granularity=PerGroup(128, reduced_axis=1))],
                         ids=lambda s: s.describe())
def test_c_rtn_metrics_equal_the_float64_reference(spec):
    x = (np.random.default_rng(1).standard_normal((300, 1024)) * 0.02).astype(np.float32)
    acc = MetricsAccumulator()
    enc = IntQuant(spec).encode_measured(x, acc, values=False)
    assert enc.values.size == 0
    got = acc.result()
    values = IntQuant(spec).encode(x).values
    ref = error_metrics(x.astype(np.float64), values.astype(np.float64))  # the numpy float64 path
    for f in ("mse", "rel_error", "sqnr_db", "cosine"):
        assert getattr(got, f) == pytest.approx(getattr(ref, f), rel=1e-12), f
    assert (got.max_abs_error, got.nonfinite, got.zeroed) == (ref.max_abs_error, ref.nonfinite, ref.zeroed)
    a, b = x.astype(np.float64).ravel(), values.astype(np.float64).ravel()
    assert got.mse * a.size == pytest.approx(math.fsum(((b - a) ** 2).tolist()), rel=1e-13)  # exact sum


def test_c_rtn_does_not_depend_on_the_thread_count():
    x = (np.random.default_rng(2).standard_normal((512, 4096))).astype(np.float32)
    spec = QuantSpec(bits=8, granularity=PerChannel(0))
    old = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            r = rtn.rtn_blocks(x, spec, values=False, metrics=True)
            assert r is not None and r.sums is not None
            out.append((r.codes.tobytes(), r.scale.tobytes(), r.sums.tobytes()))
    finally:
        torch.set_num_threads(old)
    assert out[0] == out[1] == out[2]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_c_rtn_refuses_non_finite_blocks_and_the_numpy_path_names_them(bad):
    x = np.ones((8, 32), np.float32)
    x[5, 7] = bad
    spec = QuantSpec(bits=8, granularity=PerChannel(0))
    assert rtn.rtn_blocks(x, spec, values=False, metrics=True) is None
    with pytest.raises(ValueError, match="NaN or inf"):
        IntQuant(spec).encode_measured(x, MetricsAccumulator(), "w")


def test_c_rtn_leaves_a_range_beyond_float32_to_the_numpy_error():
    x = np.array([[-3e38, 3e38, 0, 1]], np.float32)
    spec = QuantSpec(bits=8, symmetric=False, granularity=PerChannel(0))
    assert rtn.rtn_blocks(x, spec, values=False, metrics=False) is None
    with pytest.raises(ValueError, match="too wide"):
        IntQuant(spec).encode_measured(x, None)


def test_blocks_that_are_not_runs_of_memory_take_the_numpy_path():
    assert rtn.contiguous_blocks((8, 64), (1, 64)) == 64
    assert rtn.contiguous_blocks((8, 64), (1, 16)) == 16
    assert rtn.contiguous_blocks((8, 64), (8, 64)) == 512
    assert rtn.contiguous_blocks((8, 64), (8, 1)) is None  # per input channel: a column
    assert rtn.contiguous_blocks((4, 8, 64), (1, 4, 64)) == 256
    x = np.random.default_rng(3).standard_normal((16, 32)).astype(np.float32)
    spec = QuantSpec(bits=8, granularity=PerChannel(1))
    assert rtn.rtn_blocks(x, spec, values=False, metrics=False) is None
    enc = IntQuant(spec).encode_measured(x, None)
    np.testing.assert_array_equal(enc.codes, IntQuant(spec).encode(x).codes)


def test_checkpoint_tensor_from_the_c_pass_equals_the_numpy_path(monkeypatch):
    w = _weights(64, 256, seed=9)
    chain = Chain(values=IntQuant(QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32, reduced_axis=1))))
    fast = compress_tensor("w", w, chain)
    monkeypatch.setattr(rtn.KERNELS, "get", lambda: None)
    slow = compress_tensor("w", w, chain)
    assert fast.scheme == slow.scheme  # the checksum covers every stored byte
    np.testing.assert_array_equal(fast.approx, slow.approx)
    for f in ("mse", "sqnr_db", "max_abs_error", "cosine"):
        assert getattr(fast.row, f) == pytest.approx(getattr(slow.row, f), rel=1e-12)


@pytest.mark.parametrize("bits, signed", [(4, True), (4, False), (3, True), (2, False)])
@pytest.mark.parametrize("n", [1, 2, 7, 4096 + 1, (1 << 21) + 3])
def test_c_nibble_packing_equals_the_numpy_packing(bits, signed, n):
    from quant.storage import pack_nibbles

    spec = QuantSpec(bits=bits, signed=signed)
    codes = np.random.default_rng(n).integers(spec.qmin, spec.qmax + 1, n).astype(spec.code_dtype)
    got = rtn.pack_nibbles_c(codes, spec.qmin)
    assert got is not None
    np.testing.assert_array_equal(got, pack_nibbles((codes.astype(np.int16) - spec.qmin).astype(np.uint8)))
