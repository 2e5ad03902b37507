"""Comparing a compressed model's outputs with the original's.

One comparison serves quant (ptq), compress (prune_model, factorize_model) and
bench: the model's final output and, optionally, named layers' outputs, with
the metrics of ``precision.metrics`` accumulated in float64.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any, Iterable

import torch
from torch import nn

from .metrics import MetricsAccumulator, error_metrics


def run_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one batch: a tuple/list is unpacked; a dict (or a tokenizer's
    ``BatchEncoding``) is passed as keyword arguments when every key names a parameter of the
    model's ``forward`` (a transformers model; a tokenizer's keys it does not take, such as a BERT
    tokenizer's ``token_type_ids`` for a decoder, are left out), else as one argument
    (sentence-transformers features); anything else is passed as is."""
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Mapping):
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        if batch and all(isinstance(k, str) and k in params for k in batch):
            return model(**batch)
        if "input_ids" in batch and "input_ids" in params:  # a tokenizer's extras this model does not take
            return model(**{k: v for k, v in batch.items() if k in params})
        return model(copy.copy(batch))  # sentence-transformers adds outputs to its feature dict: keep ours clean
    return model(batch)


def model_output(out: Any) -> torch.Tensor:
    """The tensor to compare from a model's output (a dict's ``sentence_embedding`` or first tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if "sentence_embedding" in out:
            return out["sentence_embedding"]
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot compare model outputs of type {type(out).__name__}")


@torch.no_grad()
def compare_outputs(float_model: nn.Module, qmodel: nn.Module, data: Iterable[Any],
                    layer_names: Iterable[str] = ()) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """One pass over ``data`` through both models: the error of the quantized model's output, and of
    each named layer's output inside it, against the float model (metrics accumulated in float64)."""
    names = list(layer_names)
    per_layer = {n: MetricsAccumulator() for n in names}
    caught: dict[str, torch.Tensor] = {}

    def grab(n):
        def hook(mod, args, out):
            caught[n] = out.detach().float()
        return hook

    def run(m, b):
        caught.clear()
        hs = [m.get_submodule(n).register_forward_hook(grab(n)) for n in names]
        try:
            out = model_output(run_model(m, b)).float()
        finally:
            for h in hs:
                h.remove()
        return out, dict(caught)

    ref, got = [], []
    for b in data:
        (r, r_layers), (q, q_layers) = run(float_model, b), run(qmodel, b)
        ref.append(r.reshape(-1, r.shape[-1]))
        got.append(q.reshape(ref[-1].shape))
        for n in names:
            if n in r_layers and n in q_layers and r_layers[n].shape == q_layers[n].shape:
                per_layer[n].add(r_layers[n], q_layers[n])
    r, g = torch.cat(ref), torch.cat(got)
    m = error_metrics(r, g)
    rowcos = torch.nn.functional.cosine_similarity(r, g, dim=-1)
    model = {"output_sqnr_db": m.sqnr_db, "output_rel_error": m.rel_error, "output_max_abs_error": m.max_abs_error,
             "output_mean_cosine": float(rowcos.mean()), "output_min_cosine": float(rowcos.min())}
    layers = {n: {"output_sqnr_db": acc.result().sqnr_db, "output_rel_error": acc.result().rel_error}
              for n, acc in per_layer.items() if acc.n}
    return model, layers


def output_error(float_model: nn.Module, qmodel: nn.Module, data: Iterable[Any]) -> dict[str, float]:
    """Error of the quantized model's outputs against the float model's on ``data``."""
    return compare_outputs(float_model, qmodel, data)[0]
