"""The fused C passes around the int8 GEMM: bit for bit against lowbit's reference, fallbacks, safe build."""

import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from quant import TOKEN_SPEC, PerChannel, PerGroup, PTQConfig, QuantSpec, calibrate, ptq, quantize
from quant import _native
from quant.calibrate import _EPS



def _run_quantize(x, smooth, spec):
    codes = torch.empty(x.shape, dtype=torch.int8)
    scales = torch.empty(x.shape[0], 1)
    ok = _native.quantize_tokens(x, smooth, (spec.qmax - spec.qmin) / 2, float(_EPS), spec.qmin, spec.qmax,
                                 codes, scales)
    return ok, codes, scales


def _activations(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-2, 2, cols)
    x[0] = 0  # constant row: the eps scale
    x[1] = 1e-30  # amax / 127 underflows below eps
    x[2, :4] = torch.tensor([-0.0, 1e-45, -3e37, 3e37])  # sign of zero, a subnormal, huge values
    steps = torch.arange(float(cols)) - cols / 2 + 0.5  # exact ties after scaling by amax / 127.5 or 127
    x[3] = steps / steps.abs().max() * 127.5
    x[4] = steps / steps.abs().max() * 127
    if rows > 6:  # constant rows land exactly on the end code of their sign (-128 in the full range)
        x[5], x[6] = -2.5, 0.75
    return x


@pytest.mark.needs_int8_c
@pytest.mark.parametrize("narrow", [True, False])
@pytest.mark.parametrize("smoothed", [False, True])
@pytest.mark.parametrize("rows,cols", [(5, 8), (700, 384), (64, 1536)])  # serial and threaded
def test_codes_and_scales_equal_quant_quantize_bit_for_bit(narrow, smoothed, rows, cols):
    spec = QuantSpec(narrow_range=narrow, granularity=PerChannel(0))
    x = _activations(rows, cols, seed=rows + cols)
    smooth = torch.rand(cols, generator=torch.Generator().manual_seed(7)) * 4 + 0.25 if smoothed else None
    ok, codes, scales = _run_quantize(x, smooth, spec)
    assert ok
    xs = (x * smooth if smoothed else x).numpy()
    qp = calibrate(xs, spec)
    np.testing.assert_array_equal(scales.numpy(), qp.scale)
    np.testing.assert_array_equal(codes.numpy(), np.asarray(quantize(xs, qp)))


@pytest.mark.needs_int8_c
def test_rows_with_a_row_stride_are_read_in_place():
    spec = TOKEN_SPEC
    wide = _activations(300, 512, seed=3)
    x = wide[:, 64:448]  # row stride 512, unit column stride: no copy needed
    ok, codes, scales = _run_quantize(x, None, spec)
    ref = _run_quantize(x.contiguous(), None, spec)
    assert ok and torch.equal(codes, ref[1]) and torch.equal(scales, ref[2])


@pytest.mark.needs_int8_c
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_row_hands_the_call_back_to_the_reference_path(bad):
    spec = TOKEN_SPEC
    x = _activations(400, 384, seed=5)
    x[399, 17] = bad
    ok, _, _ = _run_quantize(x, None, spec)
    assert not ok


@pytest.mark.needs_int8_c
def test_arguments_that_do_not_fit_are_refused_not_misread():
    spec = TOKEN_SPEC
    x = _activations(20, 16, seed=1)
    assert not _run_quantize(x.double(), None, spec)[0]
    assert not _run_quantize(x.t(), None, spec)[0]  # column stride 20
    assert not _run_quantize(x, torch.ones(15), spec)[0]  # smoothing vector of the wrong length
    codes = torch.empty(16, 20, dtype=torch.int8).t()
    assert not _native.quantize_tokens(x, None, 127.0, float(_EPS), -127, 127, codes, torch.empty(20))
    acc = torch.ones(20, 16, dtype=torch.int32)
    assert _native.rescale(acc.t(), torch.ones(16), torch.ones(20), None) is None
    assert _native.rescale(acc, torch.ones(20), torch.ones(16, dtype=torch.float64), None) is None
    assert _native.rescale(acc, torch.ones(20), torch.ones(7), None) is None


@pytest.mark.needs_int8_c
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", [3, 1000])
def test_rescale_equals_torch_float32_ops_in_order(per_tensor, with_bias, rows):
    g = torch.Generator().manual_seed(rows)
    acc = torch.randint(-2**24, 2**24, (rows, 96), dtype=torch.int32, generator=g)
    sx = torch.rand(rows, 1, generator=g) * 1e-2
    sw = torch.rand(1, 1 if per_tensor else 96, generator=g) * 1e-2
    bias = torch.randn(96, generator=g) if with_bias else None
    want = acc.float() * sx * sw
    if with_bias:
        want = want + bias
    mem = acc.clone()
    y = _native.rescale(mem, sx, sw, bias)
    assert y is not None and y.data_ptr() == mem.data_ptr()  # written over the accumulator
    assert torch.equal(y, want)


@pytest.mark.needs_int8_c
@pytest.mark.parametrize("rows", [3, 1000])
def test_rescale_takes_affine_zero_points_out_of_the_accumulator_exactly(rows):
    g = torch.Generator().manual_seed(rows)
    acc = torch.randint(-2**24, 2**24, (rows, 96), dtype=torch.int32, generator=g)
    zp = torch.randint(-128, 128, (rows,), dtype=torch.int32, generator=g)
    col_sum = torch.randint(-127 * 384, 127 * 384, (96,), dtype=torch.int32, generator=g)
    sx, sw = torch.rand(rows, 1, generator=g) * 1e-2, torch.rand(1, 96, generator=g) * 1e-2
    bias = torch.randn(96, generator=g)
    want = (acc - zp.reshape(-1, 1) * col_sum).float() * sx * sw + bias
    y = _native.rescale(acc.clone(), sx, sw, bias, zp, col_sum)
    assert y is not None and torch.equal(y, want)
    assert _native.rescale(acc.clone(), sx, sw, bias, zp, None) is None  # both or neither
    assert _native.rescale(acc.clone(), sx, sw, bias, zp[:-1].clone(), col_sum) is None
    assert _native.rescale(acc.clone(), sx, sw, bias, zp.long(), col_sum) is None


@pytest.mark.needs_int8_c
def test_affine_token_quantization_refuses_bad_buffers_and_non_finite_rows():
    x = torch.randn(8, 16)
    codes, scales, zps = torch.empty(8, 16, dtype=torch.int8), torch.empty(8), torch.empty(8, dtype=torch.int32)
    assert _native.quantize_tokens_affine(x, None, float(_EPS), -128, 127, codes, scales, zps)
    assert not _native.quantize_tokens_affine(x, None, float(_EPS), -128, 127, codes, scales, zps[:7].clone())
    assert not _native.quantize_tokens_affine(x, None, float(_EPS), -128, 127, codes, scales, zps.float())
    assert not _native.quantize_tokens_affine(x, None, float(_EPS), -128, 127, codes[:7].clone(), scales, zps)
    x[3, 5] = float("nan")
    assert not _native.quantize_tokens_affine(x, None, float(_EPS), -128, 127, codes, scales, zps)


@pytest.mark.needs_int8_c
def test_a_model_gives_the_same_output_on_the_c_and_the_torch_passes(monkeypatch):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(384, 512), torch.nn.GELU(), torch.nn.Linear(512, 384))
    data = [torch.randn(256, 384) for _ in range(3)]
    q, rep = ptq(m, PTQConfig(activations=TOKEN_SPEC, activation_mode="dynamic", smoothquant=0.6), data)
    assert "fused C passes" in q[0].kernel
    x = torch.randn(300, 384)
    with torch.no_grad():
        fused = q(x)
        monkeypatch.setattr(_native, "library", lambda: None)
        assert "torch passes" in q[0].kernel
        assert torch.equal(q(x), fused)


def _status_in_subprocess(env_extra):
    env = {k: v for k, v in os.environ.items() if k != "LOWBIT_NATIVE"}  # the caller's setting is not the test's
    env.update(env_extra)
    code = "from quant import _native; print(_native.status())"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_lowbit_native_0_turns_the_c_passes_off():
    assert "turned off by LOWBIT_NATIVE=0" in _status_in_subprocess({"LOWBIT_NATIVE": "0"})


@pytest.mark.needs_int8_c
def test_the_build_cache_is_private_and_a_shared_one_is_not_used(tmp_path):
    own = tmp_path / "own"
    assert _status_in_subprocess({"LOWBIT_CACHE_DIR": str(own)}) == "fused C passes"
    assert stat.S_IMODE(own.stat().st_mode) == 0o700 and len(list(own.glob("int8_kernels-*.so"))) == 1
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant a library here: build privately instead
    assert _status_in_subprocess({"LOWBIT_CACHE_DIR": str(shared)}) == "fused C passes"
    assert list(shared.iterdir()) == []


def test_a_missing_compiler_falls_back_with_the_reason(tmp_path):
    status = _status_in_subprocess({"CC": str(tmp_path / "no-such-cc"), "LOWBIT_CACHE_DIR": str(tmp_path / "c")})
    assert status.startswith("torch passes (not built:")


def test_threads_running_one_quantized_model_at_once_get_the_sequential_results():
    # each thread has its own scratch; the C passes run one OpenMP team per calling thread
    from concurrent.futures import ThreadPoolExecutor
    torch.manual_seed(4)
    m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
    q, _ = ptq(m, PTQConfig(activations=TOKEN_SPEC, activation_mode="dynamic", smoothquant=0.6), [torch.randn(128, 256) for _ in range(2)])
    xs = [torch.randn(300 + 7 * i, 256) for i in range(8)]
    with torch.no_grad():
        want = [q(x) for x in xs]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda x: q(x), xs * 3))
    assert all(torch.equal(g, w) for g, w in zip(got, want * 3))


@pytest.mark.needs_int8_c
def test_a_damaged_cached_library_is_built_again(tmp_path):
    cache = tmp_path / "cache"
    assert _status_in_subprocess({"LOWBIT_CACHE_DIR": str(cache)}) == "fused C passes"
    (lib,) = cache.glob("int8_kernels-*.so")
    lib.write_bytes(b"not a shared library")
    assert _status_in_subprocess({"LOWBIT_CACHE_DIR": str(cache)}) == "fused C passes"
    assert lib.read_bytes() != b"not a shared library"


@pytest.mark.needs_int8_c
def test_a_cache_reached_through_a_link_is_not_used(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)  # whoever controls the link decides where the library comes from
    assert _status_in_subprocess({"LOWBIT_CACHE_DIR": str(link)}) == "fused C passes"
    assert list(real.iterdir()) == []


@pytest.mark.needs_int8_c
@pytest.mark.parametrize("plant", ["group_writable", "symlink"])
def test_a_cached_library_others_could_have_written_is_not_loaded(tmp_path, plant):
    cache = tmp_path / "cache"
    assert _status_in_subprocess({"LOWBIT_CACHE_DIR": str(cache)}) == "fused C passes"
    (lib,) = cache.glob("int8_kernels-*.so")
    planted = tmp_path / "planted.so"  # a real library without lowbit's symbols: loading it fails to bind
    src = tmp_path / "planted.c"
    src.write_text("int planted(void) { return 1; }\n")
    subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", str(src), "-o", str(planted)], check=True)
    if plant == "group_writable":
        lib.write_bytes(planted.read_bytes())
        lib.chmod(0o666)
    else:
        lib.unlink()
        lib.symlink_to(planted)
    # loaded, it would fail and the status would say so; refused, the library is built again
    assert _status_in_subprocess({"LOWBIT_CACHE_DIR": str(cache)}) == "fused C passes"
    assert not lib.is_symlink() and stat.S_IMODE(lib.stat().st_mode) & 0o022 == 0
    assert lib.read_bytes() != planted.read_bytes()


@pytest.mark.needs_int8_c
def test_every_c_library_loads_in_one_process_from_one_cache(tmp_path):
    # each library is its own file; loading one must never hand back another already loaded
    code = ("from quant import _native; from precision.codec import _KERNELS; "
            "libs = [_native.library(), _native.attention_library(), _KERNELS.get()]; "
            "print(all(lib is not None for lib in libs), len({lib._name for lib in libs}))")
    env = {k: v for k, v in os.environ.items() if k != "LOWBIT_NATIVE"}
    env["LOWBIT_CACHE_DIR"] = str(tmp_path / "cache")
    for _ in range(2):  # a fresh build, then loads from the cache
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.stdout.split() == ["True", "3"], r.stderr


@pytest.mark.needs_int8_c
@pytest.mark.parametrize("gran", [PerChannel(0), PerGroup(32)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(3, 64), (2048, 1024)])  # serial and threaded
def test_dequantize_int8_equals_the_torch_path_then_the_cast(gran, symmetric, dtype, rows, cols):
    from quant.modules import QuantizedLinear
    from quant.quantize import dequantize_tensor

    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, cols)).numpy()
    spec = QuantSpec(symmetric=symmetric, granularity=gran)
    qp = calibrate(w, spec)
    layer = QuantizedLinear(np.asarray(quantize(w, qp)), qp, None)
    want = dequantize_tensor(layer.codes(), layer.weight_scale, layer.weight_zero_point, spec).to(dtype)
    fast = _native.dequantize_int8(layer.weight_codes, layer.weight_scale,
                                   None if symmetric else layer.weight_zero_point, dtype)
    assert fast is not None and fast.dtype == dtype
    assert torch.equal(fast.view(torch.int16) if dtype == torch.bfloat16 else fast.view(torch.int32),
                       want.view(torch.int16) if dtype == torch.bfloat16 else want.view(torch.int32))
    assert torch.equal(layer.weight_as(dtype), want)


def test_dequantize_int8_refuses_what_does_not_fit():
    codes = torch.zeros(4, 8, dtype=torch.int8)
    assert _native.dequantize_int8(codes, torch.ones(3), None, torch.float32) is None  # 3 scales for 4 rows
    assert _native.dequantize_int8(codes.t(), torch.ones(8), None, torch.float32) is None  # not contiguous
    assert _native.dequantize_int8(codes, torch.ones(4), None, torch.float16) is None  # no float16 output
    assert _native.dequantize_int8(codes, torch.ones(4), torch.zeros(4, dtype=torch.int64), torch.float32) is None
