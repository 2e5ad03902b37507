"""DynamicQuantizer: the range is computed from each input when it is called."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .calibrate import calibrate
from .quantize import QParams, dequantize, fake_quantize, quantize
from .spec import QuantSpec


@dataclass(frozen=True)
class Quantized:
    """Integer ``codes`` (same kind as the input) with the ``qparams`` that decode them."""

    codes: Any
    qparams: QParams

    def dequantize(self) -> Any:
        return dequantize(self.codes, self.qparams)


class DynamicQuantizer:
    """Quantize each input with its own min/max range (per tensor, or per token/row with
    ``PerChannel(kept_axis=0)`` on a (tokens, features) activation)."""

    def __init__(self, spec: QuantSpec, method: str = "minmax") -> None:
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        self.spec, self.method = spec, method

    def qparams(self, x: Any, name: str = "x") -> QParams:
        return calibrate(x, self.spec, self.method, name=name)

    def __call__(self, x: Any, name: str = "x") -> Quantized:
        qp = self.qparams(x, name)
        return Quantized(quantize(x, qp, name=name), qp)

    def fake_quantize(self, x: Any, name: str = "x") -> Any:
        return fake_quantize(x, self.qparams(x, name), name=name)
