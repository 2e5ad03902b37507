"""Issue 16 findings in the C kernels and at numeric edges: each test failed before its fix."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from precision import cast, cosine, describe, error_metrics, rel_error
from precision.codec import _KERNELS, _decode_table
from precision.formats import get_format
from quant import _native, int8_attention

nan_equal = dict(equal_nan=True)


def _sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---- attention (findings 5, 11, 17)
def test_broadcast_inputs_claiming_huge_lengths_are_refused_not_crashed():
    code = ("import torch\nfrom quant import int8_attention\n"
            "q = torch.zeros(1, 1, 1, 8).expand(1, 1, 1 << 59, 8); k = torch.zeros(1, 1, 4, 8)\n"
            "try:\n    int8_attention(q, k, k)\nexcept ValueError as e:\n    print('refused', e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("refused"), r.stderr[-500:]


@pytest.mark.needs_attention_c
@pytest.mark.parametrize("portable", [False, True])
def test_an_overflowed_score_at_a_masked_key_falls_back_to_float_attention(portable):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    q[0, 0, 1] = 1e20
    k[0, 0, 2] = 1e20  # q1 . k2 overflows float32; the mask then adds -inf: inf - inf
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2] = -torch.inf
    with torch.no_grad():
        got = int8_attention(q, k, v, mask, portable=portable)
    assert torch.allclose(got, _sdpa(q, k, v, mask), **nan_equal)


@pytest.mark.needs_attention_c
def test_non_finite_values_where_the_kernel_does_not_look_still_fall_back():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    keep = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    keep[..., 3] = False  # key 3 is attended by nobody: the kernel leaves it out
    v[0, 0, 3, 0] = torch.nan
    with torch.no_grad():
        assert torch.allclose(int8_attention(q, k, v, keep), _sdpa(q, k, v, keep), **nan_equal)
    none = torch.zeros(1, 1, 4, 4, dtype=torch.bool)  # every key masked: the kernel writes zeros
    q2 = q.clone()
    q2[0, 1, 0, 0] = torch.nan
    with torch.no_grad():
        assert torch.allclose(int8_attention(q2, k, v.nan_to_num(), none), _sdpa(q2, k, v.nan_to_num(), none),
                              **nan_equal)


def test_integer_masks_and_non_finite_scales_are_refused():
    q = torch.randn(1, 1, 4, 8)
    with torch.no_grad():
        with pytest.raises(TypeError, match="attn_mask must be bool"):
            int8_attention(q, q, q, torch.ones(4, 4, dtype=torch.int64))
        for s in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="scale must be finite"):
                int8_attention(q, q, q, scale=s)


def test_head_dimension_zero_gives_the_empty_output():
    q = torch.zeros(2, 3, 4, 0)
    with torch.no_grad():
        assert int8_attention(q, q, q).shape == (2, 3, 4, 0)


# ---- ctypes wrappers check sizes (finding 10) and the decode pass stays in its table (finding 9)
@pytest.mark.needs_int8_c
def test_quantize_tokens_refuses_a_codes_buffer_too_small():
    x = torch.randn(8, 16)
    codes, scales = torch.empty(8 * 16 - 1, dtype=torch.int8), torch.empty(8)
    assert _native.quantize_tokens(x, None, 127.0, 1e-8, -127, 127, codes, scales) is False
    assert _native.quantize_tokens(x, None, 127.0, 1e-8, -127, 127, torch.empty(8, 16, dtype=torch.int8),
                                   torch.empty(7)) is False


@pytest.mark.needs_codec_c
def test_the_c_decode_pass_never_reads_outside_its_table():
    lib = _KERNELS.get()
    fmt = get_format("fp4_e2m1fn")
    table = _decode_table(fmt)
    assert table.size == 16
    codes = np.arange(256, dtype=np.uint8)  # as if another thread rewrote checked codes mid-pass
    out = np.empty(codes.size, np.uint32)
    lib.lowbit_decode_table(codes.ctypes.data, 1, codes.size, table.ctypes.data, table.size, out.ctypes.data, 1)
    assert np.array_equal(out, table.view(np.uint32)[codes & 15])
    assert ctypes.sizeof(ctypes.c_int64) == 8


# ---- numeric edges (finding 17)
def test_a_scaled_cast_beyond_the_float32_range_is_refused():
    with pytest.raises(ValueError, match="beyond float32"):
        cast(np.array([1e300, 1.0]), "fp8_e4m3fn", scaling="tensor")


@pytest.mark.parametrize("amax", [4e-36, 1e-40, 3e-44])
def test_a_scaled_cast_of_a_tiny_tensor_keeps_its_values(amax):
    x = np.array([amax, -amax / 2, amax / 4], np.float32)
    c = cast(x, "fp8_e4m3fn", scaling="tensor")
    v = c.values()
    assert np.all(v != 0) and np.all(np.sign(v) == np.sign(x))
    assert np.max(np.abs(v - x)) <= 0.5 * amax  # subnormal float32 scales carry few bits


def test_metrics_of_huge_finite_float64_data_are_finite():
    x = np.array([1e200, -3e199, 2e200])
    y = x * (1 + 1e-3)
    assert cosine(x, y) == pytest.approx(1.0) and rel_error(x, y) == pytest.approx(1e-3, rel=1e-6)
    m = error_metrics(x, y)
    assert m.sqnr_db == pytest.approx(60.0, abs=1e-6) and np.isfinite(m.max_abs_error)


def test_describe_infinity_in_a_format_without_it():
    for fmt in ("fp8_e4m3fn", "fp6_e3m2fn", "fp4_e2m1fn"):
        s = describe(float("inf"), fmt, overflow="saturate")
        assert "error -inf" in s
