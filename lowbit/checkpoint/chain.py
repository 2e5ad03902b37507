"""A chain: at most one structure method followed by at most one value method, applied to one tensor.

The methods own their maths and their stored form (``precision.methods``);
this module composes them, checksums the parts and rebuilds tensors from them.
Scheme (JSON, one per tensor; version 3)::

    {"version": 3, "shape": [...], "dtype": "F32", "chain": ["int8 ..."],
     "structure": {"kind": "none" | "magnitude" | "nm" | "structured" | "svd", ...},
     "values": {"kind": "none" | "float" | "int", ...}, "values_part": {...}, "values_count": n,
     ("factors": {"A": {...}, "B": {...}} for svd), "blake3": "..."}

Version 3's ``blake3`` checksum covers the scheme as well as the parts (:func:`scheme_digest`).
Versions 2 (the same with SHA-256, field ``sha256``) and 1 (SHA-256 of the parts only,
:func:`parts_digest`) still read. BLAKE3 replaced SHA-256 because the checksum is a large share
of a checkpoint job (every stored byte is hashed once), and BLAKE3 hashes about twice as fast on
one core with the same 256-bit strength. A checksum stored beside the data catches corruption,
never tampering (anyone can recompute it). A scheme comes from a file and is trusted in nothing:
:func:`restore` checks every field against the stored parts' sizes before it allocates anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import blake3
import numpy as np

import compress  # noqa: F401  (registers the structure methods)
import quant  # noqa: F401  (registers the integer method)
from precision import known_formats
from precision.blocks import BLOCK_FORMATS, BlockCast
from precision.cast import FloatCast
from precision.dtypes import NP_TO_ST, ST_TO_NP
from precision.methods import (EncodedValues, Method, NoStructure, NotApplied, Solution, StructureMethod,
                               ValueMethod, ValueStore, parts_nbytes, stored_shape, structure_method_class)
from precision.metrics import MetricsAccumulator, error_metrics
from precision.report import TensorReport
from compress.storage import LowRankSVD, MagnitudePrune
from quant.spec import PerChannel, PerGroup, QuantSpec
from quant.storage import IntQuant

from .io import row_spans

SCHEME_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
ROW_BLOCK_BYTES = 256 << 20  # float32 bytes of one row block when rows can be encoded independently

__all__ = ["Chain", "Compressed", "NotApplied", "compress_tensor", "restore", "parts_digest", "scheme_digest",
           "seal", "checksum_field", "SCHEME_VERSION"]


@dataclass(frozen=True)
class Chain:
    """What a checkpoint job does to each selected tensor: an optional ``structure`` method
    (prune or low rank) then an optional ``values`` method (a float cast or integer quantization).
    At least one is required."""

    structure: StructureMethod | None = None
    values: ValueMethod | None = None

    def __post_init__(self) -> None:
        if self.structure is not None and not isinstance(self.structure, StructureMethod):
            raise TypeError(f"Chain: structure must be a structure method (prune or low rank), got "
                            f"{type(self.structure).__name__}; put a value method in values=")
        if self.values is not None and not isinstance(self.values, ValueMethod):
            raise TypeError(f"Chain: values must be a value method (FloatCast or IntQuant), got "
                            f"{type(self.values).__name__}; put a structure method in structure=")
        if self.structure is None and self.values is None:
            raise ValueError("Chain: give a structure method, a value method, or both")

    @classmethod
    def of(cls, method: "Chain | Method | str") -> "Chain":
        """A chain from a chain, one method config, or a name such as ``"int8"`` or ``"prune,int8"``."""
        if isinstance(method, Chain):
            return method
        if isinstance(method, StructureMethod):
            return cls(method, None)
        if isinstance(method, ValueMethod):
            return cls(None, method)
        if isinstance(method, str):
            return cls.parse(method)
        raise TypeError(f"method must be a Chain, a method config or a name, got {type(method).__name__}")

    @classmethod
    def parse(cls, text: str, build: Callable[[str, str], Method] | None = None) -> "Chain":
        """A chain from names such as ``"int8"``, ``"fp8_e4m3fn"``, ``"prune,int4"`` or ``"svd,fp16"``
        (see :func:`step_kind`). ``build(kind, name)`` makes each step's config; by default each
        method's defaults (magnitude pruning at 0.5, SVD keeping half the parameters, integers
        per output channel, float casts as :meth:`FloatCast.for_format`)."""
        steps = [t.strip() for t in text.split(",") if t.strip()]
        if not steps:
            raise ValueError("the method is empty; give e.g. 'int8' or 'prune,int8'")
        kinds = [step_kind(s) for s in steps]
        structure = [i for i, k in enumerate(kinds) if k in ("prune", "svd")]
        values = [i for i, k in enumerate(kinds) if k in ("float", "int", "block")]
        if len(structure) > 1 or len(values) > 1:
            raise ValueError("a chain holds at most one prune/svd step and one float/int step (e.g. prune,int8)")
        if structure and values and structure[0] > values[0]:
            raise ValueError("put the prune/svd step before the float/int step (e.g. prune,int8)")
        make = build or _default_step
        s_m = make(kinds[structure[0]], steps[structure[0]]) if structure else None
        v_m = make(kinds[values[0]], steps[values[0]]) if values else None
        return cls(s_m, v_m)  # type: ignore[arg-type]

    def describe(self) -> list[str]:
        return [m.describe() for m in (self.structure, self.values) if m is not None]

    def check_shape(self, shape: tuple[int, ...], name: str) -> None:
        """ValueError naming ``name`` if a tensor of ``shape`` cannot take this chain."""
        if self.structure is not None:
            self.structure.check_shape(shape, name)
        if self.values is not None:
            # a structure that changes the shape (structured rows, factors) is checked when it runs
            self.values.check_shape(shape, name)

    def for_channel_axis(self, axis: int) -> "Chain":
        """This chain for a 2-D weight whose output channels run along ``axis`` (1: stored (in, out), as
        transformers' ``Conv1D``): integer scales per channel follow that axis and groups run along the
        other (the input) axis; a float cast's per-channel scale follows it. Other methods are unchanged."""
        if axis in (0, -2):
            return self
        v = self.values
        if isinstance(v, IntQuant):
            g = v.spec.granularity
            if isinstance(g, PerChannel) and g.kept_axis in (0, -2):
                v = replace(v, spec=replace(v.spec, granularity=PerChannel(axis)))
            elif isinstance(g, PerGroup) and g.reduced_axis in (1, -1):
                v = replace(v, spec=replace(v.spec, granularity=PerGroup(g.size, reduced_axis=1 - axis % 2)))
        elif isinstance(v, FloatCast) and v.scaling == "channel":
            v = replace(v, axis=axis)
        return Chain(self.structure, v)

    def to_dict(self) -> dict[str, Any]:
        return {"structure": None if self.structure is None else self.structure.to_dict(),
                "values": None if self.values is None else self.values.to_dict()}


def _default_step(kind: str, name: str) -> Method:
    if kind == "prune":
        return MagnitudePrune()
    if kind == "svd":
        return LowRankSVD()
    if kind == "float":
        return FloatCast.for_format(name)
    if kind == "block":
        return BlockCast(name)
    return IntQuant(QuantSpec(bits=int(name[3:]), granularity=PerChannel(0)))

INT_NAMES = tuple(f"int{b}" for b in range(2, 9))


def step_kind(name: str) -> str:
    """The kind of a method name: ``"float"`` (any precision format name: fp16, bf16, fp8_e4m3fn ...),
    ``"int"`` (int2 ... int8), ``"block"`` (mxfp4, mxfp8_e4m3 ...), ``"prune"`` or ``"svd"``;
    ValueError listing the names otherwise."""
    if name in known_formats():
        return "float"
    if name in INT_NAMES:
        return "int"
    if name in BLOCK_FORMATS:
        return "block"
    if name in ("prune", "svd"):
        return name
    raise ValueError(f"unknown method {name!r}; use a float format ({', '.join(known_formats())}), "
                     f"{', '.join(INT_NAMES)}, a block format ({', '.join(BLOCK_FORMATS)}), prune, svd, "
                     "or a chain such as prune,int8")


@dataclass
class Compressed:
    """One compressed tensor: the ``parts`` to store, its ``scheme``, the dense values a reader
    gets back (``approx``, in the source dtype; None when not kept) and its report ``row``."""

    parts: dict[str, np.ndarray]
    scheme: dict[str, Any]
    approx: np.ndarray | None
    row: TensorReport


def checksum_field(version: int) -> str:
    """The scheme field that holds a version's checksum: ``blake3`` from version 3, ``sha256`` before."""
    return "blake3" if version >= 3 else "sha256"


def _hasher(version: int) -> Any:
    # one thread: the job's thread policy already gives every core to a tensor in flight
    return blake3.blake3(max_threads=1) if version >= 3 else hashlib.sha256()


def parts_digest(parts: dict[str, np.ndarray], version: int = 1) -> str:
    """The checksum (SHA-256 before scheme version 3, BLAKE3 from it) over the parts' names, dtypes,
    shapes and bytes, in name order."""
    h = _hasher(version)
    for k in sorted(parts):
        a = parts[k]
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)  # the bytes in place: no copy
    return h.hexdigest()


def scheme_digest(parts: dict[str, np.ndarray], scheme: dict[str, Any]) -> str:
    """The checksum of the scheme's version (2: SHA-256, 3: BLAKE3) over the scheme (every field but the
    checksum's, as canonical JSON) and the parts."""
    version = scheme.get("version")
    if isinstance(version, bool) or version not in (2, 3):
        raise ValueError(f"scheme_digest: version 2 or 3, got {version!r:.40}")
    field = checksum_field(version)
    body = json.dumps({k: v for k, v in scheme.items() if k != field}, sort_keys=True, separators=(",", ":"))
    h = _hasher(version)
    h.update(body.encode())
    h.update(parts_digest(parts, version).encode())
    return h.hexdigest()


def seal(parts: dict[str, np.ndarray], scheme: dict[str, Any]) -> dict[str, Any]:
    """``scheme`` with its checksum field set (see :func:`scheme_digest`); returned for chaining."""
    digest = scheme_digest(parts, scheme)  # refuses a version without a scheme checksum
    scheme[checksum_field(scheme["version"])] = digest
    return scheme


def _header(a: np.ndarray, chain: Chain) -> dict[str, Any]:
    return {"version": SCHEME_VERSION, "shape": list(a.shape), "dtype": NP_TO_ST[a.dtype], "chain": chain.describe()}


def rows_streamable(chain: Chain, shape: tuple[int, ...]) -> bool:
    """Whether ``chain`` encodes a tensor of ``shape`` row block by row block (a row-independent
    value method, no structure, two dimensions): what :func:`compress_row_blocks` takes."""
    values = chain.values
    return (chain.structure is None and values is not None and getattr(values, "rows_independent", False)
            and len(shape) == 2 and shape[0] > 0 and shape[1] > 0)


def compress_row_blocks(name: str, shape: tuple[int, ...], dtype: np.dtype,
                        blocks: Iterable[tuple[int, int, np.ndarray]], chain: Chain, *, keep_approx: bool = False,
                        metrics: bool = True) -> Compressed | None:
    """:func:`compress_tensor` of a finite tensor given as its rows in order (``(first row, end
    row, rows)``, each block used only until the next is asked for, as
    :meth:`~lowbit.checkpoint.io.Checkpoint.row_blocks` reads them): the same codes, scales and
    scheme, without the whole tensor in memory. For chains where :func:`rows_streamable`; None
    where the chain's form would not be smaller than the tensor (``compress_tensor`` then stores
    it dense, from the whole tensor)."""
    ref = np.broadcast_to(np.zeros((), dtype), shape)  # the tensor's name, shape and bytes for the report
    c = _by_rows(name, ref, chain, keep_approx, metrics, blocks)
    return c if c.row.bytes_after < ref.nbytes else None


def _by_rows(name: str, a: np.ndarray, chain: Chain, keep_approx: bool, metrics: bool,
             blocks: Iterable[tuple[int, int, np.ndarray]] | None = None) -> Compressed:
    """A row-independent value method on blocks of rows: the same codes and scales as the
    whole-tensor path, with memory near the source tensor plus its codes. ``blocks``: the rows
    of ``a`` (then only its shape and dtype are used), else slices of ``a``."""
    method = chain.values
    assert method is not None
    store = ValueStore(method, a.dtype)
    if blocks is None:
        blocks = ((r0, r1, a[r0:r1]) for r0, r1 in row_spans(a.shape[0], a.shape[1] * 4, ROW_BLOCK_BYTES))
    codes: np.ndarray | None = None  # the whole tensor's, each block's copied in while it is in the cache
    side: dict[str, list[np.ndarray]] = {}
    acc = MetricsAccumulator()
    approx = np.empty(a.shape, a.dtype) if keep_approx else None
    scheme: dict[str, Any] = {}
    for r0, r1, block in blocks:
        if a.dtype == np.float32:  # measured against the source itself: the method may do both in one pass
            enc = method.encode_measured(block, acc if metrics else None, name, values=approx is not None)
            if approx is not None:
                approx[r0:r1] = enc.values
        else:
            enc = store.encode(block.astype(np.float32), name)
            deq = enc.values.astype(a.dtype, copy=False)
            if metrics:
                acc.add(block, deq)
            if approx is not None:
                approx[r0:r1] = deq
        if enc.codes.shape[:1] != (r1 - r0,):
            raise AssertionError(f"{method.describe()} is row-independent but gave codes of shape "
                                 f"{list(enc.codes.shape)} for {r1 - r0} rows")
        if codes is None:
            codes = enc.codes if r1 == a.shape[0] else np.empty((a.shape[0], *enc.codes.shape[1:]), enc.codes.dtype)
        if codes is not enc.codes:
            codes[r0:r1] = enc.codes
        for k, v in enc.side.items():
            side.setdefault(k, []).append(v)
        scheme = enc.scheme

    def joined(pieces: list[np.ndarray]) -> np.ndarray:
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    assert codes is not None  # a 2-D tensor with rows gives at least one block
    whole = EncodedValues(codes, {k: joined(v) for k, v in side.items()}, scheme, np.empty(0, np.float32))
    parts, fields_ = store.store(whole)
    out = {**_header(a, chain), "structure": {"kind": "none"}, **fields_}
    seal(parts, out)
    label = " + ".join(out["chain"])
    row = TensorReport.from_metrics(name, a, acc.result(), method=label, bytes_after=parts_nbytes(parts)) if metrics \
        else TensorReport.unmeasured(name, a, method=label, bytes_after=parts_nbytes(parts))
    return Compressed(parts, out, approx, row)


def compress_tensor(name: str, a: np.ndarray, chain: Chain, *, keep_approx: bool = True,
                    metrics: bool = True, solution: Solution | None = None) -> Compressed:
    """Apply ``chain`` to one finite floating-point array ``a`` (any float dtype, including bfloat16).

    The stored form is the smaller of the chain's form and the dense reconstruction in the
    source dtype. Raises :class:`NotApplied` when a method would save nothing (SVD above the
    break-even rank). ``keep_approx=False`` spares the methods that can skip it the dense
    reconstruction (``approx`` is then None); large row-independent integer schemes then run
    block by block without materialising it.
    ``metrics=False`` skips the error metrics: the report row carries the bytes only.
    ``solution``: what a calibrated solver decided for this tensor (GPTQ's codes and params,
    SparseGPT's or Wanda's mask; :func:`lowbit.checkpoint.calibrated.solve`), stored in the chain's
    own form instead of the chain deciding; the error is measured against ``solution.reference``
    (default: ``a``)."""
    if solution is not None:
        return _compress_solved(name, a, chain, solution, keep_approx, metrics)
    values = chain.values
    if rows_streamable(chain, a.shape):
        c = _by_rows(name, a, chain, keep_approx, metrics)
        if c.row.bytes_after < a.nbytes:
            return c
    x = a.astype(np.float32, copy=False)  # no copy for float32 sources: peak memory per tensor
    structure = chain.structure if chain.structure is not None else NoStructure()
    store = ValueStore(values, a.dtype)
    acc = MetricsAccumulator() if metrics and a.dtype == np.float32 else None
    if a.dtype == np.float32:  # measured against the source itself: the method may do both in fewer passes
        parts, fields_, recon = structure.encode_measured(x, store, acc, name, recon=keep_approx)
    else:
        parts, fields_, recon = structure.encode(x, store, name)
    if parts_nbytes(parts) >= a.nbytes:  # the method's form would not be smaller: store its result dense
        if recon is None:
            parts, fields_, recon = structure.encode(x, store, name)
        parts, fields_ = {"values": recon.astype(a.dtype, copy=False)}, {
            "structure": {"kind": "none"}, "values": {"kind": "none"}, "values_part": {}, "values_count": int(a.size)}
    approx = recon.astype(a.dtype, copy=False) if recon is not None else None
    scheme = {**_header(a, chain), **fields_}
    seal(parts, scheme)
    method = " + ".join(scheme["chain"])
    nbytes = parts_nbytes(parts)
    if not metrics:
        row = TensorReport.unmeasured(name, a, method=method, bytes_after=nbytes)
    elif acc is not None:
        row = TensorReport.from_metrics(name, a, acc.result(), method=method, bytes_after=nbytes)
    else:
        assert approx is not None  # encode always reconstructs
        row = TensorReport.measure(name, a, approx, method=method, bytes_after=nbytes)
    return Compressed(parts, scheme, approx if keep_approx else None, row)


def _compress_solved(name: str, a: np.ndarray, chain: Chain, solution: Solution, keep_approx: bool,
                     metrics: bool) -> Compressed:
    if solution.values.shape != a.shape:
        raise ValueError(f"the solution has shape {list(solution.values.shape)}, the tensor {list(a.shape)}")
    structure = chain.structure if chain.structure is not None else NoStructure()
    store = ValueStore(chain.values, a.dtype)
    parts, fields_, recon = structure.encode_solved(solution, store, name)
    if parts_nbytes(parts) >= a.nbytes:
        parts, fields_ = {"values": recon.astype(a.dtype, copy=False)}, {
            "structure": {"kind": "none"}, "values": {"kind": "none"}, "values_part": {}, "values_count": int(a.size)}
    approx = recon.astype(a.dtype, copy=False)
    scheme = {**_header(a, chain), **fields_}
    seal(parts, scheme)
    method = " + ".join(scheme["chain"])
    nbytes = parts_nbytes(parts)
    if metrics:
        ref = a if solution.reference is None else solution.reference
        row = TensorReport.from_metrics(name, a, error_metrics(ref, approx), method=method, bytes_after=nbytes)
    else:
        row = TensorReport.unmeasured(name, a, method=method, bytes_after=nbytes)
    return Compressed(parts, scheme, approx if keep_approx else None, row)


def restore(name: str, scheme: dict[str, Any], parts: dict[str, np.ndarray]) -> np.ndarray:
    """Rebuild the dense tensor (source dtype) from its stored ``parts`` and ``scheme``
    (the inverse of :func:`compress_tensor`, bit for bit what its report measured)."""
    if not isinstance(scheme, dict):
        raise ValueError(f"{name}: the scheme is not a JSON object")
    version = scheme.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ValueError(f"{name}: unknown scheme version {version!r:.40} (this lowbit reads {READABLE_VERSIONS})")
    digest = parts_digest(parts) if version == 1 else scheme_digest(parts, scheme)
    if digest != scheme.get(checksum_field(version)):
        raise ValueError(f"{name}: checksum mismatch: the stored parts or the scheme are corrupted")
    shape = stored_shape(scheme.get("shape"))
    dt = scheme.get("dtype")
    src = ST_TO_NP.get(dt) if isinstance(dt, str) else None
    if src is None or src.kind not in "fV":
        raise ValueError(f"{name}: scheme field dtype must name a floating-point dtype, got {dt!r:.40}")
    structure = scheme.get("structure")
    if not isinstance(structure, dict) or not isinstance(structure.get("kind"), str):
        raise ValueError(f"{name}: scheme field structure must be an object with a kind")
    out = structure_method_class(structure["kind"]).decode(parts, scheme, shape, src)
    if out.shape != shape:
        raise ValueError(f"{name}: the stored parts rebuild shape {list(out.shape)}, not {list(shape)}")
    return out.astype(src, copy=False)


def names_matching(key: str, names: Iterable[str]) -> list[str]:
    """The checkpoint tensor names that a model's parameter name ``key`` stands for: the same name, or else
    each name that ends with ``key`` (or that ``key`` ends with) after a ``.`` (a wrapper's prefix such as
    sentence-transformers' ``0.auto_model.``, or a head's ``model.``)."""
    names = list(names)
    if key in names:
        return [key]
    return [n for n in names if key.endswith("." + n) or n.endswith("." + key)]

