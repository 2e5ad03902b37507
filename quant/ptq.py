"""Post-training quantization of a whole model, with lowbit's own quantizers or torch.ao."""

from __future__ import annotations

import copy
import time
import weakref
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from precision.outputs import compare_outputs, model_output, output_error, run_model  # noqa: F401 (re-exported)
from precision.report import Report, TensorReport, nbytes

from .calibrate import calibrate
from .modules import TOKEN_SPEC, QuantizedLinear
from .quantize import dequantize, quantize
from .spec import PerChannel, QuantSpec
from .static import StaticQuantizer

BACKENDS = ("native", "torch.ao")


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def ptq(model: nn.Module, calibration_data: Iterable[Any] | None = None, *,
        weights: QuantSpec = QuantSpec(granularity=PerChannel(0)), activations: QuantSpec | None = None,
        backend: str = "native", activation_mode: str = "static", weight_method: str = "minmax",
        activation_method: str = "minmax", eval_data: Iterable[Any] | None = None,
        smooth: float | None = None, fuse_gelu: bool = False, attention: bool = False,
        **method_options: Any) -> tuple[nn.Module, Report]:
    """Quantize every ``nn.Linear`` of ``model`` (a copy; the input model is untouched).

    ``weights``: the weight scheme (default int8 symmetric per output channel).
    ``activations``: None for weight-only (W8), or the activation scheme (W8A8)
    for each layer's input viewed as (tokens, features):
    ``activation_mode="static"`` calibrates one frozen range per layer input on
    ``calibration_data`` (an iterable of model inputs); ``"dynamic"`` computes
    the range of each input when called. ``quant.modules.TOKEN_SPEC`` (int8
    symmetric per token) runs on the int8 kernel ``torch._int_mm``.
    ``backend``: ``"native"`` (lowbit) or ``"torch.ao"`` (quantize_dynamic, or
    prepare/calibrate/convert for static activations).

    ``smooth``: SmoothQuant's migration strength alpha in [0, 1] (e.g. 0.5), for
    quantized activations: per input channel j, ``s_j = max|x_j|**alpha /
    max|W[:, j]|**(1 - alpha)`` (from ``calibration_data``) scales the weight
    column up and the activation down, so activation outliers cost less.
    Layers fed the very same tensor (Q, K and V) share one ``s`` (the weight
    maxima taken over the group, as SmoothQuant does), which lets the int8
    kernel quantize that input once for all of them. On MiniLM alpha 0.6 keeps
    the embedding cosine at 0.9992 (0.5: 0.9989; none: 0.9974).

    ``fuse_gelu`` (native backend): where a quantized layer's output feeds
    nothing but a module that computes exact GELU, apply the GELU in place in
    the layer's output and replace that module by ``nn.Identity`` (for MiniLM
    at 32 x 128 tokens this saves a fresh 25 MB result per FFN layer). Shown on
    ``calibration_data`` in two passes: every call of the module took a
    quantized layer's output and returned exactly ``F.gelu`` of it, every
    output of such a layer went to one such call, and the fused model's outputs
    equal the unfused model's bit for bit; otherwise nothing is fused. A model
    whose module calls depend on its input beyond what calibration exercised
    must not use it. ``report.meta["gelu_in_place"]`` lists the fused layers.

    ``attention`` (native backend): also run attention's two matrix products
    (``Q Kᵀ`` and ``P V``) on int8 codes, in the Hugging Face transformers
    models inside the copy (:mod:`quant.attention` gives the scheme; on
    MiniLM it costs 4e-5 of embedding cosine). ``report.meta["attention"]``
    names the switched models; ValueError if there is none.

    Returns ``(quantized model, Report)``: one row per layer (weight error,
    bytes before and after: codes + scales + zero points + the float bias
    kept; with ``eval_data`` (default: the calibration data) also the layer's
    output SQNR and relative error inside the quantized model, in the row's
    ``details``) and the model's output error against the float model in
    ``report.meta``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if activation_mode not in ("static", "dynamic"):
        raise ValueError(f"activation_mode must be 'static' or 'dynamic', got {activation_mode!r}")
    if not isinstance(weights, QuantSpec) or (activations is not None and not isinstance(activations, QuantSpec)):
        raise TypeError("weights and activations must be QuantSpec values (activations may be None)")
    if not linear_layers(model):
        raise ValueError("ptq: the model has no nn.Linear layers to quantize")
    calib = list(calibration_data) if calibration_data is not None else []
    if activations is not None and activation_mode == "static" and not calib:
        raise ValueError("ptq: static activations need calibration_data (an iterable of model inputs)")
    if smooth is not None:
        if activations is None or backend != "native":
            raise ValueError("ptq: smooth= applies to quantized activations with backend='native'")
        if not 0 <= smooth <= 1:
            raise ValueError(f"ptq: smooth (SmoothQuant alpha) must be in [0, 1], got {smooth}")
        if not calib:
            raise ValueError("ptq: smooth= needs calibration_data to measure activation ranges")
    if fuse_gelu and (backend != "native" or not calib):
        raise ValueError("ptq: fuse_gelu=True needs backend='native' and calibration_data to check the fusion on")
    if attention and backend != "native":
        raise ValueError("ptq: attention=True (int8 attention products) needs backend='native'")
    t0 = time.perf_counter()
    model.eval()
    if backend == "native":
        qmodel, report = _native(model, calib, weights, activations, activation_mode, weight_method,
                                 activation_method, smooth, method_options)
        if attention:  # before the comparison below, so the output error includes it
            from .attention import IMPLEMENTATION, use_int8_attention

            report.meta["attention"] = {"implementation": IMPLEMENTATION, "models": use_int8_attention(qmodel)}
    else:
        from .backends.torch_ao import quantize_torch_ao

        qmodel, report = quantize_torch_ao(model, calib, weights, activations, activation_mode)
    report.meta["quantize_time_s"] = time.perf_counter() - t0
    report.meta["backend"] = backend
    evald = list(eval_data) if eval_data is not None else calib
    if evald:
        whole, per_layer = compare_outputs(model, qmodel, evald, [r.name for r in report.tensors])
        report.meta.update(whole)
        for r in report.tensors:
            r.details.update(per_layer.get(r.name, {}))
    if fuse_gelu:  # after the comparison, which hooks each layer's own (pre-GELU) output
        report.meta["gelu_in_place"] = _fuse_gelu(qmodel, calib)
    return qmodel, report


def _outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (nested dicts, lists, tuples), in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in _outputs(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _outputs(v)]
    return []


@torch.no_grad()
def _fuse_gelu(qmodel: nn.Module, batches: list) -> list[str]:
    """Fuse exact-GELU modules into the quantized layers that feed them (see ``ptq(fuse_gelu=...)``);
    returns the fused layers' names, or [] with the model unchanged when the check fails."""
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantizedLinear)}
    produced: dict[int, str] = {}  # id of a layer output (kept alive in `keep`) -> layer name
    keep: list[torch.Tensor] = []
    made: dict[str, int] = {}  # layer -> outputs made
    fed: dict[int, list[str | None]] = {}  # id(module) -> per call, the layer whose output it took, or None

    def on_layer(n):
        def hook(mod, args, out):
            produced[id(out)] = n
            keep.append(out)
            made[n] = made.get(n, 0) + 1
        return hook

    def on_leaf(mod, args, out):
        x = args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else None
        src = produced.get(id(x)) if x is not None else None
        if src is not None and not (isinstance(out, torch.Tensor) and out is not x and out.shape == x.shape
                                    and torch.equal(out, F.gelu(x))):
            src = None
        fed.setdefault(id(mod), []).append(src)

    hooks = [m.register_forward_hook(on_layer(n)) for n, m in layers.items()]
    hooks += [m.register_forward_hook(on_leaf) for m in qmodel.modules()
              if not isinstance(m, QuantizedLinear) and next(m.children(), None) is None]
    reference = []
    try:
        for b in batches:
            reference.append([t.clone() for t in _outputs(run_model(qmodel, b))])
            produced.clear()  # ids are only meaningful while the outputs they name are alive
            keep.clear()
    finally:
        for h in hooks:
            h.remove()
    # a module is fused only if every call took some fusable layer's output, and a layer only if every
    # one of its outputs went to one call of such a module: narrow both sets until they agree
    gelus = {i for i, srcs in fed.items() if srcs and all(s is not None for s in srcs)}
    while True:
        used: dict[str, int] = {}
        for i in gelus:
            for src in fed[i]:
                used[src] = used.get(src, 0) + 1
        fused = {n for n, k in used.items() if k == made.get(n)}
        keep_gelus = {i for i in gelus if all(src in fused for src in fed[i])}
        if keep_gelus == gelus:
            break
        gelus = keep_gelus
    if not fused:
        return []
    swapped = []
    for parent in qmodel.modules():
        for k, child in list(parent._modules.items()):
            if child is not None and id(child) in gelus:
                swapped.append((parent, k, child))
                parent._modules[k] = nn.Identity()
    for n in fused:
        layers[n].gelu_in_place = True
    same = all(len(r) == len(g) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(r, g))
               for r, g in zip(reference, ([t for t in _outputs(run_model(qmodel, b))] for b in batches)))
    if not same:  # an output also went somewhere the hooks could not see: undo
        for parent, k, child in swapped:
            parent._modules[k] = child
        for n in fused:
            layers[n].gelu_in_place = False
        return []
    return sorted(fused)


def _on_inputs(model: nn.Module, layers, batches, fn) -> None:
    """Run ``batches`` through ``model`` calling ``fn(name, args)`` before each layer's forward
    (whatever ``fn`` returns is dropped: a pre-hook's return value would replace the layer's input)."""
    def hook(n):
        def pre(mod, args) -> None:
            fn(n, args)
        return pre

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    try:
        for b in batches:
            run_model(model, b)
    finally:
        for h in hooks:
            h.remove()


def _collect_inputs(model: nn.Module, layers, calib, fn) -> None:
    """Run ``calib`` through ``model`` calling ``fn(name, input as (tokens, features))`` for each layer."""
    _on_inputs(model, layers, calib, lambda n, args: fn(n, args[0].detach().reshape(-1, args[0].shape[-1])))


def _shared_inputs(model: nn.Module, layers, batch) -> list[list[str]]:
    """Groups of layers that receive the very same input tensor in a forward pass (Q, K and V of an
    attention block), found by running ``batch`` once. Weak references: a tensor freed and replaced
    by another at the same address is not mistaken for it."""
    groups: list[tuple[weakref.ref, list[str]]] = []
    seen: set[str] = set()

    def pre(n, args):
        if not args or n in seen:  # a layer called twice stays in the group of its first call
            return
        seen.add(n)
        for ref, names in groups:
            if ref() is args[0]:
                names.append(n)
                return
        groups.append((weakref.ref(args[0]), [n]))

    _on_inputs(model, layers, [batch], pre)
    return [names for _, names in groups]


@torch.no_grad()
def _native(model, calib, weights, activations, activation_mode, weight_method, activation_method, smooth, opts):
    qmodel = copy.deepcopy(model)
    layers = linear_layers(qmodel)
    smooth_s: dict[str, np.ndarray] = {}
    if smooth is not None:
        amax: dict[str, torch.Tensor] = {}
        _collect_inputs(qmodel, layers, calib, lambda n, x: amax.__setitem__(
            n, torch.maximum(amax[n], x.abs().amax(0)) if n in amax else x.abs().amax(0)))
        # layers fed the same tensor share one smoothing vector (as SmoothQuant does for Q, K and V, with
        # the weights' column maxima taken over the group), so the int8 kernel quantizes that input once
        mods = dict(layers)
        for group in _shared_inputs(qmodel, layers, calib[0]):
            wmax = torch.stack([mods[n].weight.detach().abs().amax(0) for n in group]).amax(0).clamp_min(1e-8)
            xmax = torch.stack([amax[n] for n in group]).amax(0).clamp_min(1e-8)
            s = (xmax ** smooth / wmax ** (1 - smooth)).clamp(1e-4, 1e4)
            for n in group:
                smooth_s[n] = s.float().numpy()
    act_qp: dict[str, Any] = {}
    if activations is not None and activation_mode == "static":
        observers = {n: StaticQuantizer(activations, activation_method) for n, _ in layers}
        _collect_inputs(qmodel, layers, calib, lambda n, x: observers[n].observe(
            x / torch.from_numpy(smooth_s[n]) if n in smooth_s else x))
        act_qp = {n: o.freeze() for n, o in observers.items()}
    rep = Report(title=f"ptq native: weights {weights.describe()}"
                       + (f", activations {activations.describe()} {activation_mode}" if activations else "")
                       + (f", SmoothQuant alpha={smooth}" if smooth is not None else ""))
    for n, m in layers:
        w = m.weight.detach().float().cpu().numpy()
        ws = w * smooth_s[n][None, :] if n in smooth_s else w
        qp = calibrate(ws, weights, weight_method, name=n + ".weight", **opts)
        codes = np.asarray(quantize(ws, qp, name=n + ".weight"))
        mode = None if activations is None else activation_mode
        inv = (1.0 / smooth_s[n]).astype(np.float32) if n in smooth_s else None
        q = QuantizedLinear(codes, qp, m.bias, mode, act_qp.get(n), activations or TOKEN_SPEC, inv)
        _set(qmodel, n, q)
        before = nbytes(m.weight) + (nbytes(m.bias) if m.bias is not None else 0)
        deq = np.asarray(dequantize(codes, qp))
        if n in smooth_s:  # the weight the layer effectively applies to the unscaled input
            deq = deq / smooth_s[n][None, :]
        rep.add(TensorReport.measure(n, w, deq, method=weights.describe(), bytes_before=before,
                                     bytes_after=q.stored_bytes, details={"kernel": q.kernel}))
    return qmodel, rep
