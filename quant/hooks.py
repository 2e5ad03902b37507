"""Forward hooks shared by PTQ's passes: find the layers, run a model over its inputs with a hook on each."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn

from precision.outputs import run_model


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of every ``nn.Linear`` (exactly that type) in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]


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
