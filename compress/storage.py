"""Storage formats that make pruning and low rank save real bytes, and read back exactly.

Each format is a small object with ``nbytes`` (what is stored), ``dense()``
(the tensor it represents, bit-exact), and ``tensors()`` / ``from_tensors``
to write it as named arrays (e.g. into a safetensors file).

Costs for an m x n float32 weight (d = 4 bytes per value):

* ``Bitmask`` (unstructured sparsity s): ``ceil(mn/8)`` bytes of mask plus
  ``(1-s) mn d`` of kept values; at 50% that is 53.1% of dense. When the
  dense tensor is smaller (sparsity below ~3%), the dense tensor is stored.
* ``NM`` (N:M along the last axis, e.g. 2:4): ``n/m`` of the values plus
  ``ceil(log2 m)`` bits per kept value for its in-group position: 2:4 costs
  50% + 1/32 = 53.1% of dense float32 (56.25% for fp16).
* Structured pruning stores the smaller dense tensor plus a bitmask of the
  kept rows/columns (``ceil(k/8)`` bytes).
* Low rank stores both factors: ``r (m + n) d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from precision.arrays import contiguous
from precision.methods import (UNPROVEN_ELEMENTS, Copy, NotApplied, Solution, StructureMethod, ValueStore, elements,
                               register_method, sparse_or_dense, stored_int, stored_part, stored_shape)

MAX_M = 1024  # N:M group size; in-group positions take log2(m) bits each


def pack_bits(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask.reshape(-1).astype(bool))


def unpack_bits(packed: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(packed, count=n).astype(bool)


@dataclass
class Bitmask:
    """Unstructured sparse tensor: packed bitmask + kept values in row-major order
    (or the dense tensor when that is smaller)."""

    shape: tuple[int, ...]
    values: np.ndarray
    mask: np.ndarray | None  # packed bits; None means ``values`` is the dense tensor

    @classmethod
    def from_dense(cls, w: np.ndarray) -> "Bitmask":
        keep = w.reshape(-1) != 0
        sparse_bytes = -(-w.size // 8) + int(keep.sum()) * w.itemsize
        if sparse_bytes >= w.nbytes:
            return cls(tuple(w.shape), contiguous(w).copy(), None)
        return cls(tuple(w.shape), w.reshape(-1)[keep].copy(), pack_bits(keep))

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + (0 if self.mask is None else self.mask.nbytes))

    def dense(self) -> np.ndarray:
        if self.mask is None:
            return self.values.reshape(self.shape)
        n = int(np.prod(self.shape))
        out = np.zeros(n, self.values.dtype)
        out[unpack_bits(self.mask, n)] = self.values
        return out.reshape(self.shape)

    def tensors(self) -> dict[str, np.ndarray]:
        return {"values": self.values} if self.mask is None else {"values": self.values, "mask": self.mask}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], shape: tuple[int, ...]) -> "Bitmask":
        return cls(tuple(shape), t["values"], t.get("mask"))


@dataclass
class NM:
    """N:M semi-structured sparse tensor along the last axis: ``n`` kept values per group of
    ``m`` and their in-group positions packed into ``ceil(log2 m)`` bits each."""

    shape: tuple[int, ...]
    n: int
    m: int
    values: np.ndarray  # (groups, n)
    positions: np.ndarray  # packed bits

    @staticmethod
    def bits_per_position(m: int) -> int:
        return max(1, int(np.ceil(np.log2(m))))

    @classmethod
    def from_dense(cls, w: np.ndarray, n: int, m: int, positions: np.ndarray) -> "NM":
        """``positions``: (groups, n) in-group indices of the kept values, ascending."""
        g = w.reshape(-1, m)
        vals = np.take_along_axis(g, positions, axis=1)
        b = cls.bits_per_position(m)
        bits = ((positions.reshape(-1, 1) >> np.arange(b)) & 1).astype(np.uint8)
        return cls(tuple(w.shape), n, m, vals.copy(), np.packbits(bits.reshape(-1)))

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.positions.nbytes)

    @classmethod
    def unpack_positions(cls, packed: np.ndarray, groups: int, n: int, m: int) -> np.ndarray:
        """(groups, n) in-group indices from their packed bits."""
        b = cls.bits_per_position(m)
        bits = np.unpackbits(packed, count=groups * n * b).reshape(groups * n, b).astype(np.int64)
        return (bits << np.arange(b)).sum(axis=1).reshape(groups, n)

    @classmethod
    def kept_mask(cls, packed: np.ndarray, shape: tuple[int, ...], n: int, m: int) -> np.ndarray:
        """Boolean mask (True = kept) of a tensor of ``shape`` from its packed positions."""
        groups = int(np.prod(shape)) // m
        mask = np.zeros((groups, m), bool)
        np.put_along_axis(mask, cls.unpack_positions(packed, groups, n, m), True, axis=1)
        return mask.reshape(shape)

    def dense(self) -> np.ndarray:
        groups = self.values.shape[0]
        out = np.zeros((groups, self.m), self.values.dtype)
        np.put_along_axis(out, self.unpack_positions(self.positions, groups, self.n, self.m), self.values, axis=1)
        return out.reshape(self.shape)

    def tensors(self) -> dict[str, np.ndarray]:
        return {"values": self.values, "positions": self.positions}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], shape: tuple[int, ...], n: int, m: int) -> "NM":
        return cls(tuple(shape), n, m, t["values"], t["positions"])


@dataclass
class Structured:
    """Rows (axis 0) or columns (axis 1) removed: the smaller dense tensor + a bitmask of kept slices."""

    shape: tuple[int, ...]
    axis: int
    values: np.ndarray
    kept_mask: np.ndarray  # packed bits over shape[axis]

    @classmethod
    def from_kept(cls, w: np.ndarray, kept: np.ndarray, axis: int) -> "Structured":
        keep = np.zeros(w.shape[axis], bool)
        keep[kept] = True
        return cls(tuple(w.shape), axis, np.take(w, kept, axis=axis).copy(), pack_bits(keep))

    @property
    def kept(self) -> np.ndarray:
        return np.flatnonzero(unpack_bits(self.kept_mask, self.shape[self.axis]))

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.kept_mask.nbytes)

    def dense(self) -> np.ndarray:
        out = np.zeros(self.shape, self.values.dtype)
        idx: list[Any] = [slice(None)] * len(self.shape)
        idx[self.axis] = self.kept
        out[tuple(idx)] = self.values
        return out

    def tensors(self) -> dict[str, np.ndarray]:
        return {"values": self.values, "kept": self.kept_mask}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], shape: tuple[int, ...], axis: int) -> "Structured":
        return cls(tuple(shape), axis, t["values"], t["kept"])


@dataclass
class Factors:
    """Low-rank factorization W ~= A @ B."""

    A: np.ndarray
    B: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.A.nbytes + self.B.nbytes)

    def dense(self) -> np.ndarray:
        return (self.A.astype(np.float64) @ self.B.astype(np.float64)).astype(self.A.dtype)

    def tensors(self) -> dict[str, np.ndarray]:
        return {"A": self.A, "B": self.B}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray]) -> "Factors":
        return cls(t["A"], t["B"])


# ------------------------------------------------------------------ methods
def _fraction(v: Any, what: str, cls: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not 0 <= v <= 1:
        raise ValueError(f"{cls}: {what} must be a fraction in [0, 1], got {v!r}")


@register_method
@dataclass(frozen=True)
class MagnitudePrune(StructureMethod):
    """Zero the ``sparsity`` fraction of smallest |w| of each tensor (see :func:`compress.magnitude_prune`).

    Stored: a packed bitmask and the kept values, or every value dense when that is
    not larger (below about 3% sparsity for float32)."""

    kind: ClassVar[str] = "magnitude"
    sparsity: float = 0.5

    def __post_init__(self) -> None:
        _fraction(self.sparsity, "sparsity", "MagnitudePrune")

    def describe(self) -> str:
        return f"prune magnitude {self.sparsity}"

    def encode(self, x, store, name="x"):
        from .prune import magnitude_prune

        r = magnitude_prune(x, self.sparsity, name=name)
        keep = np.asarray(r.mask)
        enc = store.encode(np.asarray(r.weight, np.float32), name)
        return sparse_or_dense({"kind": self.kind, "sparsity": self.sparsity}, {"mask": pack_bits(keep)}, enc,
                               keep, store)

    def encode_measured(self, x, store, acc, name="x", *, recon=True):
        """Values stored as they are (no value method) from a float32 tensor: the C pass selects, packs
        the mask, gathers the kept values and measures in a few passes (the same parts as ``encode``)."""
        from ._common import amount_to_count
        from ._native import magnitude_prune_c

        k = amount_to_count(x.size, self.sparsity, None)
        sparse_bytes = (x.size + 7) // 8 + 4 * (x.size - k)
        fused = None
        if isinstance(store.method, Copy) and store.src_dtype == np.float32 and sparse_bytes < x.nbytes:
            fused = magnitude_prune_c(x, k, dense=recon, metrics=acc is not None)
        if fused is None:  # the numpy path, which also decides when dense storage is smaller
            return super().encode_measured(x, store, acc, name, recon=recon)
        if acc is not None:
            assert fused.sums is not None and fused.counts is not None
            acc.add_sums(fused.sums, fused.counts, x.size)
        fields_ = {"structure": {"kind": self.kind, "sparsity": self.sparsity}, "values": {"kind": Copy.kind},
                   "values_part": {}, "values_count": int(fused.values.size)}
        return {"mask": fused.mask, "values": fused.values}, fields_, fused.dense

    def encode_solved(self, solution, store, name="x"):
        """The solver's mask and values (e.g. SparseGPT's or Wanda's), stored as :meth:`encode` stores
        its own: a bitmask and the kept values, or every value dense when that is not larger."""
        keep = _solved_mask(solution, name)
        enc = store.encode_solved(solution, name)
        return sparse_or_dense({"kind": self.kind, "sparsity": self.sparsity}, {"mask": pack_bits(keep)}, enc,
                               keep, store)

    @classmethod
    def decode(cls, parts, scheme, shape, src_dtype):
        n = elements(shape)
        keep = unpack_bits(stored_part(parts, "mask", np.uint8, (n + 7) // 8), n).reshape(shape)
        return _sparse_decode(keep, {k: v for k, v in parts.items() if k != "mask"}, scheme, shape, src_dtype)


def _solved_mask(solution: Solution, name: str) -> np.ndarray:
    keep = solution.keep
    if keep is None or keep.shape != solution.values.shape or keep.dtype != np.bool_:
        raise ValueError(f"{name}: a pruned solution needs a bool kept mask of the tensor's shape")
    return keep


def _sparse_decode(keep: np.ndarray, parts: dict[str, np.ndarray], scheme: dict[str, Any], shape: tuple[int, ...],
                   src_dtype: np.dtype) -> np.ndarray:
    vals = ValueStore.codes(parts, scheme, src_dtype)
    if int(keep.sum()) != vals.size:
        raise ValueError(f"the mask keeps {int(keep.sum())} values but {vals.size} are stored")
    codes = np.zeros(keep.size, vals.dtype)
    codes[keep.reshape(-1)] = vals
    recon = ValueStore.decode(codes.reshape(shape), parts, scheme, shape, src_dtype)
    return np.where(keep, recon, np.float32(0))


@register_method
@dataclass(frozen=True)
class NMPrune(StructureMethod):
    """Keep the ``n`` largest |w| of every ``m`` consecutive elements along the last axis (2:4 by
    default). Stored: the kept values and their packed in-group positions."""

    kind: ClassVar[str] = "nm"
    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        for v in (self.n, self.m):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"NMPrune: n and m must be integers, got n={self.n!r}, m={self.m!r}")
        if not 1 <= self.m <= MAX_M or not 0 <= self.n <= self.m:
            raise ValueError(f"NMPrune: N:M needs 0 <= n <= m and 1 <= m <= {MAX_M}, got {self.n}:{self.m}")

    def describe(self) -> str:
        return f"prune nm {self.n}:{self.m}"

    def check_shape(self, shape, name="x"):
        if not shape or shape[-1] % self.m:
            raise ValueError(f"{name}: {self.n}:{self.m} pruning needs a last axis that is a multiple of {self.m}, "
                             f"got shape {tuple(shape)}; exclude this tensor or choose another m")

    def encode(self, x, store, name="x"):
        from .prune import nm_prune

        r = nm_prune(x, self.n, self.m, name=name)
        keep = np.asarray(r.mask)
        enc = store.encode(np.asarray(r.weight, np.float32), name)
        return sparse_or_dense({"kind": self.kind, "n": self.n, "m": self.m},
                               {"positions": np.asarray(r.storage.positions)}, enc, keep, store)

    def encode_solved(self, solution, store, name="x"):
        """The solver's N:M mask and values (SparseGPT's or Wanda's); ValueError unless the mask keeps
        exactly ``n`` of every ``m`` consecutive elements along the last axis."""
        keep = _solved_mask(solution, name)
        self.check_shape(keep.shape, name)
        groups = keep.reshape(-1, self.m)
        if not (groups.sum(1) == self.n).all():
            raise ValueError(f"{name}: the solver's mask is not {self.n}:{self.m}")
        pos = np.nonzero(groups)[1].reshape(-1, self.n) if self.n else np.zeros((groups.shape[0], 0), np.int64)
        enc = store.encode_solved(solution, name)
        st = NM.from_dense(solution.values, self.n, self.m, pos)
        return sparse_or_dense({"kind": self.kind, "n": self.n, "m": self.m},
                               {"positions": np.asarray(st.positions)}, enc, keep, store)

    @classmethod
    def decode(cls, parts, scheme, shape, src_dtype):
        st = scheme["structure"]
        m = stored_int(st.get("m"), "structure.m", 1, MAX_M)
        n = stored_int(st.get("n"), "structure.n", 0, m)
        if not shape or shape[-1] % m:
            raise ValueError(f"shape {list(shape)} has no last axis that is a multiple of m={m}")
        groups = elements(shape) // m
        if n == 0 and elements(shape) > UNPROVEN_ELEMENTS:
            raise ValueError(f"0:{m} stores nothing that proves the shape {list(shape)}")
        bits = groups * n * NM.bits_per_position(m)
        keep = NM.kept_mask(stored_part(parts, "positions", np.uint8, (bits + 7) // 8), shape, n, m)
        return _sparse_decode(keep, {k: v for k, v in parts.items() if k != "positions"}, scheme, shape, src_dtype)


@register_method
@dataclass(frozen=True)
class StructuredPrune(StructureMethod):
    """Remove the ``sparsity`` fraction of slices along ``axis`` (0: output rows) with the smallest
    L``norm`` norm. Stored: the smaller dense tensor and a packed bitmask of the kept slices."""

    kind: ClassVar[str] = "structured"
    sparsity: float = 0.5
    axis: int = 0
    norm: int = 2

    def __post_init__(self) -> None:
        _fraction(self.sparsity, "sparsity", "StructuredPrune")
        if self.norm not in (1, 2) or isinstance(self.norm, bool):
            raise ValueError(f"StructuredPrune: norm must be 1 or 2, got {self.norm!r}")
        if isinstance(self.axis, bool) or not isinstance(self.axis, (int, np.integer)):
            raise TypeError(f"StructuredPrune: axis must be an integer, got {self.axis!r}")

    def describe(self) -> str:
        return f"prune structured {self.sparsity}"

    def check_shape(self, shape, name="x"):
        if len(shape) < 2 or not -len(shape) <= self.axis < len(shape):
            raise ValueError(f"{name}: structured pruning along axis {self.axis} needs a tensor of at least 2 "
                             f"dimensions that has that axis, got shape {tuple(shape)}")

    def encode(self, x, store, name="x"):
        from .prune import structured_prune

        r = structured_prune(x, self.sparsity, axis=self.axis, norm=self.norm, name=name)
        kept = np.asarray(r.kept)
        keep = np.zeros(x.shape[r.axis], bool)
        keep[kept] = True
        small = np.asarray(r.weight, np.float32)
        enc = store.encode(small, name)
        parts, fields_ = store.store(enc)
        recon = np.zeros(x.shape, np.float32)
        idx: list[Any] = [slice(None)] * x.ndim
        idx[int(r.axis or 0)] = kept
        recon[tuple(idx)] = enc.values
        return ({"kept": pack_bits(keep), **parts},
                {"structure": {"kind": self.kind, "axis": int(r.axis), "small_shape": list(small.shape)}, **fields_},
                recon)

    @classmethod
    def decode(cls, parts, scheme, shape, src_dtype):
        st = scheme["structure"]
        axis = stored_int(st.get("axis"), "structure.axis", 0, max(len(shape) - 1, 0))
        small_shape = stored_shape(st.get("small_shape"), "structure.small_shape")
        if len(shape) < 2 or len(small_shape) != len(shape) or any(
                s != d for i, (s, d) in enumerate(zip(small_shape, shape)) if i != axis):
            raise ValueError(f"structure.small_shape {list(small_shape)} does not match shape {list(shape)} "
                             f"outside axis {axis}")
        kept = np.flatnonzero(unpack_bits(stored_part(parts, "kept", np.uint8, (shape[axis] + 7) // 8), shape[axis]))
        if kept.size != small_shape[axis]:
            raise ValueError(f"the kept-slice mask keeps {kept.size} slices but {small_shape[axis]} are stored")
        if kept.size == 0 and elements(shape) > UNPROVEN_ELEMENTS:
            raise ValueError(f"no stored slice proves the shape {list(shape)}")
        rest = {k: v for k, v in parts.items() if k != "kept"}
        small = ValueStore.decode(ValueStore.codes(rest, scheme, src_dtype), rest, scheme, small_shape, src_dtype)
        recon = np.zeros(shape, np.float32)
        idx: list[Any] = [slice(None)] * len(shape)
        idx[st["axis"]] = kept
        recon[tuple(idx)] = small
        return recon


@register_method
@dataclass(frozen=True)
class LowRankSVD(StructureMethod):
    """Factor a 2-D tensor as ``A @ B`` by SVD (see :func:`compress.low_rank`). The rank comes from
    exactly one of ``ratio`` (fraction of parameters kept; 0.5 when none is given), ``energy`` (fraction of squared
    singular-value energy kept) or ``rank``. Tensors where the factors would not be smaller
    are kept as they are unless ``force``. Stored: both factors (under the chain's value method)."""

    kind: ClassVar[str] = "svd"
    ratio: float | None = None
    energy: float | None = None
    rank: int | None = None
    method: str = "exact"
    force: bool = False

    def __post_init__(self) -> None:
        from .lowrank import METHODS

        if self.ratio is None and self.energy is None and self.rank is None:
            object.__setattr__(self, "ratio", 0.5)
        if sum(v is not None for v in (self.ratio, self.energy, self.rank)) != 1:
            raise ValueError("LowRankSVD: give exactly one of ratio=, energy= or rank= (set the others to None)")
        for what in ("ratio", "energy"):
            if getattr(self, what) is not None:
                _fraction(getattr(self, what), what, "LowRankSVD")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer))
                                      or self.rank < 0):
            raise ValueError(f"LowRankSVD: rank must be a non-negative integer, got {self.rank!r}")
        if self.method not in METHODS:
            raise ValueError(f"LowRankSVD: method must be one of {METHODS}, got {self.method!r}")

    def describe(self) -> str:
        return f"svd {self.method} " + ", ".join(f"{k}={getattr(self, k)}" for k in ("ratio", "energy", "rank")
                                                 if getattr(self, k) is not None)

    def check_shape(self, shape, name="x"):
        if len(shape) != 2:
            raise ValueError(f"{name}: svd needs a 2-D tensor, got shape {tuple(shape)}; "
                             "exclude it (e.g. --exclude or a --min-ndim) or use another method")

    def encode(self, x, store, name="x"):
        from .lowrank import low_rank

        self.check_shape(x.shape, name)
        lr = low_rank(x, self.rank, ratio=self.ratio, energy=self.energy, method=self.method, force=self.force,
                      name=name)
        if not lr.applied:
            raise NotApplied(lr.report.tensors[0].method)
        fstore = store.with_dtype(_factor_dtype(store.src_dtype))
        parts: dict[str, np.ndarray] = {}
        fs: dict[str, Any] = {}
        recons = []
        for f in ("A", "B"):
            fac = np.asarray(getattr(lr.storage, f), np.float32)
            enc = fstore.encode(fac, f"{name}.{f}")
            fparts, fields_ = fstore.store(enc)
            parts.update({f"{f}.{k}": v for k, v in fparts.items()})
            fs[f] = {"shape": list(fac.shape), **fields_}
            recons.append(enc.values)
        recon = (recons[0].astype(np.float64) @ recons[1].astype(np.float64)).astype(np.float32)
        return parts, {"structure": {"kind": self.kind, "rank": lr.rank}, "factors": fs}, recon

    @classmethod
    def decode(cls, parts, scheme, shape, src_dtype):
        fdt = _factor_dtype(np.dtype(src_dtype))
        factors = scheme.get("factors")
        if not isinstance(factors, dict) or not all(isinstance(factors.get(f), dict) for f in ("A", "B")):
            raise ValueError("scheme field factors must hold objects A and B")
        fshapes = [stored_shape(factors[f].get("shape"), f"factors.{f}.shape") for f in ("A", "B")]
        if len(shape) != 2 or any(len(s) != 2 for s in fshapes) or fshapes[0][1] != fshapes[1][0] \
                or (fshapes[0][0], fshapes[1][1]) != tuple(shape):
            raise ValueError(f"factors of shapes {[list(s) for s in fshapes]} do not multiply to shape {list(shape)}")
        facs = []
        for f, fshape in zip(("A", "B"), fshapes):
            info = factors[f]
            fp = {k[len(f) + 1:]: v for k, v in parts.items() if k.startswith(f + ".")}
            facs.append(ValueStore.decode(ValueStore.codes(fp, info, fdt), fp, info, fshape, fdt))
        return (facs[0].astype(np.float64) @ facs[1].astype(np.float64)).astype(np.float32)


def _factor_dtype(src: np.dtype) -> np.dtype:
    """Factors of a float64 tensor are computed and stored in float32, like every other source."""
    return np.dtype(np.float32) if src == np.float64 else src
