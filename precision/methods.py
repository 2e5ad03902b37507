"""Compression methods as typed configs that own their stored form, found by name in one registry.

A method is a frozen, validated dataclass in the package that owns its maths
(a float cast in ``precision``, integer quantization in ``quant``, pruning and
low rank in ``compress``). There are two roles:

* a **value method** (:class:`ValueMethod`) turns every element of a tensor into
  a code (``encode``) plus side arrays such as scales, and back (``decode``);
  it also says how its codes are packed into bytes (``pack`` / ``unpack``);
* a **structure method** (:class:`StructureMethod`) decides which values are
  stored at all (a mask, N:M positions, kept rows, two factors) and hands the
  stored values to a value method through a :class:`ValueStore`.

A checkpoint writer composes at most one structure method followed by at most
one value method and writes the named parts; the JSON scheme that each method
returns is what a reader needs to rebuild the tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

import numpy as np
from numpy.typing import DTypeLike

from .metrics import MetricsAccumulator


@dataclass
class EncodedValues:
    """The output of a value method on one tensor.

    ``codes``: one code per element, the tensor's shape, in the method's code
    dtype (not yet packed). ``side``: named side arrays (``scale``,
    ``zero_point``). ``scheme``: JSON-serialisable description that ``decode``
    reads back. ``values``: the float32 reconstruction, equal to what ``decode``
    returns."""

    codes: np.ndarray
    side: dict[str, np.ndarray]
    scheme: dict[str, Any]
    values: np.ndarray


@dataclass
class Solution:
    """What a calibrated solver (GPTQ, AWQ, SparseGPT, Wanda) decided for one tensor, for a method to
    store instead of deciding itself.

    ``values``: the float32 values to store (the tensor's shape; on the integer grid of ``qparams``
    and zero where ``keep`` is False). ``keep``: the kept mask (bool, the tensor's shape) or None.
    ``qparams``: the integer params (``quant.QParams``) the values lie on, or None. ``reference``:
    the float tensor the error is measured against (None: the source tensor; AWQ gives the scaled
    weight, whose input was divided by the same scale)."""

    values: np.ndarray
    keep: np.ndarray | None = None
    qparams: Any = None
    reference: np.ndarray | None = None


class Method(ABC):
    """Base of every method config: a name in the registry and a JSON form."""

    kind: ClassVar[str]
    role: ClassVar[str]

    @abstractmethod
    def describe(self) -> str:
        """A short human-readable name, e.g. ``"int8 symmetric per-channel(axis=0) minmax"``."""

    def check_shape(self, shape: tuple[int, ...], name: str = "x") -> None:
        """Raise ValueError (naming ``name`` and the fix) if a tensor of ``shape`` cannot take
        this method; called on every selected tensor before any work starts."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}}  # type: ignore[arg-type]


# ------------------------------------------------------- checks of stored schemes
# A scheme comes from a file; nothing in it is trusted. Before anything is allocated, every
# count and shape must be backed by the byte sizes of the stored parts (see ``restore``).
MAX_DIMS = 64  # numpy's limit on dimensions: the most any stored shape may have
UNPROVEN_ELEMENTS = 1 << 20  # a tensor whose stored parts prove no size (everything pruned) may declare this many


def stored_int(v: Any, what: str, lo: int = 0, hi: int | None = None) -> int:
    """A scheme field that must be an integer in [lo, hi]; ValueError naming it otherwise."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise ValueError(f"scheme field {what} must be an integer in [{lo}, {'...' if hi is None else hi}], got {v!r}")
    return v


def stored_shape(v: Any, what: str = "shape") -> tuple[int, ...]:
    """A scheme shape: a list of at most MAX_DIMS non-negative integers."""
    if not isinstance(v, list) or len(v) > MAX_DIMS:
        raise ValueError(f"scheme field {what} must be a list of at most {MAX_DIMS} integers, got {v!r:.80}")
    return tuple(stored_int(d, what) for d in v)


def elements(shape: tuple[int, ...]) -> int:
    """The element count of ``shape`` as a Python integer (no int64 wrap-around)."""
    n = 1
    for d in shape:
        n *= d
    return n


def stored_part(parts: dict[str, np.ndarray], key: str, dtype: DTypeLike | None = None,
                size: int | None = None) -> np.ndarray:
    """The part ``key``, checked for presence, dtype and element count."""
    p = parts.get(key)
    if p is None:
        raise ValueError(f"the stored part {key!r} is missing")
    if dtype is not None and p.dtype != np.dtype(dtype):
        raise ValueError(f"the stored part {key!r} is {p.dtype}, expected {np.dtype(dtype)}")
    if size is not None and p.size != size:
        raise ValueError(f"the stored part {key!r} holds {p.size} elements, expected {size}")
    return p


def _jsonable(v: Any) -> Any:
    to_dict = getattr(v, "to_dict", None)
    return to_dict() if callable(to_dict) else v


class ValueMethod(Method):
    """A method that stores every element as a code (see the module docstring)."""

    role: ClassVar[str] = "values"

    @abstractmethod
    def encode(self, x: np.ndarray, name: str = "x") -> EncodedValues:
        """Encode ``x`` (any real float dtype; a finite array)."""

    def encode_measured(self, x: np.ndarray, acc: MetricsAccumulator | None, name: str = "x", *,
                        values: bool = True) -> EncodedValues:
        """``encode(x)`` for a finite float32 ``x``, adding the error of the encoded values against
        ``x`` to ``acc`` (unless None). A method that can measure while it encodes overrides this to
        do both in one pass; with ``values=False`` it may leave ``values`` empty when the caller
        needs only the codes and the error. The codes, side arrays and scheme are those of ``encode``."""
        enc = self.encode(x, name)
        if acc is not None:
            acc.add(x, enc.values)
        return enc

    def encode_solved(self, solution: Solution, name: str = "x") -> EncodedValues:
        """Store ``solution.values`` with the params a solver chose. Methods with no params to give
        encode the values as they are; a method that cannot take ``solution.qparams`` refuses."""
        if solution.qparams is not None:
            raise ValueError(f"{name}: a {self.describe()} tensor cannot store integer params chosen by a solver; "
                             "use an integer method (int2 ... int8) with it")
        return self.encode(solution.values, name)

    @classmethod
    @abstractmethod
    def decode(cls, codes: np.ndarray, side: dict[str, np.ndarray], scheme: dict[str, Any],
               src_dtype: np.dtype) -> np.ndarray:
        """float32 values of ``codes`` (already unpacked, in the tensor's shape)."""

    @classmethod
    @abstractmethod
    def code_dtype(cls, scheme: dict[str, Any], src_dtype: np.dtype) -> np.dtype:
        """The dtype of unpacked codes."""

    @classmethod
    def pack(cls, codes: np.ndarray, scheme: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Codes (1-D) as stored bytes, plus what ``unpack`` needs. Default: stored as they are."""
        return codes, {}

    @classmethod
    def unpack(cls, stored: np.ndarray, info: dict[str, Any], count: int, dtype: np.dtype) -> np.ndarray:
        """Inverse of ``pack``: ``count`` codes of ``dtype`` (1-D)."""
        return stored

    @classmethod
    def check_packed(cls, stored: np.ndarray, info: dict[str, Any], count: int, dtype: np.dtype) -> None:
        """ValueError unless ``stored`` holds exactly ``count`` codes of ``dtype`` as ``pack`` writes them
        (called on untrusted input before ``unpack``). Default: stored as they are."""
        if info:
            raise ValueError(f"unexpected packing {info!r:.80} for {cls.kind} codes")
        if stored.dtype != dtype or stored.size != count:
            raise ValueError(f"{stored.size} codes of {stored.dtype} are stored where the scheme says {count} of {dtype}")


@dataclass(frozen=True)
class Copy(ValueMethod):
    """The identity value method: elements are stored in the source dtype, bit for bit."""

    kind: ClassVar[str] = "none"

    def describe(self) -> str:
        return "copy"

    def encode(self, x: np.ndarray, name: str = "x") -> EncodedValues:
        return EncodedValues(x, {}, {"kind": self.kind}, x.astype(np.float32, copy=False))

    @classmethod
    def decode(cls, codes, side, scheme, src_dtype):
        return codes.astype(np.float32)

    @classmethod
    def code_dtype(cls, scheme, src_dtype):
        return src_dtype

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


class ValueStore:
    """A value method bound to a source dtype, used by structure methods to store their values.

    The parts it writes are ``values`` (the packed codes) and the method's side
    arrays; the scheme fields are ``values`` (the method's scheme),
    ``values_part`` (packing info) and ``values_count`` (number of codes)."""

    def __init__(self, method: ValueMethod | None, src_dtype: np.dtype) -> None:
        self.method: ValueMethod = method if method is not None else Copy()
        self.src_dtype = np.dtype(src_dtype)

    def with_dtype(self, src_dtype: np.dtype) -> "ValueStore":
        return ValueStore(self.method, src_dtype)

    def encode(self, x: np.ndarray, name: str = "x") -> EncodedValues:
        if isinstance(self.method, Copy):
            return self.method.encode(x.astype(self.src_dtype, copy=False), name)
        return self.method.encode(x, name)

    def encode_solved(self, solution: Solution, name: str = "x") -> EncodedValues:
        if isinstance(self.method, Copy):
            return self.method.encode(solution.values.astype(self.src_dtype, copy=False), name)
        return self.method.encode_solved(solution, name)

    def store(self, enc: EncodedValues, keep: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(parts, scheme fields) of ``enc``; ``keep`` (bool, the tensor's shape) stores only those codes
        (1-D); without it the codes keep the tensor's shape unless the method packs them."""
        codes = enc.codes if keep is None else enc.codes.reshape(-1)[keep.reshape(-1)]
        stored, info = self.method.pack(codes, enc.scheme)
        return {"values": stored, **enc.side}, {"values": enc.scheme, "values_part": info,
                                                "values_count": int(codes.size)}

    @staticmethod
    def codes(parts: dict[str, np.ndarray], fields_: dict[str, Any], src_dtype: np.dtype) -> np.ndarray:
        """The unpacked codes (1-D) that ``store`` wrote; the count is checked against the stored bytes."""
        values = fields_.get("values")
        if not isinstance(values, dict) or not isinstance(values.get("kind"), str):
            raise ValueError("scheme field values must be an object with a kind")
        cls = value_method_class(values["kind"])
        dt = np.dtype(cls.code_dtype(values, src_dtype))
        info = fields_.get("values_part", {})
        if not isinstance(info, dict):
            raise ValueError("scheme field values_part must be an object")
        count = stored_int(fields_.get("values_count"), "values_count")
        cls.check_packed(stored_part(parts, "values"), info, count, dt)
        return cls.unpack(parts["values"], info, count, dt)

    @staticmethod
    def decode(codes: np.ndarray, parts: dict[str, np.ndarray], fields_: dict[str, Any],
               shape: tuple[int, ...], src_dtype: np.dtype) -> np.ndarray:
        """float32 values of ``codes`` (the tensor's shape) with the side arrays in ``parts``."""
        if codes.size != elements(shape):
            raise ValueError(f"{codes.size} codes are stored for shape {list(shape)} ({elements(shape)} elements)")
        cls = value_method_class(fields_["values"]["kind"])
        side = {k: v for k, v in parts.items() if k != "values"}
        return cls.decode(codes.reshape(shape), side, fields_["values"], src_dtype)


class StructureMethod(Method):
    """A method that chooses what is stored and delegates the stored values to a :class:`ValueStore`."""

    role: ClassVar[str] = "structure"

    @abstractmethod
    def encode(self, x: np.ndarray, store: ValueStore, name: str = "x") -> tuple[dict[str, np.ndarray], dict[str, Any], np.ndarray]:
        """(parts, scheme fields, float32 reconstruction) of a float32 tensor ``x``."""

    def encode_measured(self, x: np.ndarray, store: ValueStore, acc: MetricsAccumulator | None, name: str = "x", *,
                        recon: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any], np.ndarray | None]:
        """``encode`` of a finite float32 ``x`` stored from a float32 source, adding the error of the
        reconstruction against ``x`` to ``acc`` (unless None). A method that can measure while it
        encodes overrides this to do both in fewer passes; with ``recon=False`` it may return None for
        the reconstruction. The parts and scheme fields are those of ``encode``."""
        parts, fields_, r = self.encode(x, store, name)
        if acc is not None:
            acc.add(x, r)
        return parts, fields_, r

    def encode_solved(self, solution: Solution, store: ValueStore,
                      name: str = "x") -> tuple[dict[str, np.ndarray], dict[str, Any], np.ndarray]:
        """``encode`` of what a solver decided (the kept mask and the values): (parts, scheme fields,
        float32 reconstruction). Methods that choose no mask of their own refuse a solution with one."""
        raise ValueError(f"{name}: {self.describe()} cannot store what a calibrated solver decided")

    @classmethod
    @abstractmethod
    def decode(cls, parts: dict[str, np.ndarray], scheme: dict[str, Any], shape: tuple[int, ...],
               src_dtype: np.dtype) -> np.ndarray:
        """The float32 tensor from what ``encode`` returned (``scheme`` is the whole scheme)."""


class NotApplied(Exception):
    """The method would not save memory for this tensor (e.g. SVD above the break-even rank);
    the tensor is kept as it is and the message says why."""


_REGISTRY: dict[tuple[str, str], type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register_method(cls: M) -> M:
    """Class decorator: make a method config findable by ``(role, kind)``."""
    key = (cls.role, cls.kind)
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise ValueError(f"a {cls.role} method named {cls.kind!r} is already registered")
    _REGISTRY[key] = cls
    return cls


def method_class(role: str, kind: str) -> type[Method]:
    try:
        return _REGISTRY[(role, kind)]
    except KeyError:
        known = sorted(k for r, k in _REGISTRY if r == role)
        raise ValueError(f"unknown {role} method {kind!r}; known: {', '.join(known)}") from None


def value_method_class(kind: str) -> type[ValueMethod]:
    cls = method_class("values", kind)
    assert issubclass(cls, ValueMethod)
    return cls


def structure_method_class(kind: str) -> type[StructureMethod]:
    cls = method_class("structure", kind)
    assert issubclass(cls, StructureMethod)
    return cls


def registered_methods() -> dict[str, list[str]]:
    """The registered method names by role, e.g. ``{"structure": [...], "values": [...]}``."""
    out: dict[str, list[str]] = {}
    for role, kind in sorted(_REGISTRY):
        out.setdefault(role, []).append(kind)
    return out


register_method(Copy)


def parts_nbytes(parts: dict[str, np.ndarray]) -> int:
    """Bytes stored by a set of named parts."""
    return sum(int(p.nbytes) for p in parts.values())


@dataclass(frozen=True)
class NoStructure(StructureMethod):
    """Every element is stored (the structure of a chain with no prune or low-rank step)."""

    kind: ClassVar[str] = "none"

    def describe(self) -> str:
        return "dense"

    def encode(self, x, store, name="x"):
        enc = store.encode(x, name)
        parts, fields_ = store.store(enc)
        return parts, {"structure": {"kind": self.kind}, **fields_}, enc.values

    def encode_measured(self, x, store, acc, name="x", *, recon=True):
        if isinstance(store.method, Copy):
            return super().encode_measured(x, store, acc, name, recon=recon)
        enc = store.method.encode_measured(x, acc, name, values=recon)  # the value method measures as it encodes
        parts, fields_ = store.store(enc)
        return parts, {"structure": {"kind": self.kind}, **fields_}, enc.values if enc.values.size == x.size else None

    def encode_solved(self, solution, store, name="x"):
        if solution.keep is not None:
            raise ValueError(f"{name}: a pruned solution needs a prune method (magnitude or nm) to store its mask")
        enc = store.encode_solved(solution, name)
        parts, fields_ = store.store(enc)
        return parts, {"structure": {"kind": self.kind}, **fields_}, enc.values

    @classmethod
    def decode(cls, parts, scheme, shape, src_dtype):
        return ValueStore.decode(ValueStore.codes(parts, scheme, src_dtype), parts, scheme, shape, src_dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


def sparse_or_dense(structure: dict[str, Any], index: dict[str, np.ndarray], enc: EncodedValues, keep: np.ndarray,
                    store: ValueStore) -> tuple[dict[str, np.ndarray], dict[str, Any], np.ndarray]:
    """Store the codes of ``enc`` where ``keep`` is True plus the ``index`` parts that locate them,
    or, when that is not smaller, every code dense (structure ``none``: the pruned zeros are
    ordinary codes then). Returns (parts, scheme fields, float32 reconstruction)."""
    sparse, sfields = store.store(enc, keep)
    dense, dfields = store.store(enc)
    if parts_nbytes(index) + parts_nbytes(sparse) < parts_nbytes(dense):
        return {**index, **sparse}, {"structure": structure, **sfields}, np.where(keep, enc.values, np.float32(0))
    return dense, {"structure": {"kind": "none"}, **dfields}, enc.values


register_method(NoStructure)
