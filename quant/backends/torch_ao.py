"""The torch.ao.quantization backend of ``ptq``.

torch.ao is deprecated upstream; its deprecation warnings are passed on once
per message, and a torch without it gives a clear RuntimeError.
"""

from __future__ import annotations

import copy
from typing import Any
import warnings

import torch
from torch import nn

from precision.report import Report, TensorReport, nbytes

from precision.outputs import run_model

from ..hooks import linear_layers
from ..spec import PerChannel, PerTensor, QuantSpec

_SEEN: set[str] = set()


def _ao():
    try:
        import torch.ao.quantization as ao
    except ImportError as e:  # pragma: no cover - depends on the installed torch
        raise RuntimeError("backend='torch.ao' needs torch.ao.quantization, which this torch "
                           f"({torch.__version__}) no longer has; use backend='native'") from e
    return ao


class _Passthrough:
    """Record warnings, then re-emit each distinct message once per process."""

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self._log = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        for w in self._log:
            key = str(w.message).split("\n")[0]
            if key not in _SEEN:
                _SEEN.add(key)
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return False


def check_spec(weights: QuantSpec, activations: QuantSpec | None) -> None:
    """ValueError (with the fix) for schemes the torch.ao backend cannot run."""
    if weights.bits != 8 or not weights.signed or not weights.symmetric:
        raise ValueError("backend='torch.ao' supports int8 signed symmetric weights only "
                         f"(got {weights.describe()}); use backend='native'")
    if isinstance(weights.granularity, PerChannel) and weights.granularity.kept_axis not in (0, -2):
        raise ValueError("backend='torch.ao' quantizes Linear weights per output channel (axis=0) only")
    if not isinstance(weights.granularity, (PerTensor, PerChannel)):
        raise ValueError("backend='torch.ao' has no per-group weights; use backend='native'")


class _Static(nn.Module):
    def __init__(self, lin: nn.Linear, ao):
        super().__init__()
        self.quant, self.lin, self.dequant = ao.QuantStub(), lin, ao.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.lin(self.quant(x)))


def quantize_torch_ao(model: nn.Module, calib: list, weights: QuantSpec, activations: QuantSpec | None,
                      activation_mode: str) -> tuple[nn.Module, Report]:
    check_spec(weights, activations)
    ao = _ao()
    per_channel = isinstance(weights.granularity, PerChannel)
    floats = {n: (m.weight.detach().float().clone(), m.bias) for n, m in linear_layers(model)}
    with _Passthrough():
        if activations is None or activation_mode == "dynamic":
            qconfig = ao.per_channel_dynamic_qconfig if per_channel else ao.default_dynamic_qconfig
            qmodel = ao.quantize_dynamic(copy.deepcopy(model), {nn.Linear: qconfig}, dtype=torch.qint8)
            title = "ptq torch.ao dynamic"
        else:
            engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "qnnpack"
            torch.backends.quantized.engine = engine
            qmodel = copy.deepcopy(model)
            qconfig = ao.get_default_qconfig(engine)
            if not per_channel:
                qconfig = ao.QConfig(activation=qconfig.activation, weight=ao.default_weight_observer)
            for n, m in linear_layers(qmodel):
                wrapped = _Static(m, ao)
                wrapped.qconfig = qconfig
                qmodel.set_submodule(n, wrapped)
            qmodel = ao.prepare(qmodel, inplace=False)
            with torch.no_grad():
                for b in calib:
                    run_model(qmodel, b)
            qmodel = ao.convert(qmodel, inplace=False)
            title = f"ptq torch.ao static ({engine})"
    rep = Report(title=f"{title}: weights {'per-channel' if per_channel else 'per-tensor'} int8")
    mod: Any
    for n, mod in qmodel.named_modules():
        if hasattr(mod, "weight") and callable(getattr(mod, "weight", None)) and hasattr(mod, "_packed_params"):
            key = n[:-4] if n.endswith(".lin") else n
            if key not in floats:
                continue
            qw = mod.weight()
            w, bias = floats[key]
            if qw.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                params = qw.q_per_channel_scales().numel() * 16  # float64 scale + int64 zero point each
            else:
                params = 16
            before = nbytes(w) + (nbytes(bias) if bias is not None else 0)
            after = qw.numel() + params + (nbytes(bias) if bias is not None else 0)
            rep.add(TensorReport.measure(key, w.numpy(), qw.dequantize().numpy(), method="torch.ao int8",
                                         bytes_before=before, bytes_after=after))
    return qmodel, rep
