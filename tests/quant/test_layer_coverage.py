"""Every layer found, nothing skipped silently: Linear subclasses, transformers Conv1D, Conv1d/Conv2d;
calibration batches as tensors, tuples, dicts and tokenizer output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quant import PerChannel, PTQConfig, QuantizedLinear, QuantSpec, prepare_qat, ptq
from quant.hooks import find_layers
from quant.qat import QATConv1d, QATLinear, QuantizedConv


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=100)).eval()


def test_ptq_quantizes_every_gpt2_projection_with_per_output_channel_scales():
    model = _gpt2()
    ids = torch.randint(0, 100, (2, 16))
    q, rep = ptq(model, PTQConfig(), [ids], eval_data=[ids])
    names = {r.name for r in rep.tensors}
    assert len(names) == 2 * 4 + 1  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block, and lm_head
    assert all(isinstance(q.get_submodule(n), QuantizedLinear) for n in names)
    row = next(r for r in rep.tensors if r.name.endswith("h.0.attn.c_attn"))
    assert row.shape == (3 * 64, 64)  # (out, in): Conv1D's (in, out) weight as the Linear it computes
    assert rep.meta["output_sqnr_db"] > 25 and rep.meta["skipped"] == {}


def test_prepare_qat_takes_linear_subclasses_conv1d_and_transformers_conv1d():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(8, 8), nn.Conv1d(1, 2, 3))
    qat = prepare_qat(model, weights=QuantSpec(granularity=PerChannel(0)))
    assert isinstance(qat[0], QATLinear) and isinstance(qat[1], QATConv1d)
    gpt = prepare_qat(_gpt2())
    assert isinstance(gpt.transformer.h[0].attn.c_attn, QATLinear)
    ids = torch.randint(0, 100, (2, 16))
    ref = _gpt2()(ids).logits
    torch.testing.assert_close(gpt(ids).logits, ref, rtol=0.1, atol=0.1)


def test_skipped_layers_are_listed_with_the_reason():
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    layers, skipped = find_layers(model, exclude=r"^2$")
    assert [n for n, _ in layers] == ["0"]
    assert "MultiheadAttention" in skipped["1.out_proj"] and "include/exclude" in skipped["2"]
    with pytest.warns(UserWarning, match="left 2 layer"):
        qat = prepare_qat(model, exclude=r"^2$")
    assert set(qat.qat_skipped) == {"1.out_proj", "2"}


def test_ptq_quantizes_convolutions_weight_only_and_says_why_it_skips_them_otherwise():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))
    x = torch.randn(4, 1, 8, 8)
    q, rep = ptq(net, PTQConfig(), [x], eval_data=[x])
    assert isinstance(q[0], QuantizedConv) and rep.meta["output_sqnr_db"] > 30
    _, rep2 = ptq(net, PTQConfig(activations=QuantSpec()), [x])
    assert "convolutions" in rep2.meta["skipped"]["0"]


def test_ptq_takes_tokenizer_output_as_calibration_batches(minilm_model):
    tok = minilm_model.tokenizer
    bert = minilm_model[0].auto_model
    enc = tok(["a sentence to calibrate on", "and another, somewhat longer one"], padding=True, return_tensors="pt")
    plain = {k: v for k, v in enc.items()}
    for batches in ([enc], [plain], iter([enc, plain])):
        q, rep = ptq(bert, PTQConfig(activations=QuantSpec()), batches, eval_data=[enc])
        assert rep.meta["output_mean_cosine"] > 0.9  # static per-tensor int8 activations: coarse but working


def test_int4_layers_hold_two_codes_per_byte_and_report_those_bytes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(16, 64)
    q4, rep4 = ptq(model, PTQConfig(weights=QuantSpec(bits=4, granularity=PerChannel(0))), eval_data=[x])
    q8, rep8 = ptq(model, PTQConfig(), eval_data=[x])
    assert q4[0].weight_codes.dtype == torch.uint8 and q4[0].weight_codes.numel() == 64 * 32 // 2
    assert q4[0].codes().shape == (32, 64) and int(q4[0].codes().abs().max()) <= 8
    assert rep4.totals["bytes_after"] < rep8.totals["bytes_after"]
    from quant import dequantize
    torch.testing.assert_close(q4[0].dequantized_weight(), torch.as_tensor(dequantize(q4[0].codes().numpy(),
                                                                                     q4[0].qparams)))


def test_save_pretrained_of_a_quantized_transformers_model_refuses_with_the_way_to_save(tmp_path):
    q, _ = ptq(_gpt2(), PTQConfig())
    with pytest.raises(NotImplementedError, match="from_pretrained does not read"):
        q.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())
    _gpt2().save_pretrained(tmp_path / "float")  # the float model is untouched
