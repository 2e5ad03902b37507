"""QuantSpec: one frozen, validated description of an integer quantization scheme.

Granularity is data (``PerTensor``, ``PerChannel``, ``PerGroup``) and every
granularity reduces to one *block shape* for a given tensor shape: each
block of that shape shares one scale and zero point. Every function in
``quant`` works on blocks, so there is one code path for all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per index along ``kept_axis`` (0 = output channels of a weight, or
    rows/tokens of an activation); every other axis is reduced."""

    kept_axis: int = 0


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``size`` consecutive elements along ``reduced_axis`` (default the
    last, i.e. input features of a Linear weight), per index of every other axis."""

    size: int = 128
    reduced_axis: int = -1


Granularity = Union[PerTensor, PerChannel, PerGroup]


@dataclass(frozen=True)
class QuantSpec:
    """An integer scheme: ``bits`` (2..8), ``signed``, ``symmetric`` or affine,
    ``narrow_range`` (signed only: drop the most negative code, e.g. [-127, 127]),
    and ``granularity``.

    Code range: signed ``[-2**(bits-1), 2**(bits-1) - 1]`` (narrow: lower bound + 1),
    unsigned ``[0, 2**bits - 1]``. Symmetric schemes have zero point 0 (signed)
    or the middle code (unsigned, 128 for 8 bits, as torch.ao).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: Granularity = field(default_factory=PerTensor)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)) or not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec: bits must be an integer from 2 to 8, got {self.bits!r}")
        for flag in ("signed", "symmetric", "narrow_range"):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise TypeError(f"QuantSpec: {flag} must be True or False, got {getattr(self, flag)!r}")
        if self.narrow_range and not self.signed:
            raise ValueError("QuantSpec: narrow_range applies to signed codes only; use signed=True "
                             "or narrow_range=False")
        g = self.granularity
        if not isinstance(g, (PerTensor, PerChannel, PerGroup)):
            raise TypeError(f"QuantSpec: granularity must be PerTensor(), PerChannel(kept_axis) or PerGroup(size, reduced_axis), "
                            f"got {g!r}")
        if isinstance(g, PerGroup) and (isinstance(g.size, bool) or not isinstance(g.size, (int, np.integer))
                                        or g.size < 1):
            raise ValueError(f"QuantSpec: PerGroup size must be a positive integer, got {g.size!r}")
        for a in ("kept_axis", "reduced_axis"):
            if hasattr(g, a) and (isinstance(getattr(g, a), bool) or not isinstance(getattr(g, a), (int, np.integer))):
                raise TypeError(f"QuantSpec: {type(g).__name__} {a} must be an integer, got {getattr(g, a)!r}")

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(1 << (self.bits - 1)) + int(self.narrow_range)
        return 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def code_dtype(self) -> np.dtype:
        """int8 for signed, uint8 for unsigned codes."""
        return np.dtype(np.int8 if self.signed else np.uint8)

    @property
    def symmetric_zero_point(self) -> int:
        return 0 if self.signed else 1 << (self.bits - 1)

    def block_shape(self, shape: tuple[int, ...], name: str = "x") -> tuple[int, ...]:
        """The block of elements sharing one scale, for a tensor of ``shape``."""
        shape = tuple(int(s) for s in shape)
        g = self.granularity
        if isinstance(g, PerTensor):
            return shape
        nd = len(shape)
        if nd == 0:
            raise ValueError(f"{name}: {type(g).__name__} needs at least a 1-D tensor, got a 0-d scalar; "
                             "use PerTensor()")
        given = g.kept_axis if isinstance(g, PerChannel) else g.reduced_axis
        if not -nd <= given < nd:
            raise ValueError(f"{name}: axis {given} is out of range for a {nd}-D tensor of shape {shape}")
        ax = given % nd
        if isinstance(g, PerChannel):
            return tuple(1 if i == ax else s for i, s in enumerate(shape))
        if shape[ax] % g.size:
            raise ValueError(f"{name}: PerGroup(size={g.size}) does not divide axis {ax} of length {shape[ax]}; "
                             f"choose a group size that divides {shape[ax]}")
        return tuple(g.size if i == ax else 1 for i, s in enumerate(shape))

    def params_shape(self, shape: tuple[int, ...], name: str = "x") -> tuple[int, ...]:
        """Shape of the scale / zero-point arrays: ``shape // block_shape`` (ones where reduced)."""
        b = self.block_shape(shape, name)
        return tuple(s // k if k else 1 for s, k in zip(shape, b))

    def describe(self) -> str:
        g = self.granularity
        gran = ("per-tensor" if isinstance(g, PerTensor) else f"per-channel(kept_axis={g.kept_axis})"
                if isinstance(g, PerChannel) else f"per-group(size={g.size}, reduced_axis={g.reduced_axis})")
        return (f"{'' if self.signed else 'u'}int{self.bits} {'symmetric' if self.symmetric else 'affine'}"
                f"{' narrow' if self.narrow_range else ''} {gran}")

    def to_dict(self) -> dict:
        g = self.granularity
        d = {"bits": self.bits, "signed": self.signed, "symmetric": self.symmetric,
             "narrow_range": self.narrow_range, "granularity": type(g).__name__}
        d.update({k: v for k, v in vars(g).items()})
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        kinds = {"PerTensor": PerTensor, "PerChannel": PerChannel, "PerGroup": PerGroup}
        gk = d.get("granularity", "PerTensor")
        if gk not in kinds:
            raise ValueError(f"unknown granularity {gk!r}; expected one of {sorted(kinds)}")
        gargs = {k: d[k] for k in ("kept_axis", "reduced_axis", "size") if k in d}
        if "axis" in d:  # the name used before kept_axis/reduced_axis; same meaning per granularity
            gargs["kept_axis" if gk == "PerChannel" else "reduced_axis"] = d["axis"]
        return cls(bits=d.get("bits", 8), signed=d.get("signed", True), symmetric=d.get("symmetric", True),
                   narrow_range=d.get("narrow_range", False), granularity=kinds[gk](**gargs))
