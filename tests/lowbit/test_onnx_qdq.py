"""ONNX QDQ output, run by onnxruntime: the dequantized weights are lowbit's, bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lowbit.checkpoint import CheckpointError, compress_checkpoint, load  # noqa: E402
from lowbit.checkpoint.io import SafetensorsWriter  # noqa: E402
from precision.cast import FloatCast  # noqa: E402
from quant import PerChannel, PerGroup, PerTensor, QuantSpec  # noqa: E402
from quant.storage import IntQuant  # noqa: E402


def _int(bits: int, gran: Any, symmetric: bool = True, signed: bool = True) -> IntQuant:
    return IntQuant(QuantSpec(bits=bits, signed=signed, symmetric=symmetric, granularity=gran))


METHODS = {
    "int8-channel": _int(8, PerChannel(0)),
    "int8-channel-affine": _int(8, PerChannel(0), symmetric=False),
    "uint8-tensor-affine": _int(8, PerTensor(), symmetric=False, signed=False),
    "int8-group32": _int(8, PerGroup(32)),
    "int4-group32": _int(4, PerGroup(32)),
    "int4-group32-affine": _int(4, PerGroup(32), symmetric=False),
    "uint4-channel-affine": _int(4, PerChannel(0), symmetric=False, signed=False),
    "fp8_e4m3fn-channel": FloatCast.for_format("fp8_e4m3fn"),
    "fp8_e5m2-tensor": FloatCast("fp8_e5m2", scaling="tensor"),
    "fp8_e4m3fn-unscaled": FloatCast("fp8_e4m3fn", scaling="none", overflow="saturate"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    p = tmp_path_factory.mktemp("onnx") / "w.safetensors"
    w = SafetensorsWriter(p)
    w.add("a.weight", (rng.standard_normal((48, 96)) * 0.05).astype(np.float32))
    w.add("b.weight", (rng.standard_normal((64, 64)) * 2).astype(np.float32))
    w.add("b.bias", rng.standard_normal(64).astype(np.float32))
    w.add("c.ids", np.arange(6, dtype=np.int64))
    w.commit()
    return p


@pytest.mark.parametrize("method", list(METHODS))
def test_onnxruntime_dequantizes_to_lowbits_weights_bit_for_bit(method: str, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.onnx"
    rep = compress_checkpoint(checkpoint, out, METHODS[method], format="onnx-qdq", progress=False)
    compress_checkpoint(checkpoint, tmp_path / "w.lowbit.safetensors", METHODS[method], progress=False)
    ours = load(tmp_path / "w.lowbit.safetensors", as_numpy=True)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == len(rep.tensors) == 2
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {})))
    assert set(got) == set(ours)
    for k, v in ours.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k].view(np.uint8), v.view(np.uint8)), k


@pytest.mark.parametrize("method", ["int3", "prune,int8", "bf16", "mxfp4"])
def test_methods_onnx_cannot_carry_are_refused(method: str, checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="formats that carry it: lowbit"):
        compress_checkpoint(checkpoint, tmp_path / "w.onnx", method, format="onnx-qdq")
    assert not (tmp_path / "w.onnx").exists()


def test_existing_onnx_file_is_not_replaced_without_force(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.onnx"
    out.write_bytes(b"keep")
    with pytest.raises(CheckpointError, match="already exists"):
        compress_checkpoint(checkpoint, out, "int8", format="onnx-qdq", progress=False)
    assert out.read_bytes() == b"keep"
    compress_checkpoint(checkpoint, out, "int8", format="onnx-qdq", progress=False, force=True)
    assert onnx.load(str(out)).opset_import[0].version == 21


def test_whole_model_graph_with_swapped_initializers_runs_in_onnxruntime(tmp_path: Path) -> None:
    """A float BERT exported by torch.onnx, its Linear weights swapped for DequantizeLinear of int8 and
    int4 codes: onnxruntime's output matches the torch model holding lowbit's dequantized weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from bench.quantize import main

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=512, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
        max_position_embeddings=64)).eval()
    model.save_pretrained(str(tmp_path / "bert"))

    class Encoder(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, ids: Any) -> Any:
            return self.m(input_ids=ids).last_hidden_state

    ids = torch.randint(1, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.onnx.export(Encoder(model).eval(), (ids,), str(tmp_path / "float.onnx"), dynamo=False, do_constant_folding=False,
                      input_names=["ids"], output_names=["out"], opset_version=17)
    for method, extra in (("int8", []), ("int4", ["--granularity", "group", "--group-size", "32", "--affine"])):
        out = tmp_path / f"{method}.onnx"
        assert main([str(tmp_path / "bert"), "--method", method, *extra, "--include", r"encoder\..*\.weight$",
                     "--format", "onnx-qdq", "--onnx-graph", str(tmp_path / "float.onnx"), "--out", str(out),
                     "--quiet"]) == 0
        compress_checkpoint(tmp_path / "bert", tmp_path / f"{method}.safetensors", "int8" if method == "int8" else
                            _int(4, PerGroup(32), symmetric=False), include=r"encoder\..*\.weight$", progress=False)
        graph = onnx.load(str(out))
        assert graph.opset_import[0].version == 21
        assert sum(n.op_type == "DequantizeLinear" for n in graph.graph.node) == 12
        dequantized = transformers.BertModel.from_pretrained(str(tmp_path / "bert")).eval()
        dequantized.load_state_dict(load(tmp_path / f"{method}.safetensors"), strict=False)
        with torch.no_grad():
            want = dequantized(input_ids=ids).last_hidden_state.numpy()
        basic = ort.SessionOptions()
        basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        got = ort.InferenceSession(str(out), basic, providers=["CPUExecutionProvider"]).run(None, {"ids": ids.numpy()})[0]
        assert np.abs(got - want).max() < 1e-5  # the same weights, float matmuls
        # at the default level onnxruntime fuses DequantizeLinear -> MatMul into its quantized kernels
        fused = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"ids": ids.numpy()})[0]
        cos = (fused * want).sum(-1) / np.linalg.norm(fused, axis=-1) / np.linalg.norm(want, axis=-1)
        assert cos.min() > 0.999
