"""Post-training quantization of models, native and torch.ao, on a toy model and on real MiniLM."""


import numpy as np
import pytest
import torch

from precision import Report
from precision.metrics import sqnr_db
from quant import TOKEN_SPEC, PerChannel, PerGroup, PerTensor, PTQConfig, QuantSpec, QuantizedLinear, calibrate, fake_quantize, ptq



@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    return m, [torch.randn(40, 32) for _ in range(4)]


@pytest.mark.parametrize("kw", [
    dict(), dict(activations=QuantSpec()), dict(activations=QuantSpec(granularity=PerChannel(0)), activation_mode="dynamic"),
    dict(activations=TOKEN_SPEC, activation_mode="dynamic", smoothquant=0.6),
    dict(weights=QuantSpec(bits=4, granularity=PerGroup(16)), weight_calibration="mse"),
    dict(backend="torch.ao"), dict(backend="torch.ao", weights=QuantSpec()),
    dict(backend="torch.ao", activations=QuantSpec(signed=False, symmetric=False)),
])
def test_both_backends_return_a_quantized_model_and_the_same_report_type(toy, kw):
    m, data = toy
    before = [p.clone() for p in m.parameters()]
    q, rep = ptq(m, PTQConfig(**kw), data)
    assert isinstance(rep, Report) and len(rep.tensors) == 2
    assert all(r.bytes_after < r.bytes_before for r in rep.tensors)
    assert rep.meta["output_mean_cosine"] > 0.99
    assert all(r.details["output_sqnr_db"] > 15 for r in rep.tensors)  # per-layer output error on held-out data
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # input model untouched
    assert q(data[0]).shape == (40, 16)


def test_int8_kernel_is_used_and_matches_the_fake_quant_reference(toy, passes):
    m, data = toy
    q, rep = ptq(m, PTQConfig(activations=QuantSpec(granularity=PerChannel(0)), activation_mode="dynamic"), data)
    assert all(isinstance(x, QuantizedLinear) and x.int_kernel for x in (q[0], q[2]))
    assert "int_mm" in rep.tensors[0].details["kernel"]
    lin = q[0]
    x = data[0]
    ref = torch.nn.Module.__call__  # noqa: F841
    xq = fake_quantize(x, calibrate(x, QuantSpec(granularity=PerChannel(0))))
    want = torch.nn.functional.linear(xq, lin.dequantized_weight(), lin.bias)
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)


def test_ptq_errors_are_clear(toy):
    m, data = toy
    with pytest.raises(ValueError, match="backend"):
        ptq(m, PTQConfig(backend="tensorrt"), data)
    with pytest.raises(ValueError, match="calibration_data"):
        ptq(m, PTQConfig(activations=QuantSpec()))
    with pytest.raises(ValueError, match="no layers to quantize"):
        ptq(torch.nn.ReLU(), PTQConfig(), data)
    with pytest.raises(ValueError, match="per-group"):
        ptq(m, PTQConfig(backend="torch.ao", weights=QuantSpec(granularity=PerGroup(16))), data)


def test_int8_error_on_minilm_weights_follows_delta_squared_over_12_and_per_channel_beats_per_tensor():
    """Uniform rounding with step Delta has mean squared error Delta^2/12 when the data is smooth on the
    scale of a step; minmax ranges clip nothing, so every tensor's error sits near that prediction."""
    from bench.models import load_minilm_weights

    w = load_minilm_weights()
    sqnr = {}
    for gran in (PerTensor(), PerChannel(0)):
        spec, vals = QuantSpec(granularity=gran), []
        for t in w.values():
            fq = fake_quantize(t, qp := calibrate(t, spec))
            step = np.broadcast_to(qp.scale.astype(np.float64), t.shape)
            ratio = np.mean((fq.astype(np.float64) - t) ** 2) / np.mean(step ** 2 / 12)
            assert 0.8 < ratio < 1.1
            vals.append(sqnr_db(t, fq))
        sqnr[type(gran).__name__] = np.mean(vals)
    assert sqnr["PerChannel"] > sqnr["PerTensor"] + 5


@pytest.fixture(scope="module")
def minilm(minilm_model):
    from bench.models import embed, feature_batches, sentences

    model = minilm_model
    s = sentences()
    calib, held_out = s[::2], s[1::2]
    return model, feature_batches(model, calib), held_out, embed(model, held_out)


MINILM_CASES = {
    "native W8 per-channel": (dict(), 0.999),
    "native W8A8 per-token dynamic, SmoothQuant 0.6": (
        dict(activations=TOKEN_SPEC, activation_mode="dynamic", smoothquant=0.6), 0.999),
    "native W4 group-128 mse": (dict(weights=QuantSpec(bits=4, granularity=PerGroup(128)), weight_calibration="mse"), 0.941),
    "native W8A8 static per-tensor": (dict(activations=QuantSpec()), 0.95),
    "torch.ao dynamic (default per-tensor)": (dict(backend="torch.ao", weights=QuantSpec()), 0.9),
    "torch.ao static": (dict(backend="torch.ao", activations=QuantSpec(signed=False, symmetric=False)), 0.8),
}


@pytest.mark.parametrize("case", list(MINILM_CASES))
def test_minilm_sentence_embeddings_stay_close(minilm, case):
    from bench.models import embed, embedding_cosine

    model, calib, held_out, ref = minilm
    kw, floor = MINILM_CASES[case]
    q, rep = ptq(model, PTQConfig(**kw), calib)
    cos = embedding_cosine(ref, embed(q, held_out))["mean_cosine"]
    print(f"MiniLM {case}: mean cosine {cos:.5f} over {len(held_out)} held-out sentences, "
          f"weights {rep.totals['mean_sqnr_db']:.2f} dB, {rep.totals['ratio']:.2f}x smaller")
    assert cos > floor


@pytest.fixture(params=["C", "torch"])
def passes(request, monkeypatch):
    """Run a test on the fused C quantize/rescale passes and on their torch fallback."""
    from quant import _native
    if request.param == "torch":
        monkeypatch.setattr(_native, "library", lambda: None)
    elif _native.library() is None:
        pytest.skip(f"fused C passes unavailable: {_native.status()}")
    return request.param


def test_int8_kernel_quantizes_tokens_bit_for_bit_as_quant_quantize(toy, passes):
    # the kernel's C or torch arithmetic must give the codes and scales of the numpy reference,
    # with and without a SmoothQuant input scale; rows of exact ties (k + 0.5 steps) included
    m, data = toy
    from quant import quantize
    for smooth, narrow, symmetric in ((None, False, True), (0.6, False, True), (None, True, True), (0.6, True, True),
                                      (None, False, False), (0.6, False, False)):
        spec = QuantSpec(narrow_range=narrow, symmetric=symmetric, granularity=PerChannel(0))
        q, _ = ptq(m, PTQConfig(activations=spec, activation_mode="dynamic", smoothquant=smooth), data)
        lin = q[0]
        assert lin.int_kernel
        x = torch.cat([data[1], (torch.arange(32.0) - 15.5).repeat(3, 1) * torch.tensor([[1.0], [0.25], [3.0]]),
                       torch.tensor([[-2.5], [0.75], [1e-30], [0.0]]).expand(4, 32),  # constant rows
                       torch.rand(3, 32) * 5 + torch.tensor([[1.0], [-7.0], [0.0]]),  # one-signed rows
                       torch.tensor([-0.0, 2.0, -1e-38, 3e-39]).repeat(8).reshape(1, 32)])  # signed zero, subnormals
        xq, sx, zx = (None if t is None else t.clone() for t in lin._quantize_tokens(x))
        xs = (x * lin.input_scale if lin.input_scale is not None else x).numpy()
        qp = calibrate(xs, spec)
        np.testing.assert_array_equal(xq.numpy(), np.asarray(quantize(xs, qp)))
        np.testing.assert_array_equal(sx.numpy(), qp.scale)
        if symmetric:
            assert zx is None
        else:
            np.testing.assert_array_equal(zx.numpy(), qp.zero_point.reshape(-1))


@pytest.mark.parametrize("rows", [5, 300])
def test_affine_token_int8_kernel_equals_its_float_arithmetic(toy, passes, rows):
    # the int32 accumulation over (code - zero point) is exact, so the kernel's output is the float
    # fake-quant path's up to the float rounding of the matmul; and the zero points really are used
    from quant.modules import TOKEN_SPEC_AFFINE
    m, data = toy
    q, _ = ptq(m, PTQConfig(activations=TOKEN_SPEC_AFFINE, activation_mode="dynamic"), data)
    lin = q[0]
    assert lin.int_kernel
    x = torch.rand(rows, 32, generator=torch.Generator().manual_seed(rows)) * 4 - 0.5  # skewed: zero points far from 0
    with torch.no_grad():
        got = lin(x)
        xq = fake_quantize_tensor_rows(x, TOKEN_SPEC_AFFINE)
        want = torch.nn.functional.linear(xq.double(), lin.dequantized_weight().double(), lin.bias.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    _, _, zx = lin._quantize_tokens(x)
    assert zx is not None and (zx != 0).all()


def fake_quantize_tensor_rows(x, spec):
    from quant import fake_quantize
    return torch.as_tensor(fake_quantize(x.numpy(), calibrate(x.numpy(), spec)))


class _QKV(torch.nn.Module):
    """Three layers fed one tensor (as Q, K, V), then one fed their sum."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        return self.o(self.q(x) + self.k(x) * self.v(x))


def test_layers_fed_one_tensor_share_a_smoothing_vector_and_quantize_it_once(monkeypatch, passes):
    import quant.modules as qm
    torch.manual_seed(1)
    m, data = _QKV(), [torch.randn(40, 32) * torch.linspace(0.1, 8, 32) for _ in range(3)]
    q, _ = ptq(m, PTQConfig(activations=TOKEN_SPEC, activation_mode="dynamic", smoothquant=0.6), data)
    assert torch.equal(q.q.input_scale, q.k.input_scale) and torch.equal(q.q.input_scale, q.v.input_scale)
    assert not torch.equal(q.q.input_scale, q.o.input_scale)
    calls = []
    real = qm._native.quantize_tokens  # called once per quantization on either path
    monkeypatch.setattr(qm._native, "quantize_tokens", lambda *a: calls.append(1) or real(*a))
    x = data[0]
    with torch.no_grad():
        shared = q(x)
    assert len(calls) == 2  # once for q/k/v, once for o
    # every layer alone (no reuse possible) gives the very same output
    qm.release_scratch()
    assert not qm._SCRATCH.buffers and qm._SCRATCH.last is None
    with torch.no_grad():
        alone = q.o(q.q(x.clone()) + q.k(x.clone()) * q.v(x.clone()))
        assert torch.equal(shared, alone)
        with torch.inference_mode():
            assert torch.equal(q(x), shared)


def test_an_input_changed_in_place_between_layers_is_quantized_again(passes):
    torch.manual_seed(2)
    m, data = _QKV(), [torch.randn(40, 32) for _ in range(2)]
    q, _ = ptq(m, PTQConfig(activations=TOKEN_SPEC, activation_mode="dynamic", smoothquant=0.6), data)
    x = data[1].clone()
    with torch.no_grad():
        q.q(x)
        x.mul_(3.0)
        torch.testing.assert_close(q.k(x), q.k(x.clone()), rtol=0, atol=0)


def test_a_layer_called_twice_keeps_one_smoothing_vector_and_the_model_runs():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.b(self.a(self.a(x)))

    torch.manual_seed(3)
    m, data = Twice(), [torch.randn(24, 16) for _ in range(3)]
    q, rep = ptq(m, PTQConfig(activations=TOKEN_SPEC, activation_mode="dynamic", smoothquant=0.6), data)
    assert rep.meta["output_mean_cosine"] > 0.99
    with torch.no_grad():
        torch.testing.assert_close(q(data[0]), m(data[0]), rtol=0.1, atol=0.1)


# ------------------------------------------------------------ GELU in place (PTQConfig(gelu_in_place=True))
W8A8_SQ = dict(activations=TOKEN_SPEC, activation_mode="dynamic", smoothquant=0.6)


class _Block(torch.nn.Module):
    """fc -> act -> out, optionally also using fc's output elsewhere or act on another tensor."""

    def __init__(self, act=None, residual=False, act_on_input=False):
        super().__init__()
        self.fc, self.out = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)
        self.act = act if act is not None else torch.nn.GELU()
        self.residual, self.act_on_input = residual, act_on_input

    def forward(self, x):
        h = self.fc(x)
        y = self.out(self.act(h) + (h if self.residual else 0))
        return y + self.act(x) if self.act_on_input else y


def _fused(m, data, **kw):
    q0, _ = ptq(m, PTQConfig(**W8A8_SQ, **kw), data)
    q, rep = ptq(m, PTQConfig(gelu_in_place=True, **W8A8_SQ, **kw), data)
    x = torch.randn(45, data[0].shape[1])
    with torch.no_grad():
        assert torch.equal(q(x), q0(x))  # fused or not, the very same outputs
    return q, rep.meta["gelu_in_place"]


@pytest.mark.parametrize("passes_", ["C", "torch"])
def test_gelu_after_a_quantized_layer_runs_in_place_with_the_same_outputs(passes_, monkeypatch):
    from quant import _native
    if passes_ == "torch":
        monkeypatch.setattr(_native, "library", lambda: None)
    torch.manual_seed(5)
    q, fused = _fused(_Block(), [torch.randn(40, 32) for _ in range(2)])
    assert fused == ["fc"] and isinstance(q.act, torch.nn.Identity) and q.fc.gelu_in_place
    assert "GELU in place" in repr(q.fc)


@pytest.mark.parametrize("kind", ["output used twice", "tanh GELU", "GELU also on a non-layer input", "ReLU"])
def test_gelu_is_not_fused_where_that_would_change_anything(kind):
    torch.manual_seed(6)
    m = {"output used twice": _Block(residual=True), "tanh GELU": _Block(torch.nn.GELU(approximate="tanh")),
         "GELU also on a non-layer input": _Block(act_on_input=True), "ReLU": _Block(torch.nn.ReLU())}[kind]
    q, fused = _fused(m, [torch.randn(40, 32) for _ in range(2)])
    assert fused == [] and not isinstance(q.act, torch.nn.Identity) and not q.fc.gelu_in_place


def test_one_gelu_module_shared_by_two_layers_is_fused_into_both():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.GELU()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    torch.manual_seed(7)
    q, fused = _fused(Shared(), [torch.randn(24, 16) for _ in range(2)])
    assert fused == ["a", "b"]


def test_gelu_in_place_needs_the_native_backend_and_calibration_data():
    m = _Block()
    with pytest.raises(ValueError, match="gelu_in_place needs backend='native'"):
        ptq(m, PTQConfig(backend="torch.ao", gelu_in_place=True), [torch.randn(8, 32)])
    with pytest.raises(ValueError, match="gelu_in_place"):
        ptq(m, PTQConfig(gelu_in_place=True))


def test_minilm_gelu_in_place_keeps_the_embeddings_bit_for_bit(minilm):
    from bench.models import embed

    model, calib, held_out, _ = minilm
    q0, _ = ptq(model, PTQConfig(**W8A8_SQ), calib)
    q, rep = ptq(model, PTQConfig(gelu_in_place=True, **W8A8_SQ), calib)
    assert [n.split(".encoder.")[-1] for n in rep.meta["gelu_in_place"]] == [f"layer.{i}.intermediate.dense" for i in range(6)]
    np.testing.assert_array_equal(embed(q, held_out[:24]), embed(q0, held_out[:24]))


def test_ptq_presets_are_valid_configs_that_say_what_they_are():
    assert PTQConfig.W8.activations is None
    assert PTQConfig.W8A8_DYNAMIC.activations == TOKEN_SPEC and PTQConfig.W8A8_DYNAMIC.activation_mode == "dynamic"
    fast = PTQConfig.W8A8_FAST
    assert fast.smoothquant == 0.6 and fast.gelu_in_place and fast.int8_attention
    assert PTQConfig.W4_G128.weights.bits == 4 and PTQConfig.W4_G128.weights.granularity == PerGroup(128)
    with pytest.raises(TypeError, match="PTQConfig"):
        ptq(_Block(), [torch.randn(8, 32)])  # the old argument order: data where the config goes
    with pytest.raises(ValueError, match="smoothquant"):
        PTQConfig(smoothquant=0.5)  # no activations to smooth
