"""QParams and the one implementation of quantize / dequantize / fake_quantize.

Rounding: ``q = clamp(rint(x * inv_scale) + zero_point, qmin, qmax)`` with
``inv_scale = 1 / scale`` in the compute dtype (float32, or float64 for
float64 input) and ``rint`` rounding half to even. This is torch's
``fake_quantize_per_{tensor,channel}_affine`` bit for bit, and torch's
``quantize_per_tensor`` / ``quantize_per_channel`` for every symmetric
signed scheme (zero point 0). With a nonzero zero point torch's own
functions disagree with each other at exact ties (``quantize_per_tensor``
rounds ``fma(x, inv_scale, zp)``, ``quantize_per_channel`` rounds
``x * inv_scale + zp``); lowbit rounds ``x * inv_scale`` first, so a zero
point never changes which way a tie goes.

NaN or inf in a numpy input is a ValueError that names the tensor and counts the
bad values (torch's observers silently turn one NaN into an all-NaN tensor).
The rounding step :func:`_round_clamp` is written once for numpy arrays and torch
tensors; torch tensors take it in torch (:func:`fake_quantize_tensor`), on their
device and inside ``torch.compile``, with the same bits as the numpy path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from precision.arrays import as_numpy, is_torch, like, real_array, require_finite, torch

from .spec import PerTensor, QuantSpec

_TINY = np.finfo(np.float32).tiny


def compute_dtype(a: np.ndarray) -> np.dtype:
    return np.dtype(np.float64) if a.dtype == np.float64 else np.dtype(np.float32)


def blocked(a: Any, block: tuple[int, ...]) -> Any:
    """View ``a`` (numpy or torch) as (n0, b0, n1, b1, ...) where b is the block shape."""
    shp: list[int] = []
    for s, b in zip(a.shape, block):
        shp += [s // b if b else 0, b]
    return a.reshape(shp)


def params_view(p: Any) -> Any:
    """Reshape per-block params (n0, n1, ...) to (n0, 1, n1, 1, ...) to broadcast against ``blocked``."""
    shp: list[int] = []
    for s in p.shape:
        shp += [s, 1]
    return p.reshape(shp)


@dataclass(frozen=True, eq=False)
class QParams:
    """Scale and zero point per block of ``spec``, for tensors of shape ``shape``.

    ``scale``: float32 array of shape ``spec.params_shape(shape)`` (ones on the
    reduced axes, so per-tensor and per-channel params broadcast against the
    tensor; per-group params have one entry per group). Always finite,
    positive and at least the smallest normal float32.
    ``zero_point``: int32 array of the same shape, within [qmin, qmax].
    """

    scale: np.ndarray
    zero_point: np.ndarray
    spec: QuantSpec
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        scale = np.asarray(self.scale, dtype=np.float32)
        zp = np.asarray(self.zero_point)
        if zp.dtype.kind == "f":
            if not np.all(np.isfinite(zp)) or np.any(zp != np.round(zp)):
                raise ValueError("QParams: zero_point must hold integers")
        zp = zp.astype(np.int32)
        want = self.spec.params_shape(self.shape)
        if scale.size == 1 and int(np.prod(want)) == 1:
            scale, zp = scale.reshape(want), np.broadcast_to(zp, want).copy()
        if scale.shape != want:
            raise ValueError(f"QParams: scale has shape {scale.shape}, but {self.spec.describe()} on a tensor of "
                             f"shape {tuple(self.shape)} needs {want}")
        zp = np.broadcast_to(zp, want).astype(np.int32)
        if not np.all(np.isfinite(scale)) or np.any(scale < _TINY):
            raise ValueError("QParams: every scale must be finite and at least the smallest normal float32 "
                             f"({_TINY:.3g}); got min {scale.min() if scale.size else 'n/a'}")
        if zp.size and (zp.min() < self.spec.qmin or zp.max() > self.spec.qmax):
            raise ValueError(f"QParams: zero_point must lie in [{self.spec.qmin}, {self.spec.qmax}] for "
                             f"{self.spec.describe()}; got [{zp.min()}, {zp.max()}]")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zp)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def block(self) -> tuple[int, ...]:
        return self.spec.block_shape(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored for the params: float32 scales, plus int32 zero points unless symmetric."""
        return int(self.scale.nbytes + (0 if self.spec.symmetric else self.zero_point.nbytes))

    def for_shape(self, shape: tuple[int, ...], name: str = "x") -> "QParams":
        """These params applied to a tensor of another shape with the same params shape (e.g. a new batch)."""
        shape = tuple(int(s) for s in shape)
        if shape == self.shape:
            return self
        if self.scale.size == 1 and isinstance(self.spec.granularity, PerTensor):
            want = self.spec.params_shape(shape, name)
            return QParams(self.scale.reshape(want), self.zero_point.reshape(want), self.spec, shape)
        if self.spec.params_shape(shape, name) != self.scale.shape:
            raise ValueError(f"{name}: shape {shape} does not match the calibrated shape {self.shape} "
                             f"for {self.spec.describe()}")
        return QParams(self.scale, self.zero_point, self.spec, shape)

    def expanded_scale(self) -> np.ndarray:
        """The scale repeated to the full tensor shape."""
        return np.broadcast_to(params_view(self.scale), blocked(np.empty(self.shape, np.bool_), self.block).shape
                               ).reshape(self.shape)


def round_scaled(x: Any, inv_scale: Any, *, out: Any = None) -> Any:
    """``rint(x * inv_scale)``, ties to even, for numpy arrays or torch tensors alike.

    The one rounding step of every quantizer in lowbit; the torch branch
    exists so that int8 inference kernels can quantize activations without
    leaving torch, with results identical to the numpy branch (same float ops).
    ``out`` (torch only): a float tensor to write the result into (may be ``x``).
    """
    if is_torch(x):
        return torch.mul(x, inv_scale, out=out).round_()
    return np.rint(x * inv_scale)


def _round_clamp(a: Any, block: tuple[int, ...], inv: Any, lo: Any, hi: Any, want_mask: bool) -> tuple[Any, Any]:
    """The one rounding step of every quantizer, on numpy arrays or torch tensors alike:
    ``clamp(rint(x * inv_scale), qmin - zp, qmax - zp)`` in the blocked layout of ``block`` (a float
    array holding ``q - zp``) and, with ``want_mask``, the in-range mask. ``inv``, ``lo`` and ``hi``
    are params views (or scalars) in ``a``'s dtype."""
    v = round_scaled(blocked(a, block), inv)
    mask = (v >= lo) & (v <= hi) if want_mask else None
    if is_torch(v):
        v = torch.clamp(v, lo, hi)
    else:
        v = np.asarray(v)  # 0-d stays an array
        np.maximum(v, lo, out=v)
        np.minimum(v, hi, out=v)
    return v, mask


def _rounded(a: np.ndarray, qp: QParams, want_mask: bool):
    """:func:`_round_clamp` of a numpy array with ``qp``, and either the in-range mask or the clipped count."""
    ct = compute_dtype(a)
    inv = params_view((np.asarray(1.0, ct) / qp.scale.astype(ct)).astype(ct))
    z = qp.zero_point
    if z.size == 1 or (z == z.flat[0]).all():  # one zero point: scalar bounds, the fast case
        lo, hi = ct.type(qp.spec.qmin - int(z.flat[0])), ct.type(qp.spec.qmax - int(z.flat[0]))
    else:
        zp = params_view(z).astype(ct)
        lo, hi = ct.type(qp.spec.qmin) - zp, ct.type(qp.spec.qmax) - zp
    if want_mask:
        return _round_clamp(a.astype(ct, copy=False), qp.block, inv, lo, hi, True)
    v = np.asarray(round_scaled(blocked(a.astype(ct, copy=False), qp.block), inv))  # counted before the clamp
    clip = int(np.count_nonzero(v < lo) + np.count_nonzero(v > hi)) if v.size and (
        v.min() < np.min(lo) or v.max() > np.max(hi)) else 0
    np.maximum(v, lo, out=v)
    np.minimum(v, hi, out=v)
    return v, clip


def quantize_with_count(x: Any, qparams: QParams, name: str = "x") -> tuple[np.ndarray, int]:
    """(integer codes as a numpy array of ``spec.code_dtype``, number of clipped elements)."""
    a = real_array(x, name, integers="float")
    require_finite(a, name, "quantization")
    qp = qparams.for_shape(a.shape, name)
    v, clipped = _rounded(a, qp, want_mask=False)
    if qp.zero_point.any():
        v += params_view(qp.zero_point).astype(v.dtype)
    return v.reshape(a.shape).astype(qp.spec.code_dtype), clipped


def quantize(x: Any, qparams: QParams, *, name: str = "x") -> Any:
    """Integer codes of ``x`` (int8 for signed specs, uint8 for unsigned), same shape and kind as ``x``.

    ``q = clamp(rint(x / scale) + zero_point, qmin, qmax)`` with half-to-even
    ties (see the module docstring for the exact float arithmetic).
    """
    codes, _ = quantize_with_count(x, qparams, name)
    return like(codes, x)


def dequantize(codes: Any, qparams: QParams, *, name: str = "codes") -> Any:
    """``(codes - zero_point) * scale`` as float32, same shape and kind as ``codes``."""
    c = as_numpy(codes, name)
    if c.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer codes, got dtype {c.dtype}")
    qp = qparams.for_shape(c.shape, name)
    if c.size and (c.min() < qp.spec.qmin or c.max() > qp.spec.qmax):
        raise ValueError(f"{name}: codes outside [{qp.spec.qmin}, {qp.spec.qmax}] for {qp.spec.describe()}")
    d = blocked(c.astype(np.float32), qp.block)  # one float32 temporary; codes and zero points are exact in it
    if qp.zero_point.any():
        d -= params_view(qp.zero_point).astype(np.float32)
    d *= params_view(qp.scale)
    return like(d.reshape(c.shape), codes)


def fake_quantize_array(a: np.ndarray, qp: QParams) -> tuple[np.ndarray, np.ndarray]:
    """(dequantize(quantize(a)) in ``a``'s compute dtype, in-range mask), both in ``a``'s shape."""
    if a.ndim == 0:  # numpy turns 0-d results into scalars, which in-place ops cannot take
        out, inside = fake_quantize_array(a.reshape(1), qp.for_shape((1,)))
        return out.reshape(()), inside.reshape(())
    v, inside = _rounded(a, qp, want_mask=True)
    v *= params_view(qp.scale).astype(v.dtype)  # (q - zp) * scale: v holds q - zp exactly
    return v.reshape(a.shape), inside.reshape(a.shape)


def fake_quantize_tensor(x: "torch.Tensor", scale: "torch.Tensor", zero_point: "torch.Tensor",
                         spec: QuantSpec) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(dequantize(quantize(x)), in-range mask)`` of a torch tensor in torch alone: on ``x``'s device,
    no numpy, no host synchronisation, so it compiles (``torch.compile(fullgraph=True)``). ``scale`` and
    ``zero_point`` hold the params of ``spec`` for ``x``'s shape (any shape with that many elements,
    e.g. flat buffers). The arithmetic is :func:`_round_clamp`'s in float32 (float64 for float64 input),
    so the result equals :func:`fake_quantize` of the numpy array bit for bit; the output is in ``x``'s dtype."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    pshape = spec.params_shape(tuple(x.shape))
    s = params_view(scale.to(ct).reshape(pshape))
    z = params_view(zero_point.to(ct).reshape(pshape))
    v, inside = _round_clamp(x.to(ct), spec.block_shape(tuple(x.shape)), 1.0 / s, spec.qmin - z, spec.qmax - z, True)
    return (v * s).reshape(x.shape).to(x.dtype), inside.reshape(x.shape)


def dequantize_tensor(codes: "torch.Tensor", scale: "torch.Tensor", zero_point: "torch.Tensor",
                      spec: QuantSpec) -> "torch.Tensor":
    """``(codes - zero_point) * scale`` as float32 in torch alone (the arithmetic of :func:`dequantize`)."""
    pshape = spec.params_shape(tuple(codes.shape))
    d = blocked(codes.to(torch.float32), spec.block_shape(tuple(codes.shape)))
    z = params_view(zero_point.to(torch.float32).reshape(pshape))
    s = params_view(scale.reshape(pshape))
    if codes.is_floating_point() or ((scale.requires_grad or zero_point.requires_grad) and torch.is_grad_enabled()):
        d = (d - z) * s
    else:  # in place in the fresh float copy of the codes: the same operations, no weight-sized temporaries
        if not (spec.symmetric and spec.signed):  # a signed symmetric zero point is 0: c - 0 is c
            d.sub_(z)
        d.mul_(s)
    return d.reshape(codes.shape)


if torch is not None:

    class FakeQuantSTE(torch.autograd.Function):
        """:func:`fake_quantize_tensor` forward; straight-through gradient, 1 inside the clip range and 0
        outside. torch ops only, so autograd and ``torch.compile`` trace it on any device."""

        @staticmethod
        def forward(ctx, x, scale, zero_point, spec):
            out, inside = fake_quantize_tensor(x, scale, zero_point, spec)
            ctx.save_for_backward(inside)
            return out

        @staticmethod
        def backward(ctx, grad):
            (inside,) = ctx.saved_tensors
            return grad * inside.to(grad.dtype), None, None, None


def fake_quantize(x: Any, qparams: QParams, *, name: str = "x") -> Any:
    """``dequantize(quantize(x))`` in ``x``'s dtype; on torch tensors differentiable with the
    straight-through estimator (gradient 1 where ``x`` is inside the clip range, 0 outside),
    equal to ``torch.fake_quantize_per_{tensor,channel}_affine`` forward and backward. Torch
    tensors stay in torch, on their device (:func:`fake_quantize_tensor`); NaN or inf there
    propagate instead of raising, as torch's own fake-quant does."""
    if is_torch(x):
        if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"{name}: fake_quantize needs a floating-point tensor, got {x.dtype}")
        qp = qparams.for_shape(tuple(x.shape), name)
        scale = torch.as_tensor(qp.scale, device=x.device)
        zp = torch.as_tensor(qp.zero_point, device=x.device)
        if torch.is_grad_enabled() and x.requires_grad:
            return FakeQuantSTE.apply(x, scale, zp, qp.spec)
        return fake_quantize_tensor(x, scale, zp, qp.spec)[0]
    a = real_array(x, name, integers="float")
    require_finite(a, name, "quantization")
    out, _ = fake_quantize_array(a, qparams.for_shape(a.shape, name))
    src = as_numpy(x, name)
    return like(out.astype(src.dtype if src.dtype.kind == "f" else out.dtype), x)

