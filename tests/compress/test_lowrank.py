"""Low rank: Eckart-Young optimality, randomized accuracy, edge cases and the memory rule."""

import numpy as np
import pytest
import torch

from compress import break_even_rank, eckart_young_error, low_rank


@pytest.mark.parametrize("r", [0, 1, 7, 20, 40])
def test_exact_error_is_the_eckart_young_optimum(r):
    w = np.random.default_rng(0).standard_normal((40, 60)).astype(np.float64)
    lr = low_rank(w, r, force=True)
    s = np.linalg.svd(w, compute_uv=False)
    assert lr.report.tensors[0].rel_error == pytest.approx(eckart_young_error(s, r), abs=1e-12)
    assert lr.A.shape == (40, r) and lr.B.shape == (r, 60)


def test_rank_by_ratio_and_energy():
    w = np.random.default_rng(1).standard_normal((30, 50)).astype(np.float32)
    lr = low_rank(w, ratio=0.5)
    assert lr.rank == int(0.5 * 30 * 50 / 80) and lr.applied
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    le = low_rank(w, energy=0.9, force=True)
    e = np.cumsum(s**2) / np.sum(s**2)
    assert e[le.rank - 1] >= 0.9 > e[le.rank - 2]
    with pytest.raises(ValueError, match="exactly one"):
        low_rank(w, 3, ratio=0.5)


def test_no_saving_is_reported_and_not_applied_unless_forced():
    w = np.random.default_rng(2).standard_normal((20, 20)).astype(np.float32)
    assert break_even_rank(20, 20) == 10
    lr = low_rank(w, 12)
    assert not lr.applied and lr.report.tensors[0].bytes_after == w.nbytes and "not applied" in lr.report.tensors[0].method
    assert low_rank(w, 12, force=True).applied


def test_edge_cases_are_exact_and_nan_free():
    z = np.zeros((5, 7), np.float32)
    lr = low_rank(z, 3, force=True)
    assert np.all(lr.dense() == 0) and np.isfinite(lr.A).all()
    u = np.random.default_rng(3).standard_normal((8, 2))
    v = np.random.default_rng(4).standard_normal((2, 9))
    deficient = u @ v
    for r in (2, 5, 100):
        lr = low_rank(deficient, r, force=True)
        assert lr.report.tensors[0].rel_error < 1e-12 and lr.rank == min(r, 8)
    with pytest.raises(ValueError, match="NaN or inf"):
        low_rank(np.array([[1.0, np.inf], [0, 1]]), 1)
    h = low_rank(torch.randn(16, 32).half(), 4)
    assert h.A.dtype == torch.float32


def test_randomized_is_within_two_percent_of_optimum_on_minilm():
    from bench.models import load_minilm_weights

    w = load_minilm_weights()
    worst = 0.0
    for i in range(6):
        t = w[f"encoder.layer.{i}.output.dense.weight"]
        opt = low_rank(t, 192).report.tensors[0].rel_error
        rnd = low_rank(t, 192, method="randomized").report.tensors[0].rel_error
        worst = max(worst, rnd / opt - 1)
    print(f"randomized SVD (4 power iterations) worst excess over Eckart-Young on MiniLM FFN out: {worst:.2%}")
    assert worst < 0.02
