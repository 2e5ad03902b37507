"""Reliability catalog for checkpoints and quantizers: every bad input gets a defined answer, nothing is lost."""

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import lowbit
from lowbit.checkpoint import Checkpoint
from bench.quantize import main
from quant import PerChannel, PerGroup, QuantSpec, calibrate, dequantize, quantize


def test_nan_int_bool_0d_empty_tensors_pass_through_bit_exact(tmp_path):
    nanw = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    nanw[3, 3] = np.nan
    nanw[0, 1] = -np.inf
    t = {"nan_weight": nanw, "ids": np.arange(6, dtype=np.int64).reshape(2, 3), "flags": np.array([[True, False]]),
         "scalar": np.array(-0.0, np.float32), "empty": np.zeros((0, 3), np.float32),
         "w": np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)}
    save_file(t, str(tmp_path / "m.safetensors"))
    out, rep = tmp_path / "q.safetensors", tmp_path / "r.json"
    assert main([str(tmp_path / "m.safetensors"), "--out", str(out), "--report", str(rep), "--quiet"]) == 0
    kept = {k["name"]: k["reason"] for k in json.loads(rep.read_text())["kept"]}
    assert kept["nan_weight"].startswith("holds NaN or inf")
    back = lowbit.load(out, as_numpy=True)
    for n in ("nan_weight", "ids", "flags", "scalar", "empty"):
        assert back[n].dtype == t[n].dtype and back[n].shape == t[n].shape and back[n].tobytes() == t[n].tobytes()


def test_tied_tensors_in_a_pickle_are_read_as_two_names(tmp_path):
    w = torch.randn(8, 8)
    torch.save({"enc.weight": w, "dec.weight": w}, tmp_path / "tied.pt")  # shared storage
    out = tmp_path / "q.safetensors"
    assert main([str(tmp_path / "tied.pt"), "--out", str(out), "--quiet"]) == 0
    back = lowbit.load(out)
    assert torch.equal(back["enc.weight"], back["dec.weight"])


def test_quantizers_on_empty_fp16_int_and_tiny_inputs():
    qp = calibrate(np.linspace(-1, 1, 8), QuantSpec())
    assert quantize(np.zeros(0, np.float32), qp).shape == (0,)
    # scales of ~8e-6 would be fp16 subnormals: they are computed and kept in float32
    small = (np.random.default_rng(2).uniform(-1, 1, (4, 64)) * 1e-3).astype(np.float16)
    q = calibrate(small, QuantSpec(granularity=PerChannel(0)))
    assert q.scale.dtype == np.float32 and np.all(q.scale < np.finfo(np.float16).tiny)
    err = np.abs(dequantize(quantize(small, q), q) - small.astype(np.float32))
    assert np.all(err <= q.scale * 0.5001)  # half a step (the top code clips by exactly half a step)
    tiny = np.full((4, 4), 1e-6, np.float16)  # constant rows reconstruct (torch's eps floor would not)
    qt = calibrate(tiny, QuantSpec(granularity=PerChannel(0)))
    np.testing.assert_allclose(dequantize(quantize(tiny, qt), qt), tiny.astype(np.float32), rtol=1e-6)
    ints = calibrate(np.array([[-300, 5], [7, 1000]], np.int64), QuantSpec(granularity=PerChannel(0)))
    assert ints.scale.shape == (2, 1)


def test_scale_benchmark_small_run_stays_within_its_memory_bound(tmp_path):
    """A small version of `python -m bench.scale` (the multi-GiB runs are `slow`)."""
    import json

    from bench.scale import main as scale_main

    out = tmp_path / "rows.json"
    assert scale_main(["--sizes", "0.05", "--tensor-mib", "4", "--workers", "1", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all(r["within_bound"] == "yes" for r in rows)


@pytest.mark.slow
def test_scale_benchmark_1_4_8_gib():
    from bench.scale import main as scale_main

    import json
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/rows.json"
        assert scale_main(["--sizes", "1", "4", "8", "--workers", "1", "2", "--json", out]) == 0
        rows = json.loads(open(out).read())
    assert len(rows) == 6 and all(r["within_bound"] == "yes" for r in rows)


def test_input_checkpoint_is_never_opened_for_writing(tmp_path, monkeypatch):
    save_file({"w": np.ones((4, 4), np.float32)}, str(tmp_path / "m.safetensors"))
    src = str(tmp_path / "m.safetensors")
    import builtins

    real_open = builtins.open

    def guarded(file, mode="r", *a, **k):
        if str(file) == src and any(c in mode for c in "wa+"):
            raise AssertionError("input opened for writing")
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    assert main([src, "--out", str(tmp_path / "q.safetensors"), "--quiet"]) == 0
    assert Checkpoint(src).read("w").sum() == 16
    assert sys.modules["lowbit.checkpoint.io"] is not None


@pytest.mark.parametrize("step_kw", [dict(), dict(affine=True), dict(granularity="group", group_size=32, bits=4),
                                     dict(method="mse"), dict(method="percentile", percentile=99.0)])
def test_row_blocked_integer_path_equals_the_whole_tensor_path(monkeypatch, step_kw):
    """Large tensors are quantized in row blocks to bound memory; codes, scales and the report match."""
    import lowbit.checkpoint.chain as M
    from quant.storage import IntQuant

    w = np.random.default_rng(3).standard_normal((96, 128)).astype(np.float32)
    kw = dict(step_kw)
    gran = PerGroup(kw.pop("group_size")) if kw.pop("granularity", None) == "group" else PerChannel(0)
    spec = QuantSpec(bits=kw.pop("bits", 8), symmetric=not kw.pop("affine", False), granularity=gran)
    step = M.Chain(values=IntQuant(spec, kw.pop("method", "minmax"), kw.pop("percentile", None)))
    whole = M.compress_tensor("w", w, step)
    monkeypatch.setattr(M, "ROW_BLOCK_BYTES", 128 * 4 * 10)  # blocks of 10 rows
    assert step.values.rows_independent
    blocked = M.compress_tensor("w", w, step)
    assert whole.scheme == blocked.scheme
    for k in whole.parts:
        assert np.array_equal(whole.parts[k], blocked.parts[k])
    assert np.array_equal(whole.approx, blocked.approx)
    assert blocked.row.mse == pytest.approx(whole.row.mse, rel=1e-12)
    assert M.compress_tensor("w", w, step, keep_approx=False).approx is None


def test_fp8_and_bf16_tensors_pass_through_and_load_as_torch(tmp_path):
    from safetensors.torch import save_file as save_pt

    t = {"f8": torch.randn(4, 4).to(torch.float8_e4m3fn), "b16": torch.randn(4, 4).to(torch.bfloat16),
         "w": torch.randn(16, 16)}
    save_pt(t, str(tmp_path / "m.safetensors"))
    out = tmp_path / "q.safetensors"
    assert main([str(tmp_path / "m.safetensors"), "--out", str(out), "--exclude", "f8", "--quiet"]) == 0
    back = lowbit.load(out)
    assert back["f8"].dtype == torch.float8_e4m3fn
    assert torch.equal(back["f8"].view(torch.uint8), t["f8"].view(torch.uint8))
    assert back["b16"].dtype == torch.bfloat16
    rep = tmp_path / "r.json"
    assert main([str(tmp_path / "m.safetensors"), "--report", str(rep), "--quiet"]) == 0
    kept = {k["name"]: k["reason"] for k in json.loads(rep.read_text())["kept"]}
    assert kept["f8"] == "already float8_e4m3fn"
