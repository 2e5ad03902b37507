"""ONNX QDQ: a checkpoint's tensors as ONNX initializers, each compressed one behind a ``DequantizeLinear``.

``compress_checkpoint(..., format="onnx-qdq")`` writes one ONNX model (opset 21) with no inputs and one
output per checkpoint tensor, named as the tensor: a compressed tensor is its codes, scale and zero
point as initializers feeding ``DequantizeLinear``; a kept tensor is its initializer through
``Identity``. onnxruntime (or any ONNX runtime) returns the dense weights, ``(code - zero_point) * scale``
in float32 exactly as lowbit's ``load`` computes them; a graph builder can take the
``DequantizeLinear`` nodes as the weights of its own graph. The codes are copied, never re-quantized:

=======================================  =================================================
lowbit method                            ONNX
=======================================  =================================================
int8 / uint8 per channel or tensor        INT8 / UINT8 codes, ``axis=0`` per channel
int8 / uint8 per group (along rows)       the same with ``block_size`` (blocked, opset 21)
int4 / uint4 per channel, tensor, group   INT4 / UINT4 codes, two per byte
fp8_e4m3fn / fp8_e5m2, scaled or not      FLOAT8E4M3FN / FLOAT8E5M2 codes, per channel or tensor
=======================================  =================================================

Other methods (int2, int3, int5-int7, pruning, low rank, block formats, fp16/bf16 casts) are refused with
the formats that carry them.

A whole model: export the float model with ``torch.onnx.export`` (its parameters become initializers
named after them) and pass that file as ``graph``: each compressed tensor's initializer in it (the same
name, or one ending with ``.<name>``) is replaced by the ``DequantizeLinear`` of its codes, the graph
converted to opset 21 first; everything else in the graph is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from precision.cast import FloatCast
from precision.dtypes import ST_TO_NP
from precision.methods import ValueStore
from quant.spec import PerChannel, PerGroup, PerTensor, QuantSpec
from quant.storage import IntQuant, pack_nibbles

from .chain import Chain, Compressed
from .io import CheckpointError, check_output, publish, temp_path

OPSET = 21
FLOAT8 = ("fp8_e4m3fn", "fp8_e5m2")


def _refuse(what: str, why: str) -> ValueError:
    return ValueError(f"ONNX QDQ cannot carry {what} losslessly ({why}); formats that carry it: lowbit (every method), "
                      "compressed-tensors (int2-int8, fp8_e4m3fn), gguf (q8_0, q4_0, fp16, bf16)")


def check_chain(chain: Chain) -> None:
    """ValueError (naming the formats that can) unless ``chain`` is a value method ONNX QDQ carries."""
    if chain.structure is not None:
        raise _refuse(chain.structure.describe(), "DequantizeLinear stores every element")
    v = chain.values
    if isinstance(v, IntQuant):
        if v.spec.bits not in (4, 8):
            raise _refuse(v.spec.describe(), "ONNX integer types are 4 and 8 bits")
        g = v.spec.granularity
        if isinstance(g, PerChannel) and g.kept_axis not in (0, -2) or isinstance(g, PerGroup) and g.reduced_axis not in (1, -1):
            raise _refuse(v.spec.describe(), "scales along axis 0 or blocks along axis 1 only")
        return
    if isinstance(v, FloatCast):
        if v.format not in FLOAT8:
            raise _refuse(v.describe(), "its float codes are fp8 e4m3fn and e5m2")
        if v.scaling == "channel" and v.axis not in (0, -2):
            raise _refuse(v.describe(), "per-channel scales along axis 0 only")
        return
    assert v is not None
    raise _refuse(v.describe(), "it stores integer or fp8 codes with scales")


def _int_type(bits: int, signed: bool) -> int:
    from onnx import TensorProto

    return {(8, True): TensorProto.INT8, (8, False): TensorProto.UINT8, (4, True): TensorProto.INT4,
            (4, False): TensorProto.UINT4}[(bits, signed)]


def _codes_tensor(name: str, codes: np.ndarray, elem_type: int, bits: int) -> Any:
    """An initializer of integer codes (two per byte, low nibble first, for 4 bits)."""
    from onnx import helper

    raw = pack_nibbles(codes.astype(np.uint8) & 0x0F).tobytes() if bits == 4 else np.ascontiguousarray(codes).tobytes()
    return helper.make_tensor(name, elem_type, list(codes.shape), raw, raw=True)


def qdq_nodes(name: str, c: Compressed) -> tuple[list[Any], list[Any]]:
    """(initializers, nodes) whose ``DequantizeLinear`` output ``name`` is the tensor ``c`` stores."""
    from onnx import TensorProto, helper, numpy_helper

    scheme = c.scheme
    shape = tuple(scheme["shape"])
    attrs: dict[str, Any] = {}
    inits: list[Any] = []
    if scheme["values"]["kind"] == "float":
        fmt = scheme["values"]["format"]
        elem: int = TensorProto.FLOAT8E4M3FN if fmt == "fp8_e4m3fn" else TensorProto.FLOAT8E5M2
        codes = np.ascontiguousarray(c.parts["values"]).reshape(shape)
        inits.append(helper.make_tensor(f"{name}::codes", elem, list(shape), codes.view(np.uint8).tobytes(), raw=True))
        scale = c.parts.get("scale")
        scale = np.ones((), np.float32) if scale is None else scale.astype(np.float32)
        if scale.size > 1:
            attrs["axis"] = 0
        inputs = [f"{name}::codes", f"{name}::scale"]
        inits.append(numpy_helper.from_array(scale.reshape(-1) if scale.size > 1 else scale.reshape(()), f"{name}::scale"))
    else:
        spec = QuantSpec.from_dict(scheme["values"]["spec"])
        codes = ValueStore.codes(c.parts, scheme, ST_TO_NP[scheme["dtype"]]).reshape(shape)
        pshape = spec.params_shape(shape)
        scale = c.parts["scale"].astype(np.float32).reshape(pshape)
        zp = c.parts["zero_point"].reshape(pshape) if "zero_point" in c.parts else \
            np.full(pshape, spec.symmetric_zero_point, np.int32)
        g = spec.granularity
        if isinstance(g, PerTensor):
            scale, zp = scale.reshape(()), zp.reshape(())
        elif isinstance(g, PerChannel):
            scale, zp = scale.reshape(-1), zp.reshape(-1)
            attrs["axis"] = 0 if len(shape) > 1 else 0
        else:
            assert isinstance(g, PerGroup)
            attrs["axis"], attrs["block_size"] = len(shape) - 1, g.size
        elem = int(_int_type(spec.bits, spec.signed))
        inits.append(_codes_tensor(f"{name}::codes", codes, elem, spec.bits))
        inits.append(numpy_helper.from_array(scale, f"{name}::scale"))
        inits.append(_codes_tensor(f"{name}::zero_point", zp.astype(spec.code_dtype), elem, spec.bits))
        inputs = [f"{name}::codes", f"{name}::scale", f"{name}::zero_point"]
    return inits, [helper.make_node("DequantizeLinear", inputs, [name], name=f"{name}::dequantize", **attrs)]


class OnnxQDQWriter:
    """The ONNX QDQ file, built in memory and written atomically by :meth:`commit` (temporary file, then
    moved into place; never over an existing file without ``force``). Tensors over 2 GiB in all go to an
    external data file beside it (``<name>.data``), as ONNX requires."""

    def __init__(self, path: str | os.PathLike, *, force: bool = False, inputs: Sequence[str | os.PathLike] = (),
                 graph: str | os.PathLike | None = None) -> None:
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise CheckpointError("--format onnx-qdq needs onnx (pip install onnx)") from None
        self.path = check_output(path, force=force, inputs=[*inputs, *([graph] if graph is not None else [])])
        self.graph = _read_graph(Path(graph)) if graph is not None else None
        self.swapped: dict[str, str] = {}
        self.force = force
        self.inits: list[Any] = []
        self.nodes: list[Any] = []
        self.outputs: list[Any] = []
        self.nbytes = 0

    def _output(self, name: str, elem: int, shape: tuple[int, ...]) -> None:
        from onnx import helper

        self.outputs.append(helper.make_tensor_value_info(name, elem, list(shape)))

    def add_kept(self, name: str, arr: np.ndarray) -> None:
        from onnx import helper, numpy_helper

        if self.graph is not None:
            return  # the graph holds its own copy of every tensor it uses

        t = numpy_helper.from_array(np.ascontiguousarray(arr), f"{name}::stored")
        self.inits.append(t)
        self.nodes.append(helper.make_node("Identity", [f"{name}::stored"], [name], name=f"{name}::identity"))
        self._output(name, t.data_type, tuple(arr.shape))
        self.nbytes += arr.nbytes

    def add_compressed(self, name: str, c: Compressed) -> None:
        from onnx import TensorProto

        if self.graph is not None:
            target = _initializer_for(self.graph, name)
            self.swapped[name] = target
            name = target
        inits, nodes = qdq_nodes(name, c)
        self.inits += inits
        self.nodes += nodes
        self._output(name, TensorProto.FLOAT, tuple(c.scheme["shape"]))
        self.nbytes += sum(len(t.raw_data) for t in inits)

    def commit(self, metadata: dict[str, str]) -> Path:
        import onnx
        from onnx import helper

        if self.graph is not None:
            model = self.graph
            g = model.graph
            keep = [t for t in g.initializer if t.name not in set(self.swapped.values())]
            del g.initializer[:]
            g.initializer.extend(keep + self.inits)
            nodes = self.nodes + list(g.node)  # the dequantizations need no input: they go first
            del g.node[:]
            g.node.extend(nodes)
            helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **metadata})
        else:
            graph = helper.make_graph(self.nodes, "lowbit_weights", [], self.outputs, self.inits)
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lowbit")
            helper.set_model_props(model, metadata)
        onnx.checker.check_model(model) if self.nbytes < (1 << 31) else None
        tmp = temp_path(self.path)
        try:
            external = self.nbytes >= (1 << 31)
            onnx.save_model(model, str(tmp), save_as_external_data=external, location=self.path.name + ".data")
            publish(tmp, self.path, self.force)
        except OSError as e:
            raise CheckpointError(f"{self.path}: writing the ONNX file failed: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        self.inits, self.nodes = [], []


def _read_graph(path: Path) -> Any:
    """The ONNX model at ``path`` in opset 21 or later (converted when older)."""
    import onnx
    from onnx import version_converter

    try:
        model = onnx.load(str(path))
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not an ONNX model: {e}") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < OPSET:
        try:
            model = version_converter.convert_version(model, OPSET)
        except Exception as e:  # noqa: BLE001 - the converter raises several kinds
            raise CheckpointError(f"{path}: cannot convert the graph from opset {opset} to {OPSET}: {e}") from None
    return model


def _initializer_for(model: Any, name: str) -> str:
    """The one initializer of ``model`` that holds checkpoint tensor ``name``."""
    hits = [t.name for t in model.graph.initializer if t.name == name or t.name.endswith("." + name)]
    if len(hits) != 1:
        raise CheckpointError(f"the ONNX graph has {len(hits)} initializers for tensor {name!r}"
                              + (f" ({', '.join(hits[:3])})" if hits else "")
                              + "; export it with torch.onnx.export(..., do_constant_folding=False) so parameters keep "
                              "their names, or leave the tensor out with exclude")
    return hits[0]
