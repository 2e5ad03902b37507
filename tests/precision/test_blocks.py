"""Block-scaled (MX) formats against torchao's MX reference (to_mx) and an exact rational oracle."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from precision import decode, get_format, round_to
from precision.blocks import (BLOCK_FORMATS, E8M0_NAN, MX_FORMATS, BlockFormat, block_decode, block_encode, get_block_format,
                              pack_fp4, round_to_block, unpack_fp4)

MXFP = [n for n, f in MX_FORMATS.items() if not f.is_int]
ELEMENTS = {"mxfp8_e4m3": "float8_e4m3fn", "mxfp8_e5m2": "float8_e5m2", "mxfp6_e3m2": "fp6_e3m2",
            "mxfp6_e2m3": "fp6_e2m3", "mxfp4": "float4_e2m1fn_x2"}


def adversarial(fmt: BlockFormat, seed: int = 0) -> np.ndarray:
    """Blocks of 32 float32 values: random at scales 2**-140 .. 2**120, all zero, amax a power of two,
    a subnormal amax, inf, exact ties of the element grid, values at the saturation edge."""
    rng = np.random.default_rng(seed)
    el = fmt.element_format
    b = fmt.block
    rows = [rng.standard_normal(b) * 2.0 ** rng.integers(-140, 120) for _ in range(40)]
    rows.append(np.zeros(b))
    p = rng.standard_normal(b)
    p[3] = 2.0 ** 5  # the block's amax is exactly a power of two
    p = np.clip(p, -31, 31)
    rows.append(p)
    rows.append(rng.standard_normal(b) * 1e-42)  # float32 subnormals
    q = rng.standard_normal(b)
    q[7] = np.inf
    rows.append(q)
    grid = decode(np.arange(el.num_codes), el).astype(np.float64)
    grid = np.unique(np.abs(grid[np.isfinite(grid)]))
    mids = (grid[:-1] + grid[1:]) / 2
    tie = np.concatenate([[el.max_finite], rng.choice(mids, b - 1)]) * rng.choice([-1.0, 1.0], b)
    for k in (-3, 0, 9):
        rows.append(tie * 2.0 ** k)  # amax = max * 2**k: the scale is 2**k, every other element a tie
    edge = np.full(b, el.max_finite * 1.9)
    edge[0] = el.max_finite * 1.999  # below the next power of two: floor keeps the scale, elements saturate
    rows.append(edge)
    return np.stack(rows).astype(np.float32)


def torchao_elements(name: str, x: torch.Tensor, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(E8M0 scale codes, element values as float32) from torchao's to_mx."""
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")
    config = pytest.importorskip("torchao.prototype.mx_formats.config")
    dt = ELEMENTS[name]
    elem = getattr(torch, dt) if hasattr(torch, dt) else dt
    scale, data = mx.to_mx(x, elem, 32, getattr(config.ScaleCalculationMode, rule.upper()))
    if name.startswith("mxfp8"):
        vals = data.to(torch.float32)
    elif name == "mxfp4":
        vals = kernels.f4_unpacked_to_f32(kernels.unpack_uint4(data.view(torch.uint8)))
    elif name == "mxfp6_e2m3":
        vals = kernels.f6_e2m3_unpacked_to_f32(data)
    else:
        vals = kernels.f6_e3m2_unpacked_to_f32(data)
    return scale.view(torch.uint8).numpy().reshape(x.shape[0], -1), vals.reshape(x.shape).numpy()


@pytest.mark.parametrize("name", MXFP)
@pytest.mark.parametrize("rule", ["floor", "ceil", "even"])
def test_scales_and_elements_equal_torchao_to_mx(name, rule):
    fmt = BlockFormat(MX_FORMATS[name].element, 32, rule)
    x = adversarial(fmt, seed=len(name))
    ref_scales, ref_vals = torchao_elements(name, torch.from_numpy(x), rule)
    got = block_encode(x, fmt)
    np.testing.assert_array_equal(got.scales, ref_scales)
    els = decode(got.codes, fmt.element_format).reshape(ref_vals.shape)
    # torchao divides by 2**-126 where the E8M0 code 0 means 2**-127: those blocks' elements are compared
    # with the oracle below instead
    same = np.repeat((got.scales != 0) & (got.scales != E8M0_NAN), 32, axis=1)
    np.testing.assert_array_equal(els[same], ref_vals[same])
    assert same.mean() > 0.8


def _oracle_exponent(amax: Fraction, fmt: BlockFormat) -> int:
    """The shared exponent from exact rational arithmetic."""
    if amax == 0:
        return -127
    lg = math.floor(math.log2(amax))
    while Fraction(2) ** lg > amax:
        lg -= 1
    while Fraction(2) ** (lg + 1) <= amax:
        lg += 1
    rule = fmt.scale_rule
    top = Fraction(fmt.element_format.max_finite)
    if rule == "floor":
        e = lg - fmt.emax
    elif rule == "ceil":
        e = lg + (Fraction(2) ** lg != amax) - fmt.emax
    elif rule == "even":
        step = Fraction(2) ** (lg - fmt.element_format.mantissa_bits)
        rounded = (amax / step + Fraction(1, 2)).__floor__() * step
        e = lg + (rounded >= Fraction(2) ** (lg + 1)) - fmt.emax
    else:
        e = -200
        while top * Fraction(2) ** e < amax:
            e += 1
    return max(-127, min(127, e))


@pytest.mark.parametrize("name", MXFP)
@pytest.mark.parametrize("rule", ["floor", "ceil", "even", "rceil"])
@pytest.mark.parametrize("rounding", ["nearest_even", "nearest_away"])
def test_every_block_equals_the_exact_rational_answer(name, rule, rounding):
    fmt = BlockFormat(MX_FORMATS[name].element, 32, rule)
    x = adversarial(fmt, seed=7)
    x = x[np.isfinite(x).all(axis=1)]
    got = block_encode(x, fmt, rounding=rounding)
    vals = block_decode(got)
    el = fmt.element_format
    for i, row in enumerate(x):
        amax = max(Fraction(float(abs(v))) for v in row)
        e = _oracle_exponent(amax, fmt)
        assert int(got.scales[i, 0]) == e + 127, (i, e)
        want = round_to(np.array([float(Fraction(float(v)) / Fraction(2) ** e) for v in row]), el,
                        rounding=rounding, overflow="saturate")
        np.testing.assert_array_equal(vals[i], (want.astype(np.float64) * 2.0 ** e).astype(np.float32))
        if rule == "rceil":
            assert np.all(np.abs(want) < el.max_finite) or np.abs(row).max() == el.max_finite * 2.0 ** e or \
                np.all(np.abs(row.astype(np.float64)) <= el.max_finite * 2.0 ** e)  # rceil never saturates


def test_rceil_matches_torchao_where_its_float32_division_is_exact():
    fmt = BlockFormat("fp8_e4m3fn", 32, "rceil")
    x = adversarial(fmt, seed=3)
    ref_scales, _ = torchao_elements("mxfp8_e4m3", torch.from_numpy(x), "rceil")
    got = block_encode(x, fmt)
    amax = np.abs(x).max(axis=1).astype(np.float64)
    exact = (np.float32(amax) / np.float32(448.0)).astype(np.float64) * 448.0 == amax
    exact &= np.isfinite(amax) & (got.scales[:, 0] != 0)
    assert exact.sum() >= 10
    np.testing.assert_array_equal(got.scales[exact], ref_scales[exact])


def test_nan_blocks_decode_to_nan_and_others_are_untouched():
    x = np.ones((2, 64), np.float32)
    x[0, 40] = np.nan
    b = block_encode(x, "mxfp8_e4m3")
    assert b.scales.tolist() == [[127 - 8, E8M0_NAN], [127 - 8, 127 - 8]]
    v = block_decode(b)
    assert np.isnan(v[0, 32:]).all() and (v[0, :32] == 1).all() and (v[1] == 1).all()
    assert (b.codes[0, 32:] == 0).all()


def test_stored_bytes_are_the_packed_elements_and_one_scale_per_block():
    x = np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32)
    b4 = block_encode(x, "mxfp4")
    assert b4.nbytes * 8 / x.size == pytest.approx(4.25)
    assert block_encode(x, "mxfp8_e4m3").nbytes * 8 / x.size == pytest.approx(8.25)
    assert block_encode(x, "mxfp6_e2m3").nbytes * 8 / x.size == pytest.approx(8.25)  # fp6: one code per byte
    assert MX_FORMATS["mxfp4"].bits_per_element == 4.25
    packed = pack_fp4(b4.codes)
    assert packed.size == x.size // 2
    assert (packed[0] & 0x0F) == b4.codes.reshape(-1)[0] and (packed[0] >> 4) == b4.codes.reshape(-1)[1]
    np.testing.assert_array_equal(unpack_fp4(packed, x.size), b4.codes.reshape(-1))
    np.testing.assert_array_equal(unpack_fp4(pack_fp4(np.arange(7, dtype=np.uint8)), 7), np.arange(7))


def test_bad_block_formats_and_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        block_encode(np.ones((2, 48), np.float32), "mxfp4")
    with pytest.raises(ValueError, match="unknown block format"):
        get_block_format("mxfp3")
    with pytest.raises(ValueError, match="at most 8 bits"):
        BlockFormat("bf16")
    with pytest.raises(ValueError, match="scale_rule"):
        BlockFormat("fp4_e2m1fn", 32, "nearest")
    with pytest.raises(ValueError, match="block must be a positive integer"):
        BlockFormat("fp4_e2m1fn", 0)


def test_torch_and_bfloat16_inputs_encode_as_their_float32_values():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    a = block_encode(x, "mxfp4")
    b = block_encode(x.float().numpy(), "mxfp4")
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)
    assert get_format("fp4_e2m1fn").bits == 4


@pytest.mark.parametrize("name", MXFP)
def test_a_checkpoint_stores_the_block_codes_and_reads_back_what_the_report_measured(tmp_path, name):
    from safetensors.numpy import save_file

    from bench.quantize import main
    from lowbit.checkpoint import Checkpoint, compress_checkpoint, load

    rng = np.random.default_rng(1)
    w = {"a.weight": (rng.standard_normal((64, 96)) * 0.05).astype(np.float32),
         "odd.weight": rng.standard_normal((8, 40)).astype(np.float32)}  # 40 is no multiple of 32
    src = tmp_path / "m.safetensors"
    save_file(w, str(src))
    out = tmp_path / "q.safetensors"
    rep = compress_checkpoint(src, out, name, progress=False, exclude="odd")
    back = load(out, as_numpy=True)
    want = round_to_block(w["a.weight"], name)
    np.testing.assert_array_equal(back["a.weight"], want)
    row = rep.tensors[0]
    fmt = MX_FORMATS[name]
    assert row.bytes_after == w["a.weight"].size * fmt.bits_per_element / 8 if fmt.element_format.bits <= 4 \
        else row.bytes_after == w["a.weight"].size + w["a.weight"].size // 32
    err = want.astype(np.float64) - w["a.weight"]
    assert row.mse == pytest.approx(float(np.mean(err ** 2)), rel=1e-12)
    parts = Checkpoint(out).names()
    assert "a.weight::scale" in parts and "a.weight::values" in parts
    np.testing.assert_array_equal(back["odd.weight"], w["odd.weight"])  # excluded: kept bit for bit
    assert main([str(src), "--method", name, "--quiet"]) == 1  # odd.weight does not split into blocks


def test_the_cli_takes_nearest_away_for_block_formats(tmp_path):
    from safetensors.numpy import save_file

    from bench.quantize import main
    from lowbit.checkpoint import load

    ties = np.array([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5], np.float32)  # amax 6: scale 1, the rest ties
    x = (np.tile(ties, 8) * np.repeat([1, -1], 32)).reshape(2, 32).astype(np.float32)
    save_file({"w": x}, str(tmp_path / "m.safetensors"))
    assert main([str(tmp_path / "m.safetensors"), "--method", "mxfp4", "--rounding", "nearest_away",
                 "--out", str(tmp_path / "q.safetensors"), "--quiet"]) == 0
    got = load(tmp_path / "q.safetensors", as_numpy=True)["w"]
    np.testing.assert_array_equal(got, round_to_block(x, "mxfp4", rounding="nearest_away"))
    assert not np.array_equal(got, round_to_block(x, "mxfp4"))


def test_float64_input_takes_the_exact_path_and_agrees_with_float32():
    x = adversarial(MX_FORMATS["mxfp6_e3m2"], seed=5)
    x = x[np.isfinite(x).all(axis=1)]
    for name in MX_FORMATS:  # MXINT8 included
        a, b = block_encode(x, name), block_encode(x.astype(np.float64), name)
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scales, b.scales)


def _gguf_inputs() -> np.ndarray:
    rng = np.random.default_rng(11)
    rows = [rng.standard_normal(64) * 10.0 ** rng.integers(-30, 30) for _ in range(30)]
    rows.append(np.zeros(64))
    rows.append(np.full(64, -3.5))  # a constant negative block
    r = rng.standard_normal(64)
    r[5], r[40] = -4.0, 4.0  # equal magnitudes of both signs: the first one sets Q4_0's sign
    rows.append(r)
    t = (rng.integers(-127, 128, 64) + 0.5) / 127 * 3  # products near halves
    t[0] = 3
    rows.append(t)
    rows.append(np.array([65504 * 127 * 4] + [1.0] * 63))  # a scale beyond float16: inf, as ggml stores it
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_gguf_blocks_are_byte_identical_to_the_gguf_package(name):
    gguf = pytest.importorskip("gguf")
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[name]
    x = _gguf_inputs()
    b = block_encode(x, name)
    with np.errstate(all="ignore"):
        ref = gguf.quants.quantize(x, qtype)
        back = gguf.quants.dequantize(ref, qtype)
    np.testing.assert_array_equal(b.gguf_blocks().reshape(ref.shape), ref)
    got = block_decode(b)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(back))
    ok = ~np.isnan(back)
    np.testing.assert_array_equal(got[ok], back[ok])
    assert b.nbytes == ref.nbytes


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_gguf_presets_in_a_checkpoint_read_back_as_ggml_dequantizes(tmp_path, name):
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import save_file

    from bench.quantize import main
    from lowbit.checkpoint import load

    w = (np.random.default_rng(2).standard_normal((48, 128)) * 0.05).astype(np.float32)
    save_file({"w": w}, str(tmp_path / "m.safetensors"))
    assert main([str(tmp_path / "m.safetensors"), "--method", name, "--out", str(tmp_path / "q.safetensors"),
                 "--quiet"]) == 0
    qtype = getattr(gguf.GGMLQuantizationType, name.upper())
    want = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
    np.testing.assert_array_equal(load(tmp_path / "q.safetensors", as_numpy=True)["w"], want)
    assert BLOCK_FORMATS[name].bits_per_element == (8.5 if name == "q8_0" else 4.5)
    with pytest.raises(ValueError, match="rounds as ggml does"):
        block_encode(w, name, rounding="nearest_away")


def _nvfp4_inputs() -> np.ndarray:
    """Blocks of 16 at scales 2**-20 .. 2**20, zeros, ties of the fp4 grid under a scale, a constant block."""
    rng = np.random.default_rng(4)
    rows = [rng.standard_normal(64) * 2.0 ** rng.integers(-20, 20) for _ in range(20)]
    rows.append(np.zeros(64))
    rows.append(np.full(64, 0.75))
    grid_mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    tie = np.concatenate([[6.0], rng.choice(grid_mids, 15)])
    rows.append(np.tile(tie, 4) * rng.choice([-1.0, 1.0], 64) * 0.37)
    return np.stack(rows).astype(np.float32)


def _exact_nvfp4_values(x: np.ndarray, b, rounding: str) -> np.ndarray:
    el = get_format("fp4_e2m1fn")
    s = decode(b.scales, "fp8_e4m3fn").astype(np.float64)
    out = np.empty(x.shape)
    for idx in np.ndindex(*x.shape):
        blk = idx[:-1] + (idx[-1] // 16,)
        d = Fraction(float(s[blk])) * Fraction(b.tensor_scale)
        q = Fraction(float(x[idx])) / d
        from tests.precision._oracle import oracle_round
        r = oracle_round(q, el, rounding)
        r = max(-el.max_finite, min(el.max_finite, r))  # saturation
        out[idx] = float(Fraction(r) * d)
    return out.astype(np.float32)


@pytest.mark.parametrize("rounding", ["nearest_even", "nearest_away"])
def test_nvfp4_equals_the_exact_rational_answer(rounding):
    x = _nvfp4_inputs()
    b = block_encode(x, "nvfp4", rounding=rounding)
    np.testing.assert_array_equal(block_decode(b), _exact_nvfp4_values(x, b, rounding))


def test_nvfp4_scales_equal_torchao_and_elements_differ_only_where_it_rounds_twice():
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")
    x = _nvfp4_inputs()
    xt = torch.from_numpy(x)
    pts = nv.per_tensor_amax_to_scale(xt.abs().max())
    scales, data = nv.nvfp4_quantize(xt, 16, pts)
    b = block_encode(x, "nvfp4")
    assert b.tensor_scale == float(pts)
    np.testing.assert_array_equal(b.scales, scales.view(torch.uint8).numpy().reshape(b.scales.shape))
    ref = kernels.f4_unpacked_to_f32(kernels.unpack_uint4(data.view(torch.uint8))).reshape(x.shape).numpy()
    mine = decode(b.codes, "fp4_e2m1fn")
    differ = mine != ref
    # where they differ, torchao's product with a rounded reciprocal crossed an fp4 midpoint; the oracle
    # test above shows lowbit's value is the exact one
    assert differ.mean() < 0.01
    assert np.array_equal(block_decode(b), _exact_nvfp4_values(x, b, "nearest_even"))


def test_nvfp4_in_a_checkpoint_costs_4_5_bits_plus_4_bytes(tmp_path):
    from safetensors.numpy import save_file

    from lowbit.checkpoint import compress_checkpoint, load

    w = (np.random.default_rng(5).standard_normal((64, 128)) * 0.02).astype(np.float32)
    save_file({"w": w}, str(tmp_path / "m.safetensors"))
    rep = compress_checkpoint(tmp_path / "m.safetensors", tmp_path / "q.safetensors", "nvfp4", progress=False)
    assert rep.tensors[0].bytes_after == w.size * 4.5 / 8 + 4
    np.testing.assert_array_equal(load(tmp_path / "q.safetensors", as_numpy=True)["w"], round_to_block(w, "nvfp4"))
    assert BLOCK_FORMATS["nvfp4"].bits_per_element == 4.5


def test_nvfp4_quotients_whose_float32_rounding_lands_on_a_midpoint_round_from_the_exact_quotient():
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((64, 16)) * 0.1).astype(np.float32)
    x[:, 0] = np.abs(x[:, 0]) + 1  # each block's amax is its first element
    x[0, 0] = 7.77  # the tensor's amax
    first = block_encode(x, "nvfp4")
    d = decode(first.scales, "fp8_e4m3fn").astype(np.float64)[:, 0] * first.tensor_scale
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    hits = 0
    for i in range(1, 64):
        for j in range(1, 16):
            m = rng.choice(mids) * rng.choice([-1, 1])
            v = np.float32(m * d[i])
            q = float(v) / d[i]
            if np.float32(q) == m and q != m and abs(v) < x[i, 0]:
                x[i, j] = v
                hits += 1
    assert hits > 10  # enough quotients that are not midpoints but look like one in float32
    b = block_encode(x, "nvfp4")
    np.testing.assert_array_equal(b.scales, first.scales)
    np.testing.assert_array_equal(block_decode(b), _exact_nvfp4_values(x, b, "nearest_even"))



@pytest.mark.parametrize("rule", ["floor", "ceil", "rceil"])
@pytest.mark.parametrize("rounding", ["nearest_even", "nearest_away"])
def test_mxint8_equals_the_exact_rational_answer(rule, rounding):
    fmt = BlockFormat("int8", 32, rule)
    x = adversarial(MX_FORMATS["mxfp8_e4m3"], seed=9)
    x = x[np.isfinite(x).all(axis=1)]
    b = block_encode(x, fmt, rounding=rounding)
    vals = block_decode(b)
    assert b.codes.dtype == np.int8 and np.abs(b.codes).max() <= 127
    for i, row in enumerate(x):
        amax = max(Fraction(float(abs(v))) for v in row)
        if amax == 0:
            e = -127
        else:
            lg = math.floor(math.log2(amax))
            while Fraction(2) ** lg > amax:
                lg -= 1
            while Fraction(2) ** (lg + 1) <= amax:
                lg += 1
            if rule == "floor":
                e = lg
            elif rule == "ceil":
                e = lg + (Fraction(2) ** lg != amax)
            else:
                e = -200
                while Fraction(127, 64) * Fraction(2) ** e < amax:
                    e += 1
            e = max(-127, min(127, e))
        assert int(b.scales[i, 0]) == e + 127
        for j, v in enumerate(row):
            t = Fraction(float(v)) / Fraction(2) ** e * 64
            fl = math.floor(t)
            frac = t - fl
            if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and (rounding == "nearest_away" and t > 0
                                                                   or rounding == "nearest_even" and fl % 2)):
                q = fl + 1
            else:
                q = fl
            if frac == Fraction(1, 2) and rounding == "nearest_away" and t < 0:
                q = fl
            q = max(-127, min(127, q))
            assert int(b.codes[i, j]) == q, (i, j, float(t), q)
            assert vals[i, j] == np.float32(float(Fraction(q, 64) * Fraction(2) ** e))


def test_mxint8_in_a_checkpoint_costs_8_25_bits(tmp_path):
    from safetensors.numpy import save_file

    from lowbit.checkpoint import compress_checkpoint, load

    w = (np.random.default_rng(6).standard_normal((32, 64)) * 0.02).astype(np.float32)
    save_file({"w": w}, str(tmp_path / "m.safetensors"))
    rep = compress_checkpoint(tmp_path / "m.safetensors", tmp_path / "q.safetensors", "mxint8", progress=False)
    assert rep.tensors[0].bytes_after == w.size * 8.25 / 8
    np.testing.assert_array_equal(load(tmp_path / "q.safetensors", as_numpy=True)["w"], round_to_block(w, "mxint8"))
    with pytest.raises(ValueError, match="MXINT8 takes"):
        BlockFormat("int8", 32, "even")


FIT = [BlockFormat("fp8_e4m3fn", 32, "fit", scale="bf16"), BlockFormat("fp4_e2m1fn", 16, "fit", scale="fp32"),
       BlockFormat("fp6_e2m3fn", 32, "fit", scale="fp16"), BlockFormat("fp8_e5m2", 16, "fit", scale="e4m3")]


@pytest.mark.parametrize("fmt", FIT, ids=lambda f: f.describe())
@pytest.mark.parametrize("rounding", ["nearest_even", "nearest_away"])
def test_fitted_float_scales_are_the_smallest_that_fit_and_elements_round_once(fmt, rounding):
    from tests.precision._oracle import oracle_round

    rng = np.random.default_rng(12)
    x = (rng.standard_normal((12, 64)) * np.exp(rng.uniform(-6, 6, (12, 1)))).astype(np.float32)
    x[0] = 0
    b = block_encode(x, fmt, rounding=rounding)
    sfmt = get_format({"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "e4m3": "fp8_e4m3fn"}[fmt.scale])
    el = fmt.element_format
    top = Fraction(float(el.max_finite))
    svals = decode(b.scales, sfmt).astype(np.float64)
    vals = block_decode(b)
    for idx in np.ndindex(*b.scales.shape):
        blk = x[idx[0], idx[1] * fmt.block:(idx[1] + 1) * fmt.block]
        amax = max(Fraction(float(abs(v))) for v in blk)
        s = Fraction(float(svals[idx]))
        if amax == 0:
            assert s == 1
            continue
        assert s * top >= amax  # fits: nothing saturates
        below = Fraction(float(decode(np.array([int(b.scales[idx]) - 1]), sfmt)[0]))
        assert below * top < amax  # and the next smaller scale would not
        for j, v in enumerate(blk):
            want = oracle_round(Fraction(float(v)) / s, el, rounding)
            assert vals[idx[0], idx[1] * fmt.block + j] == np.float32(float(Fraction(want) * s))


def test_a_custom_block_format_is_stored_and_read_back(tmp_path):
    from safetensors.numpy import save_file

    from lowbit.checkpoint import Chain, compress_checkpoint, load
    from precision.blocks import BlockCast

    fmt = BlockFormat("fp8_e4m3fn", 16, "fit", scale="bf16")
    w = (np.random.default_rng(13).standard_normal((32, 64)) * 0.03).astype(np.float32)
    save_file({"w": w}, str(tmp_path / "m.safetensors"))
    rep = compress_checkpoint(tmp_path / "m.safetensors", tmp_path / "q.safetensors", Chain(None, BlockCast(fmt)),
                              progress=False)
    np.testing.assert_array_equal(load(tmp_path / "q.safetensors", as_numpy=True)["w"], round_to_block(w, fmt))
    assert rep.tensors[0].bytes_after == w.size + w.size // 16 * 2
    with pytest.raises(ValueError, match="beyond fp16"):
        block_encode(np.array([[1e30] * 32], np.float32), BlockFormat("fp8_e4m3fn", 32, "fit", scale="fp16"))
    with pytest.raises(ValueError, match="not a block format"):
        get_block_format({"element": "fp8_e4m3fn"})


@pytest.mark.needs_blocks_c
def test_nvfp4_c_passes_equal_the_numpy_path_bit_for_bit(monkeypatch):
    """The two C passes (block amax; scales and element codes by exact comparisons) against the numpy
    path: random, heavy-tailed, tiny, subnormal and huge tensors, signed zeros, exact midpoints and
    their float32 neighbours, and a tensor past the threaded size."""
    import precision.blocks as blocks

    rng = np.random.default_rng(11)
    cases = [rng.standard_normal((1100, 1024)).astype(np.float32),
             (rng.standard_t(2, (64, 1024)) * 1e-3).astype(np.float32),
             (rng.standard_normal((8, 64)) * 1e-40).astype(np.float32),
             (rng.standard_normal((8, 64)) * 1e37).astype(np.float32),
             np.where(rng.random((8, 64)) < 0.5, np.float32(-0.0), np.float32(0.0)).astype(np.float32),
             _nvfp4_inputs()]
    x = rng.standard_normal((64, 64)).astype(np.float32)
    first = blocks.block_encode(x, "nvfp4")
    d = decode(first.scales, "fp8_e4m3fn").astype(np.float64) * first.tensor_scale
    mids = rng.choice(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]), x.shape) * np.repeat(d, 16, axis=-1)
    y = (mids * rng.choice([-1.0, 1.0], x.shape)).astype(np.float32)
    for side in (None, -np.inf, np.inf):  # at the midpoints (as float32 holds them) and a step either way
        z = y.copy() if side is None else np.nextafter(y, np.float32(side))
        z[:, ::16] = d * 6  # each block keeps its amax, so its scale
        cases.append(z.astype(np.float32))
    for c in cases:
        got = blocks.block_encode(c, "nvfp4")
        with monkeypatch.context() as m:
            m.setattr(blocks._BLOCK_KERNELS, "get", lambda: None)
            want = blocks.block_encode(c, "nvfp4")
        assert got.tensor_scale == want.tensor_scale
        np.testing.assert_array_equal(got.scales, want.scales)
        np.testing.assert_array_equal(got.codes, want.codes)
