"""Post-training quantization of a whole model: one validated ``PTQConfig`` applied by ``ptq``.

The passes live in their own modules: forward hooks (:mod:`quant.hooks`),
SmoothQuant (:mod:`quant.smoothquant`), GELU in place (:mod:`quant.fusion`),
int8 attention (:mod:`quant.attention`) and the torch.ao backend
(:mod:`quant.backends.torch_ao`).
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Iterable, Union, cast

import numpy as np
import torch
from torch import nn

from precision.outputs import compare_outputs
from precision.report import Report, TensorReport, nbytes

from .backends.torch_ao import check_spec
from .awq import AWQ
from .calibrate import METHODS, calibrate
from .gptq import GPTQ
from .hooks import as_linear, collect_inputs, find_layers, is_transposed_linear
from .modules import TOKEN_SPEC, QuantizedLinear, refuse_save_pretrained
from .quantize import dequantize, quantize
from .smoothquant import smoothing_vectors
from .qat import QuantizedConv
from .spec import PerChannel, PerGroup, PerTensor, QuantSpec
from .static import StaticQuantizer

BACKENDS = ("native", "torch.ao")
ACTIVATION_MODES = ("static", "dynamic")


@dataclass(frozen=True)
class PTQConfig:
    """What :func:`ptq` does to every ``nn.Linear`` of a model; validated when built.

    * ``weights``: the weight scheme (default int8 symmetric per output channel), calibrated
      by ``weight_calibration`` (one of ``quant.METHODS``; ``percentile`` for "percentile").
    * ``activations``: None for weight-only, or the scheme of each layer's input viewed as
      (tokens, features). ``activation_mode``: ``"static"`` calibrates one frozen range per
      layer input on the calibration data (with ``activation_calibration``); ``"dynamic"``
      takes the range of each input when called. ``quant.modules.TOKEN_SPEC`` (int8 symmetric
      per token, narrow range) runs on the int8 kernel ``torch._int_mm``.
    * ``smoothquant``: SmoothQuant's migration strength alpha in [0, 1] (e.g. 0.6), for
      quantized activations (see :func:`quant.smoothquant.smoothing_vectors`).
    * ``gelu_in_place``: where a quantized layer's output feeds nothing but an exact-GELU
      module, apply the GELU in place in the layer's output (see :func:`quant.fusion.fuse_gelu`:
      shown on the calibration data in two passes and checked bit for bit, else not fused).
    * ``int8_attention``: also run attention's two products on int8 codes in the Hugging Face
      transformers models inside the copy (:mod:`quant.attention`).
    * ``gptq``: quantize the weights with GPTQ (:class:`quant.gptq.GPTQ`) instead of rounding to
      nearest: layer by layer in forward order on the calibration data, with ``weight_calibration``
      choosing each group's scale before the sweep. Same stored form as round to nearest.
    * ``awq``: search an AWQ input scale per group of layers sharing an input
      (:class:`quant.awq.AWQ`), folded into the operation before it where that provably keeps the
      float model's output; composes with ``gptq`` or round to nearest.
    * ``include`` / ``exclude``: regular expressions on module names (searched) selecting the layers.
      The layers are every ``nn.Linear`` and subclass, transformers' ``Conv1D`` (stored (in, out):
      per channel means per output feature), and, for weight-only configs, ``nn.Conv1d`` and
      ``nn.Conv2d`` (per output channel). Every other candidate is listed in ``report.meta["skipped"]``
      with the reason.
    * ``backend``: ``"native"`` (lowbit) or ``"torch.ao"``; the SmoothQuant, GELU, attention, GPTQ
      and AWQ passes need ``"native"``.

    Presets: :attr:`W8`, :attr:`W8A8_DYNAMIC`, :attr:`W8A8_FAST` and :attr:`W4_G128`.
    """

    weights: QuantSpec = field(default_factory=lambda: QuantSpec(granularity=PerChannel(0)))
    weight_calibration: str = "minmax"
    activations: QuantSpec | None = None
    activation_mode: str = "static"
    activation_calibration: str = "minmax"
    percentile: float | None = None
    smoothquant: float | None = None
    gelu_in_place: bool = False
    int8_attention: bool = False
    gptq: GPTQ | None = None
    awq: AWQ | None = None
    include: str | None = None
    exclude: str | None = None
    backend: str = "native"

    W8: ClassVar["PTQConfig"]
    W8A8_DYNAMIC: ClassVar["PTQConfig"]
    W8A8_FAST: ClassVar["PTQConfig"]
    W4_G128: ClassVar["PTQConfig"]

    def __post_init__(self) -> None:
        if not isinstance(self.weights, QuantSpec) or (self.activations is not None
                                                       and not isinstance(self.activations, QuantSpec)):
            raise TypeError("PTQConfig: weights and activations must be QuantSpec values (activations may be None)")
        if self.backend not in BACKENDS:
            raise ValueError(f"PTQConfig: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.activation_mode not in ACTIVATION_MODES:
            raise ValueError(f"PTQConfig: activation_mode must be one of {ACTIVATION_MODES}, "
                             f"got {self.activation_mode!r}")
        for what in ("weight_calibration", "activation_calibration"):
            if getattr(self, what) not in METHODS:
                raise ValueError(f"PTQConfig: {what} must be one of {METHODS}, got {getattr(self, what)!r}")
        if self.percentile is not None and not 0 < self.percentile <= 100:
            raise ValueError(f"PTQConfig: percentile must be in (0, 100], got {self.percentile}")
        native_only = [n for n, on in (("smoothquant", self.smoothquant is not None),
                                       ("gelu_in_place", self.gelu_in_place),
                                       ("int8_attention", self.int8_attention),
                                       ("gptq", self.gptq is not None), ("awq", self.awq is not None)) if on]
        if native_only and self.backend != "native":
            raise ValueError(f"PTQConfig: {', '.join(native_only)} needs backend='native'")
        if self.smoothquant is not None:
            if self.activations is None:
                raise ValueError("PTQConfig: smoothquant applies to quantized activations; set activations= too")
            if not 0 <= self.smoothquant <= 1:
                raise ValueError(f"PTQConfig: smoothquant (alpha) must be in [0, 1], got {self.smoothquant}")
        if self.gptq is not None and not isinstance(self.gptq, GPTQ):
            raise TypeError(f"PTQConfig: gptq must be a quant.GPTQ value or None, got {type(self.gptq).__name__}")
        if self.awq is not None and not isinstance(self.awq, AWQ):
            raise TypeError(f"PTQConfig: awq must be a quant.AWQ value or None, got {type(self.awq).__name__}")
        if self.smoothquant is not None and (self.gptq is not None or self.awq is not None):
            raise ValueError("PTQConfig: smoothquant does not combine with gptq/awq (both rescale the inputs); "
                             "use awq= for activation-aware scaling of the weights")
        if (self.gptq is not None or self.awq is not None) and self.weight_calibration in ("moving_average", "entropy"):
            raise ValueError("PTQConfig: gptq and awq choose weight scales with minmax, percentile or mse")
        for what in ("include", "exclude"):
            pat = getattr(self, what)
            if pat is not None:
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ValueError(f"PTQConfig: {what} is not a valid regular expression: {e}") from None
        if self.backend == "torch.ao":
            check_spec(self.weights, self.activations)

    @property
    def needs_calibration(self) -> bool:
        """Whether :func:`ptq` needs calibration data for this config."""
        return ((self.activations is not None and self.activation_mode == "static")
                or self.smoothquant is not None or self.gelu_in_place or self.gptq is not None or self.awq is not None)

    def describe(self) -> str:
        return (f"weights {self.weights.describe()}"
                + (f", activations {self.activations.describe()} {self.activation_mode}" if self.activations else "")
                + (f", SmoothQuant alpha={self.smoothquant}" if self.smoothquant is not None else "")
                + (f", {self.awq.describe()}" if self.awq is not None else "")
                + (f", {self.gptq.describe()}" if self.gptq is not None else ""))


PTQConfig.W8 = PTQConfig()
PTQConfig.W8A8_DYNAMIC = PTQConfig(activations=TOKEN_SPEC, activation_mode="dynamic")
PTQConfig.W8A8_FAST = replace(PTQConfig.W8A8_DYNAMIC, smoothquant=0.6, gelu_in_place=True, int8_attention=True)
PTQConfig.W4_G128 = PTQConfig(weights=QuantSpec(bits=4, symmetric=False, granularity=PerGroup(128)))


def ptq(model: nn.Module, config: PTQConfig = PTQConfig.W8, calibration_data: Iterable[Any] | None = None,
        eval_data: Iterable[Any] | None = None) -> tuple[nn.Module, Report]:
    """Quantize every ``nn.Linear`` of ``model`` (a copy; the input model is untouched) as ``config`` says.

    ``calibration_data``: an iterable of model inputs (a tensor, a tuple of positional
    arguments, or a dict of keyword arguments each), needed for static activations,
    SmoothQuant and GELU in place. Returns ``(quantized model, Report)``: one row per layer
    (weight error; bytes before and after: codes + scales + zero points + the float bias kept;
    with ``eval_data`` (default: the calibration data) also the layer's output SQNR and
    relative error inside the quantized model, in the row's ``details``) and the model's output
    error against the float model in ``report.meta`` (also ``gelu_in_place``, ``attention``).
    """
    if not isinstance(config, PTQConfig):
        raise TypeError(f"ptq(model, config, calibration_data): config must be a PTQConfig, got "
                        f"{type(config).__name__}; e.g. ptq(model, PTQConfig.W8A8_DYNAMIC, batches)")
    if not isinstance(model, nn.Module) or not find_layers(model, config.include, config.exclude)[0]:
        raise ValueError("ptq: the model has no layers to quantize (nn.Linear, transformers Conv1D, nn.Conv1d/2d)"
                         + (" matching include/exclude" if config.include or config.exclude else ""))
    calib = list(calibration_data) if calibration_data is not None else []
    if config.needs_calibration and not calib:
        raise ValueError("ptq: this config (static activations, smoothquant, gelu_in_place, gptq or awq) needs "
                         "calibration_data, an iterable of model inputs")
    t0 = time.perf_counter()
    model.eval()
    if config.backend == "native":
        qmodel, report = _native(model, calib, config)
        if config.int8_attention:  # before the comparison below, so the output error includes it
            from .attention import IMPLEMENTATION, use_int8_attention

            report.meta["attention"] = {"implementation": IMPLEMENTATION, "models": use_int8_attention(qmodel)}
    else:
        from .backends.torch_ao import quantize_torch_ao

        qmodel, report = quantize_torch_ao(model, calib, config.weights, config.activations, config.activation_mode)
    report.meta["quantize_time_s"] = time.perf_counter() - t0
    report.meta["backend"] = config.backend
    refuse_save_pretrained(qmodel)
    evald = list(eval_data) if eval_data is not None else calib
    if evald:
        whole, per_layer = compare_outputs(model, qmodel, evald, [r.name for r in report.tensors])
        report.meta.update(whole)
        for r in report.tensors:
            r.details.update(per_layer.get(r.name, {}))
    if config.gelu_in_place:  # after the comparison, which hooks each layer's own (pre-GELU) output
        from .fusion import fuse_gelu

        report.meta["gelu_in_place"] = fuse_gelu(qmodel, calib)
    return qmodel, report


@torch.no_grad()
def _native(model: nn.Module, calib: list[Any], config: PTQConfig) -> tuple[nn.Module, Report]:
    qmodel = copy.deepcopy(model)
    found, skipped = find_layers(qmodel, config.include, config.exclude)
    for n, m in found:
        if is_transposed_linear(m):  # the same layer as an nn.Linear: every pass below takes it
            qmodel.set_submodule(n, as_linear(m))
    found = [(n, qmodel.get_submodule(n)) for n, _ in found]
    layers = [(n, m) for n, m in found if isinstance(m, nn.Linear)]
    convs = [(n, m) for n, m in found if not isinstance(m, nn.Linear)]
    if convs and (config.activations is not None or config.gptq is not None or config.awq is not None
                  or not isinstance(config.weights.granularity, (PerChannel, PerTensor))):
        for n, _ in convs:
            skipped[n] = ("convolutions take weight-only per-channel or per-tensor configs here "
                          "(use prepare_qat for quantized activations)")
        convs = []
    acts = config.activations
    solved: dict[str, Any] = {}
    if config.gptq is not None or config.awq is not None:  # before the activation observers: AWQ may fold into inputs
        from .solve import Solver, solve_layers
        from .storage import IntQuant

        solver = Solver(quantizer=IntQuant(config.weights, config.weight_calibration,
                                           config.percentile if config.weight_calibration == "percentile" else None),
                        gptq=config.gptq, awq=config.awq)
        solved, unreached = solve_layers(qmodel, layers, calib, solver)
        if unreached:
            raise ValueError(f"ptq: the calibration data never reaches {', '.join(unreached[:5])}"
                             f"{' ...' if len(unreached) > 5 else ''}; GPTQ/AWQ need every layer's inputs")
    smooth_s = smoothing_vectors(qmodel, layers, calib, config.smoothquant) if config.smoothquant is not None else {}
    act_qp: dict[str, Any] = {}
    if acts is not None and config.activation_mode == "static":
        observers = {n: StaticQuantizer(acts, config.activation_calibration) for n, _ in layers}
        collect_inputs(qmodel, layers, calib, lambda n, x: observers[n].observe(
            x / torch.from_numpy(smooth_s[n]) if n in smooth_s else x))
        act_qp = {n: o.freeze() for n, o in observers.items()}
    percentile = 99.99 if config.percentile is None else config.percentile  # calibrate's own default
    rep = Report(title=f"ptq native: {config.describe()}")
    for n, m in layers:
        w = m.weight.detach().float().cpu().numpy()
        sol = solved.get(n)
        inv: np.ndarray | None = None
        if sol is not None:  # GPTQ / AWQ: the codes are chosen; the error is against the weight in the same coordinates
            codes, qp, ws = sol.codes, sol.qparams, sol.reference.numpy()
            if sol.input_scale is not None:
                inv = sol.input_scale.numpy()
        else:
            ws = w * smooth_s[n][None, :] if n in smooth_s else w
            qp = calibrate(ws, config.weights, config.weight_calibration, percentile=percentile, name=n + ".weight")
            codes = np.asarray(quantize(ws, qp, name=n + ".weight"))
            if n in smooth_s:
                inv = (1.0 / smooth_s[n]).astype(np.float32)
        mode = None if acts is None else config.activation_mode
        q = QuantizedLinear(codes, qp, m.bias, mode, act_qp.get(n), acts or TOKEN_SPEC, inv)
        qmodel.set_submodule(n, q)
        before = nbytes(m.weight) + (nbytes(m.bias) if m.bias is not None else 0)
        deq = np.asarray(dequantize(codes, qp))
        if n in smooth_s:  # the weight the layer effectively applies to the unscaled input
            deq, ws = deq / smooth_s[n][None, :], w
        elif inv is not None:
            deq = deq * inv[None, :]
        details: dict[str, Any] = {"kernel": q.kernel}
        if sol is not None and sol.awq is not None:
            details["awq"] = sol.awq
        rep.add(TensorReport.measure(n, ws, deq, method=config.weights.describe(), bytes_before=before,
                                     bytes_after=q.stored_bytes, details=details))
    for n, m in convs:
        w = getattr(m, "weight").detach().float().cpu().numpy()
        qp = calibrate(w, config.weights, config.weight_calibration, percentile=percentile, name=n + ".weight")
        codes = np.asarray(quantize(w, qp, name=n + ".weight"))
        qc = QuantizedConv(cast(Union[nn.Conv1d, nn.Conv2d], m), codes, qp, None)
        qmodel.set_submodule(n, qc)
        bias = getattr(m, "bias", None)
        before = nbytes(getattr(m, "weight")) + (nbytes(bias) if bias is not None else 0)
        rep.add(TensorReport.measure(n, w, np.asarray(dequantize(codes, qp)), method=config.weights.describe(),
                                     bytes_before=before, bytes_after=qc.stored_bytes,
                                     details={"kernel": "dequantize + float convolution"}))
    rep.meta["skipped"] = skipped
    return qmodel, rep
