"""Sequential calibration: compress a model's layers in forward order, each on the inputs that
the layers compressed before it produce.

GPTQ, AWQ, SparseGPT and Wanda all solve one layer at a time from statistics of its
inputs. The papers take those inputs from the model *as compressed so far*, so that
each layer corrects for the error of the layers before it. :func:`calibrate_in_order`
does that for any ``nn.Module``, with no knowledge of its architecture:

* the layers are grouped by shared input (Q, K and V read the same tensor: one group)
  and ordered by the forward pass (:func:`quant.hooks.shared_inputs`);
* for each group in turn, the calibration batches run through the model until they
  reach the group, where a pre-hook adds the input rows to a :class:`LayerInputs` and
  stops the forward pass (the rest of the model is not run);
* ``solve(group, inputs)`` then compresses the group in place, and the next group's
  inputs come from the model with it compressed.

Memory: one group's statistics at a time (its ``in x in`` float64 Hessian), never the model's
activations except the inputs of the one transformer block being solved. Padding tokens (where a
batch's ``attention_mask`` is 0) are left out of the statistics.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch
from torch import nn

from precision.outputs import run_model

from .gptq import Hessian
from .hooks import shared_inputs


class _Reached(Exception):
    """Raised by the capture hook to end a forward pass once the group's input is seen."""


class LayerInputs:
    """Statistics of one group's input rows (tokens, features): the squared norm and the mean |x| of
    each feature, and the :class:`Hessian` (unless ``hessian=False``)."""

    def __init__(self, features: int, hessian: bool = True) -> None:
        self._hessian = Hessian(features) if hessian else None
        self.abs_sum = torch.zeros(features, dtype=torch.float64)
        self.sq_sum = torch.zeros(features, dtype=torch.float64)
        self.n = 0

    @property
    def hessian(self) -> Hessian:
        if self._hessian is None:
            raise ValueError("this layer's Hessian was not collected (hessian=False)")
        return self._hessian

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self._hessian is not None:
            self._hessian.add(x)
        self.n += x.shape[0]
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.sq_sum += x.square().sum(0, dtype=torch.float64)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` as (tokens, features) without the padding positions: ``mask`` (batch, sequence) of 0/1
    applies when ``x`` is (batch, sequence, features) of the same leading shape."""
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def batch_mask(batch: Any) -> torch.Tensor | None:
    """The ``attention_mask`` of a dict batch (tokenizer output), else None."""
    if isinstance(batch, Mapping):
        m = batch.get("attention_mask")
        if isinstance(m, torch.Tensor) and m.ndim == 2:
            return m
    return None


def repeated_blocks(model: nn.Module, names: Sequence[str]) -> list[str] | None:
    """The names of the children of the ``nn.ModuleList`` of same-type modules (a transformer's
    layers) that holds the most of ``names``, or None when there is none with two or more."""
    best: tuple[int, list[str]] | None = None
    for pname, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(c) for c in mod}) == 1:
            children = [f"{pname}.{i}" if pname else str(i) for i in range(len(mod))]
            covered = sum(1 for n in names if any(n.startswith(c + ".") for c in children))
            if covered and (best is None or covered > best[0]):
                best = (covered, children)
    return best[1] if best else None


CACHE_ARGUMENTS = ("past_key_value", "past_key_values", "layer_past")  # a decoder block's KV cache, by name


def _is_cache(v: Any) -> bool:
    """A transformers KV cache (``DynamicCache`` and the like): a block call would append to it."""
    return "Cache" in type(v).__name__ and callable(getattr(v, "update", None))


def without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A decoder block's captured call with its KV cache taken out: replaying the block for each group
    would otherwise append the same tokens to the cache again and attend over them twice."""
    a = tuple(None if _is_cache(v) else v for v in args)
    k = {n: (None if (n in CACHE_ARGUMENTS or _is_cache(v)) else v) for n, v in kwargs.items()}
    if "use_cache" in k:
        k["use_cache"] = False
    return a, k


def uncached(model: nn.Module, batch: Any) -> Any:
    """``batch`` with ``use_cache=False`` where ``model`` is a transformers model that takes it (causal LMs
    build a KV cache by default, which calibration never reads)."""
    if not isinstance(batch, Mapping) or "use_cache" in batch:
        return batch
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return batch
    if "use_cache" in params and "input_ids" in batch and "input_ids" in params:
        return {**{k: v for k, v in batch.items() if k in params}, "use_cache": False}
    return batch


def _block_index(name: str, blocks: list[str]) -> int | None:
    for i, c in enumerate(blocks):
        if name.startswith(c + "."):
            return i
    return None


Run = tuple[Callable[[], Any], Any]  # a call that runs (part of) the model on one batch, and the batch's mask


def _capture(model: nn.Module, first: nn.Module, inputs: LayerInputs, runs: list[Run]) -> None:
    """Run each ``(call, mask)`` until ``first`` is reached, adding its input rows to ``inputs``."""
    mask: list[torch.Tensor | None] = [None]

    def capture(mod: nn.Module, args: tuple) -> None:
        inputs.add(token_rows(args[0], mask[0]))
        raise _Reached

    def call(run: Run) -> None:
        mask[0] = run[1]
        run[0]()

    _until_reached(first.register_forward_pre_hook(capture), [functools.partial(call, r) for r in runs])


def _until_reached(hook: Any, calls: list[Callable[[], Any]]) -> None:
    """Make each call, which a capture hook ends by raising _Reached; then remove the hook."""
    try:
        for c in calls:
            try:
                c()
            except _Reached:
                pass
    finally:
        hook.remove()


@torch.no_grad()
def calibrate_in_order(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], batches: list[Any],
                       solve: Callable[[list[str], LayerInputs], None], *, hessian: bool = True) -> list[str]:
    """Call ``solve(group names, inputs)`` for every group of ``layers`` (layers sharing one input),
    in forward order, each on the inputs that ``batches`` give it with the groups before it already
    solved (``solve`` changes the model in place). Returns the names of the layers the batches never
    reach (they are not solved).

    Where the groups lie in the repeated blocks of a transformer (:func:`repeated_blocks`), the
    inputs of the first block are captured once and each block then runs on its own cached inputs
    (the outputs of the blocks before it, solved), as llm-compressor's sequential pipeline does;
    the model before and after the blocks, or one with no such blocks, runs from its inputs up to
    each group. Both give the same inputs; the block path runs a fraction of the model per group."""
    if not batches:
        raise ValueError("sequential calibration needs calibration batches (an iterable of model inputs)")
    mods = dict(layers)
    groups = shared_inputs(model, layers, batches[0])
    reached = {n for g in groups for n in g}
    masks = [batch_mask(b) for b in batches]
    whole: list[Run] = [(functools.partial(run_model, model, uncached(model, b)), m) for b, m in zip(batches, masks)]

    def do(group: list[str], runs: list[Run]) -> None:
        inputs = LayerInputs(getattr(mods[group[0]], "weight").shape[1], hessian)
        _capture(model, mods[group[0]], inputs, runs)
        if inputs.n == 0:
            raise ValueError(f"the calibration batches give no tokens to {group[0]} (all padding?)")
        solve(group, inputs)

    blocks = repeated_blocks(model, list(reached))
    index = [_block_index(g[0], blocks) for g in groups] if blocks else []
    inner = [i for i, b in enumerate(index) if b is not None]
    if not blocks or not inner or any(index[i] is None for i in range(inner[0], inner[-1] + 1)) \
            or any(index[a] > index[b] for a, b in zip(inner, inner[1:])):  # type: ignore[operator]
        for group in groups:
            do(group, whole)
        return [n for n, _ in layers if n not in reached]
    for group in groups[:inner[0]]:
        do(group, whole)
    cached: list[tuple[tuple, dict]] = []
    first_block = model.get_submodule(blocks[0])

    def keep(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        cached.append((args, kwargs))
        raise _Reached

    _until_reached(first_block.register_forward_pre_hook(keep, with_kwargs=True), [c for c, _ in whole])
    cached = [without_cache(a, k) for a, k in cached]
    for bi, child in enumerate(blocks):
        block = model.get_submodule(child)
        runs: list[Run] = [(functools.partial(block, *a, **k), m) for (a, k), m in zip(cached, masks)]
        for gi in inner:
            if index[gi] == bi:
                do(groups[gi], runs)
        if bi + 1 < len(blocks):
            for i, (a, k) in enumerate(cached):
                out = block(*a, **k)
                h = out[0] if isinstance(out, (tuple, list)) else out
                if a:
                    cached[i] = ((h,) + tuple(a[1:]), k)
                else:
                    cached[i] = (a, {**k, "hidden_states": h})
    for group in groups[inner[-1] + 1:]:
        do(group, whole)
    return [n for n, _ in layers if n not in reached]
