import json
import math

import numpy as np
import pytest
import torch

from precision import Report, cast, cast_report, error_metrics, round_to


def test_metrics_match_closed_forms():
    x = np.array([3.0, 4.0])
    y = np.array([3.0, 5.0])
    m = error_metrics(x, y)
    assert m.mse == 0.5 and m.max_abs_error == 1.0
    assert m.rel_error == pytest.approx(1 / 5)
    assert m.sqnr_db == pytest.approx(10 * math.log10(25 / 1))
    assert m.cosine == pytest.approx((9 + 20) / (5 * math.sqrt(34)))
    assert error_metrics(x, x).sqnr_db == math.inf and error_metrics(x, x).rel_error == 0
    assert error_metrics(np.zeros(3), np.zeros(3)).cosine == 1.0


def test_metrics_accumulate_in_float64_for_any_dtype():
    x = torch.full((1000,), 1.0, dtype=torch.bfloat16)
    y = x + 0.0078125
    assert error_metrics(x, y).mse == pytest.approx(0.0078125**2, rel=1e-12)


def test_nonfinite_outputs_are_counted_not_dropped():
    m = error_metrics(np.array([1.0, 2.0]), np.array([1.0, np.nan]))
    assert m.nonfinite == 1 and math.isnan(m.mse)


def test_uniform_rounding_noise_is_delta_squared_over_12():
    """fp8 e4m3fn quantum in [1, 2) is 1/8: rounding noise of uniform inputs has MSE 1/(12*64)."""
    x = np.random.default_rng(0).uniform(1, 2, 1_000_000)
    mse = error_metrics(x, round_to(x, "fp8_e4m3fn")).mse
    assert mse == pytest.approx(0.125**2 / 12, rel=0.01)


def test_report_totals_json_round_trip_and_markdown():
    a = np.linspace(-1, 1, 100, dtype=np.float32)
    rep = cast_report({"a": a, "b": a[:10]}, "bf16")
    t = rep.totals
    assert t["bytes_before"] == 440 and t["bytes_after"] == 220 and t["ratio"] == 2.0
    back = Report.from_json(rep.to_json())
    assert back.totals == t
    assert json.loads(rep.to_json())["schema"] == "lowbit.report/1"
    assert "| a |" in rep.to_markdown() and "checkpoint bytes" in rep.to_table()
    exact = cast_report(np.zeros(4, np.float32), "fp16")
    assert json.loads(exact.to_json())["tensors"][0]["sqnr_db"] == "inf"


def test_scaled_cast_maps_absmax_to_max_finite_and_counts_scale_bytes():
    w = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    c = cast(w, "fp8_e4m3fn", scaling="channel")
    assert c.scale.shape == (8, 1) and c.nbytes == 8 * 16 + 8 * 4
    assert np.allclose(np.abs(c.values()).max(axis=1), np.abs(w).max(axis=1), rtol=0.07)
    z = cast(np.zeros((2, 3), np.float32), "fp8_e4m3fn", scaling="tensor")
    assert (z.values() == 0).all() and z.scale == 1.0
    with pytest.raises(ValueError, match="NaN or inf"):
        cast(np.array([1.0, np.inf]), "fp8_e4m3fn", scaling="tensor")


def test_minilm_cast_reports_sqnr_follows_the_significand_width():
    from bench.models import load_minilm_weights

    w = load_minilm_weights()
    assert len(w) == 40
    bf = cast_report(w, "bf16").totals
    f16 = cast_report(w, "fp16").totals
    f8 = cast_report(w, "fp8_e4m3fn", scaling="tensor").totals
    # rounding to p significand bits leaves a relative error of at most 2^-p, close to uniform:
    # SQNR about 6.02 p + 4.8 dB, a little more since small mantissas round with a finer relative step
    for totals, p in ((bf, 8), (f16, 11), (f8, 4)):
        assert 6.02 * p + 4.8 < totals["mean_sqnr_db"] < 6.02 * p + 12
    assert bf["ratio"] == 2.0 and f16["ratio"] == 2.0
    # fp8 stores one byte per value plus one float32 scale per tensor: 4x up to 4 bytes a tensor
    assert f8["bytes_after"] == f8["bytes_before"] // 4 + 4 * 40
    exact = [r for r in cast_report(w, "fp16").tensors if r.sqnr_db == math.inf]
    assert len(exact) == 1  # one MiniLM weight is exactly representable in fp16


def test_sqnr_of_an_infinite_or_overwhelming_error_is_minus_infinity():
    from precision.metrics import sqnr_from_powers

    assert sqnr_from_powers(1.0, float("inf")) == float("-inf")
    assert sqnr_from_powers(1e-300, 1e300) == float("-inf")  # the ratio underflows
    assert math.isnan(sqnr_from_powers(float("inf"), float("inf")))
    assert sqnr_from_powers(10.0, 1.0) == pytest.approx(10.0)
