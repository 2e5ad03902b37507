"""Pruning: masks equal torch.nn.utils.prune, deterministic ties, real storage bytes, clear errors."""

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as tprune

from compress import Bitmask, NM, global_magnitude_prune, magnitude_prune, nm_prune, structured_prune


@pytest.mark.parametrize("amount", [0.1, 0.5, 0.9])
def test_magnitude_mask_equals_torch_l1_unstructured(amount):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48)
    w = lin.weight.detach().clone()
    tprune.l1_unstructured(lin, "weight", amount)
    r = magnitude_prune(w, amount)
    assert torch.equal(r.mask, lin.weight_mask.bool())
    assert torch.equal(r.weight, lin.weight.detach())


def test_global_mask_equals_torch_global_unstructured():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 16))
    ws = {"0": net[0].weight.detach().clone() * 3, "1": net[1].weight.detach().clone()}
    with torch.no_grad():
        net[0].weight.mul_(3)
    tprune.global_unstructured([(net[0], "weight"), (net[1], "weight")], tprune.L1Unstructured, amount=0.6)
    res = global_magnitude_prune(ws, 0.6)
    assert torch.equal(res.masks["0"], net[0].weight_mask.bool())
    assert torch.equal(res.masks["1"], net[1].weight_mask.bool())
    assert res.report.totals["tensors"] == 2


def test_ties_are_broken_by_index_and_count_is_explicit():
    w = np.ones(10, np.float32)
    r = magnitude_prune(w, count=3)
    assert r.mask.tolist() == [False] * 3 + [True] * 7
    with pytest.raises(ValueError, match="count="):
        magnitude_prune(w, 3)  # the torch amount=3 trap: an integer is not a fraction
    assert magnitude_prune(w, 1).mask.sum() == 0 and magnitude_prune(w, 1.0).mask.sum() == 0


@pytest.mark.parametrize("bad, err", [(-0.1, ValueError), (1.5, ValueError), ("half", TypeError)])
def test_sparsity_outside_unit_interval_is_an_error(bad, err):
    with pytest.raises(err):
        magnitude_prune(np.ones(4), bad)


def test_sparsity_zero_and_one():
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    r0, r1 = magnitude_prune(w, 0.0), magnitude_prune(w, 1.0)
    assert np.array_equal(r0.weight, w) and r0.report.tensors[0].bytes_after == w.nbytes  # dense is smaller
    assert (r1.weight == 0).all() and r1.report.tensors[0].bytes_after == 8


def test_nan_weights_are_errors_naming_the_tensor():
    with pytest.raises(ValueError, match="fc1.weight: 1 of 3"):
        magnitude_prune(np.array([1.0, np.nan, 2.0]), 0.5, name="fc1.weight")


def test_bitmask_storage_costs_53_percent_at_half_sparsity_and_round_trips():
    w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    r = magnitude_prune(w, 0.5)
    assert r.report.tensors[0].bytes_after / w.nbytes == pytest.approx(0.53125)
    back = Bitmask.from_tensors(r.storage.tensors(), w.shape).dense()
    assert np.array_equal(back, r.weight)


def test_structured_prune_removes_rows_or_columns_by_norm():
    w = np.arange(24, dtype=np.float32).reshape(6, 4)
    r = structured_prune(w, 0.5, axis=0, norm=1)
    assert r.kept.tolist() == [3, 4, 5] and r.weight.shape == (3, 4)
    c = structured_prune(torch.from_numpy(w), count=1, axis=1)
    assert c.weight.shape == (6, 3) and c.kept.tolist() == [1, 2, 3]
    assert isinstance(c.weight, torch.Tensor)
    np.testing.assert_array_equal(r.storage.dense()[r.kept], w[r.kept])
    with pytest.raises(ValueError, match="at least 2"):
        structured_prune(np.ones(5), 0.5)


def test_structured_prune_equals_torch_ln_structured_on_distinct_norms():
    torch.manual_seed(3)
    lin = torch.nn.Linear(20, 30)
    w = lin.weight.detach().clone()
    tprune.ln_structured(lin, "weight", amount=0.4, n=2, dim=0)
    r = structured_prune(w, 0.4, axis=0, norm=2)
    kept_rows = lin.weight_mask.any(dim=1).nonzero().ravel()
    assert torch.equal(r.kept, kept_rows)


def test_nm_keeps_n_largest_per_group_and_stores_positions():
    w = np.array([[1, -4, 3, 2, 0, 0, 5, -1]], np.float32)
    r = nm_prune(w, 2, 4)
    assert r.weight.tolist() == [[0, -4, 3, 0, 0, 0, 5, -1]]
    assert r.mask.sum() == 4
    big = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    rb = nm_prune(big)
    assert rb.report.tensors[0].bytes_after / big.nbytes == pytest.approx(0.53125)
    back = NM.from_tensors(rb.storage.tensors(), big.shape, 2, 4).dense()
    assert np.array_equal(back, rb.weight)
    tie = nm_prune(np.ones((1, 4), np.float32))
    assert tie.mask.tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match="n=5 > m=4"):
        nm_prune(big, 5, 4)
    with pytest.raises(ValueError, match="multiple of m"):
        nm_prune(np.ones((2, 6)), 2, 4)


def test_fp16_and_bf16_weights_are_accepted():
    for dt in (torch.float16, torch.bfloat16):
        w = torch.randn(16, 16).to(dt)
        r = magnitude_prune(w, 0.5)
        assert r.weight.dtype in (dt, torch.float32) and r.mask.sum() == 128


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_0d_weight_is_one_element_for_magnitude_pruning_and_refused_by_nm(kind):
    import torch

    x = np.array(-3.0, np.float32) if kind == "numpy" else torch.tensor(-3.0)
    everything, nothing = magnitude_prune(x, 1.0), magnitude_prune(x, 0.0)
    assert float(everything.weight) == 0.0 and not bool(everything.mask) and float(nothing.weight) == -3.0
    assert type(everything.weight) is type(x) and tuple(everything.weight.shape) == ()
    glob = global_magnitude_prune({"a": x, "b": np.ones(3, np.float32)}, count=1)
    assert float(glob.weights["a"]) == -3.0 and type(glob.weights["a"]) is type(x)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        nm_prune(x, 2, 4)
