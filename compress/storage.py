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

import numpy as np

from precision._bridge import contiguous


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
        idx = [slice(None)] * len(self.shape)
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
