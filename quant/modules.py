"""Quantized inference modules that store integer weights (the memory saving is real)."""

from __future__ import annotations

import math
import threading
import weakref

from typing import Any

import numpy as np

from precision.arrays import contiguous
import torch
import torch.nn.functional as F
from torch import nn

from . import _native
from .calibrate import _EPS, calibrate, constant_block_scale, scale_zero_point, symmetric_scale
from .quantize import QParams, dequantize_tensor, fake_quantize, fake_quantize_tensor, round_scaled
from .spec import PerChannel, PerGroup, PerTensor, QuantSpec

# per-token activations for the int8 kernel: symmetric int8, one scale per row
# (codes in [-127, 127]: scale amax / 127, so no code can round past the range and the kernel skips
# the clamp pass; the full range [-128, 127] also runs on the kernel, with the clamp: amax / 127.5, and
# +amax rounds to 128)
TOKEN_SPEC = QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True, granularity=PerChannel(kept_axis=0))
# the same over the full range [-128, 127] (scale amax / 127.5): compressed-tensors' dynamic per-token int8
# (W8A8), which has no narrow range; a checkpoint declaring it runs with exactly that rounding
TOKEN_SPEC_FULL = QuantSpec(bits=8, signed=True, symmetric=True, granularity=PerChannel(kept_axis=0))
# affine per-token int8: one scale and one zero point per row, the range [min, max] (widened to hold 0)
# mapped onto [-128, 127]. Inputs with a skewed range (a GELU's output, most LayerNorm outputs) lose
# half a bit or more to a symmetric scale; compressed-tensors' asymmetric dynamic per-token int8, which
# vLLM runs (its "azp" kernels, CPU and GPU)
TOKEN_SPEC_AFFINE = QuantSpec(bits=8, signed=True, symmetric=False, granularity=PerChannel(kept_axis=0))


def _is_token_spec(spec: QuantSpec) -> bool:
    """int8, one scale (and for an affine spec one zero point) per token (row): what the int8 kernel
    quantizes activations with."""
    return spec.bits == 8 and spec.signed and spec.granularity == PerChannel(kept_axis=0)


class _Scratch(threading.local):
    """Per-thread scratch for the int8 kernel's activation quantization, reused by every layer.

    A fresh CPU tensor of activation size costs more in page faults than the
    arithmetic done in it, so the int8 codes (and, on the torch fallback, the
    float temporary) live in buffers that grow to the largest activation a
    thread has seen (for MiniLM at 32 x 128 tokens: 6 MB, + 25 MB) and stay; :func:`release_scratch`
    frees the calling thread's. ``last`` remembers whose codes the buffer
    holds, so layers that share an input and a SmoothQuant scale (Q, K and V)
    quantize it once.
    """

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}
        self.last: tuple | None = None

    def take(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = shape[0] * shape[1]
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < n:
            self.last = None
            with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
                buf = self.buffers[dtype] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)


_SCRATCH = _Scratch()


def release_scratch() -> None:
    """Free the calling thread's int8-kernel scratch buffers (they are re-made on the next call)."""
    _SCRATCH.buffers.clear()
    _SCRATCH.last = None


def codes_buffer(codes: np.ndarray, spec: QuantSpec) -> torch.Tensor:
    """Integer codes as a module stores them: 4 bits or fewer two per byte (flat, low nibble first, offset
    by ``qmin``: the checkpoint's packing, :func:`quant.storage.pack_codes`), wider ones as they are."""
    if spec.bits <= 4:
        from .storage import pack_codes

        packed, _ = pack_codes(np.ascontiguousarray(codes).reshape(-1), spec)
        return torch.from_numpy(np.ascontiguousarray(packed))
    return torch.from_numpy(contiguous(codes))


def register_quantized_state(module: nn.Module, codes: np.ndarray, qparams: QParams,
                             act_qparams: QParams | None) -> None:
    """The buffers of a quantized layer: ``weight_codes`` (:func:`codes_buffer`), ``weight_scale``,
    ``weight_zero_point``, and the static activation params ``act_scale`` / ``act_zero_point`` (None
    without), so that a saved model loads into a fresh skeleton with nothing held outside its state."""
    module.register_buffer("weight_codes", codes_buffer(codes, qparams.spec))
    module.register_buffer("weight_scale", torch.from_numpy(qparams.scale.copy()))
    module.register_buffer("weight_zero_point", torch.from_numpy(qparams.zero_point.copy()))
    module.register_buffer("act_scale", None if act_qparams is None else torch.from_numpy(act_qparams.scale.copy()))
    module.register_buffer("act_zero_point", None if act_qparams is None else
                           torch.from_numpy(act_qparams.zero_point.copy()))


def weight_bytes(module: Any) -> int:
    """Bytes a quantized layer stores for its weight: the codes as held, float32 scales, and int32 zero
    points unless symmetric."""
    return int(module.weight_codes.numel() * module.weight_codes.element_size() + module.weight_scale.numel() * 4
               + (0 if module.spec.symmetric else module.weight_zero_point.numel() * 4))


def unpacked_codes(buf: torch.Tensor, shape: tuple[int, ...], spec: QuantSpec) -> torch.Tensor:
    """The codes of :func:`codes_buffer` back in ``shape`` (int8 or uint8), in torch on ``buf``'s device."""
    if spec.bits > 4:
        return buf
    n = math.prod(shape)
    u = torch.stack([buf & 0x0F, buf >> 4], dim=1).reshape(-1)[:n]
    return (u.to(torch.int16) + spec.qmin).to(torch.int8 if spec.signed else torch.uint8).reshape(shape)


SAVE_PRETRAINED_REFUSED = (
    "save_pretrained would write lowbit's quantized modules, which transformers' from_pretrained does not read "
    "(it would re-initialise those layers at random). Save it with lowbit.save_quantized(model, dir) (a "
    "compressed-tensors directory that transformers, vLLM and lowbit.load_quantized load), or with "
    "torch.save(model.state_dict()) into a model quantized or prepared the same way")


def refuse_save_pretrained(model: nn.Module) -> None:
    """Make ``save_pretrained`` (and sentence-transformers' ``save``) of a quantized model raise with
    the way to save it instead of silently writing what ``from_pretrained`` re-initialises."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(SAVE_PRETRAINED_REFUSED)

    for m in model.modules():
        for name in ("save_pretrained", "save"):
            if callable(getattr(m, name, None)) and name in dir(type(m)):
                object.__setattr__(m, name, refuse)


def _same_scale(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))


def _has_int_mm() -> bool:
    return hasattr(torch, "_int_mm")


class QuantizedLinear(nn.Module):
    """A Linear layer whose weight is stored as integer codes plus scales (and zero points).

    ``activations``:
      * ``None``: weight-only; the weight is dequantized on the fly (float matmul).
      * ``"static"``: inputs are fake-quantized with the frozen ``act_qparams``.
      * ``"dynamic"``: inputs (first multiplied by ``input_scale`` when the
        weight was smoothed, see ``PTQConfig.smoothquant``), viewed as (tokens, features), are quantized with
        ``act_spec`` on each call. With int8 per-token activations
        (the default ``TOKEN_SPEC``, codes in [-127, 127], the full range
        ``TOKEN_SPEC_FULL``, or affine ``TOKEN_SPEC_AFFINE``, whose zero points are
        taken out of the int32 accumulator exactly) and int8 symmetric per-tensor/per-channel
        weights this runs on the int8 kernel ``torch._int_mm`` (int32
        accumulation), then rescales; otherwise it fake-quantizes in float.
    """

    input_scale: torch.Tensor | None
    act_scale: torch.Tensor | None
    act_zero_point: torch.Tensor | None
    weight_codes: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    _ws: torch.Tensor

    def __init__(self, codes: np.ndarray, qparams: QParams, bias: torch.Tensor | None,
                 activations: str | None = None, act_qparams: QParams | None = None,
                 act_spec: QuantSpec = TOKEN_SPEC, input_scale: np.ndarray | None = None) -> None:
        super().__init__()
        if activations not in (None, "static", "dynamic"):
            raise ValueError(f"activations must be None, 'static' or 'dynamic', got {activations!r}")
        if activations == "static" and act_qparams is None:
            raise ValueError("activations='static' needs act_qparams from calibration")
        self.out_features, self.in_features = codes.shape
        self.spec = qparams.spec
        self.act_qparams = act_qparams
        self.activations = activations
        self.act_spec = act_spec
        # SmoothQuant: the stored weight was multiplied by s per input channel, so inputs are divided by it
        self.register_buffer("input_scale", None if input_scale is None else
                             torch.from_numpy(np.asarray(input_scale, np.float32).reshape(-1).copy()))
        register_quantized_state(self, codes, qparams, act_qparams)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # set by ptq with PTQConfig(gelu_in_place=True) once it has shown the output feeds nothing but an exact GELU, which
        # it then removes: GELU is applied here, in place in this layer's fresh output (same values)
        self.gelu_in_place = False
        spec = qparams.spec
        self.int_kernel = (
            activations == "dynamic" and _is_token_spec(act_spec) and _has_int_mm() and spec.bits == 8 and spec.signed and spec.symmetric
            and isinstance(spec.granularity, (PerTensor, PerChannel))
            and (isinstance(spec.granularity, PerTensor) or spec.granularity.kept_axis % 2 == 0)
            and self.in_features % 8 == 0 and self.out_features % 8 == 0
        )
        if self.int_kernel:
            # (in, out) view of the row-major (out, in) codes: the column-major layout _int_mm is fastest on
            self._wt = self.weight_codes.t()
            self.register_buffer("_ws", torch.empty(0), persistent=False)
            self.register_buffer("_wsum", None, persistent=False)
            self._sync_kernel()
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._sync_kernel())

    def _sync_kernel(self) -> None:
        """The int8 kernel's views of the (possibly just loaded) weight buffers."""
        if self.int_kernel:
            self._wt = self.weight_codes.t()
            self._ws = self.weight_scale.reshape(1, -1).to(torch.float32).clone()
            if not self.act_spec.symmetric:  # sum_k (x_k - z) w_k = acc - z * sum_k w_k: the weight codes' row sums
                w = self.weight_codes
                # numpy's reduction casts in small buffers; torch's first makes an int32 copy of the whole
                # weight, which the allocator then keeps (tens of MB over a model's layers)
                self._wsum = (torch.from_numpy(w.numpy().sum(axis=1, dtype=np.int32)) if w.device.type == "cpu"
                              else w.sum(dim=1, dtype=torch.int32))

    @property
    def qparams(self) -> QParams:
        """The weight's params, read from the buffers (numpy, on the CPU)."""
        shape = (self.out_features, self.in_features)
        pshape = self.spec.params_shape(shape)
        return QParams(self.weight_scale.detach().cpu().numpy().reshape(pshape),
                       self.weight_zero_point.detach().cpu().numpy().reshape(pshape), self.spec, shape)

    @property
    def kernel(self) -> str:
        if not self.int_kernel:
            return "dequantize + float32 matmul"
        return f"torch._int_mm (int8 x int8 -> int32), quantize/rescale: {_native.status()}"

    def codes(self) -> torch.Tensor:
        """The weight's integer codes, (out, in) (unpacked when stored two per byte)."""
        return unpacked_codes(self.weight_codes, (self.out_features, self.in_features), self.spec)

    def dequantized_weight(self) -> torch.Tensor:
        """``(codes - zero_point) * scale`` from the buffers, in torch on their device."""
        return dequantize_tensor(self.codes(), self.weight_scale, self.weight_zero_point, self.spec)

    @property
    def stored_bytes(self) -> int:
        b = weight_bytes(self)
        if self.bias is not None:
            b += self.bias.numel() * self.bias.element_size()
        if self.act_qparams is not None:
            b += self.act_qparams.nbytes
        if self.input_scale is not None:
            b += self.input_scale.numel() * 4
        return int(b)

    def _quantize_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-token int8 codes (tokens, features), scales (tokens, 1) and, for an affine ``act_spec``,
        int32 zero points (tokens,) (else None) of ``x`` after the
        SmoothQuant input scale: the arithmetic of ``quant.quantize`` (tested bit for bit), in one
        fused C pass (:mod:`quant._native`) or, where that is unavailable or a row is not finite, in as
        few torch passes as eager torch allows: in place in per-thread scratch (see :class:`_Scratch`),
        with ``|x|``'s row max from ``amax`` and ``amin`` instead of ``abs(x)``. The codes live in the
        scratch buffer: use them before the next quantization in this thread."""
        x2 = x.reshape(-1, x.shape[-1]).float()
        scratch = _SCRATCH
        # an in-place change of x bumps its version; inference tensors have none, so they are not reused
        version = None if x.is_inference() else x._version
        last = scratch.last
        spec = self.act_spec
        if last is not None and version is not None and last[0]() is x and last[1] == version \
                and _same_scale(last[2], self.input_scale) and last[3] == spec:
            return last[4], last[5], last[6]
        xq = scratch.take(torch.int8, x2.shape)
        sx = torch.empty(x2.shape[0], 1)
        zx = None
        if not spec.symmetric:
            zx = torch.empty(x2.shape[0], dtype=torch.int32)
            if not _native.quantize_tokens_affine(x2, self.input_scale, float(_EPS), spec.qmin, spec.qmax, xq, sx, zx):
                t = scratch.take(torch.float32, x2.shape)
                src = torch.mul(x2, self.input_scale, out=t) if self.input_scale is not None else x2
                sx, z = scale_zero_point(src.amin(dim=1, keepdim=True), src.amax(dim=1, keepdim=True), spec)
                round_scaled(src, 1.0 / sx, out=t)
                zf = z.to(torch.float32)
                xq.copy_(torch.maximum(torch.minimum(t, spec.qmax - zf, out=t), spec.qmin - zf, out=t).add_(zf))
                zx = z.reshape(-1)
        elif not _native.quantize_tokens(x2, self.input_scale, (spec.qmax - spec.qmin) / 2, float(_EPS),
                                         spec.qmin, spec.qmax, xq, sx):
            t = scratch.take(torch.float32, x2.shape)
            src = torch.mul(x2, self.input_scale, out=t) if self.input_scale is not None else x2
            hi, lo = src.amax(dim=1, keepdim=True), src.amin(dim=1, keepdim=True)
            sx = constant_block_scale(lo, hi, symmetric_scale(torch.maximum(hi, -lo), spec), spec)
            round_scaled(src, 1.0 / sx, out=t)
            xq.copy_(t if spec.narrow_range else t.clamp_(spec.qmin, spec.qmax))
        scratch.last = None if version is None else (weakref.ref(x), version, self.input_scale, spec, xq, sx, zx)
        return xq, sx, zx

    @torch.no_grad()  # integer codes carry no gradient; the float path is the one for training
    def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, sx, zx = self._quantize_tokens(x)
        rows = xq.shape[0]
        if rows <= 16:  # _int_mm wants more than 16 rows
            xq = torch.cat([xq, xq.new_zeros(17 - rows, xq.shape[1])])
        acc = torch._int_mm(xq, self._wt)[:rows]
        y = _native.rescale(acc, sx, self._ws, self.bias, zx, self._wsum if zx is not None else None)
        if y is not None:
            return self._activate(y.reshape(*x.shape[:-1], self.out_features).to(x.dtype))
        # the same epilogue in torch, in place in the accumulator's memory, in same-dtype passes (a mixed
        # int32 * float op is several times slower than a conversion plus a float op); not addcmul, whose
        # fused multiply-add rounds differently from the C pass
        if zx is not None:
            acc.sub_(zx.reshape(-1, 1) * self._wsum)
        y = acc.view(torch.float32)
        y.copy_(acc)
        y.mul_(sx).mul_(self._ws)
        if self.bias is not None:
            y.add_(self.bias)
        return self._activate(y.reshape(*x.shape[:-1], self.out_features).to(x.dtype))

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        # in place: y is this call's own fresh tensor, and a new result per FFN layer costs more in
        # page faults than the GELU itself
        return torch.ops.aten.gelu_(y) if self.gelu_in_place else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int_kernel:
            return self._int8_forward(x)
        if self.input_scale is not None:
            x = x * self.input_scale
        if self.activations == "static":
            x2 = x.reshape(-1, x.shape[-1])  # activation params are calibrated on (tokens, features)
            assert self.act_scale is not None and self.act_zero_point is not None and self.act_qparams is not None
            x = fake_quantize_tensor(x2, self.act_scale, self.act_zero_point, self.act_qparams.spec)[0].reshape(x.shape)
        elif self.activations == "dynamic":
            x2 = x.reshape(-1, x.shape[-1])
            x = fake_quantize(x2, calibrate(x2, self.act_spec), name="activation").reshape(x.shape)
        w = self.weight_as(x.dtype)
        y = F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        return F.gelu(y) if self.gelu_in_place else y  # not in place: y may carry autograd history

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """``dequantized_weight().to(dtype)``: for int8 codes per row or per group of columns, float32 or
        bfloat16, in one C pass (the same values; :func:`quant._native.dequantize_int8`)."""
        g = self.spec.granularity
        rowwise = (isinstance(g, PerChannel) and g.kept_axis % 2 == 0) or (isinstance(g, PerGroup) and g.reduced_axis % 2 == 1)
        if rowwise and self.spec.bits == 8 and self.spec.signed and self.weight_codes.device.type == "cpu":
            zp = None if self.spec.symmetric else self.weight_zero_point
            w = _native.dequantize_int8(self.weight_codes, self.weight_scale, zp, dtype)
            if w is not None:
                return w
        return self.dequantized_weight().to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weights={self.qparams.spec.describe()}, activations={self.activations}, kernel={self.kernel}"
                + (", then GELU in place" if self.gelu_in_place else ""))


class _DequantizingLinear(nn.Module):
    """A Linear layer that holds its weight in a compact form and dequantizes it per call
    (``dequantized_weight``, float32), dropping it after the matmul; ``weight_codes``, ``weight_scale`` and
    the optional float ``bias`` are its state."""

    weight_codes: torch.Tensor
    weight_scale: torch.Tensor
    bias: nn.Parameter | None
    out_features: int
    in_features: int

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def stored_bytes(self) -> int:
        """Bytes of the codes, the scales (as held) and the bias."""
        b = self.weight_codes.numel() * self.weight_codes.element_size() + self.weight_scale.numel() * \
            self.weight_scale.element_size() + self._extra_bytes()
        return int(b + (0 if self.bias is None else self.bias.numel() * self.bias.element_size()))

    def _extra_bytes(self) -> int:
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


class Float8Linear(_DequantizingLinear):
    """A Linear layer whose weight is stored as fp8 e4m3fn codes (1 byte each) times a float32 scale, one
    per output row or one for the whole weight, dequantized per call (``code * scale`` in float32, then
    the input's dtype) and dropped after the matmul: no dense copy is kept.

    ``codes``: (out, in) fp8 e4m3fn codes (an ``ml_dtypes`` array, or their bits as uint8). ``scale``:
    float32, (out, 1) or (1, 1). ``bias``: float or None."""

    def __init__(self, codes: np.ndarray, scale: np.ndarray, bias: torch.Tensor | None) -> None:
        super().__init__()
        if codes.ndim != 2 or codes.dtype.itemsize != 1:
            raise ValueError(f"Float8Linear: codes must be a 2-D array of 1-byte fp8 codes, got {codes.dtype} {codes.shape}")
        self.out_features, self.in_features = codes.shape
        scale = np.asarray(scale, np.float32)
        if scale.shape not in ((self.out_features, 1), (1, 1)):
            raise ValueError(f"Float8Linear: scale must be (out, 1) or (1, 1), got {scale.shape}")
        bits = torch.from_numpy(contiguous(codes.view(np.uint8)))
        self.register_buffer("weight_codes", bits.view(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.from_numpy(scale.copy()))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        """``code * scale`` in float32, (out, in)."""
        return self.weight_codes.to(torch.float32) * self.weight_scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp8_e4m3fn x float32 scale"


class BlockLinear(_DequantizingLinear):
    """A Linear layer whose weight is stored in a block format (MXFP4/6/8, NVFP4; :mod:`precision.blocks`):
    element codes (fp4 two per byte, low nibble first; wider ones a byte each) and one scale code per block
    along the rows, dequantized per call and dropped after the matmul (no dense copy is kept).

    The value of an element is its format's value times the block's: ``2**(e - 127)`` for the MX formats'
    E8M0 scale ``e`` (exact in float32), or, for NVFP4 (e4m3 block scales), ``scale / global_scale`` in
    float32, compressed-tensors' definition (``global_scale`` is the reciprocal of lowbit's tensor scale).

    ``codes``: (out, in) uint8 element codes. ``scales``: (out, in / block) uint8 scale codes. ``fmt``: the
    preset's name. ``global_scale``: NVFP4's float32, else None."""

    table: torch.Tensor
    scale_table: torch.Tensor

    def __init__(self, codes: np.ndarray, scales: np.ndarray, fmt: str, global_scale: float | None,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        from precision import decode
        from precision.blocks import get_block_format, pack_fp4

        self.format = get_block_format(fmt)
        self.fmt_name = fmt
        if self.format.is_int or self.format.scale_rule not in ("floor", "nvfp4"):
            raise ValueError(f"BlockLinear: {fmt} is not an MX float or NVFP4 format")
        if codes.ndim != 2 or codes.shape[1] % self.format.block or scales.shape != (codes.shape[0], codes.shape[1] // self.format.block):
            raise ValueError(f"BlockLinear: codes {codes.shape} and scales {scales.shape} do not match {fmt}'s blocks")
        if (self.format.scale_rule == "nvfp4") != (global_scale is not None):
            raise ValueError("BlockLinear: NVFP4 takes a global scale, the MX formats none")
        self.out_features, self.in_features = codes.shape
        el = self.format.element_format
        stored = pack_fp4(codes.reshape(-1)) if el.bits <= 4 else codes.astype(np.uint8)
        self.register_buffer("weight_codes", torch.from_numpy(contiguous(stored)))
        self.register_buffer("weight_scale", torch.from_numpy(contiguous(scales.astype(np.uint8))))
        values = np.asarray(decode(np.arange(el.num_codes, dtype=np.uint8), el), np.float32)
        self.register_buffer("table", torch.from_numpy(contiguous(values)))
        self.global_scale = global_scale
        if global_scale is not None:
            self.register_buffer("scale_table", torch.from_numpy(contiguous(
                np.asarray(decode(np.arange(256, dtype=np.uint8), "fp8_e4m3fn"), np.float32))))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def codes(self) -> torch.Tensor:
        """The element codes, (out, in) uint8."""
        if self.format.element_format.bits > 4:
            return self.weight_codes.reshape(self.out_features, self.in_features)
        c = self.weight_codes
        return torch.stack([c & 0x0F, c >> 4], dim=1).reshape(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 (out, in): element value times block scale (see the class docstring)."""
        v = self.table[self.codes().long()].reshape(self.out_features, -1, self.format.block)
        s = self.weight_scale.to(torch.int32)
        if self.global_scale is None:
            factor = torch.ldexp(torch.ones(s.shape), (s - 127).to(torch.float32))
            factor = torch.where(s == 255, torch.full_like(factor, float("nan")), factor)
        else:
            factor = self.scale_table[s.long()] / torch.tensor(self.global_scale, dtype=torch.float32)
        return (v * factor[..., None]).reshape(self.out_features, self.in_features)

    def _extra_bytes(self) -> int:
        return 4 if self.global_scale is not None else 0  # NVFP4's float32 global scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.fmt_name}"
