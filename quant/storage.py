"""Integer quantization as a checkpoint method: codes, scales and zero points, with codes
of 4 bits or fewer packed two per byte."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from precision.methods import EncodedValues, Solution, ValueMethod, register_method, stored_part
from precision.metrics import MetricsAccumulator

from ._native.rtn import pack_nibbles_c, rtn_blocks
from .calibrate import METHODS, calibrate
from .quantize import QParams, dequantize, quantize
from .spec import PerChannel, PerGroup, QuantSpec


def _stored_spec(scheme: dict[str, Any]) -> QuantSpec:
    d = scheme.get("spec")
    if not isinstance(d, dict):
        raise ValueError("scheme field spec must be an object")
    return QuantSpec.from_dict(d)


def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """Two 4-bit unsigned codes per byte, low nibble first (an odd count is padded with 0)."""
    flat = u.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(p: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` 4-bit codes of ``pack_nibbles`` output, as uint8."""
    out = np.empty(p.size * 2, np.uint8)
    out[0::2] = p & 0x0F
    out[1::2] = p >> 4
    return out[:n]


def pack_codes(codes: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, dict[str, Any]]:
    """Codes as stored: 4 bits or fewer are offset by ``qmin`` to unsigned and packed two per
    byte; wider codes are stored one per byte. Returns (array, info for ``unpack_codes``)."""
    if spec.bits <= 4:
        packed = pack_nibbles_c(codes, spec.qmin)
        if packed is None:
            packed = pack_nibbles((codes.astype(np.int16) - spec.qmin).astype(np.uint8))
        return packed, {"packed": 4, "qmin": spec.qmin}
    return codes, {}


def unpack_codes(stored: np.ndarray, info: dict[str, Any], count: int, dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` codes of ``dtype`` (1-D)."""
    if info.get("packed") == 4:
        return (unpack_nibbles(stored, count).astype(np.int16) + info["qmin"]).astype(dtype)
    return stored


SCALE_DTYPES = ("float32", "bfloat16", "float16")


def round_scales_up(scale: np.ndarray, dtype: str) -> np.ndarray:
    """Positive float32 ``scale`` rounded up to the nearest value of ``dtype`` (``"float32"``: unchanged),
    returned as float32 (every bfloat16 and float16 value is one). ValueError if a scale exceeds the dtype."""
    s = np.asarray(scale, np.float32)
    if dtype == "float32":
        return s
    if dtype == "bfloat16":  # the top 16 bits of a float32; dropping nonzero low bits and stepping up rounds up
        bits = s.view(np.uint32)
        up = (bits & np.uint32(0xFFFF0000)) + np.where(bits & np.uint32(0xFFFF), np.uint32(0x10000), np.uint32(0))
        out = up.astype(np.uint32).view(np.float32)
    else:
        with np.errstate(over="ignore"):
            h = s.astype(np.float16)
        h = np.where(h.astype(np.float32) < s, np.nextafter(h, np.float16(np.inf)), h)
        out = h.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"a scale of {float(s.max()):.4g} exceeds {dtype}'s range")
    return out


@register_method
@dataclass(frozen=True)
class IntQuant(ValueMethod):
    """Integer quantization of a checkpoint tensor under ``spec``, calibrated by ``calibration``
    (one of ``quant.METHODS``; ``percentile`` is used by ``"percentile"`` only).

    Stored parts: the codes (packed two per byte at 4 bits or fewer), the float32
    ``scale`` and, for affine specs, the int32 ``zero_point``; one of each per block
    of ``spec.granularity``.

    ``scale_dtype``: ``"float32"`` (default), or ``"bfloat16"`` / ``"float16"`` for symmetric specs: each
    calibrated scale is rounded up to the nearest value of that dtype before the codes are computed (up,
    so no value that fitted the range is clipped), so that a reader holding scales in that dtype (transformers
    and vLLM hold them in a bfloat16 model's dtype) reads exactly the scales the codes were made with.
    """

    kind: ClassVar[str] = "int"
    spec: QuantSpec = field(default_factory=lambda: QuantSpec(granularity=PerChannel(0)))
    calibration: str = "minmax"
    percentile: float | None = None
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.spec, QuantSpec):
            raise TypeError(f"IntQuant: spec must be a QuantSpec, got {type(self.spec).__name__}")
        if self.calibration not in METHODS:
            raise ValueError(f"IntQuant: calibration must be one of {METHODS}, got {self.calibration!r}")
        if self.percentile is not None:
            if self.calibration != "percentile":
                raise ValueError("IntQuant: percentile applies to calibration='percentile' only")
            if not 0 < self.percentile <= 100:
                raise ValueError(f"IntQuant: percentile must be in (0, 100], got {self.percentile}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"IntQuant: scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        if self.scale_dtype != "float32" and not self.spec.symmetric:
            raise ValueError("IntQuant: scale_dtype other than float32 applies to symmetric specs (an affine zero point "
                             "would have to move with the rounded scale)")

    def describe(self) -> str:
        return f"{self.spec.describe()} {self.calibration}" + (
            "" if self.scale_dtype == "float32" else f" {self.scale_dtype} scales")

    def stored_params(self, qp: QParams) -> QParams:
        """``qp`` with its scales rounded up to ``scale_dtype`` (unchanged for float32)."""
        if self.scale_dtype == "float32":
            return qp
        return replace(qp, scale=round_scales_up(qp.scale, self.scale_dtype))

    def check_shape(self, shape: tuple[int, ...], name: str = "x") -> None:
        self.spec.block_shape(shape, name)

    @property
    def rows_independent(self) -> bool:
        """True when no scale spans two rows of a 2-D tensor (per output channel, or groups along
        the last axis), so rows can be encoded block by block with identical results."""
        g = self.spec.granularity
        return (isinstance(g, PerChannel) and g.kept_axis in (0, -2)) or (isinstance(g, PerGroup) and g.reduced_axis in (1, -1))

    def encode(self, x: np.ndarray, name: str = "x") -> EncodedValues:
        x = x.astype(np.float32, copy=False)
        if self.percentile is None:
            qp = calibrate(x, self.spec, self.calibration, name=name)
        else:
            qp = calibrate(x, self.spec, self.calibration, percentile=self.percentile, name=name)
        qp = self.stored_params(qp)
        return self._encoded(np.asarray(quantize(x, qp, name=name)), qp)

    def _encoded(self, codes: np.ndarray, qp: QParams) -> EncodedValues:
        side = {"scale": qp.scale}
        if not self.spec.symmetric:
            side["zero_point"] = qp.zero_point
        return EncodedValues(codes, side, {"kind": self.kind, "spec": self.spec.to_dict()},
                             np.asarray(dequantize(codes, qp), np.float32))

    def encode_solved(self, solution: Solution, name: str = "x") -> EncodedValues:
        """The codes of ``solution.values`` under the solver's ``solution.qparams`` (a
        :class:`~quant.QParams` of this ``spec``; e.g. GPTQ's), instead of calibrating: values on that
        grid give back the solver's codes exactly. Without params, as :meth:`encode`."""
        qp = solution.qparams
        if qp is None:
            return self.encode(solution.values, name)
        if not isinstance(qp, QParams) or qp.spec != self.spec:
            raise ValueError(f"{name}: the solver's params are not QParams of {self.spec.describe()}")
        if not np.array_equal(round_scales_up(qp.scale, self.scale_dtype), qp.scale):
            # a scale the solver moved after its sweep (AWQ divides a row's scales when it folds): rounded up
            # to the stored dtype, and the solved values' codes taken under it
            qp = self.stored_params(qp)
        return self._encoded(np.asarray(quantize(np.ascontiguousarray(solution.values, np.float32), qp, name=name)), qp)

    def encode_measured(self, x: np.ndarray, acc: MetricsAccumulator | None, name: str = "x", *,
                        values: bool = True) -> EncodedValues:
        """``encode`` with the error measured on the way: minmax calibration of float32 blocks that are
        consecutive runs of memory (per output channel, groups along the last axis, the whole tensor)
        runs as one C pass that also accumulates the metrics (same codes, scales and zero points)."""
        fused = rtn_blocks(x, self.spec, values=values, metrics=acc is not None) \
            if self.calibration == "minmax" and self.percentile is None and self.scale_dtype == "float32" else None
        if fused is None:
            return super().encode_measured(x, acc, name, values=values)
        if acc is not None:
            assert fused.sums is not None and fused.counts is not None
            acc.add_sums(fused.sums, fused.counts, x.size)
        pshape = self.spec.params_shape(tuple(x.shape))
        side = {"scale": fused.scale.reshape(pshape)}
        if not self.spec.symmetric:
            side["zero_point"] = fused.zero_point.reshape(pshape)
        return EncodedValues(fused.codes, side, {"kind": self.kind, "spec": self.spec.to_dict()},
                             fused.values if fused.values is not None else np.empty(0, np.float32))

    @classmethod
    def decode(cls, codes: np.ndarray, side: dict[str, np.ndarray], scheme: dict[str, Any],
               src_dtype: np.dtype) -> np.ndarray:
        spec = _stored_spec(scheme)
        want = spec.params_shape(tuple(codes.shape))
        scale = stored_part(side, "scale", np.float32, int(np.prod(want)))
        zp = stored_part(side, "zero_point", np.int32, scale.size) if "zero_point" in side else \
            np.full(scale.shape, spec.symmetric_zero_point if spec.symmetric else 0, np.int32)
        qp = QParams(scale, zp, spec, tuple(codes.shape))
        return np.asarray(dequantize(codes.astype(spec.code_dtype), qp), np.float32)

    @classmethod
    def code_dtype(cls, scheme: dict[str, Any], src_dtype: np.dtype) -> np.dtype:
        return _stored_spec(scheme).code_dtype

    @classmethod
    def pack(cls, codes: np.ndarray, scheme: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        return pack_codes(codes, QuantSpec.from_dict(scheme["spec"]))

    @classmethod
    def unpack(cls, stored: np.ndarray, info: dict[str, Any], count: int, dtype: np.dtype) -> np.ndarray:
        return unpack_codes(stored, info, count, dtype)

    @classmethod
    def check_packed(cls, stored: np.ndarray, info: dict[str, Any], count: int, dtype: np.dtype) -> None:
        if not info:
            super().check_packed(stored, info, count, dtype)
        elif set(info) != {"packed", "qmin"} or info["packed"] != 4 or isinstance(info["qmin"], bool) \
                or not isinstance(info["qmin"], int) or not -8 <= info["qmin"] <= 0:
            raise ValueError(f"unknown packing {info!r:.80} for integer codes")
        elif stored.dtype != np.uint8 or stored.size != (count + 1) // 2:
            raise ValueError(f"{stored.size} packed bytes of {stored.dtype} are stored for {count} 4-bit codes")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "spec": self.spec.to_dict(), "calibration": self.calibration}
        if self.percentile is not None:
            d["percentile"] = self.percentile
        if self.scale_dtype != "float32":
            d["scale_dtype"] = self.scale_dtype
        return d
