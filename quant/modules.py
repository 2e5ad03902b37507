"""Quantized inference modules that store integer weights (the memory saving is real)."""

from __future__ import annotations

import numpy as np

from precision._bridge import contiguous
import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import calibrate, symmetric_scale
from .quantize import QParams, dequantize, fake_quantize, round_scaled
from .spec import PerChannel, PerTensor, QuantSpec

# per-token activations for the int8 kernel: symmetric int8, one scale per row
TOKEN_SPEC = QuantSpec(bits=8, signed=True, symmetric=True, granularity=PerChannel(axis=0))


def _has_int_mm() -> bool:
    return hasattr(torch, "_int_mm")


class QuantizedLinear(nn.Module):
    """A Linear layer whose weight is stored as integer codes plus scales (and zero points).

    ``activations``:
      * ``None``: weight-only; the weight is dequantized on the fly (float matmul).
      * ``"static"``: inputs are fake-quantized with the frozen ``act_qparams``.
      * ``"dynamic"``: inputs (first multiplied by ``input_scale`` when the
        weight was smoothed, see ``ptq(smooth=...)``), viewed as (tokens, features), are quantized with
        ``act_spec`` on each call. With int8 symmetric per-token activations
        (the default ``TOKEN_SPEC``) and int8 symmetric per-tensor/per-channel
        weights this runs on the int8 kernel ``torch._int_mm`` (int32
        accumulation), then rescales; otherwise it fake-quantizes in float.
    """

    def __init__(self, codes: np.ndarray, qparams: QParams, bias: torch.Tensor | None,
                 activations: str | None = None, act_qparams: QParams | None = None,
                 act_spec: QuantSpec = TOKEN_SPEC, input_scale: np.ndarray | None = None) -> None:
        super().__init__()
        if activations not in (None, "static", "dynamic"):
            raise ValueError(f"activations must be None, 'static' or 'dynamic', got {activations!r}")
        if activations == "static" and act_qparams is None:
            raise ValueError("activations='static' needs act_qparams from calibration")
        self.out_features, self.in_features = codes.shape
        self.qparams = qparams
        self.act_qparams = act_qparams
        self.activations = activations
        self.act_spec = act_spec
        # SmoothQuant: the stored weight was multiplied by s per input channel, so inputs are divided by it
        self.register_buffer("input_scale", None if input_scale is None else
                             torch.from_numpy(np.asarray(input_scale, np.float32).reshape(-1).copy()))
        self.register_buffer("weight_codes", torch.from_numpy(contiguous(codes)))
        self.register_buffer("weight_scale", torch.from_numpy(qparams.scale.copy()))
        self.register_buffer("weight_zero_point", torch.from_numpy(qparams.zero_point.copy()))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        spec = qparams.spec
        self.int_kernel = (
            activations == "dynamic" and act_spec == TOKEN_SPEC and _has_int_mm() and spec.bits == 8 and spec.signed and spec.symmetric
            and isinstance(spec.granularity, (PerTensor, PerChannel))
            and (isinstance(spec.granularity, PerTensor) or spec.granularity.axis % 2 == 0)
            and self.in_features % 8 == 0 and self.out_features % 8 == 0
        )
        if self.int_kernel:
            # (in, out) view of the row-major (out, in) codes: the column-major layout _int_mm is fastest on
            self._wt = self.weight_codes.t()
            self.register_buffer("_ws", torch.from_numpy(qparams.scale.reshape(1, -1).astype(np.float32).copy())
                                 if qparams.scale.size > 1 else torch.from_numpy(qparams.scale.reshape(1, 1).copy()),
                                 persistent=False)

    @property
    def kernel(self) -> str:
        return "torch._int_mm (int8 x int8 -> int32)" if self.int_kernel else "dequantize + float32 matmul"

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight_codes, self.qparams)

    @property
    def stored_bytes(self) -> int:
        b = self.weight_codes.numel() * self.weight_codes.element_size() + self.qparams.nbytes
        if self.bias is not None:
            b += self.bias.numel() * self.bias.element_size()
        if self.act_qparams is not None:
            b += self.act_qparams.nbytes
        if self.input_scale is not None:
            b += self.input_scale.numel() * 4
        return int(b)

    def _quantize_tokens(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token symmetric int8 codes and scales of ``x2`` (tokens, features), after the SmoothQuant
        input scale: the arithmetic of ``quant.quantize`` (tested bit for bit), in as few passes over
        the activation as eager torch allows. Every op after the first works in place on one temporary
        (a fresh tensor costs its page faults, more than the op), and ``|x|``'s row max comes from two
        reductions (``amax`` and ``amin``) instead of materialising ``abs(x)``."""
        t = torch.mul(x2, self.input_scale) if self.input_scale is not None else None
        src = x2 if t is None else t
        amax = torch.maximum(src.amax(dim=1, keepdim=True), src.amin(dim=1, keepdim=True).neg_())
        sx = symmetric_scale(amax, TOKEN_SPEC)
        t = round_scaled(x2, 1.0 / sx) if t is None else round_scaled(t, 1.0 / sx, in_place=True)
        return t.clamp_(TOKEN_SPEC.qmin, TOKEN_SPEC.qmax).to(torch.int8), sx

    def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        shp = x.shape
        x2 = x.reshape(-1, shp[-1]).float()
        rows = x2.shape[0]
        xq, sx = self._quantize_tokens(x2)
        if rows <= 16:  # _int_mm wants more than 16 rows
            xq = torch.cat([xq, xq.new_zeros(17 - rows, xq.shape[1])])
        acc = torch._int_mm(xq, self._wt)[:rows]
        # epilogue in place in the accumulator's memory, in same-dtype passes (a mixed int32 * float op
        # is several times slower than a conversion plus a float op): float(acc) * row scale * col scale + bias
        y = acc.view(torch.float32)
        y.copy_(acc)
        y.mul_(sx)
        if self.bias is not None:
            torch.addcmul(self.bias, y, self._ws, out=y)
        else:
            y.mul_(self._ws)
        return y.reshape(*shp[:-1], self.out_features).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int_kernel:
            return self._int8_forward(x)
        if self.input_scale is not None:
            x = x * self.input_scale
        if self.activations == "static":
            x2 = x.reshape(-1, x.shape[-1])  # activation params are calibrated on (tokens, features)
            x = fake_quantize(x2, self.act_qparams.for_shape(x2.shape), name="activation").reshape(x.shape)
        elif self.activations == "dynamic":
            x2 = x.reshape(-1, x.shape[-1])
            x = fake_quantize(x2, calibrate(x2, self.act_spec), name="activation").reshape(x.shape)
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weights={self.qparams.spec.describe()}, activations={self.activations}, kernel={self.kernel}")
