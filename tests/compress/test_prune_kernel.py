"""The C magnitude pruning (compress/_kernels/prune_kernels.c) against the numpy path it replaces:
the same mask, kept values and dense result bit for bit, ties pruned lowest index first, metrics
equal to the float64 reference, and the same stored checkpoint tensor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compress import _native
from compress._common import amount_to_count
from compress.prune import magnitude_prune
from compress.storage import MagnitudePrune, pack_bits
from lowbit.checkpoint import Chain, compress_tensor
from precision.metrics import MetricsAccumulator, error_metrics

pytestmark = pytest.mark.skipif(_native.KERNELS.get() is None, reason="the pruning C pass is unavailable here")


def _data(n: int, seed: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "ties":  # few distinct magnitudes, both signs, zeros of both signs: ties everywhere
        x = rng.integers(-4, 5, n).astype(np.float32)
        x[rng.integers(0, n, n // 10)] = -0.0
        return x
    if kind == "wide":  # subnormals to huge, so both radix passes and every exponent matter
        return (rng.standard_normal(n) * np.exp(rng.uniform(-100, 85, n))).astype(np.float32)
    return rng.standard_normal(n).astype(np.float32)


@pytest.mark.parametrize("kind", ["normal", "ties", "wide"])
@pytest.mark.parametrize("n", [1, 7, 8, 1000, 65536 * 2 + 5, (1 << 20) + 3])
def test_c_pruning_equals_the_numpy_selection_bit_for_bit(kind, n):
    x = _data(n, n, kind)
    for frac in (0.0, 1 / n, 0.5, 0.9, 1.0):
        k = amount_to_count(n, frac, None)
        got = _native.magnitude_prune_c(x, k, dense=True, metrics=False)
        assert got is not None
        keep = np.asarray(magnitude_prune(x, count=k).mask)
        np.testing.assert_array_equal(got.mask, pack_bits(keep))
        np.testing.assert_array_equal(got.values.view(np.uint32), x[keep].view(np.uint32))
        want = np.where(keep, x, np.float32(0))
        np.testing.assert_array_equal(got.dense.view(np.uint32), want.view(np.uint32))


def test_c_pruning_metrics_equal_the_float64_reference():
    x = _data(300_001, 1, "normal") * np.float32(0.02)
    got = _native.magnitude_prune_c(x, x.size // 2, dense=True, metrics=True)
    assert got is not None and got.sums is not None and got.counts is not None
    m = MetricsAccumulator().add_sums(got.sums, got.counts, x.size).result()
    ref = error_metrics(x.astype(np.float64), got.dense.astype(np.float64))
    for f in ("mse", "rel_error", "sqnr_db", "cosine"):
        assert getattr(m, f) == pytest.approx(getattr(ref, f), rel=1e-12), f
    assert (m.max_abs_error, m.zeroed) == (ref.max_abs_error, ref.zeroed) == (ref.max_abs_error, x.size // 2)
    a, b = x.astype(np.float64), got.dense.astype(np.float64)
    assert m.mse * x.size == pytest.approx(math.fsum(((b - a) ** 2).tolist()), rel=1e-13)


def test_c_pruning_does_not_depend_on_the_thread_count():
    x = _data((1 << 20) + 77, 5, "ties")
    old = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            r = _native.magnitude_prune_c(x, x.size // 3, dense=False, metrics=True)
            assert r is not None and r.sums is not None
            out.append((r.mask.tobytes(), r.values.tobytes(), r.sums.tobytes()))
    finally:
        torch.set_num_threads(old)
    assert out[0] == out[1] == out[2]


@pytest.mark.parametrize("sparsity", [0.5, 0.03, 0.01])
def test_checkpoint_tensor_from_the_c_pass_equals_the_numpy_path(monkeypatch, sparsity):
    w = _data(300 * 257, 11, "ties").reshape(300, 257)
    chain = Chain(MagnitudePrune(sparsity), None)
    fast = compress_tensor("w", w, chain)
    lean = compress_tensor("w", w, chain, keep_approx=False)
    monkeypatch.setattr(_native.KERNELS, "get", lambda: None)
    slow = compress_tensor("w", w, chain)
    assert fast.scheme == slow.scheme == lean.scheme  # the checksum covers every stored byte
    np.testing.assert_array_equal(fast.approx.view(np.uint32), slow.approx.view(np.uint32))
    assert lean.approx is None
    for f in ("mse", "sqnr_db", "max_abs_error", "cosine"):
        assert getattr(fast.row, f) == pytest.approx(getattr(slow.row, f), rel=1e-12)
        assert getattr(lean.row, f) == getattr(fast.row, f)


@pytest.mark.parametrize("kind", ["normal", "ties", "wide"])
def test_the_avx512_and_scalar_bodies_on_one_or_two_threads_prune_and_measure_the_same_bits(scalar_build, kind):
    scalar, vector = scalar_build(_native.KERNELS), _native.KERNELS.get()
    n = 65536 * 3 + 1021  # several chunks, runs of 1024, a tail of 13
    x = _data(n, 5, kind)
    x[[17, 40_000]] = [np.inf, -np.inf]  # kept: their error is inf - inf = NaN in both bodies
    for k in (n // 3, n // 2, n - 5):
        got = []
        for lib in (scalar, vector):
            for threads in (1, 2):  # chunks in order on one thread, placed by a counting pass on two
                thr, need = _native.magnitude_threshold(lib, x, k)
                mask, values = np.empty((n + 7) // 8, np.uint8), np.empty(n - k, np.float32)
                dense, sums, counts = np.empty(n, np.float32), np.zeros(5), np.zeros(2, np.int64)
                for d in (dense, None):
                    assert lib.lowbit_magnitude_apply(x.ctypes.data, n, thr, need, mask.ctypes.data,
                                                      values.ctypes.data, values.size,
                                                      None if d is None else d.ctypes.data, sums.ctypes.data,
                                                      counts.ctypes.data, threads) == n - k
                got.append((mask, values.view(np.uint32), dense.view(np.uint32), sums, counts))
        for other in got[1:]:
            for a, b in zip(got[0][:3], other[:3]):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(got[0][3], other[3])  # NaN where NaN, and every other bit the same
            assert got[0][3][~np.isnan(got[0][3])].tobytes() == other[3][~np.isnan(other[3])].tobytes()
            assert got[0][4].tolist() == other[4].tolist()


def _select(lib, x, k):
    import ctypes

    thr, need = ctypes.c_uint32(), ctypes.c_int64()
    rc = lib.lowbit_magnitude_select(x.ctypes.data, x.size, k, ctypes.byref(thr), ctypes.byref(need), 2)
    return rc, (thr.value, need.value)


@pytest.mark.parametrize("kind", ["normal", "ties", "wide", "strided"])
def test_the_sampled_selection_finds_the_histograms_threshold_or_declines(kind):
    lib = _native.KERNELS.get()
    n = (1 << 21) + 77
    if kind == "strided":  # every element the sample reads is huge: its bounds miss the true quantile
        x = np.random.default_rng(2).standard_normal(n).astype(np.float32)
        x[(np.arange(65536) * n) // 65536] = 1e30
    else:
        x = _data(n, 9, kind)
    answers = set()
    for k in (1, 2, n // 1000, n // 3, n // 2, n - 1000, n - 1, n):
        rc, got = _select(lib, x, k)
        want = _native.magnitude_threshold_by_histograms(lib, x, k)
        answers.add(rc)
        assert rc in (0, 1)
        if rc == 1:
            assert got == want, k
        assert _native.magnitude_threshold(lib, x, k) == want  # whichever path answers
    # the sample brackets smooth data; it declines where its bounds miss, and where a ninth of the
    # elements share one magnitude (more between the bounds than it makes room for)
    assert answers == ({1} if kind in ("normal", "wide") else {0})


@pytest.mark.parametrize("threads", [1, 2])
def test_a_capacity_that_does_not_add_up_is_refused_without_writing_past_it(threads):
    lib = _native.KERNELS.get()
    n, k = 65536 * 2 + 40, 1000
    x = _data(n, 4, "normal")
    thr, need = _native.magnitude_threshold(lib, x, k)
    mask = np.empty((n + 7) // 8, np.uint8)
    room = np.zeros(n - k + 64, np.float32)  # one value short of what is kept, then a guard
    assert lib.lowbit_magnitude_apply(x.ctypes.data, n, thr, need, mask.ctypes.data, room.ctypes.data, n - k - 1,
                                      None, None, None, threads) == -2
    assert not room[n - k - 1:].any()
