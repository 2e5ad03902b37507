"""Defects found by running peer test suites against lowbit; each test failed before its fix."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from precision import FloatFormat, decode, encode
from quant import FakeQuantize, PerChannel, QParams, QuantSpec, calibrate, fake_quantize, prepare_qat


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_only_8bit_format_encodes_its_most_negative_value_from_any_float(dtype):
    fmt = FloatFormat(4, 3, specials="finite")
    assert int(encode(dtype(-480.0), fmt)) == 255
    codes = np.arange(256, dtype=np.uint8)
    assert np.array_equal(encode(decode(codes, fmt).astype(dtype), fmt), codes)
    with pytest.raises(ValueError, match="NaN"):
        encode(np.array([1.0, np.nan], dtype), fmt)


def test_fake_quantize_of_a_0d_tensor_equals_its_1d_counterpart():
    qp = calibrate(torch.linspace(-1, 1, 11), QuantSpec())
    x = torch.tensor(0.3)
    assert fake_quantize(x, qp).shape == ()
    assert torch.equal(fake_quantize(x, qp), fake_quantize(x.reshape(1), qp)[0])
    g = torch.tensor(0.3, requires_grad=True)
    fake_quantize(g, qp).backward()
    assert g.grad == 1.0
    fq = FakeQuantize(QuantSpec())
    assert fq(torch.tensor(0.5)).shape == ()


def test_fake_quantize_module_returns_an_empty_input_unchanged_as_torch_does():
    x = torch.empty(0)
    assert FakeQuantize(QuantSpec())(x).shape == (0,)
    ref = torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127)
    assert ref.shape == (0,)


def _qat_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return prepare_qat(model, QuantSpec(granularity=PerChannel(0)), QuantSpec())


def _steps(model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for x in batches:
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("learn_scale", [False, True])
def test_a_qat_run_saved_and_resumed_continues_bit_for_bit(learn_scale):
    torch.manual_seed(0)
    batches = [torch.randn(32, 8) for _ in range(6)]
    model = prepare_qat(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
                        QuantSpec(granularity=PerChannel(0)), QuantSpec(), learn_scale=learn_scale)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _steps(model, opt, batches[:3])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    _steps(model, opt, batches[3:])  # the uninterrupted run

    fresh = prepare_qat(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
                        QuantSpec(granularity=PerChannel(0)), QuantSpec(), learn_scale=learn_scale)
    fresh.load_state_dict(saved_model)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    fresh_opt.load_state_dict(saved_opt)
    _steps(fresh, fresh_opt, batches[3:])

    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_float64_fake_quantize_rounds_exact_ties_to_even_where_torch_does_not_have_to():
    """Ties x/scale = k + 1/2 with a scale that is not a power of two: lowbit rounds the exact
    quotient half to even (checked with rationals); the README says torch's float64 op may not."""
    from fractions import Fraction

    scale = 0.1
    s32 = float(np.float32(scale))  # the scale lowbit and torch both apply, as float32
    ks = np.arange(-40, 40)
    x = (ks + 0.5) * s32  # float64 products, exact halves of the float32 scale up to one rounding
    qp = QParams(np.array([s32], np.float32), np.array([0], np.int32), QuantSpec(), x.shape)
    got = np.asarray(fake_quantize(x, qp))
    for xi, gi in zip(x, got):
        q = Fraction(xi) / Fraction(s32)
        want = max(-128, min(127, round(q)))  # Python's round on a Fraction: nearest, ties to even
        assert Fraction(gi) == want * Fraction(s32), (xi, gi, want)
