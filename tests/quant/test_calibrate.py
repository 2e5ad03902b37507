"""Range estimation: torch.ao parity for minmax, and what each clipping method buys."""


import numpy as np
import pytest
import torch

from precision.metrics import sqnr_db
from quant import PerChannel, PerGroup, PerTensor, QuantSpec, StaticQuantizer, calibrate, fake_quantize

ao = torch.ao.quantization


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_minmax_equals_torch_ao_observers(signed, symmetric):
    batches = [torch.randn(32, 16) * (i + 1) + 0.3 * i for i in range(3)]
    dt = torch.qint8 if signed else torch.quint8
    obs = ao.MinMaxObserver(dtype=dt, qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine)
    cobs = ao.PerChannelMinMaxObserver(ch_axis=1, dtype=dt,
                                       qscheme=torch.per_channel_symmetric if symmetric else torch.per_channel_affine)
    mobs = ao.MovingAverageMinMaxObserver(averaging_constant=0.1, dtype=dt,
                                          qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine)
    for b in batches:
        obs(b), cobs(b), mobs(b)
    spec = QuantSpec(signed=signed, symmetric=symmetric)
    for o, qp in [(obs, calibrate(batches, spec)),
                  (cobs, calibrate(batches, QuantSpec(signed=signed, symmetric=symmetric, granularity=PerChannel(1)))),
                  (mobs, calibrate(batches, spec, "moving_average", momentum=0.1))]:
        s, z = o.calculate_qparams()
        np.testing.assert_array_equal(qp.scale.ravel(), s.numpy())
        np.testing.assert_array_equal(qp.zero_point.ravel(), z.numpy())


def test_narrow_range_equals_torch_with_quant_range():
    x = torch.randn(100)
    o = ao.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127)
    o(x)
    s, _ = o.calculate_qparams()
    assert calibrate(x, QuantSpec(narrow_range=True)).scale.item() == s.item()


def test_percentile_clips_outliers_and_static_quantizer_counts_them():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(100_000).astype(np.float32)
    x[:10] = 50.0
    qs = StaticQuantizer(QuantSpec(), "percentile", percentile=99.9)
    qs.observe(x[:50_000]).observe(x[50_000:])
    qp = qs.freeze()
    assert qp.scale.item() < 4 / 127
    qs.quantize(x)
    assert qs.clipped >= 10
    assert qs.report(x, "x").clipped == qs.clipped
    with pytest.raises(RuntimeError, match="frozen"):
        qs.observe(x)


def test_mse_calibration_never_worse_than_minmax_per_block():
    rng = np.random.default_rng(1)
    w = (rng.standard_t(3, (64, 256))).astype(np.float32)
    for g in (PerTensor(), PerChannel(0), PerGroup(64)):
        spec = QuantSpec(bits=4, granularity=g)
        mm, ms = calibrate(w, spec), calibrate(w, spec, "mse")
        assert sqnr_db(w, fake_quantize(w, ms)) >= sqnr_db(w, fake_quantize(w, mm))


def test_entropy_threshold_clips_a_heavy_tail():
    x = np.random.default_rng(2).laplace(size=200_000).astype(np.float32)
    qp = calibrate(x, QuantSpec(), "entropy")
    amax = np.abs(x).max()
    assert 0.2 * amax < qp.scale.item() * 127.5 < amax
    with pytest.raises(ValueError, match="PerTensor"):
        calibrate(x.reshape(100, -1), QuantSpec(granularity=PerChannel(0)), "entropy")


def test_bad_method_and_options_are_value_errors():
    with pytest.raises(ValueError, match="method"):
        calibrate(np.ones(3), QuantSpec(), "max")
    with pytest.raises(ValueError, match="percentile"):
        calibrate(np.ones(3), QuantSpec(), "percentile", percentile=0)
    with pytest.raises(ValueError, match="batch 1"):
        calibrate([np.ones((2, 4)), np.ones((2, 5))], QuantSpec(granularity=PerChannel(1)))


def test_mse_per_tensor_beats_minmax_on_minilm_weights():
    """On the real MiniLM 2-D weights, per-tensor int8: MSE-optimal clipping gains SQNR over minmax."""
    from bench.models import load_minilm_weights

    w = load_minilm_weights()
    gains = []
    for name, t in w.items():
        spec = QuantSpec()
        a = sqnr_db(t, fake_quantize(t, calibrate(t, spec)))
        b = sqnr_db(t, fake_quantize(t, calibrate(t, spec, "mse")))
        gains.append(b - a)
    mean_gain = float(np.mean(gains))
    print(f"MiniLM per-tensor int8: mse over minmax mean gain {mean_gain:.2f} dB")
    assert min(gains) >= 0 and mean_gain > 0.5
