"""compressed-tensors: the model-directory layout that vLLM and transformers load (``quant_method:
compressed-tensors``), written from lowbit's codes and read back into lowbit's quantized modules.

Writing (:class:`CompressedTensorsWriter`, used by ``compress_checkpoint(..., format="compressed-tensors")``)
copies the codes and scales a lowbit method chose; nothing is re-quantized. What each method becomes:

=====================================  =====================  ==========================================
lowbit method                          compressed-tensors     tensors per Linear layer ``M``
=====================================  =====================  ==========================================
int8 per channel / group / tensor      ``naive-quantized``    ``M.weight`` (I8), ``M.weight_scale`` (F32),
                                       (``int-quantized``     ``M.weight_zero_point`` (I8, affine only)
                                       with int8 activations)
int2 ... int7, same granularities      ``pack-quantized``     ``M.weight_packed`` (I32, 32 codes in ``bits``
                                                              words per row), ``M.weight_shape`` (I64),
                                                              ``M.weight_scale``, ``M.weight_zero_point``
                                                              (I32, packed along the output axis)
fp8_e4m3fn, per channel or tensor      ``float-quantized``    ``M.weight`` (F8_E4M3), ``M.weight_scale``
mxfp4 (fp4 e2m1, 32 per E8M0 scale)    ``mxfp4-pack-          ``M.weight_packed`` (U8, two codes per byte,
                                       quantized``            low nibble first), ``M.weight_scale`` (U8)
mxfp6_e2m3                             ``mxfp6-pack-          ``M.weight_packed`` (U8, four 6-bit codes in
                                       quantized``            three bytes, little-endian), ``M.weight_scale``
mxfp8_e4m3                             ``mxfp8-quantized``    ``M.weight`` (F8_E4M3), ``M.weight_scale`` (U8)
nvfp4 (16 per e4m3 scale, one float32  ``nvfp4-pack-          ``M.weight_packed``, ``M.weight_scale``
per tensor)                            quantized``            (F8_E4M3), ``M.weight_global_scale`` (F32,
                                                              the reciprocal of lowbit's tensor scale)
=====================================  =====================  ==========================================

The block formats' codes and scales are carried as stored; compressed-tensors' decompression computes
their values in bfloat16, exactly for the MX formats (an element times a power of two) and, for NVFP4,
as ``element * (scale / global_scale)`` rounded to bfloat16, which lowbit's float32 ``element * scale *
tensor_scale`` matches to bfloat16 rounding.

Unsigned lowbit codes are carried as signed ones (code and zero point both minus ``2**(bits-1)``:
the same ``(code - zero_point) * scale``). Only the weights of ``nn.Linear`` layers are quantized in
this layout; every other tensor is written as it is. Pruning, low rank, mxint8, mxfp8_e5m2, mxfp6_e3m2,
GGUF blocks, fp8 e5m2 and fp16/bf16 casts have no lossless form here and are refused with the formats
that carry them.

Integer scales are written in the method's ``scale_dtype`` (float32 by default), which lowbit and
compressed-tensors' own decompression read as they are. transformers holds a layer's scales in the
model's dtype, so it would round float32 scales of a bfloat16 or float16 model; with
``IntQuant(scale_dtype="bfloat16")`` the codes are made with scales that dtype holds, and such a model
loads bit for bit too.

Reading: :func:`read_layers` turns a directory's quantized layers (written by lowbit or by
compressed-tensors' ``ModelCompressor`` for another tool) back into codes and params;
:func:`load_quantized` builds the transformers model with lowbit's quantized modules from them
(``QuantizedLinear``, ``Float8Linear``, ``BlockLinear``), keeping the codes in memory;
:func:`save_quantized` writes a model quantized with ``ptq``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from precision.blocks import BlockCast
from precision.cast import FloatCast
from precision.dtypes import ST_TO_NP
from precision.methods import ValueStore
from quant.quantize import QParams
from quant.spec import PerChannel, PerGroup, PerTensor, QuantSpec
from quant.storage import IntQuant, pack_nibbles, unpack_nibbles

from . import hf
from .chain import Chain, Compressed
from .io import Checkpoint, CheckpointError, SafetensorsWriter, _fsync_dir

FORMAT = "compressed-tensors"
LAYOUT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this module writes and was tested against
ACTIVATIONS = ("int8", "int8_affine")
WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|gguf|h5|msgpack|ckpt)$|.*\.safetensors\.index\.json$")
CARRIERS = ("lowbit (every method)", "gguf (q8_0, q4_0, fp16, bf16)", "onnx-qdq (int8, int4, fp8)")


@dataclass(frozen=True)
class CompressedTensors:
    """The compressed-tensors output format (``compress_checkpoint(..., format=CompressedTensors(...))``;
    the string ``"compressed-tensors"`` is ``CompressedTensors()``).

    ``activations``: None (weight-only), ``"int8"``: the layers' inputs are declared dynamic per-token
    symmetric int8 (W8A8, compressed-tensors' ``int-quantized``), or ``"int8_affine"``: dynamic per-token
    asymmetric int8 (a scale and a zero point per token, ``symmetric: false``; more accurate where inputs
    are skewed, such as a GELU's output). vLLM (its zero-point "azp" kernels) and :func:`load_quantized`
    run both on int8 matmuls. Weights must then be int8 symmetric per channel or per tensor.
    """

    activations: str | None = None

    def __post_init__(self) -> None:
        if self.activations is not None and self.activations not in ACTIVATIONS:
            raise ValueError(f"CompressedTensors: activations must be None or one of {ACTIVATIONS}, got {self.activations!r}")

    @classmethod
    def of(cls, format: "str | CompressedTensors") -> "CompressedTensors":
        if isinstance(format, CompressedTensors):
            return format
        if format == FORMAT:
            return cls()
        raise ValueError(f"not the compressed-tensors format: {format!r}")


def _refuse(what: str, why: str) -> ValueError:
    return ValueError(f"compressed-tensors cannot carry {what} losslessly ({why}); "
                      f"formats that carry it: {', '.join(CARRIERS)}")


def _strategy(spec: QuantSpec) -> tuple[str, int | None]:
    g = spec.granularity
    if isinstance(g, PerTensor):
        return "tensor", None
    if isinstance(g, PerChannel) and g.kept_axis in (0, -2):
        return "channel", None
    if isinstance(g, PerGroup) and g.reduced_axis in (1, -1):
        return "group", g.size
    raise _refuse(spec.describe(), "its scales run along a layer's input axis; compressed-tensors' run along the output")


def weight_args(chain: Chain, fmt: CompressedTensors) -> tuple[dict[str, Any], str]:
    """The compressed-tensors ``weights`` quantization args and the format name for ``chain`` (a value
    method alone); ValueError naming the formats that can carry it otherwise."""
    if chain.structure is not None:
        raise _refuse(chain.structure.describe(), "compressed-tensors reads no sparse format since 0.15: its bitmask "
                      "and 2:4 compressors were removed, and 0.20 refuses their configs")
    v = chain.values
    if isinstance(v, IntQuant):
        strategy, group = _strategy(v.spec)
        args = {"num_bits": v.spec.bits, "type": "int", "symmetric": v.spec.symmetric, "strategy": strategy,
                "group_size": group, "dynamic": False}
        if fmt.activations is not None and not (v.spec.bits == 8 and v.spec.symmetric and strategy != "group"):
            raise ValueError(f"CompressedTensors(activations={fmt.activations!r}) (W8A8) needs int8 symmetric weights "
                             f"per channel or per tensor, got {v.spec.describe()}")
        if v.spec.bits == 8:
            return args, "int-quantized" if fmt.activations else "naive-quantized"
        return args, "pack-quantized"
    if isinstance(v, FloatCast):
        if v.format != "fp8_e4m3fn":
            raise _refuse(v.describe(), "its float weights are fp8 e4m3fn only")
        if v.scaling == "channel" and v.axis not in (0, -2):
            raise _refuse(v.describe(), "its channel scales run along the output axis")
        if fmt.activations is not None:
            raise ValueError(f"CompressedTensors(activations={fmt.activations!r}) applies to int8 weights, not fp8")
        return {"num_bits": 8, "type": "float", "symmetric": True,
                "strategy": "channel" if v.scaling == "channel" else "tensor", "group_size": None,
                "dynamic": False}, "float-quantized"
    if isinstance(v, BlockCast):
        fmt_name = v.format if isinstance(v.format, str) else ""
        if fmt_name not in BLOCK_ARGS or fmt.activations is not None:
            raise _refuse(v.describe(), f"its block formats are {', '.join(BLOCK_ARGS)}, weight-only")
        return dict(BLOCK_ARGS[fmt_name][0]), BLOCK_ARGS[fmt_name][1]
    assert v is not None  # a chain has a value method when it has no structure method
    raise _refuse(v.describe(), "it stores integer, fp8 e4m3fn or MX/NVFP4 codes with scales only")


def _block_args(bits: int, group: int, strategy: str, scale_dtype: str) -> dict[str, Any]:
    return {"num_bits": bits, "type": "float", "symmetric": True, "strategy": strategy, "group_size": group,
            "dynamic": False, "scale_dtype": scale_dtype}


# lowbit's block presets that compressed-tensors reads: (weights args, format name)
BLOCK_ARGS: dict[str, tuple[dict[str, Any], str]] = {
    "mxfp4": (_block_args(4, 32, "group", "torch.uint8"), "mxfp4-pack-quantized"),
    "mxfp6_e2m3": (_block_args(6, 32, "group", "torch.uint8"), "mxfp6-pack-quantized"),
    "mxfp8_e4m3": (_block_args(8, 32, "group", "torch.uint8"), "mxfp8-quantized"),
    "nvfp4": (_block_args(4, 16, "tensor_group", "torch.float8_e4m3fn"), "nvfp4-pack-quantized"),
}


def input_args(activations: str) -> dict[str, Any]:
    """The ``input_activations`` quantization args of dynamic per-token int8, symmetric (``"int8"``) or
    not (``"int8_affine"``)."""
    return {"num_bits": 8, "type": "int", "symmetric": activations == "int8", "strategy": "token", "dynamic": True,
            "group_size": None}


def quantization_config(groups: list[tuple[dict[str, Any], str, str | None, list[str]]]) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json``: one config group per ``(weights args, format
    name, activations, module names)``."""
    cg = {f"group_{i}": {"targets": [module_target(m) for m in modules], "weights": args,
                         "input_activations": input_args(acts) if acts else None, "output_activations": None,
                         "format": fmt_name}
          for i, (args, fmt_name, acts, modules) in enumerate(groups)}
    names = {g[1] for g in groups}
    return {"quant_method": FORMAT, "format": names.pop() if len(names) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": cg, "ignore": [], "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
            "version": LAYOUT_VERSION}


def module_target(module: str) -> str:
    """A target that matches ``module`` whatever prefix the loading model class puts before it."""
    return "re:^(?:.*\\.)?" + re.escape(module) + "$"


# ------------------------------------------------------------------ packing

def pack_int32(codes: np.ndarray, bits: int) -> np.ndarray:
    """compressed-tensors' dense packing of signed ``bits``-bit codes (rows, cols): each row's codes, offset
    by ``2**(bits-1)``, as one little-endian bit stream (code i at bit ``i*bits``), in int32 words
    (rows, ceil(cols*bits/32)); the last word of a row is padded with zero bits."""
    rows, cols = codes.shape
    u = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    words = -(-cols * bits // 32)
    if bits == 4:  # nibbles never straddle a byte: lowbit's own nibble packing, per row
        u = np.pad(u, ((0, 0), (0, words * 8 - cols)))
        packed = pack_nibbles(u).reshape(rows, words * 4)
    else:
        stream = np.unpackbits(u[:, :, None], axis=2, count=bits, bitorder="little").reshape(rows, cols * bits)
        stream = np.pad(stream, ((0, 0), (0, words * 32 - cols * bits)))
        packed = np.packbits(stream, axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view("<i4").astype(np.int32, copy=False)


def unpack_int32(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """The signed int8 codes (rows, cols) of :func:`pack_int32` output."""
    rows = packed.shape[0]
    if packed.dtype != np.int32 or packed.ndim != 2 or packed.shape[1] != -(-cols * bits // 32):
        raise ValueError(f"packed codes of shape {list(packed.shape)} ({packed.dtype}) do not hold {cols} "
                         f"{bits}-bit codes per row")
    raw = np.ascontiguousarray(packed).astype("<i4", copy=False).view(np.uint8).reshape(rows, -1)
    if bits == 4:
        u = unpack_nibbles(raw.reshape(-1), raw.size * 2).reshape(rows, -1)[:, :cols]
    else:
        stream = np.unpackbits(raw, axis=1, bitorder="little")[:, :cols * bits].reshape(rows, cols, bits)
        u = np.packbits(stream, axis=2, bitorder="little").reshape(rows, cols)
    return (u.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)


# ------------------------------------------------------------------ writing

def linear_modules(model_dir: Path, names: list[str]) -> dict[str, str]:
    """``{tensor name: module name}`` for the checkpoint tensors that are ``nn.Linear`` weights of the
    model ``config.json`` in ``model_dir`` describes (built on the meta device: nothing is allocated)."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{model_dir}: compressed-tensors output needs the model's config.json beside the "
                              "checkpoint (to find its Linear layers and to write the quantization_config)")
    linear = {n for n, m in _meta_model(model_dir).named_modules() if _is_linear(m)}
    out: dict[str, str] = {}
    for t in names:
        mod, _, leaf = t.rpartition(".")
        if leaf == "weight" and any(mod == n or mod.endswith("." + n) or n.endswith("." + mod) for n in linear):
            out[t] = mod
    return out


def _is_linear(m: Any) -> bool:
    from torch import nn

    return isinstance(m, nn.Linear)


def _model_class(config: Any, model_dir: Path | None = None) -> Any:
    """The transformers model class ``config.architectures`` names (else ``AutoModel``). Only subclasses
    of ``PreTrainedModel`` are accepted: a config names a class, never any other callable of the namespace."""
    transformers = hf.transformers()
    archs = getattr(config, "architectures", None) or []
    if not isinstance(archs, (list, tuple)):
        raise CheckpointError(f"{model_dir}/config.json: architectures must be a list of class names, got {archs!r:.80}")
    for arch in archs:
        if not isinstance(arch, str) or not arch.isidentifier():
            raise CheckpointError(f"{model_dir}/config.json: architectures holds {arch!r:.80}, not a class name")
        cls = getattr(transformers, arch, None)
        if cls is None:
            continue
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise CheckpointError(f"{model_dir}/config.json: architectures names {arch!r}, which is not a transformers "
                                  "model class")
        return cls
    return transformers.AutoModel


LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "num_decoder_layers", "num_encoder_layers")


def _check_declared_sizes(model_dir: Path, config: Any, stored: int) -> None:
    """A config may not declare more layers than the checkpoint stores tensors (each layer stores at
    least one): bounds the modules built before anything else is checked."""
    for key in LAYER_COUNT_KEYS:
        v = getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= max(stored, 1):
            raise CheckpointError(f"{model_dir}/config.json: {key} is {v}, but the checkpoint stores {stored} tensors")


def _meta_model(model_dir: Path) -> Any:
    """The model class of ``model_dir``'s config, built with every tensor on the meta device."""
    import torch

    config = _config(model_dir)
    _check_declared_sizes(model_dir, config, len(Checkpoint(model_dir).names()))
    with torch.device("meta"):
        return _from_config(_model_class(config, model_dir), config)


def _from_config(cls: Any, config: Any) -> Any:
    return cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)


def _config(model_dir: Path) -> Any:
    AutoConfig = hf.transformers().AutoConfig
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{model_dir}: config.json is not a transformers config: {e}") from None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def ct_tensors(module: str, c: Compressed, scale_dtype: str = "float32") -> dict[str, np.ndarray]:
    """The compressed-tensors tensors of one Linear weight compressed by lowbit (``c``), codes copied; integer
    scales written in ``scale_dtype`` (the method's: they hold its values exactly)."""
    scheme = c.scheme
    shape = tuple(scheme["shape"])
    if scheme["values"]["kind"] == "block":
        codes = ValueStore.codes(c.parts, scheme, ST_TO_NP[scheme["dtype"]]).reshape(shape)
        t = c.parts.get("tensor_scale")
        return block_tensors(module, codes, c.parts["scale"], None if t is None else float(t[0]),
                             scheme["values"]["format"])
    if scheme["values"]["kind"] == "float":
        scale = c.parts.get("scale")
        return float_tensors(module, np.ascontiguousarray(c.parts["values"]).reshape(shape),
                             np.ones(1, np.float32) if scale is None else scale, scheme["values"].get("scaling") == "channel")
    spec = QuantSpec.from_dict(scheme["values"]["spec"])
    codes = ValueStore.codes(c.parts, scheme, ST_TO_NP[scheme["dtype"]]).reshape(shape)
    return int_tensors(module, codes, spec, c.parts["scale"], c.parts.get("zero_point"), scale_dtype)


def block_tensors(module: str, codes: np.ndarray, scales: np.ndarray, tensor_scale: float | None,
                  fmt_name: str) -> dict[str, np.ndarray]:
    """compressed-tensors' tensors of MX / NVFP4 element codes (out, in) and their block scales (E8M0 bytes
    or e4m3 codes, one per block along the rows) and NVFP4's tensor scale."""
    rows, cols = codes.shape
    scales = np.ascontiguousarray(scales).reshape(rows, -1)
    out: dict[str, np.ndarray] = {}
    if fmt_name in ("mxfp4", "nvfp4"):
        out[f"{module}.weight_packed"] = pack_nibbles(codes).reshape(rows, cols // 2)
    elif fmt_name == "mxfp6_e2m3":
        c = codes.reshape(rows, cols // 4, 4).astype(np.uint32)
        word = c[..., 0] | c[..., 1] << 6 | c[..., 2] << 12 | c[..., 3] << 18
        out[f"{module}.weight_packed"] = np.stack([word, word >> 8, word >> 16], -1).astype(np.uint8).reshape(rows, -1)
    else:
        out[f"{module}.weight"] = codes.astype(np.uint8).view(ST_TO_NP["F8_E4M3"])
    if fmt_name == "nvfp4":
        assert tensor_scale is not None
        out[f"{module}.weight_scale"] = scales.astype(np.uint8).view(ST_TO_NP["F8_E4M3"])
        out[f"{module}.weight_global_scale"] = np.array([1.0 / tensor_scale], np.float32)
    else:
        out[f"{module}.weight_scale"] = scales.astype(np.uint8)
    return out


def float_tensors(module: str, codes: np.ndarray, scale: np.ndarray, per_channel: bool) -> dict[str, np.ndarray]:
    """``M.weight`` (fp8 e4m3fn codes, as stored) and ``M.weight_scale`` (float32, (out, 1) or (1,))."""
    scale = np.asarray(scale, np.float32)
    return {f"{module}.weight": codes, f"{module}.weight_scale": scale.reshape(-1, 1) if per_channel else scale.reshape(1)}


def int_tensors(module: str, codes: np.ndarray, spec: QuantSpec, scale: np.ndarray,
                zero_point: np.ndarray | None, scale_dtype: str = "float32") -> dict[str, np.ndarray]:
    """compressed-tensors' tensors of integer codes (out, in) under ``spec`` with their float32 ``scale`` and
    ``zero_point`` (``spec.params_shape``): int8 as ``M.weight``, fewer bits packed (``M.weight_packed`` and
    ``M.weight_shape``); unsigned codes carried as signed (code and zero point minus ``2**(bits-1)``). The
    scales are written in ``scale_dtype`` (``"bfloat16"`` / ``"float16"``: they must hold them exactly)."""
    shape = tuple(codes.shape)
    pshape = spec.params_shape(shape)
    scale = np.asarray(scale, np.float32).reshape(pshape)
    zp = None if zero_point is None else np.asarray(zero_point).astype(np.int32).reshape(pshape)
    if not spec.signed:  # the same (code - zero point) in signed codes
        off = 1 << (spec.bits - 1)
        codes = (codes.astype(np.int16) - off).astype(np.int8)
        zp = None if zp is None else zp - off
    if isinstance(spec.granularity, PerTensor):
        scale = scale.reshape(1)
        zp = None if zp is None else zp.reshape(1)
    out: dict[str, np.ndarray] = {}
    if spec.bits == 8:
        out[f"{module}.weight"] = np.ascontiguousarray(codes, np.int8)
    else:
        out[f"{module}.weight_packed"] = pack_int32(codes, spec.bits)
        out[f"{module}.weight_shape"] = np.asarray(shape, np.int64)
    if scale_dtype != "float32":
        narrow = scale.astype(ST_TO_NP["BF16"] if scale_dtype == "bfloat16" else np.float16)
        if not np.array_equal(narrow.astype(np.float32), scale):
            raise ValueError(f"{module}: its scales are not {scale_dtype} values")
        scale = narrow
    out[f"{module}.weight_scale"] = scale
    if zp is not None and not spec.symmetric:
        zp8 = zp.astype(np.int8)
        if spec.bits < 8 and not isinstance(spec.granularity, PerTensor):
            out[f"{module}.weight_zero_point"] = np.ascontiguousarray(pack_int32(zp8.T, spec.bits).T)
        else:
            out[f"{module}.weight_zero_point"] = zp8
    return out


class CompressedTensorsWriter:
    """A compressed-tensors model directory, written into a temporary directory beside ``path`` and
    moved into place by :meth:`commit` (an existing directory is replaced only with ``force``):
    ``model.safetensors``, ``config.json`` with a ``quantization_config`` (one config group per distinct
    scheme), and the files of ``copy_from`` (a model directory: tokenizer, sentence-transformers
    modules; weights and config.json are not copied)."""

    def __init__(self, path: str | os.PathLike, *, force: bool = False, copy_from: Path | None = None,
                 header_reserve: int = 1 << 16) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"{self.path}: compressed-tensors output is a directory; a file is there")
        if self.path.exists() and not force:
            raise CheckpointError(f"{self.path}: already exists (pass --force to replace it)")
        if copy_from is not None and (self.path.resolve() == copy_from.resolve()
                                      or copy_from.resolve() in self.path.resolve().parents):
            raise CheckpointError(f"{self.path}: the output would be written inside the input model directory")
        if not self.path.parent.is_dir():
            raise CheckpointError(f"{self.path.parent}: the output's parent directory does not exist")
        self.copy_from = copy_from
        self._tmp = self.path.with_name(f".{self.path.name}.lowbit-{os.getpid()}-{secrets.token_hex(4)}.tmpdir")
        self._tmp.mkdir()
        self._weights = SafetensorsWriter(self._tmp / "model.safetensors", header_reserve=header_reserve)
        self.groups: dict[str, tuple[dict[str, Any], str, str | None, list[str]]] = {}

    @property
    def directory(self) -> Path:
        """The temporary directory being written (for files a caller adds, e.g. a tokenizer's)."""
        return self._tmp

    def add_kept(self, name: str, arr: np.ndarray) -> None:
        self._weights.add(name, arr)

    def add_layer(self, module: str, tensors: Mapping[str, np.ndarray], args: dict[str, Any], fmt_name: str,
                  activations: str | None) -> None:
        """One quantized Linear layer: its tensors (:func:`int_tensors` / :func:`float_tensors`) and its scheme."""
        for k, v in tensors.items():
            self._weights.add(k, v)
        key = json.dumps([args, fmt_name, activations], sort_keys=True)
        self.groups.setdefault(key, (args, fmt_name, activations, []))[3].append(module)

    def commit(self, config: dict[str, Any], metadata: Mapping[str, str]) -> Path:
        """Finish: ``config`` (the model's config.json content) gets the quantization_config."""
        try:
            self._weights.commit({"format": "pt", **metadata})
            config = dict(config)
            config.pop("quantization_config", None)
            if self.groups:
                config["quantization_config"] = quantization_config(list(self.groups.values()))
            if self.copy_from is not None:
                _copy_model_files(self.copy_from, self._tmp)
            (self._tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            old = None
            if self.path.exists():
                old = self.path.with_name(f".{self.path.name}.lowbit-{os.getpid()}-{secrets.token_hex(4)}.old")
                os.replace(self.path, old)
            os.replace(self._tmp, self.path)
            _fsync_dir(self.path.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            self.abort()
            raise CheckpointError(f"{self.path}: writing the model directory failed: {e.strerror or e}") from None
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        self._weights.abort()
        shutil.rmtree(self._tmp, ignore_errors=True)


def _copy_model_files(src: Path, dst: Path) -> None:
    """Every file of the model directory ``src`` but its weights and config.json (tokenizer, sentence-transformers
    modules ...), sub-directories included; hidden entries and symbolic links are skipped."""
    for entry in sorted(src.iterdir()):
        if entry.name.startswith(".") or entry.is_symlink() or entry.name in ("config.json", "__pycache__"):
            continue
        if entry.is_dir():
            (dst / entry.name).mkdir()
            _copy_model_files(entry, dst / entry.name)
        elif entry.is_file() and not WEIGHT_FILES.match(entry.name):
            shutil.copyfile(entry, dst / entry.name)


# ------------------------------------------------------------------ reading

@dataclass
class QuantizedWeight:
    """One Linear layer's weight as a compressed-tensors directory stores it, in lowbit's terms.

    ``codes``: (out, in) int8 integer codes, or fp8 e4m3fn codes (``float_format`` set) as stored.
    ``qparams``: the integer params (None for fp8). ``scale``: fp8's float32 scale ((out, 1) or (1,)).
    ``activations``: ``"int8"`` or ``"int8_affine"`` when the layer's inputs are declared dynamic per-token
    int8, symmetric or asymmetric (:data:`ACTIVATIONS`)."""

    module: str
    codes: np.ndarray
    qparams: QParams | None
    scale: np.ndarray | None
    float_format: str | None
    activations: str | None
    block: str | None = None
    global_scale: float | None = None

    def dequantized(self) -> np.ndarray:
        """float32 ``(code - zero_point) * scale`` (fp8: ``code * scale``; block formats: element times block
        scale, see :class:`quant.modules.BlockLinear`), as compressed-tensors computes it in float32."""
        if self.block is not None:
            from quant.modules import BlockLinear

            assert self.scale is not None
            return BlockLinear(self.codes, self.scale, self.block, self.global_scale, None).dequantized_weight().numpy()
        if self.qparams is None:
            assert self.scale is not None
            return self.codes.astype(np.float32) * self.scale
        from quant.quantize import dequantize

        return np.asarray(dequantize(self.codes, self.qparams), np.float32)


def is_compressed_tensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model directory whose config.json declares ``quant_method: compressed-tensors``."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config")
    except (ValueError, OSError, AttributeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == FORMAT


def _groups(model_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{model_dir}: config.json cannot be read: {e}") from None
    q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(q, dict) or q.get("quant_method") != FORMAT:
        raise CheckpointError(f"{model_dir}: config.json has no compressed-tensors quantization_config")
    if q.get("quantization_status", "compressed") != "compressed":
        raise CheckpointError(f"{model_dir}: quantization_status is {q.get('quantization_status')!r}; "
                              "only compressed checkpoints store codes")
    sparsity = q.get("sparsity_config")
    if sparsity is not None and not isinstance(sparsity, dict):
        raise CheckpointError(f"{model_dir}/config.json: quantization_config.sparsity_config must be an object, got "
                              f"{sparsity!r:.80}")
    sparse_format = (sparsity or {}).get("format")
    if sparse_format not in (None, "dense"):
        raise CheckpointError(f"{model_dir}: sparse compressed-tensors checkpoints ({sparse_format!r:.80}) are not supported")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{model_dir}: quantization_config has no config_groups")
    out = []
    for gname, g in groups.items():
        if not isinstance(g, dict):
            raise CheckpointError(f"{model_dir}: config group {gname!r} is not an object")
        out.append({**g, "name": gname, "format": g.get("format") or q.get("format")})
    return q, out


def _match(module: str, targets: Any, is_linear: bool) -> bool:
    """Whether ``module`` matches one of a config's ``targets`` (names, ``re:`` patterns, or ``"Linear"``)."""
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(f"config targets must be a list of strings, got {targets!r:.80}")
    for t in targets:
        if t.startswith("re:"):
            try:
                if re.match(t[3:], module):
                    return True
            except re.error as e:
                raise CheckpointError(f"config target {t!r:.80} is not a valid regular expression: {e}") from None
        elif t == module or (t == "Linear" and is_linear):
            return True
    return False


def _describe(w: dict[str, Any], fmt: str | None) -> str:
    return (f"{w.get('type')} {w.get('num_bits')}-bit {w.get('strategy')}"
            + (f" {w.get('group_size')}" if w.get("group_size") else "")
            + (" symmetric" if w.get("symmetric", True) else " affine") + f" ({fmt})")


def _spec_of(w: dict[str, Any], fmt: str | None, where: str) -> QuantSpec:
    bits = w.get("num_bits")
    strategy = w.get("strategy") or ("group" if (w.get("group_size") or 0) > 0 else
                                     "channel" if w.get("group_size") == -1 else "tensor")
    if w.get("type", "int") != "int" or not isinstance(bits, int) or not 2 <= bits <= 8 \
            or strategy not in ("tensor", "channel", "group") or w.get("block_structure") \
            or w.get("dynamic") not in (False, None) or fmt not in ("naive-quantized", "int-quantized", "pack-quantized"):
        raise CheckpointError(f"{where}: lowbit cannot run the scheme {_describe(w, fmt)}; it runs int2-int8 "
                              "per tensor, channel or group (naive-, int- and pack-quantized), fp8 e4m3fn "
                              "per tensor or channel (float-quantized), and mxfp4, mxfp6 (e2m3), mxfp8 (e4m3) "
                              "and nvfp4")
    g = (PerTensor() if strategy == "tensor" else PerChannel(0) if strategy == "channel"
         else PerGroup(int(w["group_size"]), -1))
    return QuantSpec(bits=bits, signed=True, symmetric=bool(w.get("symmetric", True)), granularity=g)


def _activations(group: dict[str, Any], where: str) -> str | None:
    a = group.get("input_activations")
    if a is None:
        return None
    if not isinstance(a, dict):
        raise CheckpointError(f"{where}: its config group's input_activations must be an object, got {a!r:.80}")
    if group.get("output_activations") is None and a.get("type", "int") == "int" and a.get("num_bits") == 8 \
            and a.get("strategy") == "token" and a.get("dynamic") is True:
        return "int8" if a.get("symmetric", True) else "int8_affine"
    raise CheckpointError(f"{where}: lowbit cannot run the input activations {_describe(a, 'input')}; it runs "
                          "dynamic per-token int8, symmetric or asymmetric (W8A8), or weight-only")


def read_layers(model_dir: str | os.PathLike, linear: set[str] | None = None) -> dict[str, QuantizedWeight]:
    """The quantized Linear weights of a compressed-tensors directory, by module name as the checkpoint
    names them. ``linear``: module names of the model's ``nn.Linear`` layers (for class targets such as
    ``"Linear"``; default: the model built from config.json on the meta device). A scheme lowbit cannot
    run raises CheckpointError naming it."""
    d = Path(model_dir)
    q, groups = _groups(d)
    ck = Checkpoint(d)
    names = ck.names()
    if linear is None:
        linear = set(linear_modules(d, names).values())
    ignore = q.get("ignore") or []
    out: dict[str, QuantizedWeight] = {}
    for m in sorted({n.rpartition(".")[0] for n in names if n.endswith((".weight", ".weight_packed"))}):
        if _match(m, ignore, m in linear):
            continue
        group = next((g for g in groups if _match(m, g.get("targets") or [], m in linear)), None)
        if group is None:
            continue
        out[m] = _read_weight(ck, m, group, f"{d}: {m}")
    return out


def _read_weight(ck: Checkpoint, m: str, group: dict[str, Any], where: str) -> QuantizedWeight:
    w = group.get("weights")
    if not isinstance(w, dict):
        raise CheckpointError(f"{where}: its config group has no weights scheme")
    fmt = group.get("format")
    acts = _activations(group, where)
    names = set(ck.names())

    def get(leaf: str) -> np.ndarray:
        if f"{m}.{leaf}" not in names:
            raise CheckpointError(f"{where}: tensor {m}.{leaf} is missing")
        return ck.read(f"{m}.{leaf}")

    scale = get("weight_scale")
    block = next((name for name, (args, f) in BLOCK_ARGS.items() if f == fmt), None)
    if block is not None:
        args = BLOCK_ARGS[block][0]
        if any(w.get(k) != args[k] for k in ("num_bits", "type", "group_size", "strategy")) or acts \
                or not w.get("symmetric", True):
            raise CheckpointError(f"{where}: lowbit cannot run the scheme {_describe(w, fmt)}")
        return _read_block(ck, m, block, scale, get, where)
    if w.get("type") == "float":
        strategy = w.get("strategy")
        if w.get("num_bits") != 8 or strategy not in ("tensor", "channel") or fmt != "float-quantized" or acts:
            raise CheckpointError(f"{where}: lowbit cannot run the scheme {_describe(w, fmt)}")
        codes = get("weight")
        if codes.dtype != ST_TO_NP["F8_E4M3"] or codes.ndim != 2:
            raise CheckpointError(f"{where}: float-quantized weights must be 2-D F8_E4M3, got {codes.dtype}")
        want = (codes.shape[0], 1) if strategy == "channel" else (1,)
        if scale.size != int(np.prod(want)):
            raise CheckpointError(f"{where}: weight_scale has shape {list(scale.shape)}, expected {list(want)}")
        return QuantizedWeight(m, codes, None, scale.astype(np.float32).reshape(want if len(want) == 2 else (1, 1)),
                               "fp8_e4m3fn", None)
    spec = _spec_of(w, fmt, where)
    if fmt == "pack-quantized":
        shape_t = get("weight_shape")
        if shape_t.size != 2:
            raise CheckpointError(f"{where}: weight_shape must hold 2 integers, got {shape_t.size}")
        shape = (int(shape_t[0]), int(shape_t[1]))
        try:
            codes = unpack_int32(get("weight_packed"), spec.bits, shape[1])
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
        if codes.shape != shape:
            raise CheckpointError(f"{where}: weight_packed holds {codes.shape[0]} rows, weight_shape says {shape[0]}")
    else:
        codes = get("weight")
        if codes.dtype != np.int8 or codes.ndim != 2:
            raise CheckpointError(f"{where}: {fmt} weights must be 2-D int8, got {codes.dtype} {list(codes.shape)}")
        shape = codes.shape
    try:
        pshape = spec.params_shape(shape, m)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    n_params = int(np.prod(pshape))
    if scale.size != n_params or scale.dtype.kind not in "fV":
        raise CheckpointError(f"{where}: weight_scale holds {scale.size} {scale.dtype} values, expected {n_params} floats")
    if spec.symmetric:
        zp = np.zeros(pshape, np.int32)
    else:
        z = get("weight_zero_point")
        if fmt == "pack-quantized" and not isinstance(spec.granularity, PerTensor):
            try:
                z = unpack_int32(np.ascontiguousarray(z.T), spec.bits, shape[0]).T
            except ValueError as e:
                raise CheckpointError(f"{where}: weight_zero_point: {e}") from None
        if z.size != n_params or z.dtype.kind not in "iu":
            raise CheckpointError(f"{where}: weight_zero_point holds {z.size} {z.dtype} values, expected {n_params} integers")
        zp = z.astype(np.int32).reshape(pshape)
        if zp.min() < spec.qmin or zp.max() > spec.qmax:
            raise CheckpointError(f"{where}: a zero point lies outside the {spec.bits}-bit code range")
    if codes.min(initial=0) < spec.qmin or codes.max(initial=0) > spec.qmax:
        raise CheckpointError(f"{where}: a code lies outside the {spec.bits}-bit range")
    qp = QParams(scale.astype(np.float32).reshape(pshape), zp, spec, tuple(shape))
    return QuantizedWeight(m, np.ascontiguousarray(codes, np.int8), qp, None, None, acts)


def _read_block(ck: Checkpoint, m: str, block: str, scale: np.ndarray, get: Any, where: str) -> QuantizedWeight:
    """An MX / NVFP4 layer: element codes unpacked to a byte each, scale codes as bytes."""
    from precision.blocks import get_block_format

    fmt = get_block_format(block)
    rows = scale.shape[0] if scale.ndim == 2 else 0
    if scale.ndim != 2 or scale.dtype.itemsize != 1:
        raise CheckpointError(f"{where}: weight_scale must be 2-D with one byte per block, got {scale.dtype} "
                              f"{list(scale.shape)}")
    cols = scale.shape[1] * fmt.block
    if block == "mxfp8_e4m3":
        codes = get("weight")
        if codes.dtype.itemsize != 1 or codes.shape != (rows, cols):
            raise CheckpointError(f"{where}: weight must be ({rows}, {cols}) fp8, got {codes.dtype} {list(codes.shape)}")
        codes = np.ascontiguousarray(codes).view(np.uint8)
    else:
        packed = get("weight_packed")
        per_byte = 2 if fmt.element_bits == 4 else 4 / 3
        if packed.dtype != np.uint8 or packed.shape != (rows, int(cols / per_byte)):
            raise CheckpointError(f"{where}: weight_packed must be ({rows}, {int(cols / per_byte)}) uint8, got "
                                  f"{packed.dtype} {list(packed.shape)}")
        if fmt.element_bits == 4:
            codes = unpack_nibbles(packed.reshape(-1), rows * cols).reshape(rows, cols)
        else:
            b = packed.reshape(rows, cols // 4, 3).astype(np.uint32)
            word = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16
            codes = np.stack([(word >> k) & 0x3F for k in (0, 6, 12, 18)], -1).astype(np.uint8).reshape(rows, cols)
    gs = None
    if block == "nvfp4":
        g = get("weight_global_scale")
        if g.size != 1 or g.dtype.kind != "f" or not np.isfinite(g).all() or float(g.reshape(-1)[0]) <= 0:
            raise CheckpointError(f"{where}: weight_global_scale must be one positive float")
        gs = float(np.float32(g.reshape(-1)[0]))
    return QuantizedWeight(m, codes, None, np.ascontiguousarray(scale).view(np.uint8), None, None, block, gs)


def load_dense(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a compressed-tensors directory with the quantized weights dequantized
    (``name.weight``, float32, as compressed-tensors' own decompression computes it) and their
    stored parts (``weight_scale``, ``weight_packed`` ...) dropped."""
    d = Path(model_dir)
    layers = read_layers(d)
    ck = Checkpoint(d)
    parts = {f"{m}.{leaf}" for m in layers for leaf in ("weight", "weight_packed", "weight_shape", "weight_scale",
                                                         "weight_zero_point", "weight_global_scale")}
    out = {n: ck.read(n) for n in ck.names() if n not in parts}
    for m, qw in layers.items():
        out[f"{m}.weight"] = qw.dequantized()
    return out


# ------------------------------------------------------------------ models

@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (nothing allocated) and their buffers
    (position ids, rotary frequencies) computed as usual on the CPU."""
    import torch
    from torch import nn

    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: Any) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _model_name(ckpt_module: str, model_modules: set[str], prefix: str) -> str | None:
    if ckpt_module in model_modules:
        return ckpt_module
    if prefix and ckpt_module.startswith(prefix + ".") and ckpt_module[len(prefix) + 1:] in model_modules:
        return ckpt_module[len(prefix) + 1:]
    if prefix and f"{prefix}.{ckpt_module}" in model_modules:
        return f"{prefix}.{ckpt_module}"
    return None


def load_quantized(model_dir: str | os.PathLike, *, int8_attention: bool = False, gelu_in_place: bool = False,
                   model_class: Any = None) -> Any:
    """The transformers model of a compressed-tensors directory with every quantized Linear layer a lowbit
    quantized module that keeps the stored codes: int2-int8 layers as :class:`quant.QuantizedLinear` (int
    codes, two per byte at 4 bits or fewer; W8A8 layers run on the int8 matmul ``torch._int_mm`` with
    dynamic per-token int8 inputs, the others dequantize per layer on the fly), fp8 e4m3fn layers as
    :class:`quant.Float8Linear`, MXFP4/6/8 and NVFP4 layers as :class:`quant.BlockLinear` (dequantized per call).
    No dense copy of a quantized weight is ever made. Every other tensor is
    loaded as stored (its dtype kept). ``model_class``: the transformers class to build (default: the
    config's ``architectures``, else ``AutoModel``). lowbit's own extras, off by default since the
    checkpoint does not declare them: ``int8_attention`` runs attention's two products on int8 codes
    (:mod:`quant.attention`; changes the outputs slightly); ``gelu_in_place`` applies an exact GELU that
    takes nothing but a quantized layer's output in place in that output (:func:`quant.fusion.fuse_gelu`,
    shown on a batch of token ids; same values). Returns the model in eval mode.

    Reads directories written by lowbit or by compressed-tensors' ``ModelCompressor`` (llm-compressor).
    A scheme lowbit cannot run raises CheckpointError naming it."""
    import torch

    from precision.arrays import like
    from quant.modules import (TOKEN_SPEC_AFFINE, TOKEN_SPEC_FULL, BlockLinear, Float8Linear, QuantizedLinear,
                               refuse_save_pretrained)

    d = Path(model_dir)
    config = _config(d)
    ck = Checkpoint(d)
    names = ck.names()
    _check_declared_sizes(d, config, len(names))
    cls = model_class or _model_class(config, d)
    _check_buffers_fit(d, cls, config, ck)
    with _parameters_on_meta():
        model = _from_config(cls, config)
    modules = dict(model.named_modules())
    linear = {n for n, m in modules.items() if _is_linear(m)}
    prefix = getattr(model, "base_model_prefix", "") or ""
    ckpt_linear = {m for m in (n.rpartition(".")[0] for n in names) if _model_name(m, linear, prefix) in linear}
    layers = read_layers(d, ckpt_linear)
    used: set[str] = set()
    for m, qw in layers.items():
        target = _model_name(m, linear, prefix)
        if target is None:
            raise CheckpointError(f"{d}: quantized layer {m!r} is not a Linear layer of {type(model).__name__}")
        lin = modules[target]
        want = (int(lin.out_features), int(lin.in_features))
        if tuple(qw.codes.shape) != want:
            raise CheckpointError(f"{d}: quantized layer {m!r} stores a {list(qw.codes.shape)} weight; "
                                  f"{type(model).__name__}'s {target} is {list(want)} (out, in)")
        bias = ck.read(f"{m}.bias") if f"{m}.bias" in names else None
        if bias is not None and (tuple(bias.shape) != (want[0],) or bias.dtype.kind not in "fV"):
            raise CheckpointError(f"{d}: tensor '{m}.bias' is {bias.dtype} {list(bias.shape)}; {target} needs "
                                  f"{want[0]} floats")
        if (bias is None) != (lin.bias is None):
            raise CheckpointError(f"{d}: quantized layer {m!r} " + ("lacks its bias" if bias is None else
                                  f"stores a bias that {type(model).__name__}'s {target} does not have"))
        b = None if bias is None else torch.from_numpy(bias.copy())
        if qw.block is not None:
            assert qw.scale is not None
            layer: Any = BlockLinear(qw.codes, qw.scale, qw.block, qw.global_scale, b)
        elif qw.qparams is None:
            assert qw.scale is not None
            layer = Float8Linear(qw.codes, qw.scale, b)
        else:
            layer = QuantizedLinear(qw.codes, qw.qparams, b, "dynamic" if qw.activations else None,
                                    act_spec=TOKEN_SPEC_AFFINE if qw.activations == "int8_affine" else TOKEN_SPEC_FULL)
        model.set_submodule(target, layer)
        used.update(n for n in names if n.rpartition(".")[0] == m)
    state: dict[str, Any] = {}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for n in names:
        if n in used:
            continue
        mod, _, leaf = n.rpartition(".")
        if leaf in QUANTIZED_LEAVES:
            raise CheckpointError(f"{d}: tensor {n!r} is part of a quantized layer that no config group of "
                                  "quantization_config targets")
        target = _model_name(mod, set(modules), prefix) if mod else None
        key = f"{target}.{leaf}" if target else n
        if key in params or key in buffers:
            target_t = params[key] if key in params else buffers[key]
            want_shape = tuple(target_t.shape)
            if tuple(ck.info(n)[1]) != want_shape:
                raise CheckpointError(f"{d}: tensor {n!r} has shape {list(ck.info(n)[1])}; {type(model).__name__} "
                                      f"expects {list(want_shape)}")
            want_float = target_t.is_floating_point()
            if want_float and ck.info(n)[0].kind not in "fV":
                raise CheckpointError(f"{d}: tensor {n!r} is {ck.info(n)[0]}, but {type(model).__name__}'s {key} holds "
                                      "floats (a quantized layer that no config group targets?)")
            state[key] = like(ck.read(n), torch.empty(0))
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{d}: the stored tensors do not fit {type(model).__name__}: "
                              f"{' '.join(str(e).split())[:300]}") from None
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{d}: the checkpoint does not hold {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""))
    model.eval()
    if gelu_in_place:
        from quant.fusion import fuse_gelu

        ids = torch.randint(1, int(getattr(config, "vocab_size", 2) or 2), (2, 16), generator=torch.Generator().manual_seed(0))
        fuse_gelu(model, [{"input_ids": ids}])
    if int8_attention:
        from quant.attention import use_int8_attention

        use_int8_attention(model)
    refuse_save_pretrained(model)
    return model


QUANTIZED_LEAVES = ("weight_scale", "weight_packed", "weight_shape", "weight_zero_point", "weight_global_scale")


def _check_buffers_fit(d: Path, cls: Any, config: Any, ck: Checkpoint) -> None:
    """Build the model once wholly on the meta device (nothing allocated) and refuse a config whose
    parameters the checkpoint does not hold in those shapes, or whose computed buffers (position ids,
    rotary tables) would take more memory than the checkpoint's files: the sizes a config declares
    are bounded by what is stored before anything is materialised."""
    import torch

    with torch.device("meta"):
        skeleton = _from_config(cls, config)
    stored = {n: tuple(ck.info(n)[1]) for n in ck.names()}
    budget = max(ck.nbytes, 1 << 20)
    total = 0
    for n, b in skeleton.named_buffers():
        total += b.numel() * b.element_size()
        if total > budget:
            raise CheckpointError(f"{d}/config.json declares sizes that need a {list(b.shape)} buffer {n!r} "
                                  f"({b.numel() * b.element_size()} bytes); the checkpoint's files hold {ck.nbytes} bytes")
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    unstored = 0  # float bytes of parameters stored in another form (a quantized layer's codes), bounded below
    for n, p in skeleton.named_parameters():
        key = next((k for k in (n, f"{prefix}.{n}", n.removeprefix(prefix + ".")) if k in stored), None)
        if key is not None:
            if stored[key] != tuple(p.shape):
                raise CheckpointError(f"{d}: tensor {key!r} has shape {list(stored[key])}; the model config.json "
                                      f"describes expects {list(p.shape)}")
            continue
        unstored += p.numel() * p.element_size()
        if unstored > 32 * budget:  # float32 of 2-bit codes is 16 x their bytes: more is not in the files
            raise CheckpointError(f"{d}/config.json declares parameters (up to {n!r}, {list(p.shape)}) far larger than "
                                  f"the checkpoint's files ({ck.nbytes} bytes) hold")


def _layer_scheme(name: str, m: Any) -> tuple[dict[str, Any], str, str | None, dict[str, np.ndarray]]:
    """(weights args, format name, activations, tensors) of one lowbit quantized layer; ValueError naming
    the layer and what compressed-tensors cannot express otherwise."""
    from quant.modules import TOKEN_SPEC_AFFINE, TOKEN_SPEC_FULL, Float8Linear, QuantizedLinear

    if isinstance(m, Float8Linear):
        import torch

        per_channel = m.weight_scale.shape[0] > 1
        codes = m.weight_codes.view(torch.uint8).numpy().view(ST_TO_NP["F8_E4M3"])
        args = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel" if per_channel else "tensor",
                "group_size": None, "dynamic": False}
        return args, "float-quantized", None, float_tensors(name, codes, m.weight_scale.numpy(), per_channel)
    assert isinstance(m, QuantizedLinear)
    if m.input_scale is not None:
        raise ValueError(f"{name}: its inputs are rescaled (SmoothQuant or AWQ runtime scales), which compressed-tensors "
                         "cannot express; quantize without smoothquant / AWQ(runtime_scales=True), or save in lowbit's format")
    if m.gelu_in_place:
        raise ValueError(f"{name}: GELU was fused into this layer (gelu_in_place), so the model lost its GELU module; "
                         "quantize with gelu_in_place=False to save it")
    acts: str | None = None
    if m.activations == "dynamic":
        if m.act_spec not in (TOKEN_SPEC_FULL, TOKEN_SPEC_AFFINE):
            raise ValueError(f"{name}: dynamic activations {m.act_spec.describe()} are not compressed-tensors' W8A8 "
                             "(int8 per token over the full range, symmetric or affine); quantize with "
                             "PTQConfig(activations=quant.TOKEN_SPEC_FULL or quant.TOKEN_SPEC_AFFINE, "
                             "activation_mode='dynamic')")
        acts = "int8" if m.act_spec == TOKEN_SPEC_FULL else "int8_affine"
    elif m.activations is not None:
        raise ValueError(f"{name}: static activation ranges are not carried by compressed-tensors' int formats; "
                         "use dynamic per-token activations (quant.TOKEN_SPEC_FULL or quant.TOKEN_SPEC_AFFINE)")
    qp = m.qparams
    args, fmt_name = weight_args(Chain(None, IntQuant(qp.spec)), CompressedTensors(acts))
    tensors = int_tensors(name, m.codes().numpy(), qp.spec, qp.scale, None if qp.spec.symmetric else qp.zero_point)
    return args, fmt_name, acts, tensors


def save_quantized(model: Any, path: str | os.PathLike, *, tokenizer: Any = None, force: bool = False) -> Path:
    """Write a transformers model quantized by lowbit (``ptq`` with weight-only int2-int8, or W8A8 with
    ``activations=quant.TOKEN_SPEC_FULL`` or ``quant.TOKEN_SPEC_AFFINE``, ``activation_mode="dynamic"``, or
    :func:`load_quantized`) as a
    compressed-tensors model directory that :func:`load_quantized`, transformers and vLLM load: the codes and
    scales of every :class:`quant.QuantizedLinear` / :class:`quant.Float8Linear` as stored, every other
    parameter and persistent buffer as it is, ``model.config`` with the quantization_config, and the
    ``tokenizer``'s files if one is given. Layers whose rescaled inputs (SmoothQuant, AWQ runtime scales),
    fused GELU or static activation ranges compressed-tensors cannot express raise ValueError naming them.
    Returns the directory."""
    import torch

    from quant.modules import Float8Linear, QuantizedLinear

    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        raise TypeError("save_quantized takes a transformers model (with .config); for a sentence-transformers model "
                        "pass model[0].auto_model and tokenizer=model.tokenizer")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, Float8Linear))}
    if not layers:
        raise ValueError("save_quantized: the model has no lowbit quantized layers; quantize it with lowbit.ptq first")
    with torch.device("meta"):  # the layers as transformers builds them from this config
        skeleton = dict(_from_config(type(model), config).named_modules())
    for n in layers:
        if not _is_linear(skeleton.get(n)):
            raise ValueError(f"save_quantized: {n} is a {type(skeleton.get(n)).__name__} in {type(model).__name__}, not an "
                             "nn.Linear; compressed-tensors quantizes Linear layers only (GPT-2's Conv1D stores its "
                             "weight transposed): save in lowbit's format instead")
    schemes = {n: _layer_scheme(n, m) for n, m in layers.items()}  # every refusal before anything is written
    writer = CompressedTensorsWriter(path, force=force)
    try:
        seen: dict[int, str] = {}
        for k, v in model.state_dict().items():
            mod = k.rpartition(".")[0]
            if mod in layers or not isinstance(v, torch.Tensor) or v.data_ptr() in seen:
                continue  # a quantized layer's state is written below; a tied tensor once
            seen[v.data_ptr()] = k
            from precision.arrays import torch_to_numpy

            writer.add_kept(k, torch_to_numpy(v.detach().cpu().contiguous()))
        for n, m in layers.items():
            args, fmt_name, acts, tensors = schemes[n]
            if m.bias is not None:
                tensors = {**tensors, f"{n}.bias": m.bias.detach().cpu().numpy()}
            writer.add_layer(n, tensors, args, fmt_name, acts)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(writer.directory))
        cfg = config.to_dict()
        cfg.setdefault("architectures", [type(model).__name__])
        return writer.commit(cfg, {"lowbit.source": f"{type(model).__name__} quantized in Python"})
    except BaseException:
        writer.abort()
        raise
