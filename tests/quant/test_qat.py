"""FakeQuantize, LSQ, prepare_qat/convert, and a real QAT-vs-PTQ training run on scikit-learn's digits."""

import numpy as np
import pytest
import torch

from quant import FakeQuantize, PerChannel, PTQConfig, QuantSpec, QuantizedLinear, convert, prepare_qat, ptq


def test_fake_quantize_module_observer_and_switches():
    fq = FakeQuantize(QuantSpec(bits=4))
    x = torch.linspace(-1, 1, 33)
    y = fq(x)
    assert fq.qparams().scale.item() == pytest.approx(1 / 7.5)
    assert not torch.equal(x, y) and len(torch.unique(y)) <= 16
    fq.enable_observer(False)
    fq(x * 10)  # range frozen: large inputs clip
    assert fq.qparams().scale.item() == pytest.approx(1 / 7.5)
    fq.enable_fake_quant(False)
    assert torch.equal(fq(x), x)


def test_lsq_scale_gradient_matches_its_closed_form():
    """LSQ: dL/ds = g * sum(dL/dy * (round(x/s) - x/s) inside, qmin or qmax outside)."""
    spec = QuantSpec(bits=4)
    fq = FakeQuantize(spec, learn_scale=True)
    x = torch.tensor([0.26, -0.51, 3.0, -5.0, 0.05])
    fq(torch.tensor([-1.0, 1.0]))  # initialises s = 1/7.5
    s = fq.scale.detach().item()
    xr = x.clone().requires_grad_()
    y = fq(xr)
    y.sum().backward()
    v = x / s
    inside = (torch.round(v) >= spec.qmin) & (torch.round(v) <= spec.qmax)
    per = torch.where(inside, torch.round(v) - v, torch.clamp(torch.round(v), spec.qmin, spec.qmax))
    g = 1 / np.sqrt(x.numel() * spec.qmax)
    assert fq.scale.grad.item() == pytest.approx(float(per.sum()) * g, rel=1e-5)
    assert torch.equal(xr.grad, inside.float())


def test_prepare_qat_swaps_layers_and_convert_stores_int8_matching_outputs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 8))
    qat = prepare_qat(net, weights=QuantSpec(granularity=PerChannel(0)), activations=QuantSpec())
    assert type(net[0]) is torch.nn.Conv2d  # the input model is untouched
    x = torch.randn(16, 1, 8, 8)
    opt = torch.optim.SGD(qat.parameters(), 0.01)
    for _ in range(3):
        opt.zero_grad()
        qat(x).square().mean().backward()
        opt.step()
    y = qat(x)
    q = convert(qat)
    assert isinstance(q[3], QuantizedLinear) and q[3].weight_codes.dtype == torch.int8
    torch.testing.assert_close(q(x), y, rtol=1e-5, atol=1e-5)
    assert q[3].stored_bytes < net[3].weight.numel() * 4 / 3


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    return X, y, perm[:1300], perm[1300:]


def _trained_digits_mlp(X, y, tr):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(800):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X[tr]), y[tr]).backward()
        opt.step()
    return net


def test_qat_recovers_the_accuracy_that_4bit_ptq_loses_on_digits():
    """Train an MLP on scikit-learn's digits, quantize weights to 4 bits per tensor:
    PTQ loses accuracy, QAT fine-tuning wins it back."""
    X, y, tr, te = _digits()
    net = _trained_digits_mlp(X, y, tr)

    def acc(m):
        with torch.no_grad():
            return (m(X[te]).argmax(1) == y[te]).float().mean().item()

    spec = QuantSpec(bits=4)
    ptq_model, _ = ptq(net, PTQConfig(weights=spec))
    qat = prepare_qat(net, weights=spec)
    opt = torch.optim.Adam(qat.parameters(), 1e-3)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(qat(X[tr]), y[tr]).backward()
        opt.step()
    qmodel = convert(qat)
    a_float, a_ptq, a_qat, a_int = acc(net), acc(ptq_model), acc(qat), acc(qmodel)
    print(f"digits accuracy: float {a_float:.4f}  4-bit PTQ {a_ptq:.4f}  4-bit QAT {a_qat:.4f}  converted {a_int:.4f}")
    assert a_float > 0.96
    assert a_ptq < a_float - 0.01          # measured: 0.9779 -> 0.9557
    assert a_qat > a_ptq + 0.01            # measured: 0.9759
    assert a_int == a_qat


def test_training_through_mxfp4_weights_recovers_what_mxfp4_ptq_loses_on_digits():
    """round_to_block is differentiable (straight-through): fine-tuning an MLP through MXFP4 weights wins
    back the accuracy that rounding the trained weights to MXFP4 loses."""
    from precision.blocks import round_to_block

    X, y, tr, te = _digits()
    net = _trained_digits_mlp(X, y, tr)

    def forward(m, x, mx):
        for layer in m:
            x = torch.nn.functional.linear(x, round_to_block(layer.weight, "mxfp4") if mx else layer.weight,
                                           layer.bias) if isinstance(layer, torch.nn.Linear) else layer(x)
        return x

    def acc(m, mx):
        with torch.no_grad():
            return (forward(m, X[te], mx).argmax(1) == y[te]).float().mean().item()

    a_float, a_ptq = acc(net, False), acc(net, True)
    w = net[0].weight
    grad = torch.autograd.grad(round_to_block(w, "mxfp4").sum(), w)[0]
    assert torch.equal(grad, torch.ones_like(w))  # straight-through
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(forward(net, X[tr], True), y[tr]).backward()
        opt.step()
    a_qat = acc(net, True)
    print(f"digits accuracy: float {a_float:.4f}  MXFP4 PTQ {a_ptq:.4f}  MXFP4 QAT {a_qat:.4f}")
    assert a_ptq < a_float - 0.01
    assert a_qat > a_ptq + 0.01
