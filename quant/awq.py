"""AWQ-class activation-aware scaling (Lin et al. 2023), searched on a layer group's inputs.

Weights that meet large activations matter most. AWQ multiplies input feature ``j`` of
every layer in a group (layers that read one input, such as Q, K and V) by
``s_j = mean|x_j| ** alpha`` (normalised to a geometric mean of 1) and divides the input by
the same ``s``, which leaves the float model unchanged but gives the salient weights a
finer grid. ``alpha`` is searched on a grid of ``grid`` points in [0, 1): the one whose
quantized group output ``X (Q(W·s)/s)ᵀ`` is closest (squared error) to the float output
``X Wᵀ`` over all calibration tokens (computed from ``XᵀX``, the layer's Hessian);
``alpha = 0`` is plain round to nearest, so the search never loses to it on that data.

The division of the input is folded into the operation that produces it, where one
provably exists (:func:`fold_candidates`): a normalisation layer's weight and bias, a
Linear's output rows, or the value projection inside an attention module whose output
is linear in it. Each fold is checked on a calibration batch (the model's output must
not change beyond float rounding) and undone otherwise: a post-LayerNorm transformer's
LayerNorm also feeds the residual stream, so it cannot take the scale. Where nothing can
take it, ``runtime_scales=True`` keeps ``1/s`` as the quantized layer's ``input_scale``
(one multiply per call, as SmoothQuant's); otherwise the group is left unscaled.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from precision.outputs import model_output, run_model

from .calibrate import calibrate
from .quantize import fake_quantize
from .spec import QuantSpec


@dataclass(frozen=True)
class AWQ:
    """AWQ's settings: ``grid`` values of alpha searched (``i / grid``, i < grid), and whether a
    group whose input scale cannot be folded keeps it as a runtime multiply (``runtime_scales``;
    models only: a checkpoint has no place for it, so there such a group stays unscaled)."""

    grid: int = 20
    runtime_scales: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"AWQ: grid must be a positive integer, got {self.grid!r}")
        if not isinstance(self.runtime_scales, bool):
            raise TypeError(f"AWQ: runtime_scales must be True or False, got {self.runtime_scales!r}")

    def describe(self) -> str:
        return f"AWQ grid={self.grid}"


def _fake_quant(w: torch.Tensor, quantizer: Any) -> torch.Tensor:
    """``w`` as the quantizer stores it, for the search: an integer spec with minmax params (as the
    paper's search), a float or block method through its own encoding."""
    spec = getattr(quantizer, "spec", quantizer)
    if isinstance(spec, QuantSpec):
        return torch.as_tensor(fake_quantize(w, calibrate(w, spec)))
    return torch.from_numpy(np.asarray(quantizer.encode(np.ascontiguousarray(w.numpy())).values, np.float32))


@torch.no_grad()
def search_scale(weights: Sequence[torch.Tensor], hessian: torch.Tensor, mean_abs: torch.Tensor, quantizer: Any,
                 grid: int = 20) -> tuple[torch.Tensor, float]:
    """The per-input-feature scale ``s`` (float32, (in,)) and its alpha that minimise the group's
    output error ``Σ_k ‖X (Q(W_k·s)/s − W_k)ᵀ‖²`` over the calibration rows, computed from their
    ``hessian`` ``∝ XᵀX`` (in, in) as ``Σ rows of D H Dᵀ`` with ``D = Q(W·s)/s − W``, each weight
    (out_k, in) quantized by ``quantizer`` (an integer ``QuantSpec`` or ``IntQuant`` with minmax params,
    or a float or block value method; see the module docstring)."""
    h = hessian.float()
    base = mean_abs.float().clamp_min(1e-8)
    best, best_s, best_alpha = float("inf"), torch.ones_like(base), 0.0
    for i in range(grid):
        alpha = i / grid
        s = base.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w in weights:
            d = _fake_quant(w * s, quantizer) / s - w
            err += float(((d @ h) * d).sum(dtype=torch.float64))
        if err < best:
            best, best_s, best_alpha = err, s.clone(), alpha
    return best_s.float(), best_alpha


# ---------------------------------------------------------------- folding the input scale
def producers(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], batch: Any) -> dict[str, str]:
    """For each layer, the module that made the very tensor the layer reads (its forward output, or
    first output): the innermost such module, not the outer ones that pass the tensor on as it is.
    Found by running ``batch`` once (weak references, as :func:`shared_inputs`)."""
    made: list[tuple[weakref.ref, str]] = []
    found: dict[str, str] = {}
    names = {id(m): n for n, m in layers}

    def post(name: str):
        def hook(mod, args, out):
            t = out[0] if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) else out
            if isinstance(t, torch.Tensor):
                made.append((weakref.ref(t), name))
        return hook

    def pre(mod, args):
        n = names[id(mod)]
        if n in found or not args:
            return
        for ref, who in made:  # the first match made it; outer modules that return it as is come after
            if ref() is args[0]:
                found[n] = who
                return

    hooks = [m.register_forward_hook(post(n)) for n, m in model.named_modules() if n]
    hooks += [m.register_forward_pre_hook(pre) for _, m in layers]
    try:
        run_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return found


def fold_candidates(model: nn.Module, producer: str, features: int) -> list[tuple[str, nn.Module]]:
    """Modules that could take a division of the producer's output by ``s`` (features,): the producer
    itself when it is a normalisation layer (1-D weight of that size) or a Linear with that many
    outputs; else its child value projection (``value``/``v_proj``) when it has that many outputs."""
    mod = model.get_submodule(producer)
    w = getattr(mod, "weight", None)
    if isinstance(mod, nn.Linear) and mod.out_features == features:
        return [(producer, mod)]
    if not isinstance(mod, nn.Linear) and isinstance(w, torch.Tensor) and w.ndim == 1 and w.numel() == features:
        return [(producer, mod)]
    out: list[tuple[str, nn.Module]] = []
    for child in ("value", "v_proj"):
        c = getattr(mod, child, None)
        if isinstance(c, nn.Linear) and c.out_features == features:
            out.append((f"{producer}.{child}", c))
    return out


def _divide(mod: nn.Module, s: torch.Tensor) -> None:
    w = getattr(mod, "weight")
    if w.ndim == 1:
        w.div_(s.to(w.dtype))
    else:
        w.div_(s.to(w.dtype)[:, None])
    b = getattr(mod, "bias", None)
    if isinstance(b, torch.Tensor):
        b.div_(s.to(b.dtype))


@torch.no_grad()
def try_fold(model: nn.Module, target: nn.Module, group: Sequence[nn.Linear], s: torch.Tensor, batch: Any,
             tolerance: float = 1e-4) -> bool:
    """Divide ``target``'s output by ``s`` and multiply the group's weight columns by ``s``; keep the
    change if the model's output on ``batch`` moves by at most ``tolerance`` (relative to its largest
    magnitude), else undo it exactly (the saved tensors are restored) and return False."""
    saved = [(p, p.detach().clone()) for p in [getattr(target, "weight"), getattr(target, "bias", None)]
             + [m.weight for m in group]
             if isinstance(p, torch.Tensor)]
    before = model_output(run_model(model, batch)).float()
    _divide(target, s)
    for m in group:
        m.weight.mul_(s.to(m.weight.dtype))
    after = model_output(run_model(model, batch)).float()
    if float((after - before).abs().max()) <= tolerance * max(float(before.abs().max()), 1e-30):
        return True
    for p, v in saved:
        p.copy_(v)
    return False

