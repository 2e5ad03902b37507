"""GELU in place: fuse exact-GELU modules into the quantized layers whose outputs feed only them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from precision.outputs import run_model

from .modules import QuantizedLinear


def model_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (nested dicts, lists, tuples), in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in model_outputs(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in model_outputs(v)]
    return []


@torch.no_grad()
def fuse_gelu(qmodel: nn.Module, batches: list) -> list[str]:
    """Fuse exact-GELU modules into the quantized layers that feed them (see ``PTQConfig.gelu_in_place``);
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
            reference.append([t.clone() for t in model_outputs(run_model(qmodel, b))])
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
                if src is not None:  # every call of a module in `gelus` took a layer's output
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
               for r, g in zip(reference, ([t for t in model_outputs(run_model(qmodel, b))] for b in batches)))
    if not same:  # an output also went somewhere the hooks could not see: undo
        for parent, k, child in swapped:
            parent._modules[k] = child
        for n in fused:
            layers[n].gelu_in_place = False
        return []
    return sorted(fused)
