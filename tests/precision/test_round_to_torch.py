"""round_to on torch tensors runs in torch: the numpy path's values on every float16 bit pattern and on
random float32/float64 values, for every format, rounding, overflow and subnormal mode; compiles."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from precision import get_format, known_formats, round_to

FORMATS = [f for f in known_formats() if get_format(f).specials != "fnu"]
MODES = list(itertools.product(["nearest_even", "nearest_away", "toward_zero"], ["ieee", "saturate"], ["keep", "flush"]))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def _inputs(dtype) -> np.ndarray:
    rng = np.random.default_rng(0)
    halves = np.arange(65536, dtype=np.uint16).view(np.float16).astype(dtype)
    wide = (rng.standard_normal(50000) * np.exp2(rng.integers(-60, 60, 50000))).astype(dtype)
    special = np.array([np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 3.4e38, 1e-45, -1e-45, np.nan], dtype)
    return np.concatenate([halves, wide, special])


def _same(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    u = np.uint64 if ref.dtype == np.float64 else np.uint32
    return (ref.view(u) == got.view(u)) | (np.isnan(ref) & np.isnan(got))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_to_on_a_tensor_gives_the_numpy_values(fmt, dtype, device):
    x = _inputs(dtype)
    if get_format(fmt).specials == "finite":  # no NaN code: both paths raise on NaN (tested below)
        x = x[~np.isnan(x)]
    t = torch.from_numpy(x).to(device)
    for rounding, overflow, subnormals in MODES:
        ref = round_to(x, fmt, rounding=rounding, overflow=overflow, subnormals=subnormals)
        got = round_to(t, fmt, rounding=rounding, overflow=overflow, subnormals=subnormals).cpu().numpy()
        bad = ~_same(ref, got)
        assert not bad.any(), (rounding, overflow, subnormals, x[bad][:3], ref[bad][:3], got[bad][:3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_round_through_float32_and_come_back_in_their_dtype(dtype):
    x = torch.randn(4096).to(dtype)
    got = round_to(x, "fp8_e4m3fn")
    assert got.dtype == dtype
    ref = round_to(x.float().numpy(), "fp8_e4m3fn")
    assert torch.equal(got.float(), torch.from_numpy(ref))


def test_round_to_never_leaves_torch_and_passes_gradients_straight_through(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError("round_to called Tensor.numpy()")
    monkeypatch.setattr(torch.Tensor, "numpy", refuse)
    x = torch.randn(64, requires_grad=True)
    round_to(x, "fp8_e5m2").sum().backward()
    assert torch.equal(x.grad, torch.ones(64))


def test_round_to_compiles_without_a_graph_break():
    def f(x):
        return round_to(x, "fp8_e4m3fn", overflow="saturate") * 2

    x = torch.randn(256) * 100
    assert torch._dynamo.explain(f)(x).graph_break_count == 0
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


def test_stochastic_rounding_on_tensors_is_reproducible_and_unbiased():
    x = torch.full((200000,), 1.0 + 2.0 ** -5)  # a quarter of the way from 1 to the next e4m3 value
    a = round_to(x, "fp8_e4m3fn", rounding="stochastic", seed=3)
    assert torch.equal(a, round_to(x, "fp8_e4m3fn", rounding="stochastic", seed=3))
    assert set(a.unique().tolist()) == {1.0, 1.125}
    assert abs(float(a.mean()) - float(x[0])) < 2e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8"])
@pytest.mark.parametrize("rounding", ["nearest_even", "nearest_away", "toward_zero"])
def test_round_to_block_on_a_tensor_gives_the_numpy_values(fmt, rounding, device):
    from precision.blocks import round_to_block

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 256)) * np.exp2(rng.integers(-30, 30, (64, 1)))).astype(np.float32)
    x[0, :32] = 0
    x[1, :5] = [np.inf, 1, 2, 3, 4]
    x[2, 3] = np.nan
    x[3, :32] = 1e-40
    x[4, 0] = 3e38
    x[5] = np.repeat(np.float32([0.75, 1.5, 3.0, 6.0]) * 2.0 ** -3, 64)  # powers and ties at the scale edges
    ref = round_to_block(x, fmt, rounding=rounding)
    got = round_to_block(torch.from_numpy(x).to(device), fmt, rounding=rounding).cpu().numpy()
    assert _same(ref, got).all()


def test_round_to_block_compiles_and_trains_straight_through(monkeypatch):
    from precision.blocks import round_to_block

    def f(w):
        return round_to_block(w, "mxfp4")

    w = torch.randn(8, 64)
    assert torch._dynamo.explain(f)(w).graph_break_count == 0
    assert torch.equal(torch.compile(f, fullgraph=True)(w), f(w))

    def refuse(self, *a, **k):
        raise AssertionError("round_to_block called Tensor.numpy()")
    monkeypatch.setattr(torch.Tensor, "numpy", refuse)
    g = w.clone().requires_grad_()
    f(g).sum().backward()
    assert torch.equal(g.grad, torch.ones_like(w))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_seeded_stochastic_rounding_compiles_and_gives_the_eager_bits(device, dtype):
    def f(w):
        return round_to(w, "fp8_e4m3fn", rounding="stochastic", seed=7, overflow="saturate")

    w = (torch.randn(64, 96) * 3).to(device=device, dtype=dtype)
    w[0, :8] = 2.0 ** -9 * torch.arange(8)  # e4m3's subnormals: the other branch of the draw
    assert torch._dynamo.explain(f)(w).graph_break_count == 0
    assert torch.equal(torch.compile(f, fullgraph=True)(w), f(w))
    ref = round_to(w.cpu(), "fp8_e4m3fn", rounding="stochastic", seed=7, overflow="saturate")
    assert torch.equal(f(w).cpu(), ref)  # the same bits on every device


@pytest.mark.parametrize("x0, fmt", [(1.0 + 2.0 ** -5, "fp8_e4m3fn"), (3 * 2.0 ** -11, "fp8_e4m3fn"),
                                     (1.0 + 2.0 ** -10, "bf16"), (0.3, "fp4_e2m1fn")])
def test_seeded_stochastic_rounding_is_unbiased_between_the_two_neighbours(x0, fmt):
    """Each result is one of the two neighbours, and the mean of n draws is within 5 standard errors of x
    (a false failure below one in a million)."""
    x = torch.full((200_000,), x0, dtype=torch.float64)
    a = round_to(x, fmt, rounding="stochastic", seed=11)
    lo = float(round_to(x[:1], fmt, rounding="toward_zero"))
    vals = set(a.unique().tolist())
    assert len(vals) == 2 and lo in vals
    hi = max(vals)
    p = (x0 - lo) / (hi - lo)
    se = (hi - lo) * (p * (1 - p) / x.numel()) ** 0.5
    assert abs(float(a.mean()) - x0) < 5 * se
    assert not torch.equal(a, round_to(x, fmt, rounding="stochastic", seed=12))


def test_a_torch_generator_drives_stochastic_rounding_reproducibly():
    x = torch.randn(10_000)
    a = round_to(x, "bf16", rounding="stochastic", generator=torch.Generator().manual_seed(5))
    b = round_to(x, "bf16", rounding="stochastic", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, round_to(x, "bf16"))
    with pytest.raises(ValueError, match="not both"):
        round_to(x, "bf16", rounding="stochastic", seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="only apply"):
        round_to(x, "bf16", generator=torch.Generator())


@pytest.mark.parametrize("fmt", ["fp4_e2m1fn", "fp6_e2m3fn", "fp6_e3m2fn"])
def test_nan_into_a_format_without_nan_raises_on_tensors_as_on_arrays(fmt):
    x = np.array([1.0, np.nan], np.float32)
    with pytest.raises(ValueError, match="cannot represent"):
        round_to(x, fmt)
    with pytest.raises(ValueError, match="cannot represent"):
        round_to(torch.from_numpy(x), fmt)
    with pytest.raises(ValueError, match="cannot represent"):
        round_to(torch.from_numpy(x).requires_grad_(), fmt, rounding="stochastic", seed=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rounding", ["nearest_even", "nearest_away", "toward_zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_on_a_tensor_gives_the_numpy_values_and_compiles(rounding, device, dtype):
    from precision.blocks import round_to_block

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((32, 128)) * np.exp2(rng.integers(-12, 12, (32, 1)))).astype(np.float32)
    x[0, :16] = 0
    x[1, :16] = np.float32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2)  # ties of e2m1 at scale 1
    t = torch.from_numpy(x).to(device=device, dtype=dtype)
    ref = round_to_block(t.float().cpu().numpy(), "nvfp4", rounding=rounding)
    got = round_to_block(t, "nvfp4", rounding=rounding)
    assert got.dtype == dtype
    assert torch.equal(got.float().cpu(), torch.from_numpy(ref).to(dtype).float())

    def f(w):
        return round_to_block(w, "nvfp4", rounding=rounding)

    assert torch._dynamo.explain(f)(t).graph_break_count == 0
    assert torch.equal(torch.compile(f, fullgraph=True)(t), f(t))
    with pytest.raises(ValueError, match="NaN or inf"):
        round_to_block(torch.tensor([np.nan] * 16), "nvfp4")


def test_block_formats_encoded_in_numpy_refuse_compile_with_the_reason():
    from precision.blocks import round_to_block

    with pytest.raises(Exception, match="cannot trace"):
        torch.compile(lambda w: round_to_block(w, "q4_0"), fullgraph=True)(torch.randn(4, 32))
