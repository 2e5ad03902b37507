"""Forward hooks shared by PTQ's passes: find the layers, run a model over its inputs with a hook on each."""

from __future__ import annotations

import re
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn

from precision.outputs import run_model


def is_transposed_linear(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections): a Linear whose weight is stored (in, out),
    ``y = x @ W + b``."""
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.ndim == 2 \
        and getattr(m, "nf", None) == w.shape[1]


def _mha_children(model: nn.Module) -> set[int]:
    return {id(c) for m in model.modules() if isinstance(m, nn.MultiheadAttention) for c in m.children()}


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of every ``nn.Linear`` or subclass in ``model``, in module order, except the
    output projection of ``nn.MultiheadAttention``, whose weight the attention reads directly."""
    inside_mha = _mha_children(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside_mha]


def find_layers(model: nn.Module, include: str | None = None, exclude: str | None = None,
                kinds: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """The layers a quantizer takes, by type and subclass (``nn.Linear``, transformers' ``Conv1D``,
    and the ``kinds`` given), selected by name (regular expressions ``include``/``exclude``, searched),
    and every other candidate with the reason it is skipped, so nothing is skipped silently."""
    inside_mha = _mha_children(model)
    found: list[tuple[str, nn.Module]] = []
    skipped: dict[str, str] = {}
    for n, m in model.named_modules():
        if not (isinstance(m, kinds) or is_transposed_linear(m)):
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_transposed_linear(m):
                skipped[n] = f"{type(m).__name__} is not handled here"
            continue
        if (include is not None and not re.search(include, n)) or (exclude and re.search(exclude, n)):
            skipped[n] = "not selected by include/exclude"
        elif id(m) in inside_mha:
            skipped[n] = "read directly by nn.MultiheadAttention (its weight is not called as a layer)"
        else:
            found.append((n, m))
    return found, skipped


def as_linear(m: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what transformers' ``Conv1D`` ``m`` computes (the weight transposed)."""
    w = getattr(m, "weight")
    b = getattr(m, "bias", None)
    lin = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.T)
        if b is not None:
            lin.bias.copy_(b)
    return lin


def on_inputs(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], batches: list[Any],
              fn: Callable[[str, tuple], Any]) -> None:
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


def collect_inputs(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], calib: list[Any],
                   fn: Callable[[str, torch.Tensor], Any]) -> None:
    """Run ``calib`` through ``model`` calling ``fn(name, input as (tokens, features))`` for each layer."""
    on_inputs(model, layers, calib, lambda n, args: fn(n, args[0].detach().reshape(-1, args[0].shape[-1])))


def shared_inputs(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], batch: Any) -> list[list[str]]:
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

    on_inputs(model, layers, [batch], pre)
    return [names for _, names in groups]
