"""Quantization-aware training: the FakeQuantize module, prepare_qat and convert."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Tuple, TypeVar, Union, cast

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import blocks_2d, scale_zero_point
from .hooks import as_linear, find_layers, is_transposed_linear
from .modules import QuantizedLinear, refuse_save_pretrained, register_quantized_state, unpacked_codes, weight_bytes
from .quantize import FakeQuantSTE, QParams, blocked, dequantize_tensor, fake_quantize_tensor, params_view, quantize
from .spec import PerChannel, PerTensor, QuantSpec


class _LSQ(torch.autograd.Function):
    """Fake quantization with a learned scale (LSQ, Esser et al. 2019), in torch alone.

    d/dx: 1 inside the clip range, 0 outside (STE). d/ds per element:
    ``round(x/s) - x/s`` inside, ``qmin - zp`` / ``qmax - zp`` at the clip
    ends, summed per block and multiplied by ``grad_scale = 1/sqrt(N * qmax)``.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec: QuantSpec, grad_scale: float):
        s = scale.clamp_min(_F32_EPS)
        out, inside = fake_quantize_tensor(x, s, zero_point, spec)
        shape = tuple(x.shape)
        block, pshape = spec.block_shape(shape), spec.params_shape(shape)
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        sv = params_view(s.to(ct).reshape(pshape))
        v = blocked(x.to(ct), block) / sv
        dq = torch.round(blocked(out.to(ct), block) / sv)  # q - zp, small integers
        ds = torch.where(blocked(inside, block), dq - v, dq)
        ctx.save_for_backward(inside, ds)
        ctx.block, ctx.grad_scale, ctx.sshape = block, grad_scale, tuple(scale.shape)
        return out

    @staticmethod
    def backward(ctx, grad):
        inside, ds = ctx.saved_tensors
        gs = blocked(grad.to(ds.dtype), ctx.block) * ds
        grad_s = gs.sum(dim=tuple(range(1, gs.ndim, 2))).reshape(ctx.sshape) * ctx.grad_scale
        return grad * inside.to(grad.dtype), grad_s.to(torch.float32), None, None, None


_F32_EPS = float(np.finfo(np.float32).eps)


def param_count(spec: QuantSpec, shape: tuple[int, ...]) -> int:
    """How many scales ``spec`` gives a tensor of ``shape``."""
    return math.prod(spec.params_shape(tuple(shape)))


class FakeQuantize(nn.Module):
    """Observe ranges and fake-quantize a tensor in training, in torch alone (any device, no numpy,
    compiles with ``torch.compile(fullgraph=True)``; the same bits as ``quant.fake_quantize``).

    ``params``: the number of scales, fixed at construction (1 for per-tensor; a per-channel weight's
    output channels; :func:`prepare_qat` takes it from the layer), so a saved state loads into a fresh
    module. ``observer``: ``"minmax"`` (running min/max) or ``"moving_average"`` (with ``momentum``).
    ``enable_observer(False)`` freezes the range (:func:`freeze_observers` for a whole model; then
    evaluation is deterministic), ``enable_fake_quant(False)`` makes the module the identity. Observers
    run whenever they are enabled, in eval mode too, as torch.ao's do.
    ``learn_scale=True`` turns the scale into a parameter trained with LSQ's gradient (initialised from
    the observer on the first batch; the observer does not overwrite it afterwards).
    """

    min_val: torch.Tensor
    max_val: torch.Tensor
    zero_point: torch.Tensor
    initialized: torch.Tensor
    scale: torch.Tensor  # a Parameter when learn_scale, else a buffer

    def __init__(self, spec: QuantSpec, observer: str = "minmax", momentum: float = 0.01,
                 learn_scale: bool = False, *, params: int = 1) -> None:
        super().__init__()
        if observer not in ("minmax", "moving_average"):
            raise ValueError(f"observer must be 'minmax' or 'moving_average', got {observer!r}")
        if isinstance(params, bool) or not isinstance(params, int) or params < 1:
            raise ValueError(f"params must be a positive integer (the number of scales), got {params!r}")
        if params != 1 and isinstance(spec.granularity, PerTensor):
            raise ValueError(f"a per-tensor spec has one scale, not params={params}")
        self.spec, self.observer, self.momentum, self.learn_scale = spec, observer, momentum, learn_scale
        self.params = params
        self.observer_enabled = True
        self.fake_quant_enabled = True
        self.register_buffer("min_val", torch.zeros(params))
        self.register_buffer("max_val", torch.zeros(params))
        self.register_buffer("zero_point", torch.zeros(params, dtype=torch.int32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        if learn_scale:
            self.scale = nn.Parameter(torch.ones(params))
        else:
            self.register_buffer("scale", torch.ones(params))
        self._has_range = False  # mirrors ``initialized`` on the Python side (a branch, not a graph op)
        self.register_load_state_dict_post_hook(_sync_range)

    def enable_observer(self, on: bool = True) -> "FakeQuantize":
        self.observer_enabled = bool(on)
        return self

    def enable_fake_quant(self, on: bool = True) -> "FakeQuantize":
        self.fake_quant_enabled = bool(on)
        return self

    def _check(self, shape: tuple[int, ...]) -> None:
        n = param_count(self.spec, shape)
        if n != self.params:
            raise ValueError(f"FakeQuantize({self.spec.describe()}, params={self.params}) got an input of shape "
                             f"{list(shape)}, which has {n} blocks; per-token activation ranges have no fixed "
                             "count: use PerTensor() or one scale per feature for QAT activations")

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        x2d = blocks_2d(x.detach().to(torch.float32), self.spec)
        lo, hi = x2d.amin(dim=1), x2d.amax(dim=1)
        if self.observer == "minmax":
            lo_new, hi_new = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        else:
            lo_new = self.min_val + self.momentum * (lo - self.min_val)
            hi_new = self.max_val + self.momentum * (hi - self.max_val)
        self.min_val.copy_(torch.where(self.initialized, lo_new, lo))
        self.max_val.copy_(torch.where(self.initialized, hi_new, hi))
        scale, zp = scale_zero_point(self.min_val, self.max_val, self.spec)
        self.zero_point.copy_(zp)
        if not (self.learn_scale and self._has_range):  # LSQ: only the first batch sets the scale
            self.scale.data.copy_(scale)
        self.initialized.fill_(True)
        self._has_range = True

    def qparams(self, shape: tuple[int, ...] | None = None) -> QParams:
        """The current QParams as numpy arrays (for ``convert``, reports), for tensors of ``shape``
        (default: any, for a per-tensor spec)."""
        if not self._has_range:
            raise RuntimeError("FakeQuantize has no range yet: run a batch with the observer enabled")
        if shape is None:
            if self.params != 1:
                raise ValueError("qparams: give the shape of the tensor for a per-channel or per-group spec")
            shape = (1,)
        s = np.maximum(self.scale.detach().float().cpu().numpy(), np.float32(_F32_EPS))
        pshape = self.spec.params_shape(tuple(shape))
        return QParams(s.reshape(pshape), self.zero_point.cpu().numpy().reshape(pshape), self.spec, tuple(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:  # nothing to observe or round; torch's fake-quant returns the empty tensor too
            return x
        self._check(tuple(x.shape))
        if self.observer_enabled and not (self.learn_scale and self._has_range):
            self._observe(x)
        if not self.fake_quant_enabled:
            return x
        if not self._has_range:
            raise RuntimeError("FakeQuantize has no range yet: run a batch with the observer enabled")
        if self.learn_scale:
            n = math.prod(self.spec.block_shape(tuple(x.shape)))
            return _LSQ.apply(x, self.scale, self.zero_point, self.spec, 1.0 / math.sqrt(n * max(self.spec.qmax, 1)))
        if torch.is_grad_enabled() and x.requires_grad:
            return FakeQuantSTE.apply(x, self.scale, self.zero_point, self.spec)
        return fake_quantize_tensor(x, self.scale, self.zero_point, self.spec)[0]

    def extra_repr(self) -> str:
        return (f"{self.spec.describe()}, params={self.params}, observer={self.observer}, "
                f"learn_scale={self.learn_scale}, observer_enabled={self.observer_enabled}, "
                f"fake_quant_enabled={self.fake_quant_enabled}")


def _sync_range(module: Any, incompatible: Any) -> None:
    module._has_range = bool(module.initialized)


def _fake_quantizers(model: nn.Module) -> list[FakeQuantize]:
    return [m for m in model.modules() if isinstance(m, FakeQuantize)]


def freeze_observers(model: nn.Module) -> nn.Module:
    """Stop every FakeQuantize of ``model`` from updating its range (evaluation is then deterministic);
    returns ``model``. :func:`enable_observers` turns them back on."""
    return enable_observers(model, False)


def enable_observers(model: nn.Module, on: bool = True) -> nn.Module:
    """Switch the range observers of every FakeQuantize in ``model`` on or off; returns ``model``."""
    for fq in _fake_quantizers(model):
        fq.enable_observer(on)
    return model


def enable_fake_quant(model: nn.Module, on: bool = True) -> nn.Module:
    """Switch fake quantization of every FakeQuantize in ``model`` on or off (off: the float model);
    returns ``model``."""
    for fq in _fake_quantizers(model):
        fq.enable_fake_quant(on)
    return model


_Q = TypeVar("_Q", "QATLinear", "QATConv1d", "QATConv2d")


def _adopt(q: _Q, m: nn.Linear | nn.Conv1d | nn.Conv2d, weights: QuantSpec, activations: QuantSpec | None, fq: dict,
           input_shape: tuple[int, ...]) -> _Q:
    """Give the QAT module ``q`` the float module's parameters and its fake-quantizers, their scale
    counts taken from the weight and from ``input_shape`` (one sample of the input)."""
    q.weight, q.bias = m.weight, m.bias  # type: ignore[assignment]  # torch declares bias a Parameter, None allowed
    q.weight_fake_quant = FakeQuantize(weights, params=param_count(weights, tuple(m.weight.shape)), **fq)
    q.input_fake_quant = FakeQuantize(activations, observer="moving_average",
                                      params=param_count(activations, input_shape)) if activations else None
    return q


class QATLinear(nn.Linear):
    """nn.Linear that fake-quantizes its weight and (optionally) its input activations."""

    weight_fake_quant: FakeQuantize
    input_fake_quant: FakeQuantize | None

    @classmethod
    def from_float(cls, m: nn.Linear, weights: QuantSpec, activations: QuantSpec | None, **fq) -> "QATLinear":
        q = cls(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        return _adopt(q, m, weights, activations, fq, (1, m.in_features))

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
        return _adopt(q, m, weights, activations, fq, (1, m.in_channels, 1, 1))

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


class QATConv1d(nn.Conv1d):
    """nn.Conv1d that fake-quantizes its weight and (optionally) its input activations."""

    weight_fake_quant: FakeQuantize
    input_fake_quant: FakeQuantize | None

    @classmethod
    def from_float(cls, m: nn.Conv1d, weights: QuantSpec, activations: QuantSpec | None, **fq) -> "QATConv1d":
        one = Tuple[int]
        q = cls(m.in_channels, m.out_channels, cast(one, m.kernel_size), cast(one, m.stride),
                cast(Union[str, one], m.padding), cast(one, m.dilation), m.groups,
                m.bias is not None, m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)
        return _adopt(q, m, weights, activations, fq, (1, m.in_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_fake_quant is not None:
            x = self.input_fake_quant(x)
        return self._conv_forward(x, self.weight_fake_quant(self.weight), self.bias)


def prepare_qat(model: nn.Module, weights: QuantSpec = QuantSpec(granularity=PerChannel(0)),
                activations: QuantSpec | None = None, *, learn_scale: bool = False, inplace: bool = False,
                include: str | None = None, exclude: str | None = None) -> nn.Module:
    """Swap every ``nn.Linear`` (and subclass), transformers ``Conv1D``, ``nn.Conv1d`` and ``nn.Conv2d``
    whose name matches ``include`` and not ``exclude`` (regular expressions, searched) for a module that
    fake-quantizes weights (and input activations when ``activations`` is given). A ``Conv1D`` (weight
    stored (in, out)) becomes a QAT ``nn.Linear`` holding the transposed weight, so per channel means
    per output feature. Returns the prepared model (a copy unless ``inplace``); the layers left out and
    why are in its ``qat_skipped`` attribute and in a warning."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    m = model if inplace else copy.deepcopy(model)
    found, skipped = find_layers(m, include, exclude)
    opts = {"learn_scale": learn_scale}
    for n, child in found:
        new: nn.Module
        if isinstance(child, (QATLinear, QATConv1d, QATConv2d)):
            continue
        if is_transposed_linear(child):
            new = QATLinear.from_float(as_linear(child), weights, activations, **opts)
        elif isinstance(child, nn.Linear):
            new = QATLinear.from_float(child, weights, activations, **opts)
        elif isinstance(child, nn.Conv2d):
            new = QATConv2d.from_float(child, weights, activations, **opts)
        else:
            new = QATConv1d.from_float(cast(nn.Conv1d, child), weights, activations, **opts)
        m.set_submodule(n, new)
    m.qat_skipped = skipped  # type: ignore[assignment]
    if skipped:
        warnings.warn(f"prepare_qat left {len(skipped)} layer(s) as they are: "
                      + "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:5]), stacklevel=2)
    return m


class QuantizedConv(nn.Module):
    """Conv1d or Conv2d with integer weight codes plus scales (all in buffers, so a saved model loads into a fresh
    skeleton); dequantizes on the fly, in torch on the buffers' device."""

    weight_codes: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    act_scale: torch.Tensor | None
    act_zero_point: torch.Tensor | None

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, codes: np.ndarray, qparams: QParams,
                 act_qparams: QParams | None) -> None:
        super().__init__()
        self.spec = qparams.spec
        self.conv = F.conv1d if codes.ndim == 3 else F.conv2d
        self.act_spec = None if act_qparams is None else act_qparams.spec
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.code_shape = tuple(codes.shape)
        register_quantized_state(self, codes, qparams, act_qparams)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_spec is not None:
            assert self.act_scale is not None and self.act_zero_point is not None
            x = fake_quantize_tensor(x.detach(), self.act_scale, self.act_zero_point, self.act_spec)[0]
        codes = unpacked_codes(self.weight_codes, self.code_shape, self.spec)
        w = dequantize_tensor(codes, self.weight_scale, self.weight_zero_point, self.spec).to(x.dtype)
        return self.conv(x, w, None if self.bias is None else self.bias.to(x.dtype), self.stride, self.padding,
                         self.dilation, self.groups)

    @property
    def stored_bytes(self) -> int:
        return weight_bytes(self) + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Turn QAT modules into modules that store integer weights plus scales (static activations
    use the range their FakeQuantize observed). Outputs match the fake-quant model within float
    tolerance. Float16 and bfloat16 models convert too (codes from the float32 value of each weight)."""
    m = model if inplace else copy.deepcopy(model)

    def fn(child):
        if isinstance(child, (QATLinear, QATConv1d, QATConv2d)):
            w = child.weight.detach()
            with torch.no_grad():  # the range a forward pass would use for the current weight
                child.weight_fake_quant(w)
            qp = child.weight_fake_quant.qparams(tuple(w.shape))
            codes = np.asarray(quantize(w.float().cpu().numpy(), qp))
            act = child.input_fake_quant.qparams() if child.input_fake_quant is not None else None
            if isinstance(child, QATLinear):
                return QuantizedLinear(codes, qp, child.bias, "static" if act is not None else None, act)
            return QuantizedConv(cast(Union[nn.Conv1d, nn.Conv2d], child), codes, qp, act)
        return None

    _swap(m, fn)
    refuse_save_pretrained(m)
    return m
