"""Block-scaled formats: blocks of elements sharing one scale, from one spec (:class:`BlockFormat`).

OCP Microscaling (MX v1.0): ``block`` consecutive elements along the last axis
share one scale ``2**s`` stored as an E8M0 code (``s + 127``; 255 is NaN). The
presets are MXFP8 (e4m3, e5m2), MXFP6 (e3m2, e2m3), MXFP4 (e2m1) and MXINT8
(int8 read as a fixed-point number with 6 fraction bits, at most 127/64, so
``emax`` is 0; codes are clamped to +-127), 32 elements per block.

Scale rules (``s`` for a block whose largest magnitude is ``amax``; ``emax``
is the exponent of the element format's largest power of two, ``max`` its
largest value):

* ``"floor"``: ``s = floor(log2(amax)) - emax``, the OCP MX v1.0 rule (section
  6.3) and torchao's ``ScaleCalculationMode.FLOOR``. Elements above the
  element range after scaling saturate to ``max``.
* ``"ceil"``: ``ceil(log2(amax)) - emax`` (torchao ``CEIL``).
* ``"even"``: ``floor(log2(amax'))`` where ``amax'`` is ``amax`` rounded to the
  element's mantissa width, half up (torchao ``EVEN``): a block whose amax
  would round up into the next power of two gets the larger scale.
* ``"rceil"``: ``ceil(log2(amax / max))``, the smallest scale under which
  nothing saturates (NVIDIA's ``cvt.rp.satfinite.ue8m0`` and torchao ``RCEIL``),
  computed exactly (torchao divides and takes the logarithm in float32).

``s`` is clamped to [-127, 127]; a block holding NaN gets the NaN scale (its
values decode to NaN; its element codes are 0). An all-zero block gets the
smallest scale, 2**-127. Infinite elements make ``amax`` infinite, which the
floor rule reads as 2**128 (as torchao does, from the float32 exponent
field), so they saturate to ``max`` with every finite element of the block
flushed toward 0.

Elements are ``x / 2**s`` rounded once, exactly, to the element format with the
given rounding mode (``nearest_even``; ``nearest_away`` is the MX reference's
default) and saturation. Where torchao differs, lowbit keeps the value the
spec gives: the E8M0 code 0 means 2**-127 (torchao divides by 2**-126 there),
and the ``rceil`` exponent is exact.

GGUF (llama.cpp) blocks: 32 integer elements share one float16 scale ``d``,
computed and applied in float32 exactly as ggml's reference quantizers (and
the ``gguf`` package's) do, so the blocks are bit-identical to theirs:

* ``q8_0`` (rule ``"amax"``): ``d = amax / 127``; ``q = round(x * (1 / d))``,
  halves away from zero, int8; a reader gets ``q * fp16(d)``.
* ``q4_0`` (rule ``"signed_max"``): ``m`` is the block's value of largest
  magnitude (the first such, with its sign), ``d = m / -8``;
  ``q = clamp(trunc(x * (1 / d) + 8.5), 0, 15) - 8``; a reader gets ``q * fp16(d)``.

The elements are quantized with the float32 ``d`` and the reader scales by its
float16 rounding, as in ggml; the error a report gives is of what the reader gets.

Float scales (rule ``"fit"``, scale ``fp32``, ``fp16``, ``bf16`` or ``e4m3``): each
block's scale is the smallest value of the scale format under which the
block's amax fits the element range (``amax / scale <= max``, found exactly),
so nothing saturates after the scale is rounded; an all-zero block takes 1.
Elements are ``x / scale`` rounded once, exactly, as for NVFP4 below.

NVFP4 (NVIDIA, rule ``"nvfp4"``): 16 fp4 e2m1 elements share one fp8 e4m3 scale, under one
float32 scale per tensor, with the scales computed in float32 as torchao's
``nvfp4_quantize`` (two-level) does: ``t = amax(tensor) / (448 * 6)``; each
block's scale is ``e4m3(clamp(amax(block) / 6 / t, 2**-6, 448))`` (an all-zero
tensor takes ``t = 1``). Elements are ``x / (scale * t)`` rounded once,
exactly, to fp4 with saturation: the divisor is exact in float64, and a
float64 quotient that is not the exact one cannot fall on an fp4 midpoint, so
rounding it to fp4 is the single correct rounding (its float32 rounding
serves too, except where that lands on a midpoint; those elements are redone
from the float64 quotient). torchao multiplies ``x`` by
a rounded reciprocal first and rounds twice; the tests list where the two
differ and check lowbit against a rational oracle. A reader gets
``fp4 * scale * t`` rounded once to float32.
"""

from __future__ import annotations

import contextlib
import ctypes
import math

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ._native import Library, threads
from .arrays import is_torch, real_array, require_finite, torch
from .codec import check_modes, decode, encode
from .formats import FloatFormat, get_format
from .methods import EncodedValues, Solution, ValueMethod, register_method, stored_part

SCALE_RULES = ("floor", "ceil", "even", "rceil")  # E8M0 scales
GGUF_RULES = ("amax", "signed_max")  # float16 scales, integer elements
NVFP4_EPS = 2.0 ** -6  # the smallest normal e4m3 value: the floor of an NVFP4 block scale
FLOAT_SCALES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "e4m3": "fp8_e4m3fn"}  # rule "fit": scale formats
INT_ELEMENTS = {"int8": (-127, 127), "int4": (-8, 7)}
E8M0_BIAS = 127
E8M0_NAN = 255


@dataclass(frozen=True)
class BlockFormat:
    """``block`` elements along the last axis share one scale stored in ``scale`` format.

    ``element``: a float format name (with ``scale="e8m0"`` and a rule of :data:`SCALE_RULES`) or
    ``"int8"`` / ``"int4"`` (with ``scale="fp16"`` and a rule of :data:`GGUF_RULES`). See the module
    docstring for each rule."""

    element: str
    block: int = 32
    scale_rule: str = "floor"
    name: str = ""
    scale: str = "e8m0"

    def __post_init__(self) -> None:
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"BlockFormat: block must be a positive integer, got {self.block!r}")
        if self.scale_rule == "nvfp4":
            if self.element != "fp4_e2m1fn" or self.scale != "e4m3" or self.block != 16:
                raise ValueError("BlockFormat: the nvfp4 rule takes fp4_e2m1fn elements, blocks of 16 and e4m3 scales")
            return
        if self.scale_rule == "fit":
            if self.scale not in FLOAT_SCALES or self.is_int:
                raise ValueError(f"BlockFormat: the fit rule takes a float element format and a scale of "
                                 f"{tuple(FLOAT_SCALES)}")
            self._check_float_element()
            return
        if self.scale == "e8m0" and self.element == "int8":
            if self.scale_rule not in ("floor", "ceil", "rceil"):
                raise ValueError("BlockFormat: MXINT8 takes the floor, ceil or rceil scale rule")
            return
        if self.scale == "fp16":
            if self.element not in INT_ELEMENTS or self.scale_rule not in GGUF_RULES:
                raise ValueError(f"BlockFormat: fp16 scales take int8/int4 elements and a rule of {GGUF_RULES}")
            if (self.element, self.scale_rule) not in (("int8", "amax"), ("int4", "signed_max")):
                raise ValueError("BlockFormat: the GGUF rules are amax for int8 (Q8_0) and signed_max for int4 (Q4_0)")
            return
        if self.scale != "e8m0":
            raise ValueError(f"BlockFormat: scale must be e8m0, {', '.join(FLOAT_SCALES)} (rule fit) or e4m3 "
                             f"(rule nvfp4), got {self.scale!r}")
        self._check_float_element()
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"BlockFormat: scale_rule must be one of {SCALE_RULES}, got {self.scale_rule!r}")

    def _check_float_element(self) -> None:
        fmt = get_format(self.element)
        if not fmt.signed or fmt.bits > 8 or fmt.specials == "fnu":
            raise ValueError(f"BlockFormat: the element format must be a signed float format of at most 8 bits, "
                             f"got {fmt.name}")

    def to_dict(self) -> dict[str, Any]:
        return {"element": self.element, "block": self.block, "scale_rule": self.scale_rule, "scale": self.scale,
                "name": self.name}

    @classmethod
    def from_dict(cls, d: Any) -> "BlockFormat":
        """A format from :meth:`to_dict` output (untrusted: every field is checked)."""
        if not isinstance(d, dict) or set(d) != {"element", "block", "scale_rule", "scale", "name"} \
                or not all(isinstance(d[k], str) for k in ("element", "scale_rule", "scale", "name")):
            raise ValueError(f"not a block format: {d!r:.120}")
        return cls(d["element"], d["block"], d["scale_rule"], d["name"], d["scale"])

    @property
    def is_int(self) -> bool:
        return self.element in INT_ELEMENTS

    @property
    def element_bits(self) -> int:
        return {"int8": 8, "int4": 4}[self.element] if self.is_int else self.element_format.bits

    @property
    def scale_bits(self) -> int:
        return {"fp32": 32, "fp16": 16, "bf16": 16}.get(self.scale, 8)

    @property
    def element_format(self) -> FloatFormat:
        if self.is_int:
            raise ValueError(f"{self.describe()}: integer elements have no float format")
        return get_format(self.element)

    @property
    def element_max(self) -> float:
        """The largest element value (MXINT8's int8 is a fixed-point 1.6 number: 127 / 64)."""
        return 127 / 64 if self.is_int else self.element_format.max_finite

    @property
    def emax(self) -> int:
        """floor(log2) of the largest element value."""
        return int(np.floor(np.log2(self.element_max)))

    @property
    def bits_per_element(self) -> float:
        """Stored bits per element: 4-bit elements two per byte, wider ones a byte each, plus the scale's
        share (NVFP4's 4 bytes per tensor come on top)."""
        return (4 if self.element_bits <= 4 else 8) + self.scale_bits / self.block

    def describe(self) -> str:
        return self.name or f"{self.element} x{self.block} {self.scale}/{self.scale_rule}"


MX_FORMATS = {
    "mxfp8_e4m3": BlockFormat("fp8_e4m3fn", 32, "floor", "mxfp8_e4m3"),
    "mxfp8_e5m2": BlockFormat("fp8_e5m2", 32, "floor", "mxfp8_e5m2"),
    "mxfp6_e3m2": BlockFormat("fp6_e3m2fn", 32, "floor", "mxfp6_e3m2"),
    "mxfp6_e2m3": BlockFormat("fp6_e2m3fn", 32, "floor", "mxfp6_e2m3"),
    "mxfp4": BlockFormat("fp4_e2m1fn", 32, "floor", "mxfp4"),
    "mxint8": BlockFormat("int8", 32, "floor", "mxint8"),
}
NV_FORMATS = {"nvfp4": BlockFormat("fp4_e2m1fn", 16, "nvfp4", "nvfp4", "e4m3")}
GGUF_FORMATS = {
    "q8_0": BlockFormat("int8", 32, "amax", "q8_0", "fp16"),
    "q4_0": BlockFormat("int4", 32, "signed_max", "q4_0", "fp16"),
}
BLOCK_FORMATS = {**MX_FORMATS, **NV_FORMATS, **GGUF_FORMATS}


def get_block_format(fmt: "BlockFormat | str | dict") -> BlockFormat:
    """A :class:`BlockFormat`, or a preset by name (``mxfp8_e4m3``, ``mxfp8_e5m2``, ``mxfp6_e3m2``,
    ``mxfp6_e2m3``, ``mxfp4``, ``mxint8``, ``nvfp4``, ``q8_0``, ``q4_0``); ValueError listing them otherwise."""
    if isinstance(fmt, BlockFormat):
        return fmt
    if isinstance(fmt, str) and fmt in BLOCK_FORMATS:
        return BLOCK_FORMATS[fmt]
    if isinstance(fmt, dict):
        return BlockFormat.from_dict(fmt)
    raise ValueError(f"unknown block format {fmt!r}; presets: {', '.join(BLOCK_FORMATS)}")


@dataclass
class BlockCodes:
    """``codes``: element codes, the input's shape, one per element (uint8 float codes, or int8 integers);
    ``scales``: one per block, shape ``(..., last // block)``: E8M0 codes (uint8) or float16 bit
    patterns (uint16) or e4m3 codes (uint8); ``format``: the :class:`BlockFormat`; ``tensor_scale``:
    NVFP4's float32 scale per tensor (None otherwise)."""

    codes: np.ndarray
    scales: np.ndarray
    format: BlockFormat
    tensor_scale: float | None = None

    def gguf_blocks(self) -> np.ndarray:
        """The blocks in GGUF's byte layout, uint8 of shape ``(blocks, 34)`` for Q8_0 (float16 ``d``, then
        32 int8) or ``(blocks, 18)`` for Q4_0 (float16 ``d``, then 16 bytes: element ``i`` offset by 8 in
        the low nibble of byte ``i``, element ``i + 16`` in its high nibble), as llama.cpp reads them."""
        fmt = self.format
        if fmt.scale != "fp16":
            raise ValueError(f"{fmt.describe()} has no GGUF block layout")
        d = np.ascontiguousarray(self.scales).view(np.uint16).reshape(-1, 1).view(np.uint8)
        q = self.codes.reshape(-1, fmt.block)
        if fmt.element == "int8":
            body = q.view(np.uint8)
        else:
            u = (q.astype(np.int16) + 8).astype(np.uint8)
            half = fmt.block // 2
            body = u[:, :half] | (u[:, half:] << np.uint8(4))
        return np.concatenate([d, body], axis=1)

    @property
    def nbytes(self) -> int:
        """Bytes as stored: elements of 4 bits or fewer two per byte, wider ones one per byte, plus scales."""
        n = self.codes.size
        per_byte = 2 if self.format.element_bits <= 4 else 1
        return -(-n // per_byte) + self.scales.nbytes + (4 if self.tensor_scale is not None else 0)


def _exponents(amax: Any, fmt: BlockFormat) -> Any:
    """The unclamped shared exponent of each block (float64 holding integers; NaN for NaN amax), from
    float64 ``amax``: numpy arrays or torch tensors alike (``xp`` is the array's namespace)."""
    xp: Any = torch if is_torch(amax) else np
    quiet = contextlib.nullcontext() if xp is torch else np.errstate(divide="ignore", invalid="ignore", over="ignore")
    with quiet:
        m, ex = xp.frexp(xp.where(xp.isfinite(amax), amax, xp.ones_like(amax)))  # amax = m * 2**ex, m in [0.5, 1)
    floor_log2 = xp.where(amax > 0, ex - 1.0, xp.full_like(amax, -np.inf))
    floor_log2 = xp.where(xp.isinf(amax), xp.full_like(amax, 128.0), floor_log2)  # float32's exponent field of inf
    exact_pow2 = m == 0.5
    rule = fmt.scale_rule
    if rule == "floor":
        e = floor_log2 - fmt.emax
    elif rule == "ceil":
        e = floor_log2 + (~exact_pow2) * 1.0 - fmt.emax
    elif rule == "even":  # amax rounded half up to the element's mantissa width carries into the next power
        carry = m >= 1 - 2.0 ** -(fmt.element_format.mantissa_bits + 2)
        e = floor_log2 + carry * 1.0 - fmt.emax
    else:  # rceil: the smallest e with amax <= max * 2**e (every product below is exact in float64)
        top = fmt.element_max
        e = floor_log2 - math.floor(math.log2(top))
        with contextlib.nullcontext() if xp is torch else np.errstate(invalid="ignore", over="ignore"):
            e = xp.where(amax > top * xp.exp2(e - 1), e, e - 1)
            e = xp.where(amax > top * xp.exp2(e), e + 1, e)
        e = xp.where(xp.isinf(amax), xp.full_like(amax, 127.0), e)  # torchao: an inf amax takes the largest scale
    return xp.where(xp.isnan(amax), xp.full_like(amax, np.nan), e)


def block_encode(x: Any, fmt: "BlockFormat | str", *, rounding: str = "nearest_even",
                 subnormals: str = "keep") -> BlockCodes:
    """Encode ``x`` (numpy or torch, float16/bfloat16/float32/float64; last axis a multiple of the block)
    block by block: E8M0 scales by the format's rule, elements rounded once, exactly, with saturation."""
    fmt = get_block_format(fmt)
    check_modes(rounding, "saturate", subnormals)
    if fmt.scale_rule in GGUF_RULES:
        if rounding != "nearest_even" or subnormals != "keep":
            raise ValueError(f"block_encode: {fmt.describe()} rounds as ggml does; rounding and subnormals do not apply")
        return _gguf_encode(x, fmt)
    if rounding == "stochastic":
        raise ValueError("block_encode: stochastic rounding is not offered for block formats")
    if fmt.scale_rule in ("nvfp4", "fit"):
        return _float_scaled_encode(x, fmt, rounding, subnormals)
    a = real_array(x, "x", integers="float")
    if a.ndim == 0 or a.shape[-1] % fmt.block:
        raise ValueError(f"block_encode: the last axis ({a.shape[-1] if a.ndim else 'none'}) must be a multiple of "
                         f"the block size {fmt.block}")
    # float32 holds float16 and bfloat16 exactly; float64 keeps its own precision on the exact path
    work = a if a.dtype == np.float64 else a.astype(np.float32, copy=False)
    v = work.reshape(*a.shape[:-1], a.shape[-1] // fmt.block, fmt.block)
    with np.errstate(invalid="ignore"):
        amax = np.max(np.abs(v), axis=-1).astype(np.float64)  # NaN propagates
    e = _exponents(amax, fmt)
    nan = np.isnan(e)
    e = np.clip(np.where(nan, 0, e), -E8M0_BIAS, E8M0_BIAS).astype(np.int32)
    scales = np.where(nan, E8M0_NAN, e + E8M0_BIAS).astype(np.uint8)
    codes = encode_elements(v, scales, fmt, rounding=rounding, subnormals=subnormals)
    return BlockCodes(codes.reshape(a.shape), scales, fmt)


def encode_elements(v: np.ndarray, scales: np.ndarray, fmt: BlockFormat, tensor_scale: float | None = None, *,
                    rounding: str = "nearest_even", subnormals: str = "keep") -> np.ndarray:
    """The element codes of ``v`` (finite, shape ``(..., blocks, k)``: ``k`` elements of each block, the
    whole block or part of it) under the given block ``scales`` (``(..., blocks)``, as :func:`block_encode`
    stores them) and NVFP4's ``tensor_scale``: each element rounded once, exactly, with saturation. This is
    the element step of :func:`block_encode`, which chooses the scales first; GPTQ rounds one column at a
    time under scales chosen up front. GGUF blocks are refused (ggml rounds with the float32 scale it
    stores as float16)."""
    if fmt.scale_rule in GGUF_RULES:
        raise ValueError(f"{fmt.describe()}: ggml rounds with a float32 scale it then stores as float16; "
                         "elements under given scales are not defined for it")
    el = None if fmt.is_int else fmt.element_format
    if fmt.scale_rule in ("nvfp4", "fit"):
        assert el is not None
        divisor = np.asarray(decode(scales, FLOAT_SCALES[fmt.scale])).astype(np.float64) * float(tensor_scale or 1.0)
        y = np.divide(v, divisor[..., None], dtype=np.float64).reshape(-1)
        return _quotient_codes(y, el, rounding, subnormals).reshape(v.shape)
    s = scales.astype(np.int32)
    nan = s == E8M0_NAN
    work = v if v.dtype == np.float64 else v.astype(np.float32, copy=False)
    # x / 2**e is exact: 2**-e is a normal float32 here (e <= 126 for any finite amax, and an inf amax
    # only saturates), and a quotient below float32's normal range rounds to 0 in every element format
    # either way; so the element codes come from the codec's float32 paths in one rounding
    y = work * np.ldexp(np.ones(s.shape, work.dtype), -np.where(nan, 0, s - E8M0_BIAS))[..., None]
    if nan.any():
        y = np.where(nan[..., None], work.dtype.type(0), y)  # a NaN block's scale carries the NaN
    if fmt.is_int:  # MXINT8: y in units of 2**-6, rounded, clamped to +-127
        t = y * y.dtype.type(64)
        if rounding == "nearest_even":
            q = np.rint(t)
        elif rounding == "nearest_away":
            q = np.copysign(np.floor(np.abs(t) + t.dtype.type(0.5)), t)  # t + 0.5 is exact below 2**22
        else:
            q = np.trunc(t)
        return np.clip(q, -127, 127).astype(np.int8)
    assert el is not None
    return np.asarray(encode(y, el, rounding=rounding, overflow="saturate", subnormals=subnormals)).astype(
        np.uint8, copy=False)


def decode_elements(codes: np.ndarray, scales: np.ndarray, fmt: BlockFormat,
                    tensor_scale: float | None = None) -> np.ndarray:
    """float32 values of element ``codes`` (``(..., blocks, k)``) under block ``scales`` (``(..., blocks)``):
    the arithmetic of :func:`block_decode`, for whole blocks or parts of them."""
    if fmt.scale_rule in ("nvfp4", "fit"):
        e64 = np.asarray(decode(codes, fmt.element_format)).astype(np.float64)
        s = np.asarray(decode(scales, FLOAT_SCALES[fmt.scale])).astype(np.float64) * float(tensor_scale or 1.0)
        return (e64 * s[..., None]).astype(np.float32)
    if fmt.scale_rule in GGUF_RULES:
        d = scales.view(np.float16).astype(np.float32)
        return codes.astype(np.float32) * d[..., None]
    el = codes.astype(np.float32) / np.float32(64) if fmt.is_int else np.asarray(decode(codes, fmt.element_format))
    s = scales.astype(np.int32)
    # 2**(s - 127) as float32 (2**-127 is subnormal but exact); element values carry so few bits that
    # every product is exact in float32
    factor = np.where(s == E8M0_NAN, np.float32(np.nan), np.ldexp(np.ones(s.shape, np.float32), s - E8M0_BIAS))
    return el * factor[..., None]


def _gguf_encode(x: Any, fmt: BlockFormat) -> BlockCodes:
    """Q8_0 / Q4_0 blocks with ggml's float32 arithmetic, step for step (see the module docstring)."""
    a = real_array(x, "x", integers="float")
    if a.ndim == 0 or a.shape[-1] % fmt.block:
        raise ValueError(f"block_encode: the last axis ({a.shape[-1] if a.ndim else 'none'}) must be a multiple of "
                         f"the block size {fmt.block}")
    require_finite(a, "x", f"{fmt.describe()} quantization")
    v = a.astype(np.float32, copy=False).reshape(-1, fmt.block)
    if fmt.scale_rule == "amax":
        d = np.abs(v).max(axis=1, keepdims=True) / np.float32(127)
    else:
        at = np.abs(v).argmax(axis=-1)[:, None]
        d = np.take_along_axis(v, at, axis=-1) / np.float32(-8)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        t = v * inv
        if fmt.scale_rule == "amax":
            mag = np.abs(t)
            whole = np.floor(mag)
            q = (np.sign(t) * (whole + np.floor(np.float32(2) * (mag - whole)))).astype(np.int8)  # halves away
        else:
            q = (np.trunc(t + np.float32(8.5)).astype(np.uint8).clip(0, 15).astype(np.int16) - 8).astype(np.int8)
        scales = d.astype(np.float16).view(np.uint16)
    shape = (*a.shape[:-1], a.shape[-1] // fmt.block)
    return BlockCodes(q.reshape(a.shape), scales.reshape(shape), fmt)


def _block_amax(v: np.ndarray) -> np.ndarray:
    """max |v| over the last axis of finite float32 ``v`` (torch's min/max reduction over short rows is
    faster than numpy's; without torch, numpy's)."""
    if torch is not None and v.size and v.flags.c_contiguous:
        lo, hi = torch.aminmax(torch.from_numpy(v), dim=-1)
        return np.maximum(-lo.numpy(), hi.numpy())
    return np.abs(v).max(axis=-1)


def _quotient_codes(y: np.ndarray, el: FloatFormat, rounding: str, subnormals: str) -> np.ndarray:
    """Codes of the float64 quotients ``y`` in ``el``, rounded once, with saturation. The float32
    rounding of a quotient rounds to ``el`` as the quotient does, unless it lands on one of ``el``'s
    midpoints (a float32 with at most ``mantissa_bits + 1`` mantissa bits) that the quotient is not:
    those few are redone from the float64 value."""
    y32 = y.astype(np.float32)
    codes = np.asarray(encode(y32, el, rounding=rounding, overflow="saturate", subnormals=subnormals)).astype(np.uint8)
    short = np.flatnonzero((y32.view(np.uint32) & np.uint32((1 << (22 - el.mantissa_bits)) - 1)) == 0)
    redo = short[y32[short] != y[short]]
    if redo.size:
        codes[redo] = np.asarray(encode(y[redo], el, rounding=rounding, overflow="saturate", subnormals=subnormals))
    return codes


def _bind_blocks(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.lowbit_block_amax.argtypes = [p, i64, i64, p, i32]
    lib.lowbit_block_amax.restype = f32
    lib.lowbit_nvfp4_encode.argtypes = [p, p, i64, i64, f32, f32, p, p, i32]
    lib.lowbit_nvfp4_encode.restype = None


_BLOCK_KERNELS = Library(Path(__file__).with_name("_kernels") / "blocks_kernels.c", _bind_blocks, fallback="numpy")


def _float_scaled_encode(x: Any, fmt: BlockFormat, rounding: str, subnormals: str) -> BlockCodes:
    """Rules ``nvfp4`` and ``fit``: float block scales (module docstring), elements rounded once."""
    a = real_array(x, "x", integers="float")
    if a.ndim == 0 or a.shape[-1] % fmt.block:
        raise ValueError(f"block_encode: the last axis ({a.shape[-1] if a.ndim else 'none'}) must be a multiple of "
                         f"the block size {fmt.block}")
    require_finite(a, "x", f"{fmt.describe()} quantization")
    v = a.astype(np.float32, copy=False).reshape(*a.shape[:-1], a.shape[-1] // fmt.block, fmt.block)
    lib = _BLOCK_KERNELS.get() if fmt.scale_rule == "nvfp4" and rounding == "nearest_even" and subnormals == "keep" \
        and fmt.block == 16 and v.size else None
    if lib is not None:  # the same arithmetic in two C passes (blocks_kernels.c)
        v = np.ascontiguousarray(v)
        nb = v.size // fmt.block
        amax = np.empty(v.shape[:-1], np.float32)
        tensor_amax = np.float32(lib.lowbit_block_amax(v.ctypes.data, nb, fmt.block, amax.ctypes.data, threads()))
        t32 = tensor_amax / np.float32(448.0 * 6.0) if tensor_amax > 0 else np.float32(1)
        scales = np.empty(v.shape[:-1], np.uint8)
        codes = np.empty(v.shape, np.uint8)
        lib.lowbit_nvfp4_encode(v.ctypes.data, amax.ctypes.data, nb, fmt.block, float(t32), NVFP4_EPS,
                                scales.ctypes.data, codes.ctypes.data, threads())
        return BlockCodes(codes.reshape(a.shape), scales, fmt, float(t32))
    block_amax = _block_amax(v)
    el = fmt.element_format
    t = None
    if fmt.scale_rule == "nvfp4":
        amax_t = np.float32(block_amax.max()) if v.size else np.float32(0)
        t32 = amax_t / np.float32(448.0 * 6.0) if amax_t > 0 else np.float32(1)
        scaled = np.clip((block_amax / np.float32(6.0)) / t32, np.float32(NVFP4_EPS), np.float32(448.0))
        scales = np.asarray(encode(scaled.astype(np.float32), "fp8_e4m3fn", overflow="saturate")).astype(np.uint8)
        t = float(t32)
    else:
        sfmt = get_format(FLOAT_SCALES[fmt.scale])
        amax = block_amax.astype(np.float64)
        top = float(el.max_finite)
        scales = np.asarray(encode(amax / top, sfmt, rounding="toward_zero", overflow="saturate"))
        low = np.asarray(decode(scales, sfmt)).astype(np.float64) * top < amax  # exact: few bits times 24
        scales = np.where(low, scales + 1, scales)  # the next value up (positive codes are in order)
        scales = np.where(amax == 0, np.asarray(encode(np.float32(1), sfmt)), scales).astype(sfmt.storage_dtype)
        if not np.all(np.isfinite(np.asarray(decode(scales, sfmt)))):
            raise ValueError(f"x: values up to {float(amax.max()):.4g} need block scales beyond {sfmt.name}'s range")
    codes = encode_elements(v, scales, fmt, t, rounding=rounding, subnormals=subnormals)
    return BlockCodes(codes.reshape(a.shape), scales, fmt, t)


def block_decode(b: BlockCodes) -> np.ndarray:
    """float32 values of ``b``: each element's value times its block's scale (NaN for a NaN E8M0 scale)."""
    fmt = b.format
    v = b.codes.reshape(*b.codes.shape[:-1], b.codes.shape[-1] // fmt.block, fmt.block)
    return decode_elements(v, b.scales, fmt, b.tensor_scale).reshape(b.codes.shape)


def round_to_block(x: Any, fmt: "BlockFormat | str", *, rounding: str = "nearest_even") -> Any:
    """``block_decode(block_encode(x))``: ``x`` as a block format stores it. numpy in, float32 numpy
    out; a torch tensor comes back as a tensor of its dtype and device, differentiable with a
    straight-through gradient (d/dx = 1), for training with block-format weights. The MX formats
    (E8M0 scales) compute in torch on the tensor's device and compile (:func:`_round_blocks_tensor`,
    the numpy path's values, tested); NVFP4, float-scaled and GGUF blocks take the numpy path (CPU)."""
    if is_torch(x) and x.is_floating_point():
        if torch.is_grad_enabled() and x.requires_grad:
            return _BlockSTE.apply(x, fmt, rounding)
        return _BlockSTE.forward(None, x, fmt, rounding)
    return block_decode(block_encode(x, fmt, rounding=rounding))


def _round_blocks_tensor(x: "torch.Tensor", fmt: BlockFormat, rounding: str) -> "torch.Tensor":
    """E8M0-scaled blocks of a torch tensor in torch alone (float32; float64 input is first rounded
    to float32 as :func:`block_encode` does not: callers pass float32 or narrower): the shared exponent
    by the format's rule, elements rounded once with saturation, float32 values."""
    from .codec import _round_tensor

    v = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // fmt.block, fmt.block)
    amax = v.abs().amax(dim=-1).to(torch.float64)  # NaN propagates
    e = _exponents(amax, fmt)
    nan = torch.isnan(e)
    e = torch.clamp(torch.where(nan, torch.zeros_like(e), e), -E8M0_BIAS, E8M0_BIAS).to(torch.float32)
    y = v * torch.exp2(-e)[..., None]  # exact: a power of two in float32's normal range
    if fmt.is_int:  # MXINT8: y in units of 2**-6, rounded, clamped to +-127
        t = y * 64.0
        if rounding == "nearest_even":
            q = torch.round(t)
        elif rounding == "nearest_away":
            q = torch.floor(t.abs() + 0.5).copysign(t)
        else:
            q = torch.trunc(t)
        el = (q.clamp(-127, 127) + 0.0) / 64.0  # + 0.0: an integer code has no negative zero
    else:
        el = _round_tensor(y, fmt.element_format, rounding, "saturate", "keep")
    out = el * torch.exp2(e)[..., None]
    out = torch.where(nan[..., None], torch.full_like(out, float("nan")), out)
    return out.reshape(x.shape)


def _round_nvfp4_tensor(x: "torch.Tensor", fmt: BlockFormat, rounding: str) -> "torch.Tensor":
    """NVFP4 blocks of a torch tensor in torch alone (float32 values; compiles): the numpy path's
    arithmetic step for step (:func:`_float_scaled_encode`): the float32 tensor scale from the largest
    block amax, each block's float32 scale rounded to e4m3 with saturation, each element the float64
    quotient by (block scale x tensor scale) rounded once to e2m1 with saturation, the value that
    quotient's code times the float64 product of the scales, in float32."""
    from .codec import _round_tensor

    v = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // fmt.block, fmt.block)
    amax = v.abs().amax(dim=-1)
    top = amax.amax() if amax.numel() else torch.zeros((), device=x.device)
    t32 = torch.where(top > 0, top / 2688.0, torch.ones_like(top))  # 448 x 6, in float32
    scaled = ((amax / 6.0) / t32).clamp(NVFP4_EPS, 448.0)
    s = _round_tensor(scaled, get_format("fp8_e4m3fn"), "nearest_even", "saturate", "keep")
    divisor = s.to(torch.float64) * t32.to(torch.float64)
    y = v.to(torch.float64) / divisor[..., None]
    el = _round_tensor(y, fmt.element_format, rounding, "saturate", "keep")
    return (el * divisor[..., None]).to(torch.float32).reshape(x.shape)


if torch is not None:

    class _BlockSTE(torch.autograd.Function):
        """Block-format rounding forward (in torch for the MX formats); identity gradient backward
        (straight-through)."""

        @staticmethod
        def forward(ctx, x, fmt, rounding):  # noqa: D401
            f = get_block_format(fmt)
            check_modes(rounding, "saturate", "keep")
            if f.scale == "e8m0" and x.dtype != torch.float64 and rounding != "stochastic":
                if x.ndim == 0 or x.shape[-1] % f.block:
                    raise ValueError(f"round_to_block: the last axis ({x.shape[-1] if x.ndim else 'none'}) must be a "
                                     f"multiple of the block size {f.block}")
                return _round_blocks_tensor(x.detach(), f, rounding).to(x.dtype)
            if f.scale_rule == "nvfp4" and x.dtype != torch.float64:
                if x.ndim == 0 or x.shape[-1] % f.block:
                    raise ValueError(f"round_to_block: the last axis ({x.shape[-1] if x.ndim else 'none'}) must be a "
                                     f"multiple of the block size {f.block}")
                if not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
                    bad = int((~torch.isfinite(x)).sum())  # the numpy path's wording (require_finite)
                    raise ValueError(f"x: {bad} of {x.numel()} values are NaN or inf; {f.describe()} quantization "
                                     "needs finite values")
                return _round_nvfp4_tensor(x.detach(), f, rounding).to(x.dtype)
            if torch.compiler.is_compiling():
                raise RuntimeError(f"round_to_block: {f.describe()} is encoded in numpy on the CPU, which torch.compile "
                                   "cannot trace; call it outside the compiled function (the MX formats and nvfp4 "
                                   "compile)")
            v = block_decode(block_encode(x.detach(), fmt, rounding=rounding))
            return torch.from_numpy(v).to(device=x.device, dtype=x.dtype)

        @staticmethod
        def backward(ctx, grad):
            return grad, None, None


def pack_fp4(codes: np.ndarray) -> np.ndarray:
    """4-bit codes two per byte, low nibble first (the OCP and compressed-tensors layout); an odd
    count is padded with a 0 nibble."""
    flat = codes.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] & 0x0F) | ((flat[1::2] & 0x0F) << 4)


def unpack_fp4(packed: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` codes of :func:`pack_fp4` output."""
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:n]


@register_method
@dataclass(frozen=True)
class BlockCast(ValueMethod):
    """Store every element in a block-scaled format (the checkpoint method behind ``mxfp4``,
    ``mxfp8_e4m3``, ``q8_0`` ...): ``format`` is a preset name, ``rounding`` the element rounding of
    the MX formats (``nearest_even`` or ``nearest_away``; GGUF blocks round as ggml does). Blocks run
    along the last axis, which must be a multiple of the block size. Stored parts: the element codes
    (4-bit elements two per byte, low nibble first, int4 offset by 8; wider ones one per byte, fp6 in
    the low bits) and ``scale``, one per block: the E8M0 byte, or the float16 scale."""

    kind: ClassVar[str] = "block"
    format: "str | BlockFormat" = "mxfp4"
    rounding: str = "nearest_even"

    def __post_init__(self) -> None:
        fmt = get_block_format(self.format)
        if fmt.scale_rule in GGUF_RULES and self.rounding != "nearest_even":
            raise ValueError(f"BlockCast: {self.format} rounds as ggml does; rounding does not apply")
        if self.rounding not in ("nearest_even", "nearest_away", "toward_zero"):
            raise ValueError(f"BlockCast: rounding must be nearest_even, nearest_away or toward_zero, "
                             f"got {self.rounding!r}")

    def describe(self) -> str:
        return get_block_format(self.format).describe() + ("" if self.rounding == "nearest_even" else f"/{self.rounding}")

    @property
    def _stored_format(self) -> "str | dict[str, Any]":
        """The format as the scheme records it: a preset's name, or a custom format's fields."""
        return self.format if isinstance(self.format, str) else self.format.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "format": self._stored_format, "rounding": self.rounding}

    def check_shape(self, shape: tuple[int, ...], name: str = "x") -> None:
        b = get_block_format(self.format).block
        if not shape or shape[-1] % b:
            raise ValueError(f"{name}: {self.format} needs the last axis to be a multiple of {b}, got shape "
                             f"{list(shape)}; exclude the tensor (--exclude) or use another method")

    @property
    def rows_independent(self) -> bool:
        return True  # blocks run along the last axis: rows never share a scale

    def encode(self, x: np.ndarray, name: str = "x") -> EncodedValues:
        self.check_shape(tuple(x.shape), name)
        b = block_encode(x, self.format, rounding=self.rounding)
        side = {"scale": b.scales.view(np.float16) if b.format.scale_rule in GGUF_RULES else b.scales}
        if b.tensor_scale is not None:
            side["tensor_scale"] = np.array([b.tensor_scale], np.float32)
        return EncodedValues(b.codes, side, {"kind": self.kind, "format": self._stored_format}, block_decode(b))

    def encode_solved(self, solution: Solution, name: str = "x") -> EncodedValues:
        """The element codes of ``solution.values`` under the solver's block scales (``solution.qparams``, the
        :class:`BlockCodes` of the source, whose scales GPTQ kept), not scales from the values themselves.
        Values on that grid give back the solver's codes exactly. Without params, as :meth:`encode`."""
        b = solution.qparams
        if b is None:
            return self.encode(solution.values, name)
        fmt = get_block_format(self.format)
        if not isinstance(b, BlockCodes) or b.format != fmt or b.codes.shape != solution.values.shape:
            raise ValueError(f"{name}: the solver's params are not {fmt.describe()} blocks of this tensor")
        x = np.ascontiguousarray(solution.values, np.float32)
        v = x.reshape(*x.shape[:-1], x.shape[-1] // fmt.block, fmt.block)
        # nearest, whatever the method's rounding: values on the grid divide back to within float32
        # rounding of an element's value, which a directed rounding could push to its neighbour
        codes = encode_elements(v, b.scales, fmt, b.tensor_scale).reshape(x.shape)
        got = BlockCodes(codes, b.scales, fmt, b.tensor_scale)
        side = {"scale": got.scales.view(np.float16) if fmt.scale_rule in GGUF_RULES else got.scales}
        if got.tensor_scale is not None:
            side["tensor_scale"] = np.array([got.tensor_scale], np.float32)
        return EncodedValues(got.codes, side, {"kind": self.kind, "format": self._stored_format}, block_decode(got))

    @classmethod
    def decode(cls, codes: np.ndarray, side: dict[str, np.ndarray], scheme: dict[str, Any],
               src_dtype: np.dtype) -> np.ndarray:
        fmt = _scheme_format(scheme)
        if not codes.ndim or codes.shape[-1] % fmt.block:
            raise ValueError(f"{fmt.describe()}: codes of shape {list(codes.shape)} do not split into blocks of "
                             f"{fmt.block}")
        want = (*codes.shape[:-1], codes.shape[-1] // fmt.block)
        scale_dtype = np.float16 if fmt.scale_rule in GGUF_RULES else get_format(FLOAT_SCALES[fmt.scale]).storage_dtype \
            if fmt.scale_rule in ("nvfp4", "fit") else np.uint8
        scale = stored_part(side, "scale", scale_dtype, int(np.prod(want, dtype=np.int64)))
        if fmt.is_int:
            lo, hi = INT_ELEMENTS[fmt.element]
            if codes.size and (int(codes.min()) < lo - 1 or int(codes.max()) > hi):
                raise ValueError(f"a code beyond {fmt.element} is stored")
        elif codes.size and int(codes.max()) >= fmt.element_format.num_codes:
            raise ValueError(f"a code beyond {fmt.element_format.name} is stored")
        t = None
        if fmt.scale_rule == "nvfp4":
            t = float(stored_part(side, "tensor_scale", np.float32, 1)[0])
            if not np.isfinite(t) or t <= 0:
                raise ValueError("the stored NVFP4 tensor scale is not a positive finite number")
        return block_decode(BlockCodes(codes, scale.reshape(want), fmt, t))

    @classmethod
    def code_dtype(cls, scheme: dict[str, Any], src_dtype: np.dtype) -> np.dtype:
        return np.dtype(np.int8 if _scheme_format(scheme).is_int else np.uint8)

    @classmethod
    def pack(cls, codes: np.ndarray, scheme: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        fmt = _scheme_format(scheme)
        if fmt.element_bits <= 4:
            offset = 8 if fmt.is_int else 0  # int4 codes as unsigned nibbles, as compressed-tensors stores them
            return pack_fp4((codes.astype(np.int16) + offset).astype(np.uint8)), {"packed": 4, "offset": offset}
        return codes, {}

    @classmethod
    def unpack(cls, stored: np.ndarray, info: dict[str, Any], count: int, dtype: np.dtype) -> np.ndarray:
        if info.get("packed") != 4:
            return stored
        return (unpack_fp4(stored, count).astype(np.int16) - info["offset"]).astype(dtype)

    @classmethod
    def check_packed(cls, stored: np.ndarray, info: dict[str, Any], count: int, dtype: np.dtype) -> None:
        if not info:
            super().check_packed(stored, info, count, dtype)
        elif info not in ({"packed": 4, "offset": 0}, {"packed": 4, "offset": 8}):
            raise ValueError(f"unknown packing {info!r:.80} for block codes")
        elif stored.dtype != np.uint8 or stored.size != (count + 1) // 2:
            raise ValueError(f"{stored.size} packed bytes of {stored.dtype} are stored for {count} 4-bit codes")


def _scheme_format(scheme: dict[str, Any]) -> BlockFormat:
    f = scheme.get("format")
    if not isinstance(f, (str, dict)):
        raise ValueError(f"scheme field format must name or describe a block format, got {f!r:.80}")
    return get_block_format(f)
