"""The training path in torch alone: fake quantization on any device, under torch.compile, through a
checkpoint and a resume."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from quant import (PerChannel, PerGroup, QuantSpec, QuantizedLinear, calibrate, convert,
                   enable_fake_quant, fake_quantize, freeze_observers, prepare_qat, quantize)
from quant.qat import QuantizedConv

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
SPECS = [QuantSpec(), QuantSpec(bits=4, symmetric=False, granularity=PerChannel(0)),
         QuantSpec(bits=3, granularity=PerGroup(16)), QuantSpec(bits=8, signed=False, symmetric=False),
         QuantSpec(bits=6, narrow_range=True, granularity=PerChannel(1))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_torch_path_gives_the_numpy_paths_bits(device, spec, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(12, 64, generator=g) * 3).to(dtype)
    x[0, :4] = torch.tensor([0.5, -0.5, 2.5, -1e-9])  # ties and a tiny negative (its -0.0 must survive)
    qp = calibrate(x.float().numpy(), spec)
    ref = fake_quantize(x.float().numpy() if dtype == torch.bfloat16 else x.numpy(), qp)
    got = fake_quantize(x.to(device), qp).cpu()
    assert got.dtype == dtype
    want = torch.from_numpy(np.asarray(ref)).to(dtype)
    assert torch.equal(got.float().view(torch.int32), want.float().view(torch.int32))


def _no_numpy(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError("the torch path called Tensor.numpy()")
    monkeypatch.setattr(torch.Tensor, "numpy", refuse)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _qat(learn_scale: bool) -> nn.Module:
    return prepare_qat(_mlp(), weights=QuantSpec(bits=4, granularity=PerChannel(0)), activations=QuantSpec(),
                       learn_scale=learn_scale)


def _step(model, opt, x, y):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("learn_scale", [False, True])
def test_a_qat_step_never_leaves_torch(learn_scale, monkeypatch):
    model = _qat(learn_scale)
    opt = torch.optim.SGD(model.parameters(), 0.01)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    qp = calibrate(torch.linspace(-1, 1, 5), QuantSpec())  # calibration is the numpy side; fake-quant is not
    _no_numpy(monkeypatch)
    for _ in range(3):
        _step(model, opt, x, y)
    fake_quantize(x.requires_grad_(), qp).sum().backward()


@pytest.mark.parametrize("learn_scale", [False, True])
def test_a_compiled_qat_step_has_no_graph_break_and_matches_eager_bit_for_bit(learn_scale):
    x, y = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), torch.randn(8, 4)
    eager, comp = _qat(learn_scale), _qat(learn_scale)
    eager(x), comp(x)  # the first batch sets the ranges (and LSQ's scales) in both
    explain = torch._dynamo.explain(comp)(x)
    assert explain.graph_break_count == 0
    compiled = torch.compile(comp, fullgraph=True)
    o1, o2 = torch.optim.SGD(eager.parameters(), 0.01), torch.optim.SGD(comp.parameters(), 0.01)
    for _ in range(3):
        le = _step(eager, o1, x, y)
        lc = _step(compiled, o2, x, y)
    assert torch.equal(lc, le)
    for (n, pe), (_, pc) in zip(eager.state_dict().items(), comp.state_dict().items()):
        assert torch.equal(pc, pe), n


def test_qat_state_loads_into_a_freshly_prepared_model():
    a = _qat(True)
    x = torch.randn(8, 16)
    a(x)
    b = _qat(True)
    b.load_state_dict(a.state_dict())
    freeze_observers(a), freeze_observers(b)
    assert torch.equal(a(x), b(x))


def test_frozen_observers_make_evaluation_deterministic():
    model = _qat(False)
    x = torch.randn(8, 16)
    model(x)
    model.eval()
    before = model[0].input_fake_quant.max_val.clone()
    model(x * 3)  # observers still run in eval mode, as torch.ao's do: the range moves
    assert not torch.equal(model[0].input_fake_quant.max_val, before)
    freeze_observers(model)
    frozen = model(x * 5)
    assert torch.equal(model(x * 5), frozen) and torch.equal(model(x * 5), frozen)
    enable_fake_quant(model, False)
    assert torch.equal(model(x), _unwrapped(model)(x))


def _unwrapped(model):
    plain = _mlp()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "fake_quant" not in k})
    return plain


def test_a_qat_run_saved_midway_and_resumed_in_a_new_process_ends_bit_identical(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).resolve().parents[2])!r})
        from torch import nn
        from quant import PerChannel, QuantSpec, prepare_qat

        def model():
            torch.manual_seed(0)
            m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
            return prepare_qat(m, weights=QuantSpec(bits=4, granularity=PerChannel(0)), activations=QuantSpec(),
                               learn_scale=True)

        def steps(m, opt, n, start):
            for i in range(start, start + n):
                g = torch.Generator().manual_seed(i)
                x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
                opt.zero_grad()
                nn.functional.mse_loss(m(x), y).backward()
                opt.step()

        mode, path = sys.argv[1], sys.argv[2]
        m = model()
        opt = torch.optim.Adam(m.parameters(), 1e-2)
        if mode == "whole":
            steps(m, opt, 10, 0)
        elif mode == "first":
            steps(m, opt, 5, 0)
            torch.save({{"model": m.state_dict(), "opt": opt.state_dict()}}, path + ".ckpt")
            sys.exit(0)
        else:
            state = torch.load(path + ".ckpt")
            m.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            steps(m, opt, 5, 5)
        torch.save(m.state_dict(), path + "." + mode)
    """)
    f = tmp_path / "run.py"
    f.write_text(script)
    base = str(tmp_path / "state")
    for mode in ("whole", "first", "resume"):
        subprocess.run([sys.executable, str(f), mode, base], check=True, timeout=300)
    whole, resumed = torch.load(base + ".whole"), torch.load(base + ".resume")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def _converted(dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16)).to(dtype)
    qat = prepare_qat(net, weights=QuantSpec(granularity=PerChannel(0)), activations=QuantSpec())
    x = torch.randn(4, 1, 8, 8).to(dtype)
    qat(x)
    return qat, convert(qat), x


def test_a_converted_model_loads_into_a_fresh_skeleton_with_identical_outputs():
    _, q, x = _converted()
    _, fresh, _ = _converted()
    with torch.no_grad():  # a skeleton with other values: everything must come from the state dict
        for name, buf in fresh.named_buffers():
            if buf.dtype.is_floating_point:
                buf.mul_(1.5)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    assert isinstance(q[0], QuantizedConv) and "0.weight_scale" in q.state_dict()


def test_the_int8_kernel_reads_the_loaded_scales():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    spec = QuantSpec(granularity=PerChannel(0))
    qp = calibrate(w.numpy(), spec)
    a = QuantizedLinear(np.asarray(quantize(w.numpy(), qp)), qp, None, "dynamic")
    qp2 = calibrate((w * 2).numpy(), spec)
    b = QuantizedLinear(np.asarray(quantize((w * 2).numpy(), qp2)), qp2, None, "dynamic")
    x = torch.randn(20, 64)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(x), a(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_convert_takes_half_precision_models(dtype):
    qat, q, x = _converted(dtype)
    out = q(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), qat(x).float(), rtol=0.05, atol=0.05)
