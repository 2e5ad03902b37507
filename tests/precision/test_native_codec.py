"""The C table passes of the codecs give exactly the numpy passes' results (and those are checked elsewhere
against the exact algorithm, ml_dtypes and torch)."""

import numpy as np
import pytest

import precision.codec as codec
from precision import FloatFormat, decode, encode, get_format
from precision.formats import known_formats

C = codec._KERNELS.get()

FORMATS = {n: get_format(n) for n in known_formats()}
BYTE_FORMATS = [n for n, f in FORMATS.items() if f.bits <= 8 and f.mantissa_bits <= 6]


def _table_domain() -> np.ndarray:
    """Every index of the 8-bit encode table, each reached four ways (low 16 bits 0, 1, 0x8000, 0xFFFF),
    in shuffled order, repeated past the threaded size, plus an odd tail."""
    top = np.arange(1 << 16, dtype=np.uint32) << 16
    bits = (top[:, None] | np.array([0, 1, 0x8000, 0xFFFF], np.uint32)).reshape(-1)
    bits = np.random.default_rng(0).permutation(bits)
    return np.concatenate([bits, bits[: 3 * bits.size // 4 + 5]]).view(np.float32)


def _numpy_path(monkeypatch):
    monkeypatch.setattr(codec._KERNELS, "get", lambda: None)


@pytest.mark.needs_codec_c
@pytest.mark.parametrize("name", BYTE_FORMATS)
@pytest.mark.parametrize("rounding", ["nearest_even", "nearest_away", "toward_zero"])
@pytest.mark.parametrize("overflow", ["ieee", "saturate"])
def test_byte_encode_equals_the_numpy_pass_on_every_table_index(name, rounding, overflow, monkeypatch):
    x = _table_domain()
    fmt = get_format(name)
    if fmt.nan_code is None:  # formats with no NaN reject NaN input; test them on the rest
        x = x[~np.isnan(x)]
    got = encode(x, fmt, rounding=rounding, overflow=overflow)
    _numpy_path(monkeypatch)
    np.testing.assert_array_equal(got, encode(x, fmt, rounding=rounding, overflow=overflow))


@pytest.mark.needs_codec_c
@pytest.mark.parametrize("name", [n for n in BYTE_FORMATS if FORMATS[n].nan_code is None])
@pytest.mark.parametrize("size", [10, 3_000_001])
def test_nan_into_a_format_without_nan_is_refused_on_both_paths(name, size, monkeypatch):
    x = np.ones(size, np.float32)
    x[size - 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        encode(x, name)
    _numpy_path(monkeypatch)
    with pytest.raises(ValueError, match="NaN"):
        encode(x, name)


@pytest.mark.needs_codec_c
@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.bits <= 16 and n not in ("fp16", "bf16")])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_table_decode_equals_the_numpy_pass(name, dtype, monkeypatch):
    fmt = get_format(name)
    if np.dtype(dtype).itemsize * 8 < fmt.bits:
        pytest.skip("codes wider than the dtype")
    codes = np.arange(fmt.num_codes, dtype=dtype)
    codes = np.concatenate([np.tile(codes, (1 << 21) // codes.size + 1), codes[:7]])  # threaded, odd tail
    got = decode(codes, fmt)
    _numpy_path(monkeypatch)
    np.testing.assert_array_equal(got.view(np.uint32), decode(codes, fmt).view(np.uint32))  # NaN payloads too


@pytest.mark.needs_codec_c
@pytest.mark.parametrize("fmt", ["bf16", FloatFormat(exponent_bits=8, mantissa_bits=3)])
def test_bf16_like_decode_equals_the_numpy_pass(fmt, monkeypatch):
    fmt = get_format(fmt)
    codes = np.arange(fmt.num_codes, dtype=np.uint16)
    codes = np.concatenate([np.tile(codes, (1 << 21) // codes.size + 1), codes[:5]])
    got = decode(codes, fmt)
    _numpy_path(monkeypatch)
    np.testing.assert_array_equal(got.view(np.uint32), decode(codes, fmt).view(np.uint32))


def test_the_codec_kernels_report_their_state():
    status = codec._KERNELS.status()
    assert status == "fused C passes" or status.startswith("numpy passes (")


@pytest.mark.needs_codec_c
@pytest.mark.parametrize("shape", [(1,), (7, 5), (3, 200_001), (4096, 33), (2, 3, 4)])
def test_row_absmax_equals_the_two_numpy_reductions(shape):
    import torch

    rng = np.random.default_rng(sum(shape))
    a = (rng.standard_normal(shape) * np.exp(rng.uniform(-30, 30, shape))).astype(np.float32)
    a[0] = -np.abs(a[0])  # a row of one sign: its max |a| comes from the minimum
    rows = a.reshape(shape[0], -1)
    want = np.maximum(rows.max(axis=1), -rows.min(axis=1))
    before = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            np.testing.assert_array_equal(codec.row_absmax(a, shape[0]), want)
            np.testing.assert_array_equal(codec.row_absmax(a, 1), [max(a.max(), -a.min())])
    finally:
        torch.set_num_threads(before)


@pytest.mark.needs_codec_c
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_row_absmax_gives_none_for_non_finite_values_and_the_cast_names_them(bad):
    from precision.cast import cast

    a = np.ones((5, 70_000), np.float32)
    a[3, 69_999] = bad
    assert codec.row_absmax(a, 5) is None
    with pytest.raises(ValueError, match="NaN or inf"):
        cast(a, "fp8_e4m3fn", scaling="channel")
