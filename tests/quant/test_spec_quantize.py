"""QuantSpec validation and quantize/dequantize/fake_quantize against torch's own ops."""


import numpy as np
import pytest
import torch

from quant import PerChannel, PerGroup, PerTensor, QParams, QuantSpec, calibrate, dequantize, fake_quantize, quantize
from quant.quantize import quantize_with_count



@pytest.mark.parametrize("kw, match", [
    (dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(bits=8.0), "bits"),
    (dict(signed=False, narrow_range=True), "narrow_range"),
    (dict(granularity=PerGroup(0)), "PerGroup"),
])
def test_bad_specs_are_value_errors_that_say_how_to_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kw)


def test_every_granularity_reduces_to_one_block_shape():
    assert QuantSpec().block_shape((4, 6)) == (4, 6)
    assert QuantSpec(granularity=PerChannel(0)).block_shape((4, 6)) == (1, 6)
    assert QuantSpec(granularity=PerChannel(-1)).block_shape((4, 6)) == (4, 1)
    assert QuantSpec(granularity=PerGroup(3)).block_shape((4, 6)) == (1, 3)
    assert QuantSpec(granularity=PerGroup(3)).params_shape((4, 6)) == (4, 2)
    with pytest.raises(ValueError, match="does not divide"):
        QuantSpec(granularity=PerGroup(4)).block_shape((4, 6), "w")
    with pytest.raises(ValueError, match="out of range"):
        QuantSpec(granularity=PerChannel(2)).block_shape((4, 6))
    s = QuantSpec(bits=4, signed=False, symmetric=False, granularity=PerGroup(32))
    assert QuantSpec.from_dict(s.to_dict()) == s


def test_code_ranges():
    assert (QuantSpec().qmin, QuantSpec().qmax) == (-128, 127)
    assert (QuantSpec(narrow_range=True).qmin, QuantSpec(narrow_range=True).qmax) == (-127, 127)
    assert (QuantSpec(bits=4, signed=False).qmin, QuantSpec(bits=4, signed=False).qmax) == (0, 15)


def test_qparams_reject_bad_scales_and_zero_points():
    spec = QuantSpec(symmetric=False)
    for bad in (0.0, np.nan, np.inf, 1e-40, -1.0):
        with pytest.raises(ValueError, match="scale"):
            QParams(np.array([bad]), np.array([0]), spec, (3,))
    with pytest.raises(ValueError, match="zero_point"):
        QParams(np.array([0.1]), np.array([200]), spec, (3,))


def adversarial(scale: float, n: int = 300) -> np.ndarray:
    """Exact ties (k + 1/2) * scale and their float32 neighbours, plus random values."""
    s = np.float32(scale)
    t = (np.arange(-n, n) / 2.0 * s).astype(np.float32)
    r = np.random.default_rng(0).standard_normal(2000).astype(np.float32) * s * 60
    return np.concatenate([t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, -np.float32(np.inf)), r])


@pytest.mark.parametrize("scale", [0.1, 1 / 3, 0.0123, 7.0])
def test_codes_equal_torch_quantize_per_tensor_and_per_channel_on_ties(scale):
    x = adversarial(scale)
    spec = QuantSpec()
    qp = QParams(np.array([scale]), np.array([0]), spec, x.shape)
    ref = torch.quantize_per_tensor(torch.from_numpy(x), float(np.float32(scale)), 0, torch.qint8).int_repr().numpy()
    np.testing.assert_array_equal(quantize(x, qp), ref)
    x2 = x.reshape(-1, 2)
    cspec = QuantSpec(granularity=PerChannel(0))
    sc = np.full((x2.shape[0], 1), scale, np.float32)
    qpc = QParams(sc, np.zeros_like(sc, dtype=np.int32), cspec, x2.shape)
    refc = torch.quantize_per_channel(torch.from_numpy(x2), torch.from_numpy(sc.ravel()).double(),
                                      torch.zeros(x2.shape[0], dtype=torch.long), 0, torch.qint8).int_repr().numpy()
    np.testing.assert_array_equal(quantize(x2, qpc), refc)
    t = quantize(torch.from_numpy(x2), qpc)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int8


@pytest.mark.parametrize("zp", [0, 3, -5])
@pytest.mark.parametrize("scale", [0.1, 1 / 3, 0.0123])
def test_fake_quantize_forward_and_backward_equal_torch(scale, zp):
    x = torch.from_numpy(adversarial(scale) * 1.3).requires_grad_()
    spec = QuantSpec(symmetric=False)
    qp = QParams(np.array([scale]), np.array([zp]), spec, tuple(x.shape))
    y = fake_quantize(x, qp)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = torch.fake_quantize_per_tensor_affine(x_ref, float(np.float32(scale)), zp, -128, 127)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    assert (x.grad == 0).any() and (x.grad != 0).any()  # both sides of the clip range were exercised
    # per channel
    x2 = x.detach().reshape(-1, 4).t().contiguous().requires_grad_()
    cspec = QuantSpec(symmetric=False, granularity=PerChannel(0))
    sc = np.array([scale, scale * 2, scale / 3, scale * 5], np.float32).reshape(4, 1)
    zps = np.array([zp, 0, 1, -1], np.int32).reshape(4, 1)
    qpc = QParams(sc, zps, cspec, tuple(x2.shape))
    yc = fake_quantize(x2, qpc)
    x2r = x2.detach().clone().requires_grad_()
    ycr = torch.fake_quantize_per_channel_affine(x2r, torch.from_numpy(sc.ravel()), torch.from_numpy(zps.ravel()),
                                                 0, -128, 127)
    assert torch.equal(yc, ycr)
    gc = torch.randn_like(yc)
    yc.backward(gc)
    ycr.backward(gc)
    assert torch.equal(x2.grad, x2r.grad)


def test_numpy_and_torch_give_identical_results():
    w = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    for g in (PerTensor(), PerChannel(0), PerGroup(64)):
        qp = calibrate(w, QuantSpec(bits=4, granularity=g))
        np.testing.assert_array_equal(quantize(torch.from_numpy(w), qp).numpy(), quantize(w, qp))
        np.testing.assert_array_equal(fake_quantize(torch.from_numpy(w), qp).numpy(), fake_quantize(w, qp))


def test_transposed_non_contiguous_input_gives_identical_result():
    w = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)
    wt = w.T  # non-contiguous view
    qp = calibrate(np.ascontiguousarray(wt), QuantSpec(granularity=PerChannel(0)))
    np.testing.assert_array_equal(quantize(wt, qp), quantize(np.ascontiguousarray(wt), qp))


def test_round_trip_noise_is_delta_squared_over_12():
    """Uniform data quantized on a grid of step scale has MSE scale**2 / 12."""
    x = np.random.default_rng(3).uniform(-1, 1, 2_000_000).astype(np.float32)
    qp = calibrate(x, QuantSpec())
    err = dequantize(quantize(x, qp), qp) - x
    assert np.mean(err.astype(np.float64) ** 2) == pytest.approx(float(qp.scale.ravel()[0]) ** 2 / 12, rel=0.01)


def test_nan_and_inf_are_errors_naming_the_tensor():
    qp = calibrate(np.ones(4), QuantSpec())
    with pytest.raises(ValueError, match=r"layer1.weight: 1 of 4 values are NaN or inf"):
        quantize(np.array([1.0, np.nan, 0, 0]), qp, name="layer1.weight")
    with pytest.raises(ValueError, match="NaN or inf"):
        calibrate([np.ones(3), np.array([np.inf, 0, 0])], QuantSpec())
    with pytest.raises(ValueError, match="empty"):
        calibrate([], QuantSpec())


def test_constant_and_zero_tensors_get_defined_scales_and_reconstruct():
    for spec in (QuantSpec(), QuantSpec(symmetric=False), QuantSpec(signed=False)):
        for c in (0.0, 0.37, -5.0):
            x = np.full((3, 5), c, np.float32)
            qp = calibrate(x, spec)
            assert np.all(np.isfinite(qp.scale)) and np.all(qp.scale > 0)
            np.testing.assert_allclose(dequantize(quantize(x, qp), qp), x, rtol=1e-6, atol=0)
    x = np.zeros((4, 8), np.float32)
    x[1] = np.linspace(-1, 1, 8)
    qp = calibrate(x, QuantSpec(granularity=PerChannel(0)))
    assert (dequantize(quantize(x, qp), qp)[[0, 2, 3]] == 0).all()


def test_clipped_values_are_counted():
    qp = calibrate(np.linspace(-1, 1, 100), QuantSpec())
    codes, clipped = quantize_with_count(np.array([0.5, 3.0, -7.0]), qp)
    assert clipped == 2 and codes.tolist() == [64, 127, -128]


def test_int_float64_and_scalar_inputs():
    qp = calibrate(np.array([-4.0, 4.0]), QuantSpec())
    assert quantize(np.array([1, 2, 3]), qp).dtype == np.int8
    assert quantize(2.0, QParams(qp.scale.reshape(()), qp.zero_point.reshape(()), qp.spec, ())) == 64
    np.testing.assert_array_equal(quantize(np.array([1.0, 2.0]), qp), quantize(np.array([1.0, 2.0], np.float32), qp))


def test_one_huge_outlier_is_reported_not_silently_collapsing_the_rest():
    """minmax on a tensor with one 1e30: every other value quantizes to 0. SQNR alone hides it
    (the outlier dominates the signal); the report's `zeroed` count does not."""
    from precision.report import TensorReport

    x = np.random.default_rng(5).standard_normal(1000).astype(np.float32)
    x[7] = 1e30
    qp = calibrate(x, QuantSpec())
    row = TensorReport.measure("x", x, dequantize(quantize(x, qp), qp), method="int8", bytes_after=1004)
    assert row.sqnr_db > 40 and row.zeroed == 999
    good = calibrate(x, QuantSpec(), "percentile", percentile=99.0)
    row2 = TensorReport.measure("x", x, dequantize(quantize(x, good), good), method="int8", bytes_after=1004)
    assert row2.zeroed < 100


def test_granularity_names_say_kept_or_reduced_and_legacy_axis_still_reads():
    ch, gr = QuantSpec(granularity=PerChannel(kept_axis=1)), QuantSpec(granularity=PerGroup(2, reduced_axis=0))
    assert ch.block_shape((4, 6)) == (4, 1)  # axis 1 kept: one scale per column
    assert gr.block_shape((4, 6)) == (2, 1)  # axis 0 reduced in groups of 2
    for spec in (ch, gr):
        d = spec.to_dict()
        assert "axis" not in d and QuantSpec.from_dict(d) == spec
    # files written before the rename store "axis" with each granularity's own meaning
    assert QuantSpec.from_dict({"granularity": "PerChannel", "axis": 1}) == ch
    assert QuantSpec.from_dict({"granularity": "PerGroup", "size": 2, "axis": 0}) == gr


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_scales_round_up_to_the_nearest_value_of_their_dtype(dtype):
    """IntQuant(scale_dtype=...): each scale becomes the smallest value of the dtype at or above it (so no
    value that fitted is clipped), exactly representable there; the codes are made with those scales."""
    import ml_dtypes

    from quant.storage import IntQuant, round_scales_up

    nd = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    s = np.concatenate([np.random.default_rng(0).random(20000).astype(np.float32) * 1e-2 + 1e-6,
                        np.array([1.0, 0.5, 3.0, 2.0 ** -20], np.float32)])
    r = round_scales_up(s, dtype)
    assert np.all(r >= s) and np.array_equal(r.astype(nd).astype(np.float32), r)
    below = np.nextafter(r.astype(nd), nd(-np.inf)).astype(np.float32)
    assert np.all(below < s)  # the next value down would not do
    assert np.array_equal(r[-4:-1], s[-4:-1])  # values of the dtype stay
    with pytest.raises(ValueError, match="range"):
        round_scales_up(np.array([1e6], np.float32), "float16")
    m = IntQuant(QuantSpec(granularity=PerChannel(0)), scale_dtype=dtype)
    x = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    enc = m.encode(x)
    assert np.array_equal(enc.side["scale"].astype(nd).astype(np.float32), enc.side["scale"])
    assert np.abs(enc.values - x).max() <= enc.side["scale"].max() / 2 * (1 + 1e-6)
    with pytest.raises(ValueError, match="symmetric"):
        IntQuant(QuantSpec(symmetric=False), scale_dtype=dtype)
