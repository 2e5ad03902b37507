"""precision.arrays is the one input path: same dtype rules and the same error wording everywhere."""

import ml_dtypes
import numpy as np
import pytest
import torch

from compress import low_rank, magnitude_prune
from precision import cast, error_metrics, round_to
from precision.arrays import real_array, require_finite
from quant import QuantSpec, quantize


def test_small_floats_widen_to_float32_exactly():
    for dt in (np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn):
        a = np.arange(-8, 8, dtype=np.float32).astype(dt)
        out = real_array(a)
        assert out.dtype == np.float32 and np.array_equal(out, a.astype(np.float32))


def test_integers_kept_or_converted_exactly():
    big = np.array([2**40 + 1], np.int64)
    assert real_array(big).dtype == np.int64
    assert real_array(big, integers="float")[0] == 2**40 + 1  # float64: exact
    assert real_array(np.array([3], np.int16), integers="float").dtype == np.float32


def test_float_input_is_not_copied():
    a = np.ones(4, np.float32)
    assert real_array(a) is a
    t = torch.ones(4)
    assert np.shares_memory(real_array(t), t.numpy())


def test_min_ndim_names_the_tensor():
    with pytest.raises(ValueError, match="w: needs at least 2 dimension"):
        real_array(np.ones(3), "w", min_ndim=2)


@pytest.mark.parametrize("call", [
    lambda x: quantize(x, QuantSpec(), name="w"),
    lambda x: magnitude_prune(x, 0.5, name="w"),
    lambda x: low_rank(x.reshape(2, 2), rank=1, name="w"),
    lambda x: round_to(x, "fp8_e4m3fn"),
    lambda x: error_metrics(x, x),
], ids=["quantize", "prune", "low_rank", "round_to", "metrics"])
def test_unsupported_dtype_has_one_wording(call):
    with pytest.raises(TypeError, match="unsupported dtype complex64: expected real floating-point or integer values"):
        call(np.ones(4, np.complex64))


@pytest.mark.parametrize("call, purpose", [
    (lambda x: quantize(x, QuantSpec(), name="w"), "quantization"),
    (lambda x: magnitude_prune(x, 0.5, name="w"), "pruning"),
    (lambda x: low_rank(x.reshape(2, 2), rank=1, name="w"), "low rank"),
    (lambda x: cast(x, "fp8_e4m3fn", scaling="tensor"), "a scaled cast"),
], ids=["quantize", "prune", "low_rank", "scaled_cast"])
def test_non_finite_input_has_one_wording(call, purpose):
    x = np.array([1.0, np.nan, np.inf, 2.0], np.float32)
    with pytest.raises(ValueError, match=rf"2 of 4 values are NaN or inf; {purpose} needs finite values"):
        call(x)


def test_require_finite_accepts_integers_and_empty():
    require_finite(np.arange(3), "w", "x")
    require_finite(np.zeros(0, np.float32), "w", "x")
