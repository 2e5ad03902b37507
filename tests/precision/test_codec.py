"""Bit-exactness of the codecs against ml_dtypes, torch and an exact rational oracle."""

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch

from precision import FloatFormat, decode, describe, encode, fields, get_format, round_to
from precision import codec
from precision.codec import (_PARALLEL_MIN, _decode_torch as torch_decode, _decompose, _encode_exact,
                             _encode_f32_torch as torch_kernel, _torch_kernel_rounds_correctly)

from ._oracle import oracle_round
from .test_formats import ML

ALL = sorted(ML)
SMALL = [n for n in ALL if get_format(n).bits <= 16]
NO_NAN = {n for n in ALL if not get_format(n).has_nan}


def ml_codes(x32: np.ndarray, name: str) -> np.ndarray:
    fmt = get_format(name)
    with np.errstate(all="ignore"):
        return x32.astype(ML[name]).view(fmt.storage_dtype)


def _neighbourhood_of_values(fmt) -> np.ndarray:
    """float32 patterns at and +-2 ulp around every value, midpoint and the overflow point of fmt."""
    with np.errstate(all="ignore"):
        v = decode(np.arange(fmt.num_codes), fmt).astype(np.float64)
        v = np.unique(np.abs(v[np.isfinite(v)]))
        ulp_top = 2.0 ** (fmt.max_exponent - fmt.mantissa_bits)
        nxt = np.append(v[1:], v[-1] + ulp_top)
        mids = ((v + nxt) / 2).astype(np.float32)  # exact: midpoints have m+2 significant bits
        extra = np.array([v[-1] + ulp_top, fmt.min_subnormal / 2], np.float64).astype(np.float32)
        b = np.concatenate([v.astype(np.float32), mids, extra]).view(np.uint32).astype(np.int64)
    return np.concatenate([(b + d).clip(0, 0x7F800000) for d in (-2, -1, 0, 1, 2)]).astype(np.uint32)


def hard_float32_set(fmt) -> np.ndarray:
    """Every exponent, every midpoint between neighbours of fmt and its float32 neighbours,
    both sides of overflow/underflow thresholds, subnormals, zeros and infinities."""
    fmt = get_format(fmt)
    pos = []
    # all float32 exponents, a few mantissas each
    e = np.arange(1, 255, dtype=np.uint32) << 23
    for mant in (0, 1, 0x400000, 0x7FFFFF, 0x123456):
        pos.append(e | mant)
    pos.append(np.array([1, 2, 3, 0x7FFFFF, 0x400000, 0x400001], np.uint32))  # float32 subnormals
    if fmt.bits <= 16:
        pos.append(_neighbourhood_of_values(fmt))
    pos.append(np.array([0, 0x7F800000], np.uint32))
    p = np.unique(np.concatenate(pos))
    return np.concatenate([p, p | np.uint32(0x80000000)]).view(np.float32)


@pytest.mark.parametrize("name", SMALL)
def test_decode_every_pattern_equals_ml_dtypes(name):
    fmt = get_format(name)
    codes = np.arange(fmt.num_codes).astype(fmt.storage_dtype)
    ours = decode(codes, fmt)
    ref = codes.view(ML[name]).astype(np.float32)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    ok = ~np.isnan(ref)
    assert np.array_equal(ours[ok].view(np.uint32), ref[ok].view(np.uint32))  # bit-exact, -0 included


@pytest.mark.parametrize("name", SMALL)
def test_encode_of_decode_is_identity_on_every_non_nan_pattern(name):
    fmt = get_format(name)
    codes = np.arange(fmt.num_codes).astype(fmt.storage_dtype)
    vals = decode(codes, fmt)
    keep = ~np.isnan(vals)
    for x in (vals[keep], vals[keep].astype(np.float64)):
        np.testing.assert_array_equal(encode(x, fmt), codes[keep])


@pytest.mark.parametrize("name", ALL)
def test_encode_float32_hard_set_equals_ml_dtypes_ieee_mode(name):
    x = hard_float32_set(name)
    x = x[~np.isnan(x)]
    if name == "fp8_e8m0fnu":
        # ml_dtypes rounds float32 *subnormal* inputs up to 2**-126 even when 2**-127 is
        # nearer (e.g. 2**-127 * (1 + 2**-22)); check those against the exact oracle instead.
        sub = (np.abs(x) < np.float32(2.0**-126)) & (x > 0)
        got = round_to(x[sub], name)
        np.testing.assert_array_equal(got, [oracle_round(Fraction(float(t)), get_format(name)) for t in x[sub]])
        x = x[~sub]
    np.testing.assert_array_equal(encode(x, name), ml_codes(x, name))


@pytest.mark.parametrize("name", [n for n in ALL if n not in NO_NAN])
def test_nan_becomes_canonical_nan_keeping_its_sign(name):
    fmt = get_format(name)
    p32 = np.array([0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0x7FC00001], np.uint32)
    p64 = np.array([0x7FF8000000000000, 0x7FF0000000000001, 0x7FF7FFFFFFFFFFFF, 0x7FF8000000000001], np.uint64)
    x32 = np.concatenate([p32, p32 | np.uint32(1 << 31)]).view(np.float32)
    x64 = np.concatenate([p64, p64 | np.uint64(1 << 63)]).view(np.float64)
    for x in (x32, x64):
        c = encode(x, fmt)
        assert np.isnan(decode(c, fmt)).all()
        if fmt.specials in ("ieee", "fn") and fmt.bits < 32:
            assert (c[:4] == fmt.nan_code).all() and (c[4:] == fmt.nan_code | fmt.sign_mask).all()
            if fmt.bits <= 8:  # numpy's float16 keeps payloads; ml_dtypes' 8-bit formats are canonical
                np.testing.assert_array_equal(c, ml_codes(x32, name))


@pytest.mark.parametrize("name", sorted(NO_NAN))
def test_nan_into_a_format_without_nan_is_an_error(name):
    with pytest.raises(ValueError, match="NaN"):
        encode(np.array([1.0, np.nan], np.float32), name)


TORCH = {"fp16": (torch.float16, "ieee"), "bf16": (torch.bfloat16, "ieee"),
         "fp8_e4m3fn": (torch.float8_e4m3fn, "saturate"), "fp8_e5m2": (torch.float8_e5m2, "ieee")}


@pytest.mark.parametrize("name", sorted(TORCH))
def test_encode_equals_torch_to_in_its_mode(name):
    dt, mode = TORCH[name]
    x = hard_float32_set(name)
    ref = torch.from_numpy(x).to(dt)
    ref = ref.view(torch.uint8).numpy() if ref.element_size() == 1 else ref.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(encode(x, name, overflow=mode), ref)
    t = encode(torch.from_numpy(x), name, overflow=mode)
    assert isinstance(t, torch.Tensor)


def test_saturate_clamps_overflow_and_inf_ieee_does_not():
    x = np.array([1000.0, np.inf, -np.inf, -1e30], np.float32)
    assert decode(encode(x, "fp8_e4m3fn", overflow="saturate"), "fp8_e4m3fn").tolist() == [448, 448, -448, -448]
    assert np.isnan(decode(encode(x, "fp8_e4m3fn"), "fp8_e4m3fn")).all()
    assert decode(encode(x, "fp8_e5m2"), "fp8_e5m2").tolist() == [1024, np.inf, -np.inf, -np.inf]
    assert decode(encode(x, "fp8_e5m2", overflow="saturate"), "fp8_e5m2").tolist() == [1024, 57344, -57344, -57344]


DOUBLE_ROUNDING_CASES = [  # (input, format): where rounding through float32 first gives another answer
    (np.array(-431.99999959766865), "fp8_e4m3fn"),
    (np.array(1 + 2**-11 + 2**-40), "fp16"),
    (np.array(1 + 2**-8 + 2**-40), "bf16"),
    (np.array([16842753], np.int64), "bf16"),
]


@pytest.mark.parametrize("x, name", DOUBLE_ROUNDING_CASES)
def test_float64_and_int64_round_once_where_float32_would_round_twice(x, name):
    fmt = get_format(name)
    want = np.array([oracle_round(Fraction(v), fmt) for v in np.atleast_1d(x).tolist()])
    twice = np.atleast_1d(round_to(np.asarray(x).astype(np.float32), fmt)).astype(np.float64)
    assert not np.array_equal(want, twice)  # the case really separates one rounding from two
    np.testing.assert_array_equal(np.atleast_1d(round_to(x, fmt)), want)
    np.testing.assert_array_equal(round_to(torch.from_numpy(np.atleast_1d(x)), fmt).numpy(), want)


@pytest.mark.parametrize("x, name", DOUBLE_ROUNDING_CASES)
def test_references_round_once_or_twice_never_otherwise(x, name):
    """The installed ml_dtypes and torch give the exact answer or the float32 double-rounded one: the README's
    claims about them are checked in tests/test_peer_claims.py against the pinned versions."""
    fmt = get_format(name)
    want = [oracle_round(Fraction(v), fmt) for v in np.atleast_1d(x).tolist()]
    twice = np.atleast_1d(round_to(np.asarray(x).astype(np.float32), fmt)).astype(np.float64).tolist()
    with np.errstate(all="ignore"):
        ml = np.atleast_1d(np.asarray(x).astype(ML[name]).astype(np.float64)).tolist()
    th = torch.from_numpy(np.atleast_1d(x)).to(fmt.torch_dtype).double().tolist()
    assert ml in (want, twice)
    assert th in (want, twice)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("rounding, subnormals", [("nearest_even", "keep"), ("nearest_away", "keep"),
                                                  ("nearest_even", "flush"), ("nearest_away", "flush")])
def test_float64_and_int64_equal_the_rational_oracle(name, rounding, subnormals):
    fmt = get_format(name)
    modes = dict(rounding=rounding, subnormals=subnormals)
    rng = np.random.default_rng(1)
    v = decode(np.arange(fmt.num_codes), fmt).astype(np.float64)
    v = np.unique(v[np.isfinite(v)])
    mids = (v[:-1] + v[1:]) / 2
    # a hair above/below each midpoint: where float32 rounding would land on the midpoint
    hair = np.concatenate([mids * (1 + 2.0**-40), mids * (1 - 2.0**-40), mids])
    x = np.concatenate([hair, rng.standard_normal(300) * fmt.max_finite / 4])
    x = rng.choice(x, size=min(x.size, 1500), replace=False)
    got = round_to(x, fmt, **modes).astype(np.float64)
    want = np.array([oracle_round(Fraction(float(t)), fmt, **modes) for t in x])
    np.testing.assert_array_equal(got, want)
    real = ~np.isnan(want) & (x != 0)  # flushed zeros keep their sign; the oracle's NaN and -0.0 carry none
    np.testing.assert_array_equal(np.signbit(got[real]), np.signbit(want[real]))
    ints = np.array([16842753, -16842753, 2**24 + 1, 2**53 + 1, 2**62 + 2**40 + 1, -(2**63), 7, 0, 3], np.int64)
    gi = round_to(ints, fmt, **modes)
    wi = np.array([oracle_round(Fraction(int(t)), fmt, **modes) for t in ints])
    np.testing.assert_array_equal(gi, wi)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("rounding", ["nearest_even", "nearest_away", "toward_zero"])
def test_float32_fast_paths_equal_the_exact_algorithm(name, rounding):
    fmt = get_format(name)
    bits = np.random.default_rng(7).integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([bits.view(np.float32), hard_float32_set(fmt)])
    if not fmt.has_nan or fmt.bits == 32:  # fp32 from float32 is the identity: payloads are kept
        x = x[~np.isnan(x)]
    for overflow in ("ieee", "saturate"):
        fast = encode(x, fmt, rounding=rounding, overflow=overflow)
        exact = _encode_exact(*_decompose(x), fmt, rounding, overflow, None).astype(fmt.storage_dtype)
        np.testing.assert_array_equal(fast, exact)


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"])
def test_large_arrays_take_the_threaded_and_torch_kernels_and_still_equal_the_exact_algorithm(name, monkeypatch):
    # above _PARALLEL_MIN encode switches to threads (fp8) or torch's conversion kernel (fp16, bf16);
    # NaN with both signs and with payloads sits inside the array, where the kernels' rule differs
    fmt = get_format(name)
    bits = np.random.default_rng(8).integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([bits.view(np.float32), hard_float32_set(fmt),
                        np.array([0x7F800001, 0xFFC00000, 0x7FFFFFFF], np.uint32).view(np.float32)])
    exact = _encode_exact(*_decompose(x), fmt, "nearest_even", "ieee", None).astype(fmt.storage_dtype)
    reps = -(-_PARALLEL_MIN // x.size) + 1
    big = np.tile(x, reps)
    calls = []
    monkeypatch.setattr(codec, "_encode_f32_torch", lambda *a: calls.append(1) or torch_kernel(*a))
    np.testing.assert_array_equal(encode(big, fmt), np.tile(exact, reps))
    assert len(calls) == (name in ("fp16", "bf16"))
    big.flags.writeable = False  # torch cannot wrap a read-only array: the numpy path takes it
    np.testing.assert_array_equal(encode(big, fmt), np.tile(exact, reps))
    np.testing.assert_array_equal(encode(torch.from_numpy(np.tile(x, reps)), fmt).numpy(), np.tile(exact, reps))


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_large_decode_equals_the_small_decode_bit_for_bit_nan_included(name, monkeypatch):
    fmt = get_format(name)
    codes = np.arange(1 << 16, dtype=np.uint16)
    small = decode(codes, fmt).view(np.uint32)
    reps = _PARALLEL_MIN // codes.size + 1
    calls = []
    monkeypatch.setattr(codec, "_decode_torch", lambda *a: calls.append(1) or torch_decode(*a))
    big = np.concatenate([np.tile(codes, reps), codes[-7:]])  # an odd tail: torch's scalar loop runs too
    got = decode(big, fmt).view(np.uint32)
    assert len(calls) == (name == "fp16")  # fp16 through torch's kernel, bf16 a shift in numpy threads
    np.testing.assert_array_equal(got, np.concatenate([np.tile(small, reps), small[-7:]]))


def test_torch_kernel_probe_rejects_a_kernel_that_rounds_differently():
    assert _torch_kernel_rounds_correctly(get_format("bf16"), torch.bfloat16)
    assert _torch_kernel_rounds_correctly(get_format("fp16"), torch.float16)
    # a kernel that produces other codes for the same values (here: the other 16-bit format) is refused
    assert not _torch_kernel_rounds_correctly(get_format("bf16"), torch.float16)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2", "fp4_e2m1fn", "fp8_e8m0fnu"])
def test_encode_every_float32_pattern_equals_ml_dtypes(name):
    step = 1 << 26
    for start in range(0, 1 << 32, step):
        x = np.arange(start, start + step, dtype=np.uint64).astype(np.uint32).view(np.float32)
        x = x[~np.isnan(x)]
        if name == "fp8_e8m0fnu":  # ml_dtypes misrounds float32 subnormals here (see the hard-set test)
            x = x[np.abs(x) >= np.float32(2.0**-126)]
        np.testing.assert_array_equal(encode(x, name), ml_codes(x, name))


# ------------------------------------------------------------ API behaviour
def test_round_to_keeps_type_and_dtype():
    x = np.linspace(-3, 3, 11)
    for dt in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16):
        assert round_to(x.astype(dt), "fp8_e4m3fn").dtype == dt
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        y = round_to(torch.tensor(x).to(dt), "fp8_e5m2")
        assert isinstance(y, torch.Tensor) and y.dtype == dt
    assert isinstance(round_to(0.1, "bf16"), float)
    assert round_to(0.1, "bf16") == float(np.float32(0.1).astype(ml_dtypes.bfloat16))


def test_round_to_on_torch_has_a_straight_through_gradient():
    w = torch.randn(4, 5, requires_grad=True)
    y = round_to(w, "fp8_e4m3fn")
    assert y.requires_grad
    (y * torch.arange(20.0).reshape(4, 5)).sum().backward()
    torch.testing.assert_close(w.grad, torch.arange(20.0).reshape(4, 5))
    np.testing.assert_array_equal(y.detach().numpy(), round_to(w.detach().numpy(), "fp8_e4m3fn"))


@pytest.mark.parametrize("bad", [np.array([1 + 2j]), np.array([True]), np.array(["a"], dtype=object),
                                 torch.tensor([True]), torch.tensor([1 + 1j])])
def test_unsupported_dtypes_are_type_errors_naming_the_dtype(bad):
    with pytest.raises(TypeError, match="dtype"):
        encode(bad, "fp16")


def test_bad_modes_and_missing_seed_are_value_errors():
    with pytest.raises(ValueError, match="rounding"):
        encode(1.0, "fp16", rounding="up")
    with pytest.raises(ValueError, match="overflow"):
        encode(1.0, "fp16", overflow="wrap")
    with pytest.raises(ValueError, match="seed"):
        encode(1.0, "fp16", rounding="stochastic")
    with pytest.raises(ValueError, match="code 256"):
        decode(np.array([256]), "fp8_e4m3fn")


def test_fields_and_describe():
    s, e, m = fields(np.array([3.140625, -0.0]), "fp16")
    assert s.tolist() == [0, 1] and e.tolist() == [16, 0] and m.tolist() == [0b1001001000, 0]
    assert describe(3.14125, "fp16") == "0 10000 1001001000 = +1.5703125 x 2^1 = 3.140625 (error -0.000625)"
    assert describe(1000.0, "fp8_e4m3fn").endswith("= nan")
    assert describe(2.0, "fp8_e8m0fnu").startswith("10000000 = +1.0 x 2^1")


def test_custom_format_round_trips_and_matches_oracle():
    f = FloatFormat(exponent_bits=3, mantissa_bits=2, specials="fn", name="my_e3m2fn")
    codes = np.arange(256 >> 2)  # 6-bit format
    vals = decode(codes, f)
    keep = ~np.isnan(vals)
    np.testing.assert_array_equal(encode(vals[keep], f), codes[keep])
    x = np.linspace(-40, 40, 1001)
    np.testing.assert_array_equal(round_to(x, f), [oracle_round(Fraction(t), f) for t in x])


@pytest.mark.needs_codec_c
@pytest.mark.parametrize("fmt", [get_format("fp8_e5m2"), FloatFormat(4, 3, specials="ieee"), FloatFormat(3, 2, specials="ieee"),
                                 FloatFormat(5, 1, specials="ieee"), FloatFormat(2, 1, specials="ieee"),
                                 FloatFormat(4, 2, specials="ieee", bias=3)], ids=str)
def test_the_c_bit_arithmetic_encode_equals_the_exact_algorithm(fmt):
    from precision.codec import _encode_f32_ieee8

    bits = np.arange(0, 1 << 32, 4099, dtype=np.uint64).astype(np.uint32)
    edges = []
    for v in (fmt.max_finite, fmt.max_finite + 2.0 ** (fmt.max_exponent - fmt.mantissa_bits - 1),
              2.0 ** fmt.min_exponent, 2.0 ** (fmt.min_exponent - fmt.mantissa_bits), 0.0, np.inf):
        c = int(np.float32(v).view(np.uint32))
        edges += [c - 2, c - 1, c, c + 1, c + 2]
    bits = np.concatenate([bits, np.array([e for e in edges if 0 <= e < 1 << 31], np.uint32)])
    bits = np.concatenate([bits, bits | np.uint32(1 << 31)])  # both signs
    x = bits.view(np.float32)
    got = _encode_f32_ieee8(x, fmt)
    want = _encode_exact(*_decompose(x), fmt, "nearest_even", "ieee", None).astype(np.uint8)
    np.testing.assert_array_equal(got, want)


EXHAUSTIVE = ["fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fnuz", "fp6_e2m3fn", "fp6_e3m2fn", "fp4_e2m1fn"]


@pytest.mark.parametrize("name", [n for n in EXHAUSTIVE if n in ML])
@pytest.mark.parametrize("rounding", ["nearest_away", "nearest_even"])
@pytest.mark.parametrize("subnormals", ["keep", "flush"])
def test_every_float16_value_rounds_as_the_rational_oracle(name, rounding, subnormals):
    """Exhaustive: every finite float16 pattern (63488 of them, both zeros included) as float32,
    through the fast paths, against the exact rational answer."""
    fmt = get_format(name)
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    x = x[np.isfinite(x)]
    got = round_to(x, fmt, rounding=rounding, subnormals=subnormals, overflow="ieee").astype(np.float64)
    want = np.array([oracle_round(Fraction(float(t)), fmt, rounding, subnormals) for t in x])
    np.testing.assert_array_equal(got, want)
    real = ~np.isnan(want) & (x != 0)  # the oracle's NaN (fn overflow) and Fraction(-0.0) carry no sign
    np.testing.assert_array_equal(np.signbit(got[real]), np.signbit(want[real]))


def test_flushing_changes_only_subnormal_results_and_keeps_the_sign():
    fmt = get_format("fp8_e4m3fn")
    x = np.array([fmt.min_subnormal, -3 * fmt.min_subnormal, fmt.min_normal * (1 - 2**-5), fmt.min_normal, 1.0,
                  -0.0, 0.0], np.float32)
    kept = encode(x, fmt)
    flushed = encode(x, fmt, subnormals="flush")
    np.testing.assert_array_equal(flushed, [0x00, 0x80, kept[2], kept[3], kept[4], 0x80, 0x00])
    assert kept[2] == int(encode(np.float32(fmt.min_normal), fmt))  # rounds up to the smallest normal: stays
    fnuz = get_format("fp8_e4m3fnuz")
    assert int(encode(np.float32(-fnuz.min_subnormal), fnuz, subnormals="flush")) == 0  # +0: 0x80 is its NaN
    e8m0 = get_format("fp8_e8m0fnu")
    np.testing.assert_array_equal(encode(x[3:5], e8m0, subnormals="flush"), encode(x[3:5], e8m0))
    with pytest.raises(ValueError, match="subnormals must be one of"):
        encode(x, fmt, subnormals="zero")


@pytest.mark.needs_codec_c
@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fnuz", "fp6_e2m3fn", "fp6_e3m2fn", "fp4_e2m1fn"])
@pytest.mark.parametrize("rounding,overflow,subnormals", [("nearest_even", "ieee", "keep"),
                                                          ("nearest_even", "saturate", "keep"),
                                                          ("toward_zero", "saturate", "flush")])
def test_row_scaled_encode_equals_dividing_then_encoding(fmt, rounding, overflow, subnormals):
    # the fused pass divides each element by its row's scale as numpy does (one float32 division), so
    # its codes are encode(a / scale)'s; odd row lengths exercise the vector loop's tail, a per-tensor
    # scale the one-row case, and scales that overflow some quotients the overflow mode
    from precision.codec import encode_row_scaled
    from precision.formats import get_format

    f = get_format(fmt)
    g = np.random.default_rng(7)
    a = (g.standard_normal((37, 129)) * np.logspace(-6, 3, 129)).astype(np.float32)
    a[3] = 0.0
    a[5, ::2] = -0.0
    for scale in ((np.abs(a).max(axis=1, keepdims=True) / np.float32(f.max_finite) * np.float32(0.7))
                  .astype(np.float32), np.float32(np.abs(a).max() / f.max_finite).reshape(())):
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        got = encode_row_scaled(a, scale, f, rounding, overflow, subnormals)
        want = encode(a / scale, f, rounding=rounding, overflow=overflow, subnormals=subnormals)
        assert got is not None and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)


@pytest.mark.needs_codec_c
def test_row_scaled_encode_splits_rows_across_threads_alike():
    # above the parallel threshold the pass runs in 2 MiB blocks that start mid-row
    from precision.codec import encode_row_scaled
    from precision.formats import get_format

    f = get_format("fp8_e4m3fn")
    a = np.random.default_rng(8).standard_normal((1500, 1001)).astype(np.float32)
    scale = (np.abs(a).max(axis=1, keepdims=True) / np.float32(448)).astype(np.float32)
    np.testing.assert_array_equal(encode_row_scaled(a, scale, f, "nearest_even", "ieee", "keep"),
                                  encode(a / scale, f))
