"""Exact references for block formats (MX, NVFP4, GGUF) and integer quantization.

Each is the defined arithmetic written with exact rationals, every rounding made explicit: where the
definition rounds an intermediate to float32 (a scale, a product), the reference rounds that exact
value to float32 (:func:`~precision.testing.oracle.round_fraction`), and nowhere else.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np

from ..arrays import as_numpy, is_torch, like, torch
from ..blocks import BlockFormat, get_block_format
from ..formats import get_format
from .oracle import reference_round, round_fraction

_F32 = get_format("fp32")
_F16 = get_format("fp16")


def _f32(x: Fraction) -> Fraction:
    return round_fraction(x, _F32)


def _f64(x: Fraction) -> Fraction:
    return Fraction(float(x))  # Python's Fraction -> float is correctly rounded (ties to even)


def _rint(p: Fraction, away: bool = False) -> int:
    """``p`` to the nearest integer, ties to even (or away from zero)."""
    q = math.floor(p)
    rem = p - q
    if rem > Fraction(1, 2):
        q += 1
    elif rem == Fraction(1, 2):
        if away:
            q += 1 if p > 0 else 0  # p = q + 1/2: up for positive p, q itself (further from 0) for negative
        elif q % 2 == 1:
            q += 1
    return int(q)


def _expand(p: np.ndarray, shape: tuple[int, ...], block: tuple[int, ...]) -> np.ndarray:
    """Per-block parameters repeated to one per element of ``shape``."""
    out = p.reshape(tuple(s // b if b else 1 for s, b in zip(shape, block)))
    for ax, b in enumerate(block):
        if b > 1:
            out = np.repeat(out, b, axis=ax)
    return np.broadcast_to(out, shape)


def reference_quantize(x: Any, qparams: Any) -> Any:
    """Integer codes of ``x`` under ``qparams`` (a :class:`quant.QParams`), by lowbit's defined arithmetic
    made exact: in the compute type (float64 for float64 input, else float32) ``inv = 1 / scale`` and
    ``p = x * inv`` are each rounded once to that type, then ``q = rint(p) + zero_point`` (ties to even)
    clamped to ``[qmin, qmax]``. This is torch's ``fake_quantize_per_*_affine`` rule. Codes as int64
    (numpy, or a torch tensor on ``x``'s device), shape of ``x``. NaN or inf input: ValueError."""
    a = np.asarray(as_numpy(x))
    wide = a.dtype == np.float64
    rnd = _f64 if wide else _f32
    qp = qparams.for_shape(tuple(a.shape))
    block = qp.block
    scale = _expand(np.asarray(qp.scale, np.float64), a.shape, block).reshape(-1)
    zp = _expand(np.asarray(qp.zero_point, np.int64), a.shape, block).reshape(-1)
    flat = a.reshape(-1)
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        raise ValueError("reference_quantize takes finite values (NaN or inf found)")
    lo, hi = qp.spec.qmin, qp.spec.qmax
    inv_cache: dict[float, Fraction] = {}
    out = np.empty(flat.size, np.int64)
    for i, (v, s, z) in enumerate(zip(flat.tolist(), scale.tolist(), zp.tolist())):
        inv = inv_cache.get(s)
        if inv is None:
            inv = inv_cache[s] = rnd(1 / rnd(Fraction(s)))
        xv = rnd(Fraction(v))  # integers and wider inputs enter the compute type rounded
        out[i] = min(hi, max(lo, _rint(rnd(xv * inv)) + int(z)))
    res = out.reshape(a.shape)
    if is_torch(x):
        return torch.from_numpy(res).to(x.device)
    return like(res, x) if isinstance(x, np.ndarray) else res


def reference_round_block(x: Any, fmt: "BlockFormat | str", *, rounding: str = "nearest_even") -> Any:
    """``x`` as the block format ``fmt`` stores it, exactly by the format's definition: float32 values of
    the same shape and kind (a torch tensor on its device). The last axis holds whole blocks.

    * E8M0-scaled (MX) formats: the shared exponent ``e`` of each block by the format's rule from the
      block's largest magnitude ``amax`` (``floor``: ``floor(log2 amax) - emax``, the OCP rule; ``ceil``;
      ``even``; ``rceil``: the smallest ``e`` with ``amax <= element_max * 2**e``), clamped to [-127, 127];
      each element ``x / 2**e`` rounded once to the element format with saturation (MXINT8: to a multiple
      of 2**-6 in [-127/64, 127/64]); a block holding NaN is NaN.
    * NVFP4: the float32 tensor scale ``t = amax_tensor / 2688``; each block's scale
      ``round_e4m3((amax / 6) / t)`` (float32 steps, clamped to [2**-6, 448]); each element
      ``x / (s * t)`` rounded once to e2m1 with saturation; the value in float32.
    * ``fit`` rules (float block scales): the smallest scale value with ``amax <= element_max * scale``.
    * GGUF Q8_0 and Q4_0: ggml's reference quantizers (``quantize_row_q8_0_ref``/``q4_0_ref``) with
      every float32 step rounded as ggml's C does, scales stored as float16.
    """
    f = get_block_format(fmt)
    a = np.asarray(as_numpy(x))
    if a.ndim == 0 or a.shape[-1] % f.block:
        raise ValueError(f"reference_round_block: the last axis must be a multiple of the block size {f.block}")
    v = a.astype(np.float64).reshape(-1, f.block)
    if f.scale_rule in ("amax", "signed_max"):
        out = np.array([_gguf_block(b, f) for b in v])
    elif f.scale_rule == "nvfp4":
        out = _nvfp4(v, f, rounding)
    elif f.scale_rule == "fit":
        out = np.array([_fit_block(b, f, rounding) for b in v])
    else:
        out = np.array([_mx_block(b, f, rounding) for b in v])
    res = out.reshape(a.shape).astype(np.float32)
    if is_torch(x):
        return torch.from_numpy(res).to(device=x.device, dtype=x.dtype)
    return like(res, x) if isinstance(x, np.ndarray) else res


def _mx_exponent(amax: float, f: BlockFormat) -> float:
    if math.isnan(amax):
        return math.nan
    if math.isinf(amax):
        return 127.0 if f.scale_rule == "rceil" else float(min(127, 128 - f.emax))
    if amax == 0:
        return -127.0
    m, ex = math.frexp(amax)  # amax = m * 2**ex, m in [0.5, 1)
    fl = ex - 1
    rule = f.scale_rule
    if rule == "floor":
        e = fl - f.emax
    elif rule == "ceil":
        e = fl + (m != 0.5) - f.emax
    elif rule == "even":
        e = fl + (Fraction(m) >= 1 - Fraction(2) ** -(f.element_format.mantissa_bits + 2)) - f.emax
    else:  # rceil: the smallest e with amax <= element_max * 2**e
        top = Fraction(f.element_max)
        e = fl - math.floor(math.log2(f.element_max)) - 2
        while Fraction(amax) > top * Fraction(2) ** e:
            e += 1
    return float(max(-127, min(127, e)))


def _mx_block(b: np.ndarray, f: BlockFormat, rounding: str) -> np.ndarray:
    amax = float(np.max(np.abs(b)))
    e = _mx_exponent(amax, f)
    if math.isnan(e):
        return np.full(b.shape, np.nan)
    y = np.where(np.isinf(b), b, b * 2.0 ** -e)  # exact: a power of two within float64's range
    if f.is_int:
        t = [Fraction(v) * 64 if math.isfinite(v) else v for v in y.tolist()]
        q = [(127 if v > 0 else -127) if isinstance(v, float) else
             max(-127, min(127, _round_mode(v, rounding))) for v in t]
        el = np.array(q, np.float64) / 64
    else:
        el = reference_round(y, f.element_format, rounding=rounding, overflow="saturate")
    return np.asarray(el, np.float64) * 2.0 ** e


def _round_mode(v: Fraction, rounding: str) -> int:
    if rounding == "toward_zero":
        return int(v)  # truncates toward zero
    return _rint(v, away=rounding == "nearest_away")


def _nvfp4(v: np.ndarray, f: BlockFormat, rounding: str) -> np.ndarray:
    if not np.isfinite(v).all():
        raise ValueError("reference_round_block: NVFP4 quantization needs finite values")
    amax_b = [_f32(Fraction(float(m))) for m in np.max(np.abs(v), axis=1).tolist()]
    amax_t = max(amax_b, default=Fraction(0))
    t = _f32(amax_t / _f32(Fraction(2688))) if amax_t > 0 else Fraction(1)
    e4m3 = get_format("fp8_e4m3fn")
    out = np.empty(v.shape)
    for i, (row, am) in enumerate(zip(v, amax_b)):
        scaled = min(Fraction(448), max(Fraction(1, 64), _f32(_f32(am / 6) / t)))
        s = round_fraction(scaled, e4m3)
        d = s * t
        out[i] = [_signed_zero(float(_f32(_round_el(Fraction(x) / d, f.element_format, rounding) * d)), x)
                  for x in row.tolist()]
    return out


def _round_el(q: Fraction, el: Any, rounding: str) -> Fraction:
    return round_fraction(q, el, rounding)  # saturates past the largest element value


def _fit_block(b: np.ndarray, f: BlockFormat, rounding: str) -> np.ndarray:
    if not np.isfinite(b).all():
        raise ValueError(f"reference_round_block: {f.describe()} quantization needs finite values")
    sfmt = get_format({"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "e4m3": "fp8_e4m3fn"}[f.scale])
    amax = Fraction(float(np.max(np.abs(b))))
    top = Fraction(f.element_max)
    if amax == 0:
        s = Fraction(1)
    else:
        s = round_fraction(amax / top, sfmt, "toward_zero")
        if s * top < amax:  # the next scale value up
            s = _next_up(s, sfmt)
    return np.array([_signed_zero(float(_f32(round_fraction(Fraction(x) / s, f.element_format, rounding) * s)), x)
                     for x in b.tolist()])


def _signed_zero(v: float, x: float) -> float:
    """A zero result carries the input's sign (the element formats have -0)."""
    return math.copysign(0.0, x) if v == 0 else v


def _next_up(s: Fraction, sfmt: Any) -> Fraction:
    lo = float(s)
    step = Fraction(2) ** (max(math.frexp(lo)[1] - 1, sfmt.min_exponent) - sfmt.mantissa_bits) if lo > 0 \
        else Fraction(sfmt.min_subnormal)
    return s + step


def _gguf_block(b: np.ndarray, f: BlockFormat) -> np.ndarray:
    """ggml's reference quantizer and dequantizer for one block, a float32 C operation per step (IEEE:
    each correctly rounded, overflow to inf), element by element as ggml's loops run."""
    if not np.isfinite(b).all():
        raise ValueError(f"reference_round_block: {f.describe()} quantization needs finite values")
    f32 = np.float32
    x = [f32(v) for v in b.tolist()]
    with np.errstate(all="ignore"):
        if f.scale_rule == "amax":  # quantize_row_q8_0_ref
            amax = f32(0)
            for v in x:
                amax = max(amax, abs(v))
            d = amax / f32(127)
            inv = f32(1) / d if d else f32(0)
            q = [_roundf(v * inv) for v in x]
        else:  # quantize_row_q4_0_ref: the first element of the largest magnitude, signed
            amax, mx = f32(0), f32(0)
            for v in x:
                if amax < abs(v):
                    amax, mx = abs(v), v
            d = mx / f32(-8)  # -0.0 when every element is zero
            inv = f32(1) / d if d else f32(0)
            q = [min(15, _trunc(v * inv + f32(8.5))) - 8 for v in x]
        d16 = np.float16(d).astype(np.float32)  # ggml's float16 of the scale (inf past its range)
        return np.array([np.float32(qi) * d16 for qi in q], np.float64)


def _roundf(t: np.float32) -> int:
    """C's roundf: halves away from zero."""
    return int(math.copysign(math.floor(abs(float(t)) + 0.5), float(t))) if math.isfinite(t) else 0


def _trunc(t: np.float32) -> int:
    """(int8_t) of a float in [0, 16.5] truncates toward zero; a non-finite one gives 0 (x86's conversion)."""
    return max(0, int(t)) if math.isfinite(t) else 0
