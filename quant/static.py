"""StaticQuantizer: observe batches, freeze a clipped range, then quantize with it."""

from __future__ import annotations

from typing import Any

import numpy as np

from precision.arrays import like, real_array
from precision.report import TensorReport

from .calibrate import METHODS, calibrate
from .quantize import QParams, dequantize, fake_quantize, quantize_with_count
from .spec import QuantSpec


class StaticQuantizer:
    """Calibrated, frozen quantizer.

    ``observe(batch)`` collects data (any number of times), ``freeze()``
    computes QParams with ``method`` (see ``calibrate``), after which
    ``quantize`` / ``dequantize`` / ``fake_quantize`` use that frozen range:
    values beyond it clip, and ``clipped`` counts how many did.
    """

    def __init__(self, spec: QuantSpec, method: str = "minmax", **method_options: Any) -> None:
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.spec, self.method, self.options = spec, method, method_options
        self._batches: list[np.ndarray] = []
        self.qparams: QParams | None = None
        self.clipped = 0
        self.seen = 0

    def observe(self, x: Any) -> "StaticQuantizer":
        if self.qparams is not None:
            raise RuntimeError("StaticQuantizer is frozen; create a new one to calibrate again")
        self._batches.append(np.array(real_array(x, "batch", integers="float"), copy=True))
        return self

    def freeze(self) -> QParams:
        if not self._batches:
            raise ValueError("StaticQuantizer.freeze: no batches observed; call observe(batch) first")
        self.qparams = calibrate(self._batches, self.spec, self.method, name="calibration batch", **self.options)
        self._batches = []
        return self.qparams

    def _frozen(self) -> QParams:
        if self.qparams is None:
            raise RuntimeError("StaticQuantizer is not frozen; call freeze() after observing batches")
        return self.qparams

    def quantize(self, x: Any, name: str = "x") -> Any:
        codes, clipped = quantize_with_count(x, self._frozen(), name)
        self.clipped += clipped
        self.seen += codes.size
        return like(codes, x)

    def dequantize(self, codes: Any) -> Any:
        return dequantize(codes, self._frozen().for_shape(np.shape(codes)))

    def fake_quantize(self, x: Any, name: str = "x") -> Any:
        return fake_quantize(x, self._frozen(), name=name)

    __call__ = fake_quantize

    def report(self, x: Any, name: str = "x") -> TensorReport:
        """Error and bytes of quantizing ``x`` with the frozen range, counting clipped values."""
        qp = self._frozen()
        codes, clipped = quantize_with_count(x, qp, name)
        deq = dequantize(codes, qp.for_shape(codes.shape))
        return TensorReport.measure(name, real_array(x, name, integers="float"), deq, method=f"static {qp.spec.describe()} {self.method}",
                                    bytes_after=codes.nbytes + qp.nbytes, clipped=clipped)
