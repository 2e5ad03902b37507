"""--format gguf: the file the gguf package's reader (GGUFReader) reads, with q8_0/q4_0 blocks
byte-identical to its own quantizers and every kept tensor bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from bench.quantize import main
from lowbit.checkpoint import CheckpointError, compress_checkpoint, load

gguf = pytest.importorskip("gguf", reason="the reader is the gguf package's")


def _source(tmp_path, dtype=np.float32):
    rng = np.random.default_rng(0)
    tensors = {"layer.weight": (rng.standard_normal((48, 128)) * 0.05).astype(dtype),
               "emb.weight": rng.standard_normal((10, 64)).astype(dtype),
               "layer.bias": rng.standard_normal(48).astype(np.float32),
               "position_ids": np.arange(12, dtype=np.int64)}
    src = tmp_path / "m.safetensors"
    save_file(tensors, str(src))
    return src, tensors


def _read(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


@pytest.mark.parametrize("method", ["q8_0", "q4_0"])
def test_gguf_blocks_are_the_gguf_packages_own_and_kept_tensors_are_exact(tmp_path, method):
    src, tensors = _source(tmp_path)
    out = tmp_path / "m.gguf"
    report = compress_checkpoint(src, out, method, format="gguf", progress=False)
    reader, got = _read(out)
    assert set(got) == set(tensors)
    qtype = getattr(gguf.GGMLQuantizationType, method.upper())
    for name in ("layer.weight", "emb.weight"):
        t = got[name]
        assert t.tensor_type == qtype
        want = gguf.quants.quantize(tensors[name], qtype)
        np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want)
        back = gguf.quants.dequantize(np.asarray(t.data), qtype).reshape(tensors[name].shape)
        ref = compress_checkpoint(src, tmp_path / f"{name}.safetensors", method, progress=False, include=name)
        np.testing.assert_array_equal(back, load(tmp_path / f"{name}.safetensors", as_numpy=True)[name])
        assert ref.tensors[0].bytes_after == want.nbytes
    np.testing.assert_array_equal(np.asarray(got["layer.bias"].data), tensors["layer.bias"])
    assert got["position_ids"].tensor_type == gguf.GGMLQuantizationType.I64
    np.testing.assert_array_equal(np.asarray(got["position_ids"].data), tensors["position_ids"])
    assert reader.alignment == 32
    assert bytes(reader.fields["lowbit.source"].parts[-1]).decode() == str(src)
    assert report.meta["output_file_bytes"] == out.stat().st_size


@pytest.mark.parametrize("method, gtype", [("fp16", "F16"), ("bf16", "BF16")])
def test_half_precision_casts_are_written_as_gguf_half_types(tmp_path, method, gtype):
    src, tensors = _source(tmp_path)
    out = tmp_path / "m.gguf"
    assert main([str(src), "--method", method, "--format", "gguf", "--out", str(out), "--quiet"]) == 0
    _, got = _read(out)
    t = got["layer.weight"]
    assert t.tensor_type == getattr(gguf.GGMLQuantizationType, gtype)
    back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(tensors["layer.weight"].shape)
    lowbit_out = tmp_path / "ref.safetensors"
    compress_checkpoint(src, lowbit_out, method, progress=False)
    np.testing.assert_array_equal(back, load(lowbit_out, as_numpy=True)["layer.weight"])


def test_methods_gguf_cannot_carry_are_refused_before_any_output(tmp_path, capsys):
    src, _ = _source(tmp_path)
    out = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match="GGUF carries q8_0, q4_0, fp16 and bf16"):
        compress_checkpoint(src, out, "int8", format="gguf", progress=False)
    assert main([str(src), "--method", "mxfp4", "--format", "gguf", "--out", str(out), "--quiet"]) == 2
    assert "--format gguf" in capsys.readouterr().err
    with pytest.raises(ValueError, match="format must be one of"):
        compress_checkpoint(src, out, "q8_0", format="onnx", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_a_tensor_gguf_has_no_type_for_fails_the_job_and_leaves_nothing(tmp_path):
    save_file({"w": np.ones((4, 32), np.float32), "flags": np.ones(3, np.uint8)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="GGUF has no type for uint8"):
        compress_checkpoint(tmp_path / "m.safetensors", tmp_path / "m.gguf", "q8_0", format="gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
