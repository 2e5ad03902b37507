"""Storing tensors in a float format, optionally scaled, with the report of what it costs.

``cast(x, fmt, scaling=...)`` is what a checkpoint writer stores: the codes
of ``fmt`` and, when scaled, a float32 scale so that ``absmax`` maps to
``fmt.max_finite`` (per tensor, or per channel along ``axis``). The values a
reader gets back are ``decode(codes) * scale`` computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from .arrays import as_numpy, real_array, require_finite
from .codec import check_modes, decode, decode_table, encode, encode_row_scaled, row_absmax
from .formats import FloatFormat, FormatLike, get_format, known_formats
from .methods import EncodedValues, Solution, ValueMethod, register_method, stored_part
from .metrics import MetricsAccumulator, decode_measure_c
from .report import Report, TensorReport

SCALINGS = ("none", "tensor", "channel")


@dataclass
class Cast:
    """A tensor stored in ``fmt``: ``codes`` (storage dtype), ``scale`` (float32 or None)."""

    codes: np.ndarray
    scale: np.ndarray | None
    fmt: FloatFormat
    scaling: str
    axis: int

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: one code per element in the storage dtype, plus the scales."""
        return int(self.codes.nbytes + (self.scale.nbytes if self.scale is not None else 0))

    def values(self) -> np.ndarray:
        """Dequantized float32 values, ``decode(codes) * scale``."""
        v = decode(self.codes, self.fmt)
        return v if self.scale is None else v * self.scale


def cast(x: Any, fmt: FormatLike, *, scaling: str = "none", axis: int = 0, rounding: str = "nearest_even",
         overflow: str = "ieee", seed: int | None = None, subnormals: str = "keep") -> Cast:
    """Encode ``x`` in ``fmt``; with ``scaling`` "tensor"/"channel" divide by a float32 scale first.

    The scale is ``absmax / max_finite`` (1.0 for an all-zero tensor or
    channel), so no finite value overflows; float64 input whose scale would
    exceed the float32 range is a ValueError. ``axis`` is the channel axis
    (kept; every other axis is reduced). NaN/inf in a scaled tensor is a
    ValueError, since it would poison the scale.
    """
    fmt = get_format(fmt)
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    a = real_array(x)
    if scaling == "none":
        return Cast(np.asarray(encode(a, fmt, rounding=rounding, overflow=overflow, seed=seed, subnormals=subnormals)),
                    None, fmt, scaling, axis)
    a = a.astype(np.float32, copy=False) if a.dtype != np.float64 else a
    if scaling == "channel" and a.ndim < 1:
        raise ValueError("scaling='channel' needs at least a 1-D tensor")
    ax = axis % a.ndim if scaling == "channel" else 0
    # one C pass checks finiteness and finds max |a| where the scale is per tensor or per index of axis 0;
    # it gives None for NaN or inf, and require_finite then names the problem
    fast = row_absmax(a, a.shape[0] if scaling == "channel" else 1) if ax == 0 else None
    if fast is not None:
        amax = fast.reshape([-1] + [1] * (a.ndim - 1)) if scaling == "channel" else fast.reshape(())
    else:
        require_finite(a, "x", "a scaled cast")
        if scaling == "channel":
            red = tuple(i for i in range(a.ndim) if i != ax)
            # max |a| as max(max a, -min a): two reductions, no |a| temporary (the sign of a zero amax is unused)
            amax = np.maximum(np.max(a, axis=red, keepdims=True), -np.min(a, axis=red, keepdims=True)) if a.size \
                else np.zeros([1] * a.ndim)
        else:
            amax = np.asarray(max(np.max(a), -np.min(a)) if a.size else 0.0).reshape(())
    ideal = amax.astype(np.float64) / fmt.max_finite
    if not np.all(ideal <= np.finfo(np.float32).max):
        raise ValueError(f"x: values up to {float(np.max(amax)):.4g} need a scale beyond float32 to fit "
                         f"{fmt.name}; scaled casts keep float32 scales")
    scale = ideal.astype(np.float32)
    # tiny tensors get subnormal scales; those carry few bits, so round up where rounding lost
    # enough that absmax would no longer fit; an all-zero channel gets scale 1
    up = (scale.astype(np.float64) * fmt.max_finite < amax) & (scale < np.finfo(np.float32).tiny)
    scale = np.where(up, np.nextafter(scale, np.float32(np.inf)), scale)
    scale = np.where(amax > 0, np.maximum(scale, np.float32(np.finfo(np.float32).smallest_subnormal)),
                     np.float32(1.0)).astype(np.float32)
    codes = encode_row_scaled(a, scale, fmt, rounding, overflow, subnormals) \
        if scale.size == 1 or (scaling == "channel" and ax == 0) else None
    if codes is None:
        codes = encode(a / scale.astype(a.dtype), fmt, rounding=rounding, overflow=overflow, seed=seed,
                       subnormals=subnormals)
    return Cast(np.asarray(codes), scale, fmt, scaling, axis)


def cast_report(tensors: Any, fmt: FormatLike, *, scaling: str = "none", axis: int = 0,
                rounding: str = "nearest_even", overflow: str = "ieee", name: str = "x",
                subnormals: str = "keep") -> Report:
    """Report of storing each tensor in ``fmt`` (a single tensor, or a mapping name -> tensor)."""
    fmt = get_format(fmt)
    items = tensors.items() if isinstance(tensors, Mapping) else [(name, tensors)]
    rep = Report(title=f"cast to {fmt.name}" + ("" if scaling == "none" else f" ({scaling} scale)"))
    for n, t in items:
        c = cast(t, fmt, scaling=scaling, axis=axis, rounding=rounding, overflow=overflow, subnormals=subnormals)
        ref = as_numpy(t, n)
        rep.add(TensorReport.measure(n, ref, c.values(), method=fmt.name + ("" if scaling == "none" else f"/{scaling}"),
                                     bytes_after=c.nbytes))
    return rep


def _native_dtype(fmt: FloatFormat) -> np.dtype | None:
    """The numpy dtype safetensors stores ``fmt``'s values as (None where it has none, or for fp32)."""
    if fmt.safetensors_dtype is None or fmt.numpy_dtype is None or fmt.bits == 32:
        return None
    return np.dtype(fmt.numpy_dtype)


_NATIVE_DTYPES = frozenset(d for d in (_native_dtype(get_format(n)) for n in known_formats()) if d is not None)


@register_method
@dataclass(frozen=True)
class FloatCast(ValueMethod):
    """Store every element in a float format (the checkpoint method behind ``fp16``, ``fp8_e4m3fn`` ...).

    ``format``: a registered format name. ``scaling``: ``"none"``, ``"tensor"`` or
    ``"channel"`` (one float32 scale per index of ``axis``, the output channel: 0 for weights stored
    (out, in), 1 for transformers' ``Conv1D`` weights stored (in, out)):
    the scale maps absmax to the format's max finite value. ``rounding``,
    ``overflow`` and ``subnormals`` are the codec's modes (see :mod:`precision.codec`);
    ``seed`` is required for stochastic rounding.
    Stored parts: the codes in the format's storage dtype, and ``scale`` when scaled.
    """

    kind: ClassVar[str] = "float"
    format: str = "fp16"
    scaling: str = "none"
    rounding: str = "nearest_even"
    overflow: str = "ieee"
    seed: int | None = None
    subnormals: str = "keep"
    axis: int = 0

    def __post_init__(self) -> None:
        get_format(self.format)  # raises with the list of known formats
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise TypeError(f"FloatCast: axis must be an integer, got {self.axis!r}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"FloatCast: scaling must be one of {SCALINGS}, got {self.scaling!r}")
        check_modes(self.rounding, self.overflow, self.subnormals)
        if self.rounding == "stochastic" and self.seed is None:
            raise ValueError("FloatCast: rounding='stochastic' needs a seed (e.g. seed=0) to be reproducible")
        if self.rounding != "stochastic" and self.seed is not None:
            raise ValueError("FloatCast: seed applies to rounding='stochastic' only; drop it or set that rounding")

    @classmethod
    def for_format(cls, format: str, **options: Any) -> "FloatCast":
        """A cast whose scaling defaults to ``"channel"`` for formats of 8 bits or fewer
        (their range is too small for raw weights) and ``"none"`` otherwise."""
        if options.get("scaling") is None:
            options["scaling"] = "channel" if get_format(format).bits <= 8 else "none"
        return cls(format, **options)

    def describe(self) -> str:
        return self.format + ("" if self.scaling == "none" else f"/{self.scaling}") + (
            f"(axis={self.axis})" if self.axis and self.scaling == "channel" else "")

    def encode(self, x: np.ndarray, name: str = "x") -> EncodedValues:
        c = cast(x.astype(np.float32, copy=False), self.format, scaling=self.scaling, axis=self.axis, rounding=self.rounding,
                 overflow=self.overflow, seed=self.seed, subnormals=self.subnormals)
        side = {} if c.scale is None else {"scale": c.scale}
        return EncodedValues(c.codes, side, {"kind": self.kind, "format": self.format, "scaling": c.scaling},
                             c.values().astype(np.float32, copy=False))

    def encode_solved(self, solution: Solution, name: str = "x") -> EncodedValues:
        """The codes of ``solution.values`` under the solver's ``solution.qparams``: the :class:`Cast` of
        the source whose scale the solver kept (GPTQ), instead of a scale from the values themselves.
        Values on that grid give back the solver's codes exactly. Without params, as :meth:`encode`."""
        c = solution.qparams
        if c is None:
            return self.encode(solution.values, name)
        if not isinstance(c, Cast) or c.fmt.name != get_format(self.format).name or c.scaling != self.scaling:
            raise ValueError(f"{name}: the solver's params are not a {self.describe()} cast")
        x = np.ascontiguousarray(solution.values, np.float32)
        # nearest, whatever the method's rounding: values on the grid divide back to within float32
        # rounding of a code's value, which a directed rounding could push to its neighbour
        codes = encode(x if c.scale is None else x / c.scale, self.format, rounding="nearest_even",
                       overflow=self.overflow, subnormals=self.subnormals)
        got = Cast(np.asarray(codes), c.scale, c.fmt, c.scaling, c.axis)
        side = {} if c.scale is None else {"scale": c.scale}
        return EncodedValues(got.codes, side, {"kind": self.kind, "format": self.format, "scaling": c.scaling},
                             got.values().astype(np.float32, copy=False))

    @property
    def rows_independent(self) -> bool:
        """True when rows of a 2-D tensor encode alike alone or together (no scale, or one per row,
        and no random stream), so large tensors are encoded block by block."""
        return (self.scaling == "none" or (self.scaling == "channel" and self.axis in (0, -2))) \
            and self.rounding != "stochastic"

    def encode_measured(self, x: np.ndarray, acc: MetricsAccumulator | None, name: str = "x", *,
                        values: bool = True) -> EncodedValues:
        """``encode`` with the error measured on the way: the codes as ``encode`` makes them, then one C
        pass decodes them through the format's table, applies the scale and measures (formats of 16 bits
        or fewer); with ``values=False`` and no metrics, nothing is decoded at all."""
        if self.scaling == "channel" and self.axis not in (0, -2):  # the fused pass takes one scale per row
            return super().encode_measured(x, acc, name, values=values)
        c = cast(x.astype(np.float32, copy=False), self.format, scaling=self.scaling, axis=self.axis, rounding=self.rounding,
                 overflow=self.overflow, seed=self.seed, subnormals=self.subnormals)
        side = {} if c.scale is None else {"scale": c.scale}
        scheme = {"kind": self.kind, "format": self.format, "scaling": c.scaling}
        if acc is None:
            return EncodedValues(c.codes, side, scheme, c.values().astype(np.float32, copy=False) if values
                                 else np.empty(0, np.float32))
        # bfloat16 decodes by a shift, which the pass does without a table of 2^16 values
        table = None if c.fmt == get_format("bf16") else decode_table(c.fmt)
        fused = decode_measure_c(c.codes, table, x, c.scale, values=values) \
            if c.fmt.bits <= 16 and x.dtype == np.float32 else None
        if fused is None:
            v = c.values().astype(np.float32, copy=False)
            acc.add(x, v)
            return EncodedValues(c.codes, side, scheme, v)
        vals, sums, counts = fused
        acc.add_sums(sums, counts, x.size)
        return EncodedValues(c.codes, side, scheme, vals if vals is not None else np.empty(0, np.float32))

    @classmethod
    def decode(cls, codes: np.ndarray, side: dict[str, np.ndarray], scheme: dict[str, Any],
               src_dtype: np.dtype) -> np.ndarray:
        v = decode(codes, scheme["format"])
        if "scale" not in side:
            return v
        scale = stored_part(side, "scale", np.float32)
        # the scale must broadcast into the codes' shape (per tensor or per channel), never widen it
        if scale.ndim > v.ndim or any(s not in (1, d) for s, d in zip(scale.shape[::-1], v.shape[::-1])):
            raise ValueError(f"a scale of shape {list(scale.shape)} does not fit codes of shape {list(v.shape)}")
        return (v * scale).astype(np.float32)

    @classmethod
    def code_dtype(cls, scheme: dict[str, Any], src_dtype: np.dtype) -> np.dtype:
        return get_format(scheme["format"]).storage_dtype

    @classmethod
    def pack(cls, codes: np.ndarray, scheme: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """The codes viewed as the format's own dtype where safetensors has one (``F16``, ``BF16``,
        ``F8_E4M3``, ``F8_E5M2``), so that any safetensors reader sees what they are; the bits are
        the codes'. Other formats store their unsigned codes."""
        native = _native_dtype(get_format(scheme["format"]))
        return (codes.view(native) if native is not None else codes), {}

    @classmethod
    def unpack(cls, stored: np.ndarray, info: dict[str, Any], count: int, dtype: np.dtype) -> np.ndarray:
        return stored if stored.dtype == dtype else stored.view(dtype)

    @classmethod
    def check_packed(cls, stored: np.ndarray, info: dict[str, Any], count: int, dtype: np.dtype) -> None:
        """The codes stored as unsigned integers (files written before the native dtypes, still read) or
        as a float dtype of the same width that safetensors names."""
        if stored.dtype != dtype and not (stored.dtype in _NATIVE_DTYPES and stored.dtype.itemsize == dtype.itemsize):
            raise ValueError(f"{stored.dtype} codes are stored where the scheme says {dtype}")
        super().check_packed(stored.view(dtype) if stored.dtype != dtype else stored, info, count, dtype)
