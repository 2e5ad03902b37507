"""Wanda and SparseGPT from calibration data: exact sparsity, exact N:M, and their stored form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compress import prune_model
from compress.calibrated import wanda_mask
from quant import GPTQ, PerChannel, PerGroup, QuantSpec, dequantize, quantize
from quant.sequential import LayerInputs


def _inputs(cols: int, seed: int = 0) -> tuple[torch.Tensor, LayerInputs]:
    x = torch.randn(200, cols, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 3, cols)
    inp = LayerInputs(cols, hessian=False)
    inp.add(x)
    return x, inp


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.6, 1.0])
@pytest.mark.parametrize("shape", [(16, 64), (5, 30)])
def test_wanda_prunes_exactly_the_requested_count_spread_over_rows(sparsity, shape):
    w = torch.randn(*shape)
    _, inp = _inputs(shape[1])
    keep = wanda_mask(w, inp, sparsity)
    pruned = (~keep).sum(1)
    assert int(pruned.sum()) == round(sparsity * w.numel())
    assert int(pruned.max() - pruned.min()) <= 1


def test_wanda_prunes_the_lowest_weight_times_input_norm_of_each_row():
    w = torch.randn(8, 32)
    x, inp = _inputs(32)
    keep = wanda_mask(w, inp, 0.5)
    score = w.abs() * x.double().square().sum(0).sqrt().float()
    for r in range(8):
        assert set(torch.argsort(score[r], stable=True)[:16].tolist()) == set(torch.nonzero(~keep[r]).flatten().tolist())


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_wanda_keeps_exactly_n_of_every_m(n, m):
    w = torch.randn(6, 64)
    _, inp = _inputs(64)
    keep = wanda_mask(w, inp, n=n, m=m)
    assert bool((keep.reshape(6, -1, m).sum(-1) == n).all())


def _zeros_per_layer(model) -> dict[str, int]:
    return {n: int((m.weight == 0).sum()) for n, m in model.named_modules() if type(m) is nn.Linear}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_pruning_of_a_model_is_exact_and_beats_magnitude(method, tiny_bert, token_batches):
    q, rep = prune_model(tiny_bert, 0.5, method=method, calibration_data=token_batches, eval_data=token_batches)
    _, mag = prune_model(tiny_bert, 0.5, eval_data=token_batches)
    for n, m in q.named_modules():
        if type(m) is nn.Linear:
            assert int((m.weight == 0).sum()) >= round(0.5 * m.weight.numel())
    assert rep.meta["output_sqnr_db"] > mag.meta["output_sqnr_db"]
    assert {r.name for r in rep.tensors} == set(_zeros_per_layer(q))


@pytest.mark.parametrize("method", ["wanda_nm", "sparsegpt_nm"])
def test_calibrated_nm_pruning_of_a_model_keeps_two_of_four(method, tiny_bert, token_batches):
    q, rep = prune_model(tiny_bert, 0.5, method=method, calibration_data=token_batches)
    for m in q.modules():
        if type(m) is nn.Linear:
            assert bool(((m.weight != 0).reshape(m.weight.shape[0], -1, 4).sum(-1) <= 2).all())


def test_sparsegpt_with_gptq_stores_pruned_int4_values_and_reports_their_bytes(tiny_bert, token_batches):
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))
    q, rep = prune_model(tiny_bert, 0.5, method="sparsegpt", calibration_data=token_batches, quantize=spec,
                         gptq=GPTQ(), eval_data=token_batches)
    dense, _ = prune_model(tiny_bert, 0.5, method="sparsegpt", calibration_data=token_batches)
    assert rep.totals["bytes_after"] < dense_bytes(dense) / 4
    for m in q.modules():
        if type(m) is nn.Linear:
            assert int((m.weight == 0).sum()) >= m.weight.numel() // 2


def dense_bytes(model) -> int:
    return sum(m.weight.numel() * 4 for m in model.modules() if type(m) is nn.Linear)


def test_wanda_then_int8_rounds_the_kept_weights_to_nearest(tiny_bert, token_batches):
    spec = QuantSpec(granularity=PerChannel(0))
    q, _ = prune_model(tiny_bert, 0.5, method="wanda", calibration_data=token_batches, quantize=spec)
    f, _ = prune_model(tiny_bert, 0.5, method="wanda", calibration_data=token_batches)
    from quant import calibrate
    # the first group sees the same inputs in both runs (later ones see the quantized layers before them)
    for (n, mq), (_, mf) in zip(q.named_modules(), f.named_modules()):
        if type(mq) is nn.Linear and n.startswith("encoder.layer.0.attention.self."):
            wf, wq = mf.weight.detach().numpy(), mq.weight.detach().numpy()
            qp = calibrate(wf, spec)
            assert np.array_equal(wq, dequantize(quantize(wf, qp), qp)), n
            assert bool((wq[wf == 0] == 0).all())


def test_calibrated_pruning_refuses_bad_requests(tiny_bert, token_batches):
    with pytest.raises(ValueError, match="calibration_data"):
        prune_model(tiny_bert, 0.5, method="sparsegpt")
    with pytest.raises(ValueError, match="refill"):
        prune_model(tiny_bert, 0.5, method="wanda", calibration_data=token_batches, quantize=QuantSpec(
            granularity=PerChannel(0)), gptq=GPTQ())
    with pytest.raises(ValueError, match="apply to"):
        prune_model(tiny_bert, 0.5, method="magnitude", calibration_data=token_batches)
    with pytest.raises(ValueError, match="fraction"):
        prune_model(tiny_bert, 1.5, method="wanda", calibration_data=token_batches)
