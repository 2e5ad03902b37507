"""GPTQ, the OBS sweep SparseGPT shares, sequential calibration and AWQ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from quant import AWQ, GPTQ, PerChannel, PerGroup, PTQConfig, QuantSpec, calibrate, dequantize, ptq, quantize
from quant.awq import producers, search_scale, try_fold
from quant.gptq import Hessian, Pruning, gptq, inverse_hessian_factor, obs_sweep
from precision.blocks import BlockCast
from precision.cast import FloatCast
from precision.methods import Solution
from quant.hooks import linear_layers
from quant.sequential import LayerInputs, calibrate_in_order

SPECS = [QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32)),
         QuantSpec(bits=4, symmetric=True, granularity=PerGroup(64)),
         QuantSpec(bits=8, granularity=PerChannel(0)),
         QuantSpec(bits=3, symmetric=False, granularity=PerChannel(0)),
         QuantSpec(bits=2, symmetric=False, granularity=PerGroup(16)),
         QuantSpec(bits=8, signed=False, symmetric=True, granularity=PerChannel(0)),
         QuantSpec(bits=6, narrow_range=True, granularity=PerGroup(32))]


def _problem(seed: int, rows: int = 48, cols: int = 128, tokens: int = 1024):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + 2 * mix) * torch.rand(cols, generator=g) * 3
    h = Hessian(cols)
    h.add(x)
    return w, x, h.matrix


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("calibration", ["minmax", "mse"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_an_identity_hessian_equals_round_to_nearest_bit_for_bit(spec, calibration, act_order):
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(3)) * 0.1
    codes, qp = gptq(w, torch.eye(128, dtype=torch.float64), spec, GPTQ(act_order=act_order), calibration)
    ref_qp = calibrate(w.numpy(), spec, calibration)
    assert np.array_equal(qp.scale, ref_qp.scale) and np.array_equal(qp.zero_point, ref_qp.zero_point)
    assert np.array_equal(codes, quantize(w.numpy(), ref_qp))


@pytest.mark.parametrize("method", [FloatCast.for_format("fp8_e4m3fn"), FloatCast.for_format("fp8_e5m2"),
                                    FloatCast("bf16"), FloatCast("fp16", scaling="tensor"),
                                    FloatCast.for_format("fp8_e4m3fn", rounding="toward_zero", overflow="saturate"),
                                    BlockCast("mxfp4"), BlockCast("mxfp6_e2m3"), BlockCast("mxfp8_e4m3"),
                                    BlockCast("mxint8"), BlockCast("nvfp4"), BlockCast("mxfp4", rounding="nearest_away")],
                         ids=lambda m: m.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_float_and_block_formats_with_an_identity_hessian_is_their_own_encoding(method, act_order):
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(3)) * 0.1
    r = obs_sweep(w, torch.eye(128, dtype=torch.float64), quantizer=method, act_order=act_order)
    enc = method.encode(w.numpy())
    assert np.array_equal(r.values.numpy(), enc.values)
    again = method.encode_solved(Solution(r.values.numpy(), qparams=r.qparams))
    assert np.array_equal(again.codes, enc.codes) and all(np.array_equal(again.side[k], enc.side[k]) for k in enc.side)


@pytest.mark.parametrize("method", [FloatCast.for_format("fp8_e4m3fn"), BlockCast("mxfp4"), BlockCast("nvfp4")],
                         ids=lambda m: m.describe())
def test_gptq_on_float_and_block_formats_lowers_the_layer_output_error(method):
    w, x, h = _problem(7)
    r = obs_sweep(w, h, quantizer=method, act_order=True)
    rtn = torch.from_numpy(method.encode(w.numpy()).values)

    def out_err(v):
        return float(((x @ (v - w).T) ** 2).sum())
    assert out_err(r.values) < out_err(rtn)
    again = method.encode_solved(Solution(r.values.numpy(), qparams=r.qparams))
    assert np.array_equal(again.values, r.values.numpy())  # the stored form holds the solver's values exactly


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spec", SPECS[:5], ids=lambda s: s.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_layer_output_error_below_round_to_nearest(seed, spec, act_order):
    w, x, h = _problem(seed)
    codes, qp = gptq(w, h, spec, GPTQ(act_order=act_order))
    ref = calibrate(w.numpy(), spec)
    rtn = torch.from_numpy(dequantize(quantize(w.numpy(), ref), ref))
    got = torch.from_numpy(dequantize(codes, qp))

    def out_err(v):
        return float(((x @ (v - w).T) ** 2).sum())
    assert out_err(got) < out_err(rtn)


def test_gptq_codes_are_the_stored_form_of_round_to_nearest():
    w, _, h = _problem(0)
    spec = SPECS[0]
    codes, qp = gptq(w, h, spec)
    assert codes.dtype == spec.code_dtype and codes.shape == tuple(w.shape)
    assert qp.scale.shape == spec.params_shape(tuple(w.shape)) and qp.spec == spec
    # the values re-quantize to the very same codes with the same params
    assert np.array_equal(quantize(dequantize(codes, qp), qp), codes)


def test_the_inverse_hessian_factor_is_the_upper_cholesky_of_the_damped_inverse():
    _, _, h = _problem(1)
    u, d = inverse_hessian_factor(h, 0.01)
    assert d == 0.01 and torch.equal(u, torch.triu(u))
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    assert torch.allclose((u.T.double() @ u.double()) @ damped, torch.eye(h.shape[0], dtype=torch.float64), atol=1e-3)


def test_a_singular_hessian_grows_its_damping_and_dead_inputs_are_zeroed():
    w = torch.randn(8, 32)
    x = torch.randn(4, 32)
    x[:, 5] = 0  # feature 5 never activated: a dead column
    h = Hessian(32)
    h.add(x)  # rank 4 of 32
    r = obs_sweep(w, h.matrix, quantizer=QuantSpec(bits=4, granularity=PerChannel(0)), damp=0.0)
    assert r.damp > 0 and bool(torch.isfinite(r.values).all())
    assert bool((r.values[:, 5] == 0).all())
    with pytest.raises(ValueError, match="not positive definite"):
        inverse_hessian_factor(torch.full((4, 4), float("nan"), dtype=torch.float64), 0.01)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("shape", [(48, 128), (7, 300)])
def test_sparsegpt_prunes_exactly_the_requested_fraction(sparsity, shape):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(*shape, generator=g)
    x = torch.randn(600, shape[1], generator=g)
    h = Hessian(shape[1])
    h.add(x)
    r = obs_sweep(w, h.matrix, pruning=Pruning(sparsity))
    assert r.keep is not None
    assert int((~r.keep).sum()) == round(sparsity * w.numel())
    assert bool((r.values[~r.keep] == 0).all())


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (0, 4), (4, 4)])
def test_sparsegpt_keeps_exactly_n_of_every_m(n, m):
    w, _, h = _problem(3)
    r = obs_sweep(w, h, pruning=Pruning(n=n, m=m))
    assert r.keep is not None
    assert bool((r.keep.reshape(w.shape[0], -1, m).sum(-1) == n).all())
    assert bool((r.values[~r.keep] == 0).all())


def test_sparsegpt_reconstruction_beats_magnitude_pruning_on_the_layer_output():
    w, x, h = _problem(5)
    r = obs_sweep(w, h, pruning=Pruning(0.5))
    mag = w * (w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values)
    assert float(((x @ (r.values - w).T) ** 2).sum()) < float(((x @ (mag - w).T) ** 2).sum())


def test_joint_sparsegpt_and_gptq_gives_pruned_zeros_and_grid_values():
    w, _, h = _problem(6)
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))
    r = obs_sweep(w, h, quantizer=spec, pruning=Pruning(n=2, m=4))
    assert r.qparams is not None and r.keep is not None
    v = r.values.numpy()
    assert np.array_equal(dequantize(quantize(v, r.qparams), r.qparams), v)
    assert bool((r.values[~r.keep] == 0).all())


def test_obs_sweep_refuses_what_it_cannot_do():
    w, _, h = _problem(0, cols=128)
    with pytest.raises(ValueError, match="give quantizer"):
        obs_sweep(w, h)
    with pytest.raises(ValueError, match="per-channel or per-group"):
        obs_sweep(w, h, quantizer=QuantSpec(bits=4))
    with pytest.raises(ValueError, match="does not divide"):
        obs_sweep(w, h, quantizer=QuantSpec(bits=4, granularity=PerGroup(48)))
    with pytest.raises(ValueError, match="act-order"):
        obs_sweep(w, h, pruning=Pruning(n=2, m=4), act_order=True)
    with pytest.raises(ValueError, match="multiple of 3"):
        obs_sweep(w, h, pruning=Pruning(n=1, m=3))
    with pytest.raises(ValueError, match="damp"):
        GPTQ(damp=-1)


# ------------------------------------------------------------------ sequential calibration
def _captured(model, batches, blocks: bool, monkeypatch) -> dict[str, LayerInputs]:
    import quant.sequential as seq

    if not blocks:
        monkeypatch.setattr(seq, "repeated_blocks", lambda *a: None)
    got: dict[str, LayerInputs] = {}
    calibrate_in_order(model, linear_layers(model), batches, lambda g, inp: got.__setitem__(g[0], inp))
    monkeypatch.undo()
    return got


def test_the_block_cache_gives_the_inputs_a_full_forward_gives(tiny_bert, token_batches, monkeypatch):
    a = _captured(tiny_bert, token_batches, True, monkeypatch)
    b = _captured(tiny_bert, token_batches, False, monkeypatch)
    assert list(a) == list(b) and len(a) == 2 * 4 + 1  # QKV, attention out, FFN in, FFN out per layer; pooler
    for n in a:
        assert a[n].n == b[n].n
        assert torch.allclose(a[n].hessian.sum, b[n].hessian.sum, rtol=1e-6, atol=1e-6)


def test_padding_tokens_are_left_out_of_the_statistics(tiny_bert, token_batches, monkeypatch):
    got = _captured(tiny_bert, token_batches, True, monkeypatch)
    tokens = sum(int(b["attention_mask"].sum()) for b in token_batches)
    assert all(inp.n == tokens for n, inp in got.items() if n.startswith("encoder."))
    assert got["pooler.dense"].n == sum(len(b["input_ids"]) for b in token_batches)  # one [CLS] row per sample


def test_each_group_sees_the_outputs_of_the_groups_solved_before_it(tiny_bert, token_batches):
    layers = linear_layers(tiny_bert)
    seen: list[float] = []

    def solve(group, inputs):
        seen.append(float(inputs.abs_sum.sum()))
        for n in group:  # zero every solved layer: later groups' inputs must change
            dict(layers)[n].weight.zero_()
    calibrate_in_order(tiny_bert, layers, token_batches, solve)
    # attention output dense reads the attention context: with Q, K, V zeroed, V's output is its bias only
    assert len(seen) == 9 and seen[1] != seen[0]


# ------------------------------------------------------------------ AWQ
def test_awq_with_alpha_zero_only_is_round_to_nearest():
    w, x, h = _problem(0)
    s, alpha = search_scale([w], h, x.abs().mean(0), SPECS[0], grid=1)
    assert alpha == 0 and torch.equal(s, torch.ones_like(s))


def test_awq_search_never_loses_to_round_to_nearest_on_its_data():
    w, x, h = _problem(4)
    spec = SPECS[0]
    s, _ = search_scale([w], h, x.abs().mean(0), spec)
    from quant import fake_quantize

    def err(v):
        return float(((x @ (v - w).T) ** 2).sum())
    rtn = torch.as_tensor(fake_quantize(w, calibrate(w, spec)))
    awq = torch.as_tensor(fake_quantize(w * s, calibrate(w * s, spec))) / s
    assert err(awq) <= err(rtn) * (1 + 1e-5)


def test_a_fold_is_kept_only_where_the_float_model_does_not_change(tiny_bert, token_batches):
    layers = linear_layers(tiny_bert)
    made = producers(tiny_bert, layers, token_batches[0])
    q = "encoder.layer.1.attention.self.query"
    out = "encoder.layer.1.attention.output.dense"
    assert made[q] == "encoder.layer.0.output.LayerNorm"
    assert made[out] == "encoder.layer.1.attention.self"
    s = torch.rand(64) + 0.5
    mods = dict(tiny_bert.named_modules())
    group = [mods[q], mods[q.replace("query", "key")], mods[q.replace("query", "value")]]
    before = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    # post-LayerNorm BERT: the LayerNorm also feeds the residual, so the fold must be refused and undone
    assert not try_fold(tiny_bert, mods[made[q]], group, s, token_batches[0])
    assert all(torch.equal(before[k], v) for k, v in tiny_bert.state_dict().items())
    # the attention output reads a context linear in the value projection's rows: the fold holds
    value = mods["encoder.layer.1.attention.self.value"]
    assert try_fold(tiny_bert, value, [mods[out]], s, token_batches[0])
    assert torch.allclose(value.weight, before["encoder.layer.1.attention.self.value.weight"] / s[:, None])


def test_ptq_with_gptq_beats_round_to_nearest_on_the_model_output(tiny_bert, token_batches):
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))
    _, rtn = ptq(tiny_bert, PTQConfig(weights=spec), token_batches, eval_data=token_batches)
    q, rep = ptq(tiny_bert, PTQConfig(weights=spec, gptq=GPTQ()), token_batches, eval_data=token_batches)
    assert rep.meta["output_sqnr_db"] > rtn.meta["output_sqnr_db"]
    assert len(rep.tensors) == len(linear_layers(tiny_bert))


def test_ptq_with_awq_keeps_folded_and_runtime_scales_consistent(tiny_bert, token_batches):
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))
    for awq in (AWQ(), AWQ(runtime_scales=True)):
        q, rep = ptq(tiny_bert, PTQConfig(weights=spec, awq=awq), token_batches, eval_data=token_batches)
        where = {r.name: r.details["awq"] for r in rep.tensors}
        assert all(w.endswith("self.value") for n, w in where.items() if n.endswith("attention.output.dense")
                   and not w.startswith("none"))
        if awq.runtime_scales:
            assert any(w == "runtime" for w in where.values())
        else:
            assert not any(w == "runtime" for w in where.values())
        assert rep.meta["output_sqnr_db"] > 10


def test_ptq_refuses_gptq_with_smoothquant_and_without_calibration(tiny_bert):
    with pytest.raises(ValueError, match="smoothquant"):
        PTQConfig(activations=QuantSpec(), smoothquant=0.5, gptq=GPTQ())
    with pytest.raises(ValueError, match="calibration_data"):
        ptq(tiny_bert, PTQConfig(gptq=GPTQ()))
    with pytest.raises(TypeError):
        PTQConfig(gptq="yes")  # type: ignore[arg-type]


def test_a_linear_the_data_never_reaches_is_an_error(token_batches):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)
    with pytest.raises(ValueError, match="never reaches unused"):
        ptq(Two(), PTQConfig(gptq=GPTQ(), weights=QuantSpec(granularity=PerChannel(0))), [torch.randn(3, 4)])


def test_the_solvers_refuse_a_model_off_the_cpu(tiny_bert, token_batches):
    with pytest.raises(ValueError, match="CPU model"):
        ptq(tiny_bert.to("meta"), PTQConfig(weights=QuantSpec(bits=4, granularity=PerGroup(32)), gptq=GPTQ()),
            token_batches)
