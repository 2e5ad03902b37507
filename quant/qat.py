"""Quantization-aware training: the FakeQuantize module, prepare_qat and convert."""

from __future__ import annotations

import copy
import math
from typing import Tuple, TypeVar, Union, cast

import numpy as np

from precision.arrays import contiguous, real_array, require_finite
import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import blocks_2d, qparams_from_range
from .modules import QuantizedLinear
from .quantize import (QParams, blocked, dequantize, fake_quantize, fake_quantize_array, params_view,
                       quantize)
from .spec import PerChannel, QuantSpec


class _LSQ(torch.autograd.Function):
    """Fake quantization with a learned scale (LSQ, Esser et al. 2019).

    d/dx: 1 inside the clip range, 0 outside (STE). d/ds per element:
    ``round(x/s) - x/s`` inside, ``qmin - zp`` / ``qmax - zp`` at the clip
    ends, summed per block and multiplied by ``grad_scale = 1/sqrt(N * qmax)``.
    """

    @staticmethod
    def forward(ctx, x, scale, qp_template: QParams, grad_scale: float):
        a = real_array(x, "x", integers="float")
        require_finite(a, "x", "quantization")
        s = np.maximum(scale.detach().cpu().numpy().astype(np.float32), np.finfo(np.float32).eps)
        qp = QParams(s, qp_template.zero_point, qp_template.spec, tuple(a.shape))
        out, inside = fake_quantize_array(a, qp)
        v = (blocked(a, qp.block) / params_view(s)).reshape(a.shape)
        dq = np.rint(blocked(out, qp.block) / params_view(s)).reshape(a.shape)  # q - zp, small integers
        ds = np.where(inside, dq - v, dq)
        ctx.save_for_backward(torch.from_numpy(inside), torch.from_numpy(ds.astype(np.float32)))
        ctx.block, ctx.grad_scale, ctx.pshape = qp.block, grad_scale, s.shape
        return torch.from_numpy(out).to(dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad):
        inside, ds = ctx.saved_tensors
        g = grad.detach().cpu().numpy().astype(np.float32)
        gs = blocked(g * ds.numpy(), ctx.block)
        axes = tuple(range(1, gs.ndim, 2))
        grad_s = gs.sum(axis=axes).reshape(ctx.pshape) * ctx.grad_scale
        return grad * inside.to(grad.dtype), torch.from_numpy(grad_s.astype(np.float32)), None, None


class FakeQuantize(nn.Module):
    """Observe ranges and fake-quantize a tensor in training.

    ``observer``: ``"minmax"`` (running min/max) or ``"moving_average"``
    (with ``momentum``). ``enable_observer(False)`` freezes the range,
    ``enable_fake_quant(False)`` makes the module the identity.
    ``learn_scale=True`` turns the scale into a parameter trained with LSQ's
    gradient (initialised from the observer on the first batch; the observer
    does not overwrite it afterwards).
    """

    min_val: torch.Tensor
    max_val: torch.Tensor
    zero_point: torch.Tensor
    observed_shape: torch.Tensor
    scale: torch.Tensor  # a Parameter when learn_scale, else a buffer

    def __init__(self, spec: QuantSpec, observer: str = "minmax", momentum: float = 0.01,
                 learn_scale: bool = False) -> None:
        super().__init__()
        if observer not in ("minmax", "moving_average"):
            raise ValueError(f"observer must be 'minmax' or 'moving_average', got {observer!r}")
        self.spec, self.observer, self.momentum, self.learn_scale = spec, observer, momentum, learn_scale
        self.observer_enabled = True
        self.fake_quant_enabled = True
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))
        # the shape of the last observed input, saved so a resumed module rebuilds the same QParams
        self.register_buffer("observed_shape", torch.empty(0, dtype=torch.int64))
        if learn_scale:
            self.scale = nn.Parameter(torch.empty(0))
        else:
            self.register_buffer("scale", torch.empty(0))

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The shape of the last observed input (None before the first batch)."""
        return tuple(int(v) for v in self.observed_shape.tolist()) if self.min_val.numel() else None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the buffers are sized by the first batch; a fresh module takes the saved sizes before the copy
        for name in ("min_val", "max_val", "zero_point", "scale", "observed_shape"):
            saved = state_dict.get(prefix + name)
            cur = getattr(self, name)
            if isinstance(saved, torch.Tensor) and saved.shape != cur.shape:
                cur.data = torch.empty(saved.shape, dtype=cur.dtype, device=cur.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def enable_observer(self, on: bool = True) -> "FakeQuantize":
        self.observer_enabled = bool(on)
        return self

    def enable_fake_quant(self, on: bool = True) -> "FakeQuantize":
        self.fake_quant_enabled = bool(on)
        return self

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        a = real_array(x, "x", integers="float")
        require_finite(a, "x", "quantization")
        x2d = blocks_2d(a, self.spec)
        lo = torch.from_numpy(np.asarray(x2d.min(axis=1), np.float32).reshape(-1))
        hi = torch.from_numpy(np.asarray(x2d.max(axis=1), np.float32).reshape(-1))
        if self.min_val.numel() == 0 or self.min_val.shape != lo.shape:
            self.min_val, self.max_val = lo, hi
        elif self.observer == "minmax":
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        else:
            self.min_val = self.min_val + self.momentum * (lo - self.min_val)
            self.max_val = self.max_val + self.momentum * (hi - self.max_val)
        qp = qparams_from_range(self.min_val.numpy(), self.max_val.numpy(), self.spec, tuple(a.shape))
        self.observed_shape = torch.tensor(a.shape, dtype=torch.int64)
        self.zero_point = torch.from_numpy(qp.zero_point.copy())
        if self.learn_scale:
            if self.scale.numel() == 0:  # in place: an optimizer made before the first batch keeps training it
                self.scale.data = torch.from_numpy(qp.scale.copy()).to(self.scale.device)
        else:
            self.scale = torch.from_numpy(qp.scale.copy())

    def qparams(self, shape: tuple[int, ...] | None = None) -> QParams:
        """The current QParams (for ``shape``, default the last observed one)."""
        observed = self.shape
        if self.scale.numel() == 0 or observed is None:
            raise RuntimeError("FakeQuantize has no range yet: run a batch with the observer enabled")
        s = np.maximum(self.scale.detach().cpu().numpy().astype(np.float32), np.finfo(np.float32).eps)
        qp = QParams(s, self.zero_point.numpy(), self.spec, observed)
        return qp.for_shape(tuple(shape)) if shape is not None else qp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:  # nothing to observe or round; torch's fake-quant returns the empty tensor too
            return x
        if self.observer_enabled and not (self.learn_scale and self.scale.numel() > 0):
            self._observe(x)
        if not self.fake_quant_enabled:
            return x
        if self.learn_scale:
            qp = self.qparams(tuple(x.shape))
            n = int(np.prod(qp.block))
            return _LSQ.apply(x, self.scale, qp, 1.0 / math.sqrt(n * max(self.spec.qmax, 1)))
        return fake_quantize(x, self.qparams(tuple(x.shape)))

    def extra_repr(self) -> str:
        return (f"{self.spec.describe()}, observer={self.observer}, learn_scale={self.learn_scale}, "
                f"observer_enabled={self.observer_enabled}, fake_quant_enabled={self.fake_quant_enabled}")


_Q = TypeVar("_Q", "QATLinear", "QATConv2d")


def _adopt(q: _Q, m: nn.Linear | nn.Conv2d, weights: QuantSpec, activations: QuantSpec | None, fq: dict) -> _Q:
    """Give the QAT module ``q`` the float module's parameters and its fake-quantizers."""
    q.weight, q.bias = m.weight, m.bias  # type: ignore[assignment]  # torch declares bias a Parameter, None allowed
    q.weight_fake_quant = FakeQuantize(weights, **fq)
    q.input_fake_quant = FakeQuantize(activations, observer="moving_average") if activations else None
    return q


class QATLinear(nn.Linear):
    """nn.Linear that fake-quantizes its weight and (optionally) its input activations."""

    weight_fake_quant: FakeQuantize
    input_fake_quant: FakeQuantize | None

    @classmethod
    def from_float(cls, m: nn.Linear, weights: QuantSpec, activations: QuantSpec | None, **fq) -> "QATLinear":
        q = cls(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        return _adopt(q, m, weights, activations, fq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_fake_quant is not None:
            shp = x.shape
            x = self.input_fake_quant(x.reshape(-1, shp[-1])).reshape(shp)
        return F.linear(x, self.weight_fake_quant(self.weight), self.bias)


class QATConv2d(nn.Conv2d):
    """nn.Conv2d that fake-quantizes its weight and (optionally) its input activations."""

    weight_fake_quant: FakeQuantize
    input_fake_quant: FakeQuantize | None

    @classmethod
    def from_float(cls, m: nn.Conv2d, weights: QuantSpec, activations: QuantSpec | None, **fq) -> "QATConv2d":
        pair = Tuple[int, int]
        q = cls(m.in_channels, m.out_channels, cast(pair, m.kernel_size), cast(pair, m.stride),
                cast(Union[str, pair], m.padding), cast(pair, m.dilation), m.groups,
                m.bias is not None, m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)
        return _adopt(q, m, weights, activations, fq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_fake_quant is not None:
            x = self.input_fake_quant(x)
        return self._conv_forward(x, self.weight_fake_quant(self.weight), self.bias)


def _swap(model: nn.Module, fn) -> None:
    for name, child in model.named_children():
        new = fn(child)
        if new is not None:
            setattr(model, name, new)
        else:
            _swap(child, fn)


def prepare_qat(model: nn.Module, weights: QuantSpec = QuantSpec(granularity=PerChannel(0)),
                activations: QuantSpec | None = None, *, learn_scale: bool = False, inplace: bool = False) -> nn.Module:
    """Swap every nn.Linear / nn.Conv2d for a module that fake-quantizes weights (and input
    activations when ``activations`` is given). Returns the prepared model (a copy unless ``inplace``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    m = model if inplace else copy.deepcopy(model)

    def fn(child):
        if type(child) is nn.Linear:
            return QATLinear.from_float(child, weights, activations, learn_scale=learn_scale)
        if type(child) is nn.Conv2d:
            return QATConv2d.from_float(child, weights, activations, learn_scale=learn_scale)
        return None

    _swap(m, fn)
    return m


class QuantizedConv2d(nn.Module):
    """Conv2d with integer weight codes plus scales; dequantizes on the fly."""

    def __init__(self, conv: nn.Conv2d, codes: np.ndarray, qparams: QParams, act_qparams: QParams | None) -> None:
        super().__init__()
        self.qparams, self.act_qparams = qparams, act_qparams
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.register_buffer("weight_codes", torch.from_numpy(contiguous(codes)))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_qparams is not None:
            x = fake_quantize(x.detach(), self.act_qparams.for_shape(tuple(x.shape)))
        w = dequantize(self.weight_codes, self.qparams)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Turn QAT modules into modules that store integer weights plus scales (static activations
    use the range their FakeQuantize observed). Outputs match the fake-quant model within float
    tolerance."""
    m = model if inplace else copy.deepcopy(model)

    def fn(child):
        if isinstance(child, (QATLinear, QATConv2d)):
            w = child.weight.detach()
            with torch.no_grad():  # the range a forward pass would use for the current weight
                child.weight_fake_quant(w)
            qp = child.weight_fake_quant.qparams(tuple(w.shape))
            codes = np.asarray(quantize(w.cpu().numpy(), qp))
            act = child.input_fake_quant.qparams() if child.input_fake_quant is not None else None
            if isinstance(child, QATLinear):
                return QuantizedLinear(codes, qp, child.bias, "static" if act is not None else None, act)
            return QuantizedConv2d(child, codes, qp, act)
        return None

    _swap(m, fn)
    return m
