"""Pruning and low rank applied to a whole nn.Module.

``prune_model`` masks weights in place of a copy (unstructured, global, N:M),
or really shrinks layers (structured FFN widths and attention heads of a
BERT-style transformer: the dependent layers shrink with them, so the pruned
model runs and is smaller). ``factorize_model`` replaces Linear layers by
two Linears through rank r. Both return ``(model, Report)`` and never modify
the model they are given.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from precision.outputs import output_error
from precision.report import Report, TensorReport, nbytes

from quant.gptq import GPTQ
from quant.spec import QuantSpec

from .lowrank import low_rank
from .prune import global_magnitude_prune, magnitude_prune, nm_prune, slice_norms
from ._common import amount_to_count, smallest_k
from .storage import Structured

PRUNE_METHODS = ("magnitude", "global", "nm", "ffn", "heads", "wanda", "wanda_nm", "sparsegpt", "sparsegpt_nm")
CALIBRATED_METHODS = ("wanda", "wanda_nm", "sparsegpt", "sparsegpt_nm")


def _linears(model: nn.Module, include: str | None, exclude: str | None) -> list[tuple[str, nn.Linear]]:
    out = []
    for n, m in model.named_modules():
        if type(m) is nn.Linear and (include is None or re.search(include, n)) and not (exclude and re.search(exclude, n)):
            out.append((n, m))
    return out


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _attach_output_error(rep: Report, model, new, eval_data) -> None:
    if eval_data is not None:
        rep.meta.update(output_error(model, new, list(eval_data)))


@torch.no_grad()
def prune_model(model: nn.Module, sparsity: float, *, method: str = "magnitude", n: int = 2, m: int = 4,
                norm: int = 2, include: str | None = None, exclude: str | None = None,
                eval_data: Iterable[Any] | None = None, calibration_data: Iterable[Any] | None = None,
                quantize: QuantSpec | None = None, calibration: str = "minmax",
                gptq: GPTQ | None = None) -> tuple[nn.Module, Report]:
    """Prune a copy of ``model``.

    ``method``:
      * ``"magnitude"``: each selected Linear weight to ``sparsity`` by |w|;
      * ``"global"``: one |w| threshold across all selected Linear weights;
      * ``"nm"``: N:M (``n``:``m``, 2:4 by default) along the input dimension (``sparsity`` ignored);
      * ``"ffn"``: the intermediate width of every BERT-style FFN
        (``*.intermediate.dense`` -> ``*.output.dense``) by the ``norm`` of
        each hidden unit's input row: both Linears shrink;
      * ``"heads"``: whole attention heads, ranked by the norm of their
        query/key/value rows, removed with the model's own ``prune_heads``.
    ``include``/``exclude``: regular expressions on module names.
    Bytes in the report are those of the storage formats in ``compress.storage``.
    """
    if method not in PRUNE_METHODS:
        raise ValueError(f"method must be one of {PRUNE_METHODS}, got {method!r}")
    if method not in CALIBRATED_METHODS and (calibration_data is not None or quantize is not None or gptq is not None):
        raise ValueError(f"prune_model: calibration_data, quantize and gptq apply to {', '.join(CALIBRATED_METHODS)}")
    new = copy.deepcopy(model)
    rep = Report(title=f"prune_model {method}" + ("" if method.endswith("nm") else f" {sparsity:.0%}"))
    if method in CALIBRATED_METHODS:
        _prune_calibrated(model, new, method, sparsity, n, m, include, exclude, calibration_data, quantize,
                          calibration, gptq, rep)
    elif method in ("magnitude", "nm", "global"):
        layers = _linears(new, include, exclude)
        if not layers:
            raise ValueError("prune_model: no nn.Linear layers matched")
        if method == "global":
            res = global_magnitude_prune({nm_: lin.weight.detach() for nm_, lin in layers}, sparsity)
            for nm_, lin in layers:
                lin.weight.copy_(res.results[nm_].weight)
            rep.extend(res.report)
        else:
            for nm_, lin in layers:
                r = (magnitude_prune(lin.weight.detach(), sparsity, name=nm_) if method == "magnitude"
                     else nm_prune(lin.weight.detach(), n, m, name=nm_))
                lin.weight.copy_(r.weight)
                rep.extend(r.report)
    elif method == "ffn":
        _prune_ffn(new, sparsity, norm, rep)
    else:
        _prune_heads(new, sparsity, norm, rep)
    _attach_output_error(rep, model, new, eval_data)
    return new, rep


def _prune_calibrated(model: nn.Module, new: nn.Module, method: str, sparsity: float, n: int, m: int,
                      include: str | None, exclude: str | None, calibration_data: Iterable[Any] | None,
                      spec: QuantSpec | None, calibration: str, gptq: GPTQ | None, rep: Report) -> None:
    from precision.methods import Solution, ValueStore, parts_nbytes
    from quant.gptq import Pruning
    from quant.solve import Solver, solve_layers
    from quant.storage import IntQuant

    from .calibrated import wanda_mask
    from .storage import MagnitudePrune, NMPrune

    nm = method.endswith("_nm")
    quantizer = IntQuant(spec, calibration) if spec is not None else None
    if not nm:
        amount_to_count(1, sparsity, None)  # the same check of sparsity as every method
    layers = _linears(new, include, exclude)
    if not layers:
        raise ValueError("prune_model: no nn.Linear layers matched")
    batches = list(calibration_data) if calibration_data is not None else []
    if not batches:
        raise ValueError(f"prune_model(method={method!r}) needs calibration_data, an iterable of model inputs")
    if method.startswith("wanda"):
        if gptq is not None:
            raise ValueError("prune_model: gptq applies to sparsegpt (GPTQ would refill Wanda's fixed mask)")
        solver = Solver(quantizer=quantizer, mask_name="Wanda",
                        mask=functools.partial(wanda_mask, sparsity=None if nm else sparsity, n=n if nm else 0,
                                               m=m if nm else 0))
    else:
        solver = Solver(quantizer=quantizer, gptq=gptq,
                        sparsegpt=Pruning(n=n, m=m) if nm else Pruning(float(sparsity)))
    originals = {name: lin.weight.detach().float().numpy().copy() for name, lin in layers}
    solved, unreached = solve_layers(new, layers, batches, solver)
    if unreached:
        raise ValueError(f"prune_model: the calibration data never reaches {', '.join(unreached[:5])}")
    structure = NMPrune(n, m) if nm else MagnitudePrune(float(sparsity))
    store = ValueStore(quantizer, np.dtype(np.float32))
    label = (f"{method.split('_')[0]} {n}:{m}" if nm else f"{method} {sparsity:.0%}") + \
        (f" + {spec.describe()}{' GPTQ' if gptq is not None else ''}" if spec is not None else "")
    for name, lin in layers:
        sol = solved[name]
        assert sol.keep is not None
        solution = Solution(sol.values.numpy(), sol.keep.numpy(), sol.qparams)
        parts, _, recon = structure.encode_solved(solution, store, name)
        rep.add(TensorReport.measure(name, originals[name], recon, method=label, bytes_before=nbytes(lin.weight),
                                     bytes_after=parts_nbytes(parts)))


def _shrink_linear(lin: nn.Linear, kept: torch.Tensor, axis: int) -> nn.Linear:
    w = lin.weight.index_select(axis, kept)
    out_f, in_f = w.shape
    new = nn.Linear(in_f, out_f, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    if lin.bias is not None:
        new.bias.copy_(lin.bias if axis == 1 else lin.bias.index_select(0, kept))
    return new


def _prune_ffn(model: nn.Module, amount: float, norm: int, rep: Report) -> None:
    pairs: list[tuple[str, nn.Linear, str, nn.Linear]] = []
    for name, mod in model.named_modules():
        if name.endswith("intermediate.dense") and isinstance(mod, nn.Linear):
            out_name = name[: -len("intermediate.dense")] + "output.dense"
            try:
                out_mod = model.get_submodule(out_name)
            except AttributeError:
                continue
            if isinstance(out_mod, nn.Linear):
                pairs.append((name, mod, out_name, out_mod))
    if not pairs:
        raise ValueError("prune_model(method='ffn') found no '*.intermediate.dense' -> '*.output.dense' pairs "
                         "(BERT-style FFN); use method='magnitude' or compress.structured_prune on your layers")
    for name, inter, out_name, outl in pairs:
        w_in, w_out = inter.weight.detach().numpy(), outl.weight.detach().numpy()
        scores = slice_norms(w_in, 0, norm)
        k = amount_to_count(scores.size, amount, None, "amount")
        kept = np.flatnonzero(~smallest_k(scores, k))
        kept_t = torch.from_numpy(kept)
        for nm_, lin, axis, w in ((name, inter, 0, w_in), (out_name, outl, 1, w_out)):
            st = Structured.from_kept(w, kept, axis)
            bias_b = nbytes(lin.bias) if lin.bias is not None else 0
            rep.add(_row(nm_, w, st, f"ffn structured L{norm} {k / scores.size:.0%}", bias_b,
                         (len(kept) if axis == 0 else lin.out_features) * 4 if lin.bias is not None else 0))
        _set(model, name, _shrink_linear(inter, kept_t, 0))
        _set(model, out_name, _shrink_linear(outl, kept_t, 1))


def _row(name, w, st, method, bias_before, bias_after):
    return TensorReport.measure(name, w, st.dense(), method=method, bytes_before=w.nbytes + bias_before,
                                bytes_after=st.nbytes + bias_after)


def _prune_heads(model: nn.Module, amount: float, norm: int, rep: Report) -> None:
    """Remove whole heads from BERT-style attention blocks: a module with ``self.query/key/value``
    Linears and ``num_attention_heads`` / ``attention_head_size``, whose ``output.dense`` reads them."""
    found = False
    mod: Any
    sa: Any
    for name, mod in list(model.named_modules()):
        sa = getattr(mod, "self", None)
        if not (isinstance(sa, nn.Module) and all(isinstance(getattr(sa, p, None), nn.Linear)
                                                  for p in ("query", "key", "value"))
                and hasattr(sa, "num_attention_heads") and hasattr(sa, "attention_head_size")
                and isinstance(getattr(getattr(mod, "output", None), "dense", None), nn.Linear)):
            continue
        found = True
        nh, hd = int(getattr(sa, "num_attention_heads")), int(getattr(sa, "attention_head_size"))
        ws = [getattr(sa, p).weight.detach().numpy() for p in ("query", "key", "value")]
        scores = sum(slice_norms(w, 0, norm).reshape(nh, hd).sum(1) for w in ws)
        k = amount_to_count(nh, amount, None, "amount")
        if k >= nh:
            raise ValueError(f"{name}: pruning all {nh} heads would remove the attention block")
        kept = np.flatnonzero(~np.repeat(smallest_k(scores, k), hd))
        kept_t = torch.from_numpy(kept)
        for p, w in zip(("query", "key", "value"), ws):
            lin = getattr(sa, p)
            rep.add(_row(f"{name}.self.{p}", w, Structured.from_kept(w, kept, 0), f"heads {k}/{nh}",
                         nbytes(lin.bias) if lin.bias is not None else 0, len(kept) * 4 if lin.bias is not None else 0))
            setattr(sa, p, _shrink_linear(lin, kept_t, 0))
        od = mod.output.dense
        wo = od.weight.detach().numpy()
        bb = nbytes(od.bias) if od.bias is not None else 0
        rep.add(_row(f"{name}.output.dense", wo, Structured.from_kept(wo, kept, 1), f"heads {k}/{nh}", bb, bb))
        mod.output.dense = _shrink_linear(od, kept_t, 1)
        setattr(sa, "num_attention_heads", nh - k)
        if hasattr(sa, "all_head_size"):
            setattr(sa, "all_head_size", (nh - k) * hd)
    if not found:
        raise ValueError("prune_model(method='heads') found no BERT-style attention blocks (self.query/key/value "
                         "with num_attention_heads); use structured_prune(..., group=head_dim) on your layers")


class LowRankLinear(nn.Sequential):
    """Two Linears (in -> r without bias, r -> out with the original bias) replacing one."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> None:
        r = B.shape[0]
        first = nn.Linear(B.shape[1], r, bias=False, dtype=B.dtype)
        second = nn.Linear(r, A.shape[0], bias=bias is not None, dtype=A.dtype)
        with torch.no_grad():
            first.weight.copy_(B)
            second.weight.copy_(A)
            if bias is not None:
                second.bias.copy_(bias)
        super().__init__(first, second)


@torch.no_grad()
def factorize_model(model: nn.Module, *, rank: int | None = None, ratio: float | None = None,
                    energy: float | None = None, method: str = "exact", force: bool = False,
                    include: str | None = None, exclude: str | None = None,
                    eval_data: Iterable[Any] | None = None) -> tuple[nn.Module, Report]:
    """Replace each selected nn.Linear by ``LowRankLinear`` (in -> r -> out) from ``low_rank``.

    Layers where the factorization saves no memory are left dense unless
    ``force`` (the report says so). With ``eval_data`` the report's meta holds
    the output error against the original model.
    """
    new = copy.deepcopy(model)
    layers = _linears(new, include, exclude)
    if not layers:
        raise ValueError("factorize_model: no nn.Linear layers matched")
    rep = Report(title=f"factorize_model {method}")
    for name, lin in layers:
        lr = low_rank(lin.weight.detach(), rank, ratio=ratio, energy=energy, method=method, force=force, name=name)
        row = lr.report.tensors[0]
        if lin.bias is not None:
            row.bytes_before += nbytes(lin.bias)
            row.bytes_after += nbytes(lin.bias)
        rep.add(row)
        if lr.applied:
            _set(new, name, LowRankLinear(lr.A, lr.B, lin.bias))
    _attach_output_error(rep, model, new, eval_data)
    return new, rep
