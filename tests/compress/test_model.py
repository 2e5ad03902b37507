"""prune_model / factorize_model on toy models and on the real MiniLM."""

import numpy as np
import pytest
import torch

from compress import LowRankLinear, factorize_model, prune_model


def toy():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))


def test_magnitude_and_nm_models_keep_shapes_and_report_storage_bytes():
    m = toy()
    x = [torch.randn(8, 32)]
    for method in ("magnitude", "global", "nm"):
        p, rep = prune_model(m, 0.5, method=method, eval_data=x)
        assert rep.totals["bytes_after"] < rep.totals["bytes_before"] * 0.6
        assert "output_mean_cosine" in rep.meta and p(x[0]).shape == (8, 16)
    assert (m[0].weight != 0).all()  # the input model is untouched


def test_factorize_model_replaces_linears_and_skips_those_that_save_nothing():
    m = toy()
    f, rep = factorize_model(m, rank=4, eval_data=[torch.randn(8, 32)])
    assert isinstance(f[0], LowRankLinear) and isinstance(f[2], LowRankLinear)
    assert f(torch.randn(3, 32)).shape == (3, 16)
    g, rep2 = factorize_model(m, rank=30)  # 30 >= 32*64/96 for layer 0
    assert type(g[0]) is torch.nn.Linear and "not applied" in rep2.tensors[0].method


@pytest.fixture(scope="module")
def minilm(minilm_model):
    from bench.models import embed, sentences

    model = minilm_model
    s = sentences()[:64]
    return model, s, embed(model, s)


def _cos(model, s, ref):
    from bench.models import embed, embedding_cosine

    return embedding_cosine(ref, embed(model, s))["mean_cosine"]


def test_minilm_structured_pruning_really_shrinks_the_model_and_runs(minilm):
    model, s, ref = minilm
    n0 = sum(p.numel() for p in model.parameters())
    ffn, rep = prune_model(model, 0.5, method="ffn")
    heads, rep_h = prune_model(model, 0.25, method="heads")
    inter = ffn[0].auto_model.encoder.layer[0].intermediate.dense
    assert inter.out_features == 768 and ffn[0].auto_model.encoder.layer[0].output.dense.in_features == 768
    assert heads[0].auto_model.encoder.layer[0].attention.self.num_attention_heads == 9
    for m_, r in ((ffn, rep), (heads, rep_h)):
        assert sum(p.numel() for p in m_.parameters()) < n0
        c = _cos(m_, s, ref)
        print(f"MiniLM {r.title}: mean cosine {c:.4f}, weights kept {r.totals['bytes_after'] / r.totals['bytes_before']:.2f}")
        assert 0.5 < c < 1


def test_minilm_magnitude_50_matches_the_peer_and_saves_memory(minilm):
    """torch.nn.utils.prune at 50% keeps ~0.72 mean cosine and saves nothing; lowbit must match it and save bytes."""
    model, s, ref = minilm
    p, rep = prune_model(model, 0.5)
    c = _cos(p, s, ref)
    print(f"MiniLM magnitude 50%: cosine {c:.4f}, mean rel error {rep.totals['mean_rel_error']:.3f}, "
          f"stored {rep.totals['bytes_after'] / rep.totals['bytes_before']:.3f} of dense")
    assert c > 0.7 and rep.totals["bytes_after"] / rep.totals["bytes_before"] == pytest.approx(0.53125)
    # magnitude pruning is the best choice of kept elements: each error is the norm of the smallest half
    assert all(t.rel_error == pytest.approx(_smallest_share(np.abs(t_ref), 0.5), rel=1e-6)
               for t, t_ref in zip(rep.tensors, _linear_weights(model, rep)))


def _smallest_share(scores, frac):
    """sqrt(sum of the smallest ``frac`` of squared scores / sum of all): the relative error of dropping them."""
    sq = np.sort(scores.astype(np.float64).reshape(-1) ** 2)
    return float(np.sqrt(sq[: int(round(frac * sq.size))].sum() / sq.sum()))


def _linear_weights(model, rep):
    named = dict(model.named_parameters())
    return [named[t.name if t.name.endswith("weight") else t.name + ".weight"].detach().numpy() for t in rep.tensors]


def test_minilm_weight_errors_equal_their_closed_forms():
    """Magnitude pruning drops the smallest elements, row pruning the smallest-norm rows, and truncated
    SVD keeps the largest singular values (Eckart-Young): each error is the norm of what was dropped."""
    from bench.models import load_minilm_weights
    from compress import low_rank, magnitude_prune, structured_prune

    w = load_minilm_weights()
    for t in w.values():
        mag = magnitude_prune(t, 0.5).report.tensors[0].rel_error
        rows = structured_prune(t, 0.5).report.tensors[0].rel_error
        assert mag == pytest.approx(_smallest_share(np.abs(t), 0.5), rel=1e-6)
        assert rows == pytest.approx(_smallest_share(np.linalg.norm(t.astype(np.float64), axis=1), 0.5), rel=1e-6)
        assert mag <= rows  # dropping whole rows is one of the ways to drop half the elements
    for i in range(6):
        t = w[f"encoder.layer.{i}.output.dense.weight"]
        s = np.linalg.svd(t.astype(np.float64), compute_uv=False)
        want = np.sqrt((s[192:] ** 2).sum() / (s ** 2).sum())
        assert low_rank(t, 192).report.tensors[0].rel_error == pytest.approx(want, rel=1e-4)
