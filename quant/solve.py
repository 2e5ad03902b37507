"""Calibrated layer solvers applied in forward order: AWQ scaling, SparseGPT or a given pruning
mask (Wanda's), then GPTQ or round to nearest, one group of layers at a time.

:func:`solve_layers` is the one driver behind ``ptq`` (``PTQConfig(gptq=..., awq=...)``),
``compress.prune_model`` (``method="wanda"`` / ``"sparsegpt"``) and the checkpoint job's
calibrated methods. It changes the model it is given in place (each layer's weight becomes
the float weight it now computes with, AWQ scales are folded where they fold) and returns a
:class:`LayerSolution` per layer: the integer codes and params in the stored form of round to
nearest, the kept mask, and what AWQ did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .awq import AWQ, fold_candidates, producers, search_scale, try_fold
from .calibrate import calibrate
from .gptq import GPTQ, Pruning, grid_for, obs_sweep
from .quantize import QParams, dequantize, quantize
from .sequential import LayerInputs, calibrate_in_order
from .storage import IntQuant

def _quantizers() -> tuple[type, ...]:
    from precision.blocks import BlockCast
    from precision.cast import FloatCast

    return IntQuant, FloatCast, BlockCast


QUANTIZERS = _quantizers()
MaskRule = Callable[[torch.Tensor, LayerInputs], torch.Tensor]


@dataclass(frozen=True)
class Solver:
    """What :func:`solve_layers` does to each layer (each step optional; at least one is needed):

    * ``awq``: search and apply an AWQ input scale (needs ``quantizer``);
    * ``sparsegpt``: prune inside the OBS sweep (:class:`~quant.gptq.Pruning`), jointly with GPTQ
      when ``gptq`` is set too; or ``mask``: a function ``(weight (out, in), inputs) -> kept mask``
      applied before quantizing (Wanda's score), with no weight update;
    * ``quantizer``: the value method to quantize with (``quant.IntQuant``, or for the checkpoint
      path also ``precision.cast.FloatCast`` and ``precision.blocks.BlockCast``), with ``gptq`` or by
      rounding to nearest.
    """

    quantizer: Any = None
    gptq: GPTQ | None = None
    awq: AWQ | None = None
    sparsegpt: Pruning | None = None
    mask: MaskRule | None = None
    mask_name: str = ""

    def __post_init__(self) -> None:
        if self.quantizer is None and (self.gptq is not None or self.awq is not None):
            raise ValueError("Solver: gptq and awq quantize; give quantizer= too")
        if self.quantizer is not None and not isinstance(self.quantizer, QUANTIZERS):
            raise TypeError(f"Solver: quantizer must be an IntQuant, FloatCast or BlockCast, got "
                            f"{type(self.quantizer).__name__}")
        if self.sparsegpt is not None and self.mask is not None:
            raise ValueError("Solver: give sparsegpt= or mask=, not both")
        if self.mask is not None and self.gptq is not None:
            raise ValueError("Solver: GPTQ's updates would refill a fixed mask; use sparsegpt= for a joint "
                             "pruned and GPTQ-quantized layer, or round to nearest after the mask")
        if self.sparsegpt is not None and self.sparsegpt.m and self.gptq is not None and self.gptq.act_order:
            raise ValueError("Solver: N:M pruning groups inputs in storage order, which act-order would permute; "
                             "use GPTQ(act_order=False) (--no-act-order)")
        if self.quantizer is None and self.sparsegpt is None and self.mask is None:
            raise ValueError("Solver: nothing to do; give quantizer=, sparsegpt= or mask=")

    @property
    def needs_hessian(self) -> bool:
        return self.gptq is not None or self.sparsegpt is not None or self.awq is not None

    def describe(self) -> str:
        steps = [s for s in (self.awq and self.awq.describe(), self.mask_name or None,
                             self.sparsegpt and "SparseGPT", self.gptq and self.gptq.describe()) if s]
        if self.quantizer is not None and self.gptq is None:
            steps.append("RTN")
        return " + ".join(steps)


@dataclass
class LayerSolution:
    """One solved layer. ``values``: the float32 weight (out, in) the layer now computes with (on
    the integer grid when quantized; AWQ-scaled when the scale was folded). ``reference``: the float
    weight it approximates, in the same coordinates (the source weight, AWQ-scaled when folded).
    ``qparams``: what the quantizer stores besides the codes (``QParams``, a float cast's ``Cast``,
    ``BlockCodes``; None unquantized) and ``codes`` the integer codes (``QParams`` only). ``keep``: the kept mask (None dense).
    ``input_scale``: ``1/s`` to multiply inputs by at run time (AWQ with nothing to fold into).
    ``awq``: where the AWQ scale went (a module name, ``"runtime"``) or why not (``"none: ..."``)."""

    values: torch.Tensor
    reference: torch.Tensor
    codes: np.ndarray | None = None
    qparams: Any = None
    keep: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    awq: str | None = None
    damp: float | None = None


def round_to_nearest(w: torch.Tensor, quantizer: Any) -> tuple[torch.Tensor, Any]:
    """``(values, params)`` of ``w`` under the quantizer's own encoding (round to nearest)."""
    a = np.ascontiguousarray(w.numpy())
    if isinstance(quantizer, IntQuant):
        qp = calibrate(a, quantizer.spec, quantizer.calibration) if quantizer.percentile is None else \
            calibrate(a, quantizer.spec, quantizer.calibration, percentile=quantizer.percentile)
        qp = quantizer.stored_params(qp)  # the scales that will be stored
        return torch.from_numpy(np.asarray(dequantize(quantize(a, qp), qp), np.float32)), qp
    grid = grid_for(quantizer, (a.shape[0], a.shape[1]))
    grid.fit_all(w)
    return grid.fitted_values(), grid.params()


def _codes(values: torch.Tensor, params: Any) -> np.ndarray | None:
    return np.asarray(quantize(np.ascontiguousarray(values.numpy()), params)) if isinstance(params, QParams) else None


@torch.no_grad()
def solve_layers(model: nn.Module, layers: Sequence[tuple[str, nn.Linear]], batches: list[Any],
                 solver: Solver) -> tuple[dict[str, LayerSolution], list[str]]:
    """Solve every layer of ``layers`` (Linear modules of ``model``) in forward order on ``batches``
    (see the module docstring). Returns ``(solutions by layer name, layers never reached)``. The
    solvers run on a CPU model (their scale calibration is numpy's); a model elsewhere is refused."""
    devices = {p.device.type for _, m in layers for p in m.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"the calibrated solvers run on a CPU model; this one is on {', '.join(sorted(devices))}: "
                         "move it with model.cpu() (the stored result is the same)")
    mods = dict(layers)
    awq = solver.awq
    made_by = producers(model, layers, batches[0]) if awq is not None else {}
    probe = first_rows(batches[0], 4)  # the batch a fold is checked on: a few samples suffice
    out: dict[str, LayerSolution] = {}

    def solve(group: list[str], inputs: LayerInputs) -> None:
        ws = [mods[n].weight.detach().float().clone() for n in group]
        refs = [w.clone() for w in ws]
        h = inputs.hessian.matrix if solver.needs_hessian else None
        scale: torch.Tensor | None = None
        where: str | None = None
        if awq is not None:
            assert solver.quantizer is not None
            s, alpha = search_scale(ws, inputs.hessian.sum, inputs.mean_abs, solver.quantizer, awq.grid)
            where = "none: alpha 0 (plain rounding was best)"
            if alpha > 0:
                where = "none: nothing to fold into"
                prod = made_by.get(group[0])
                for tname, target in (fold_candidates(model, prod, s.numel()) if prod else []):
                    if tname in out and not isinstance(out[tname].qparams, (QParams, type(None))):
                        continue  # a float or block grid's row cannot take an arbitrary scale
                    if try_fold(model, target, [mods[n] for n in group], s, probe):
                        where = tname
                        if tname in out:  # an already solved Linear: its rows scale, so do its row scales
                            _divide_rows(out[tname], s)
                            weight = getattr(target, "weight")
                            weight.copy_(out[tname].values.to(weight.dtype))
                        break
                if where.startswith("none") and awq.runtime_scales:
                    where = "runtime"
                if not where.startswith("none"):
                    scale = s
                    ws = [w * s for w in ws]
                    if where != "runtime":
                        refs = [w.clone() for w in ws]
                    if h is not None:
                        h = h / (s.double()[:, None] * s.double()[None, :])
        for n, w, ref in zip(group, ws, refs):
            out[n] = LayerSolution(values=w, reference=ref, awq=where)
        if solver.gptq is not None and solver.sparsegpt is None and isinstance(solver.quantizer, IntQuant):
            # rows are independent under an integer grid per channel or group: one sweep for the group
            sizes = [w.shape[0] for w in ws]
            assert h is not None
            r = obs_sweep(torch.cat(ws), h, quantizer=solver.quantizer, damp=solver.gptq.damp,
                          block_size=solver.gptq.block_size, act_order=solver.gptq.act_order)
            assert r.qparams is not None
            for n, v, sc, zp in zip(group, r.values.split(sizes), *_split_params(r.qparams, sizes)):
                qp = QParams(sc, zp, solver.quantizer.spec, tuple(v.shape))
                out[n].values, out[n].qparams, out[n].damp = v.contiguous(), qp, r.damp
        else:
            for n, w in zip(group, ws):
                sol = out[n]
                g = solver.gptq
                if solver.sparsegpt is not None or g is not None:
                    assert h is not None
                    r = obs_sweep(w, h, quantizer=solver.quantizer if g is not None else None,
                                  pruning=solver.sparsegpt, damp=g.damp if g else 0.01,
                                  block_size=g.block_size if g else 128, act_order=g.act_order if g else False)
                    sol.values, sol.keep, sol.damp, sol.qparams = r.values, r.keep, r.damp, r.qparams
                elif solver.mask is not None:
                    sol.keep = solver.mask(w, inputs).to(torch.bool)
                    sol.values = torch.where(sol.keep, w, torch.zeros((), dtype=w.dtype))
                if solver.quantizer is not None and sol.qparams is None:
                    sol.values, sol.qparams = round_to_nearest(sol.values, solver.quantizer)
        for n in group:
            out[n].codes = _codes(out[n].values, out[n].qparams)
        for n in group:
            sol = out[n]
            if scale is not None and where == "runtime":
                sol.input_scale = (1.0 / scale).float()
            w_eff = sol.values / scale if sol.input_scale is not None and scale is not None else sol.values
            mods[n].weight.copy_(w_eff.to(mods[n].weight.dtype))

    skipped = calibrate_in_order(model, layers, batches, solve, hessian=solver.needs_hessian)
    return out, skipped


def first_rows(batch: Any, k: int) -> Any:
    """The first ``k`` samples of a batch (a tensor, or a dict/tuple of tensors sharing the batch axis)."""
    if isinstance(batch, torch.Tensor):
        return batch[:k] if batch.ndim else batch
    if isinstance(batch, dict):
        return {n: first_rows(v, k) for n, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(first_rows(v, k) for v in batch)
    return batch


def _divide_rows(sol: LayerSolution, s: torch.Tensor) -> None:
    """Divide output row j of a solved layer by ``s[j]``: exactly its row's scales (codes unchanged)."""
    sol.reference = sol.reference / s[:, None]
    if sol.qparams is None or sol.codes is None:
        sol.values = sol.values / s[:, None]
        return
    qp = sol.qparams
    scale = (torch.from_numpy(qp.scale) / s.reshape((-1,) + (1,) * (qp.scale.ndim - 1))).numpy().astype(np.float32)
    sol.qparams = QParams(scale, qp.zero_point, qp.spec, qp.shape)
    sol.values = torch.from_numpy(np.asarray(dequantize(sol.codes, sol.qparams), np.float32))


def _split_params(qp: QParams, sizes: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    bounds = np.cumsum([0] + sizes)
    return ([qp.scale[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
            [qp.zero_point[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
