"""Compression chains for whole checkpoints, mapped onto the library's own functions.

A chain is at most one *structure* step (``prune`` / ``svd``) followed by at
most one *values* step (a float format or an integer scheme). Each tensor is
stored as named parts (``NAME::codes``, ``NAME::scale``, ``NAME::mask`` ...)
and described by a JSON scheme, from which ``restore`` rebuilds the dense
tensor bit for bit as the report measured it. The maths lives in
``precision``, ``quant`` and ``compress``; this module only wires it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compress import low_rank, magnitude_prune, nm_prune, structured_prune
from compress.storage import NM, pack_bits, unpack_bits
from precision import cast, decode, get_format
from precision.metrics import MetricsAccumulator
from precision.report import TensorReport
from quant import PerChannel, PerGroup, PerTensor, QParams, QuantSpec, calibrate, dequantize, quantize

from .checkpoint import NP_TO_ST, ST_TO_NP

SCHEME_VERSION = 1


@dataclass(frozen=True)
class Step:
    """One step of a chain: ``kind`` in prune | svd | float | int, with its options."""

    kind: str
    options: dict = field(default_factory=dict)

    def describe(self) -> str:
        o = self.options
        if self.kind == "float":
            return o["format"] + ("" if o.get("scaling", "none") == "none" else f"/{o['scaling']}")
        if self.kind == "int":
            return QuantSpec.from_dict(o["spec"]).describe() + f" {o.get('method', 'minmax')}"
        if self.kind == "prune":
            return f"prune {o['how']} {o.get('sparsity', '')}".strip()
        return f"svd {o.get('method', 'exact')} " + ", ".join(f"{k}={o[k]}" for k in ("ratio", "energy", "rank") if o.get(k) is not None)


def validate_chain(chain: list[Step]) -> None:
    structure = [s for s in chain if s.kind in ("prune", "svd")]
    values = [s for s in chain if s.kind in ("float", "int")]
    if len(structure) > 1 or len(values) > 1:
        raise ValueError("a chain holds at most one prune/svd step and one float/int step (e.g. prune,int8)")
    if structure and values and chain.index(structure[0]) > chain.index(values[0]):
        raise ValueError("put the prune/svd step before the float/int step (e.g. prune,int8)")
    for s in chain:
        if s.kind not in ("prune", "svd", "float", "int"):
            raise ValueError(f"unknown step kind {s.kind!r}")


# ------------------------------------------------------------------ values
def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """Two 4-bit unsigned codes per byte (low nibble first)."""
    flat = u.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(p: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(p.size * 2, np.uint8)
    out[0::2] = p & 0x0F
    out[1::2] = p >> 4
    return out[:n]


def _values_encode(x: np.ndarray, step: Step | None, src_dtype: np.dtype, name: str = "x") -> tuple[dict, dict, np.ndarray]:
    """(parts, scheme, dense reconstruction) of a dense float32 array under a values step.
    The part named ``"dense"`` (if any) has x's shape and may be sparsified by the structure step."""
    if step is None:
        stored = x.astype(src_dtype)
        return {"dense": stored}, {"kind": "none"}, stored.astype(np.float32, copy=False)
    o = step.options
    if step.kind == "float":
        c = cast(x, o["format"], scaling=o.get("scaling", "none"), axis=0, rounding=o.get("rounding", "nearest_even"),
                 overflow=o.get("overflow", "ieee"), seed=o.get("seed"))
        parts = {"dense": c.codes}
        if c.scale is not None:
            parts["scale"] = c.scale
        return parts, {"kind": "float", "format": o["format"], "scaling": c.scaling}, c.values().astype(np.float32, copy=False)
    spec = QuantSpec.from_dict(o["spec"])
    opts = {k: o[k] for k in ("percentile",) if k in o}
    qp = calibrate(x, spec, o.get("method", "minmax"), name=name, **opts)
    codes = np.asarray(quantize(x, qp, name=name))
    parts = {"dense": codes, "scale": qp.scale}
    if not spec.symmetric:
        parts["zero_point"] = qp.zero_point
    return parts, {"kind": "int", "spec": spec.to_dict()}, np.asarray(dequantize(codes, qp), np.float32)


def _values_decode(parts: dict, vs: dict, shape: tuple[int, ...], src_dtype: np.dtype) -> np.ndarray:
    kind = vs["kind"]
    if kind == "none":
        return parts["dense"].reshape(shape).astype(np.float32)
    if kind == "float":
        v = decode(parts["dense"].reshape(shape), vs["format"])
        return v if "scale" not in parts else (v * parts["scale"]).astype(np.float32)
    spec = QuantSpec.from_dict(vs["spec"])
    scale = parts["scale"]
    zp = parts.get("zero_point", np.full(scale.shape, spec.symmetric_zero_point if spec.symmetric else 0, np.int32))
    qp = QParams(scale, zp, spec, shape)
    return np.asarray(dequantize(parts["dense"].reshape(shape).astype(spec.code_dtype), qp), np.float32)


def _dense_part_store(codes: np.ndarray, vs: dict) -> tuple[np.ndarray, dict]:
    """Integer codes of <= 4 bits are packed two per byte (offset to unsigned)."""
    if vs["kind"] == "int":
        spec = QuantSpec.from_dict(vs["spec"])
        if spec.bits <= 4:
            return pack_nibbles((codes.astype(np.int16) - spec.qmin).astype(np.uint8)), {"packed": 4, "qmin": spec.qmin}
    return codes, {}


def _dense_part_load(stored: np.ndarray, info: dict, n: int, dtype: np.dtype) -> np.ndarray:
    if info.get("packed") == 4:
        return (unpack_nibbles(stored, n).astype(np.int16) + info["qmin"]).astype(dtype)
    return stored


# --------------------------------------------------------------- compress
@dataclass
class Compressed:
    parts: dict[str, np.ndarray]   # part name -> array to store
    scheme: dict[str, Any]
    approx: np.ndarray | None      # what load() will return (source dtype); None if not kept
    row: TensorReport


def _code_dtype(vs: dict, src_dtype: np.dtype) -> np.dtype:
    if vs["kind"] == "none":
        return src_dtype
    if vs["kind"] == "float":
        return get_format(vs["format"]).storage_dtype
    return QuantSpec.from_dict(vs["spec"]).code_dtype


ROW_BLOCK_BYTES = 32 << 20  # float32 bytes of one row block when rows can be quantized independently


def _rows_independent(a: np.ndarray, chain: list[Step]) -> bool:
    """True for a plain integer step whose scales never span rows (per output channel, or groups
    along the last axis) on a 2-D tensor large enough for blocking to matter."""
    if len(chain) != 1 or chain[0].kind != "int" or a.ndim != 2 or a.size * 4 <= ROW_BLOCK_BYTES:
        return False
    g = QuantSpec.from_dict(chain[0].options["spec"]).granularity
    return (isinstance(g, PerChannel) and g.axis in (0, -2)) or (isinstance(g, PerGroup) and g.axis in (1, -1))


def _compress_int_by_rows(name: str, a: np.ndarray, step: Step, scheme: dict, keep_approx: bool) -> Compressed:
    """``_values_encode`` on blocks of rows: the same codes and scales as the whole-tensor path
    (rows are independent), with memory near the source tensor plus its codes."""
    src = a.dtype
    rows_per = max(1, ROW_BLOCK_BYTES // (a.shape[1] * 4))
    blocks: dict[str, list[np.ndarray]] = {}
    acc = MetricsAccumulator()
    approx = np.empty(a.shape, src) if keep_approx else None
    for r0 in range(0, a.shape[0], rows_per):
        r1 = min(r0 + rows_per, a.shape[0])
        bparts, vs, recon = _values_encode(a[r0:r1].astype(np.float32, copy=False), step, src, name)
        for k, v in bparts.items():
            blocks.setdefault(k, []).append(v)
        deq = recon.astype(src, copy=False)
        acc.add(a[r0:r1], deq)
        if approx is not None:
            approx[r0:r1] = deq
    joined = {k: np.concatenate(v) for k, v in blocks.items()}
    stored, pinfo = _dense_part_store(joined.pop("dense"), vs)
    parts = {"values": stored, **joined}
    scheme.update(structure={"kind": "none"}, values=vs, values_part=pinfo, values_count=int(a.size))
    scheme["sha256"] = parts_digest(parts)
    row = TensorReport.from_metrics(name, a, acc.result(), method=" + ".join(scheme["chain"]),
                                    bytes_after=sum(p.nbytes for p in parts.values()))
    return Compressed(parts, scheme, approx, row)


def compress_tensor(name: str, a: np.ndarray, chain: list[Step], *, keep_approx: bool = True) -> Compressed:
    """Apply ``chain`` to one floating-point tensor ``a`` (numpy, any float dtype).

    ``keep_approx=False`` lets large per-row integer schemes run block by block without
    materialising the dequantized tensor (``Compressed.approx`` is then None)."""
    src = a.dtype
    if _rows_independent(a, chain):
        return _compress_int_by_rows(name, a, chain[0], {"version": SCHEME_VERSION, "shape": list(a.shape),
                                                         "dtype": NP_TO_ST[src],
                                                         "chain": [s.describe() for s in chain]}, keep_approx)
    x = a.astype(np.float32, copy=False)  # no copy for float32 sources: peak memory per tensor
    structure = next((s for s in chain if s.kind in ("prune", "svd")), None)
    values = next((s for s in chain if s.kind in ("float", "int")), None)
    parts: dict[str, np.ndarray] = {}
    scheme: dict[str, Any] = {"version": SCHEME_VERSION, "shape": list(a.shape), "dtype": NP_TO_ST[src],
                              "chain": [s.describe() for s in chain]}
    if structure is None or (structure.kind == "prune" and structure.options["how"] in ("magnitude", "nm")):
        target = x
        st: dict[str, Any] = {"kind": "none"}
        keep = None
        if structure is not None:
            o = structure.options
            if o["how"] == "magnitude":
                r = magnitude_prune(x, o["sparsity"], name=name)
                keep = np.asarray(r.mask)
                parts["mask"] = pack_bits(keep)
                st = {"kind": "magnitude", "sparsity": o["sparsity"]}
            else:
                r = nm_prune(x, o["n"], o["m"], name=name)
                keep = np.asarray(r.mask)
                pos = np.asarray(r.storage.positions)
                parts["positions"] = pos
                st = {"kind": "nm", "n": o["n"], "m": o["m"]}
            target = np.asarray(r.weight, np.float32)
        vparts, vs, recon = _values_encode(target, values, src, name)
        dense = vparts.pop("dense")
        if keep is not None:
            dense = dense.reshape(-1)[keep.reshape(-1)]
            recon = np.where(keep, recon, np.float32(0))
        stored, pinfo = _dense_part_store(dense, vs)
        parts["values"] = stored
        parts.update(vparts)
        scheme.update(structure=st, values=vs, values_part=pinfo, values_count=int(dense.size))
    elif structure.kind == "prune":  # structured
        o = structure.options
        r = structured_prune(x, o["sparsity"], axis=o.get("axis", 0), norm=o.get("norm", 2), name=name)
        kept = np.asarray(r.kept)
        keep = np.zeros(x.shape[r.axis], bool)
        keep[kept] = True
        parts["kept"] = pack_bits(keep)
        small = np.asarray(r.weight, np.float32)
        vparts, vs, recon_small = _values_encode(small, values, src, name)
        stored, pinfo = _dense_part_store(vparts.pop("dense"), vs)
        parts["values"] = stored
        parts.update(vparts)
        recon = np.zeros(x.shape, np.float32)
        idx = [slice(None)] * x.ndim
        idx[r.axis] = kept
        recon[tuple(idx)] = recon_small
        scheme.update(structure={"kind": "structured", "axis": int(r.axis), "small_shape": list(small.shape)},
                      values=vs, values_part=pinfo, values_count=int(small.size))
    else:  # svd
        o = structure.options
        if x.ndim != 2:
            raise ValueError(f"{name}: svd needs a 2-D tensor, got shape {x.shape}")
        lr = low_rank(x, o.get("rank"), ratio=o.get("ratio"), energy=o.get("energy"), method=o.get("method", "exact"),
                      force=o.get("force", False), name=name)
        if not lr.applied:
            raise NotApplied(lr.report.tensors[0].method)
        recons = []
        fs: dict[str, Any] = {}
        for f in ("A", "B"):
            fac = np.asarray(getattr(lr.storage, f), np.float32)
            vparts, vs, rf = _values_encode(fac, values, src if src != np.float64 else np.dtype(np.float32),
                                            f"{name}.{f}")
            stored, pinfo = _dense_part_store(vparts.pop("dense"), vs)
            parts[f"{f}.values"] = stored
            parts.update({f"{f}.{k}": v for k, v in vparts.items()})
            fs[f] = {"shape": list(fac.shape), "values": vs, "values_part": pinfo, "values_count": int(fac.size)}
            recons.append(rf)
        recon = (recons[0].astype(np.float64) @ recons[1].astype(np.float64)).astype(np.float32)
        scheme.update(structure={"kind": "svd", "rank": lr.rank}, factors=fs)
    approx = recon.astype(src, copy=False)
    scheme["sha256"] = parts_digest(parts)
    row = TensorReport.measure(name, a, approx, method=" + ".join(scheme["chain"]) or "copy",
                               bytes_after=sum(p.nbytes for p in parts.values()))
    return Compressed(parts, scheme, approx, row)


class NotApplied(Exception):
    """The method would not save memory for this tensor (e.g. SVD above the break-even rank)."""



def parts_digest(parts: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(parts):
        a = np.ascontiguousarray(parts[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def restore(name: str, scheme: dict, parts: dict[str, np.ndarray]) -> np.ndarray:
    """Rebuild the dense tensor from its stored ``parts`` and ``scheme`` (inverse of compress_tensor)."""
    if scheme.get("version") != SCHEME_VERSION:
        raise ValueError(f"{name}: unknown scheme version {scheme.get('version')!r}")
    if parts_digest(parts) != scheme.get("sha256"):
        raise ValueError(f"{name}: checksum mismatch: the stored parts are corrupted")
    shape = tuple(scheme["shape"])
    src = ST_TO_NP[scheme["dtype"]]
    st = scheme["structure"]
    n = int(np.prod(shape, dtype=np.int64))
    if st["kind"] in ("none", "magnitude", "nm"):
        vs = scheme["values"]
        cdt = _code_dtype(vs, src)
        vals = _dense_part_load(parts["values"], scheme["values_part"], scheme["values_count"], cdt)
        if st["kind"] == "none":
            dense = vals.reshape(shape)
            keep = None
        else:
            if st["kind"] == "magnitude":
                keep = unpack_bits(parts["mask"], n).reshape(shape)
            else:
                keep = NM.kept_mask(parts["positions"], shape, st["n"], st["m"])
            dense = np.zeros(n, vals.dtype)
            dense[keep.reshape(-1)] = vals
            dense = dense.reshape(shape)
        other = {k: v for k, v in parts.items() if k not in ("values", "mask", "positions")}
        recon = _values_decode({"dense": dense, **other}, vs, shape, src)
        if keep is not None:
            recon = np.where(keep, recon, np.float32(0))
    elif st["kind"] == "structured":
        vs = scheme["values"]
        small_shape = tuple(st["small_shape"])
        vals = _dense_part_load(parts["values"], scheme["values_part"], scheme["values_count"], _code_dtype(vs, src))
        other = {k: v for k, v in parts.items() if k not in ("values", "kept")}
        small = _values_decode({"dense": vals.reshape(small_shape), **other}, vs, small_shape, src)
        kept = np.flatnonzero(unpack_bits(parts["kept"], shape[st["axis"]]))
        recon = np.zeros(shape, np.float32)
        idx = [slice(None)] * len(shape)
        idx[st["axis"]] = kept
        recon[tuple(idx)] = small
    elif st["kind"] == "svd":
        facs = []
        for f in ("A", "B"):
            info = scheme["factors"][f]
            fsrc = src if src != np.float64 else np.dtype(np.float32)
            vals = _dense_part_load(parts[f"{f}.values"], info["values_part"], info["values_count"],
                                    _code_dtype(info["values"], fsrc))
            other = {k[len(f) + 1:]: v for k, v in parts.items() if k.startswith(f + ".") and k != f"{f}.values"}
            facs.append(_values_decode({"dense": vals.reshape(info["shape"]), **other}, info["values"],
                                       tuple(info["shape"]), fsrc))
        recon = (facs[0].astype(np.float64) @ facs[1].astype(np.float64)).astype(np.float32)
    else:
        raise ValueError(f"{name}: unknown structure {st['kind']!r}")
    return recon.astype(src, copy=False)


def int_step(bits: int = 8, granularity: str = "channel", group_size: int = 128, affine: bool = False,
             narrow_range: bool = False, method: str = "minmax", percentile: float | None = None) -> Step:
    g = {"tensor": PerTensor(), "channel": PerChannel(0), "group": PerGroup(group_size)}[granularity]
    spec = QuantSpec(bits=bits, signed=True, symmetric=not affine, narrow_range=narrow_range, granularity=g)
    o: dict[str, Any] = {"spec": spec.to_dict(), "method": method}
    if percentile is not None:
        o["percentile"] = percentile
    return Step("int", o)
