"""2-D weights stored (in, out), as GPT-2's Conv1D: per-channel scales follow the output axis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.quantize import main as cli
from lowbit.checkpoint import compress_checkpoint, load
from quant import PerChannel, PerGroup, QuantSpec, dequantize, quantize
from quant.storage import IntQuant


@pytest.fixture
def gpt2_dir(tmp_path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=128)).save_pretrained(d)
    return d


@pytest.mark.parametrize("method", ["int8", "fp8_e4m3fn", "int4-group"])
def test_gpt2_conv1d_weights_are_quantized_per_output_feature(gpt2_dir, method):
    from safetensors.numpy import load_file

    m = IntQuant(QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))) if method == "int4-group" else method
    rep = compress_checkpoint(gpt2_dir / "model.safetensors", None, m, progress=False)
    rows = {r.name: r for r in rep.tensors}
    assert rows["transformer.h.0.attn.c_attn.weight"].details["channel_axis"] == 1
    assert rows["transformer.wte.weight"].details["channel_axis"] == 0
    w = load_file(str(gpt2_dir / "model.safetensors"))["transformer.h.0.mlp.c_fc.weight"]  # (in, out)
    if method == "int8":  # the same as quantizing the (out, in) transpose per output channel
        from quant import calibrate
        spec = QuantSpec(granularity=PerChannel(0))
        qp = calibrate(w.T, spec)
        expect = dequantize(quantize(w.T, qp), qp).T
        out = compress_checkpoint(gpt2_dir / "model.safetensors", gpt2_dir / "q.safetensors", "int8", progress=False)
        assert out.tensors
        assert np.array_equal(load(gpt2_dir / "q.safetensors", as_numpy=True)["transformer.h.0.mlp.c_fc.weight"],
                              expect)


def test_channel_axis_rules_from_the_caller_come_first(gpt2_dir, capsys):
    rep = compress_checkpoint(gpt2_dir / "model.safetensors", None, "int8", progress=False,
                              channel_axis={r"c_attn": 0})
    rows = {r.name: r for r in rep.tensors}
    assert rows["transformer.h.0.attn.c_attn.weight"].details["channel_axis"] == 0
    assert rows["transformer.h.0.attn.c_proj.weight"].details["channel_axis"] == 1
    assert cli([str(gpt2_dir), "--channel-axis", "c_fc=2"]) == 2
    assert cli([str(gpt2_dir), "--channel-axis", "c_fc=0", "--rows", "0", "--quiet"]) == 0


def test_tied_tensors_are_stored_and_counted_once_and_come_back_tied(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, n_positions=32, vocab_size=128))
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    torch.save(sd, tmp_path / "model.bin")
    out = tmp_path / "q.safetensors"
    rep = compress_checkpoint(tmp_path / "model.bin", out, "int8", progress=False)
    assert rep.meta["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    names = [r.name for r in rep.tensors] + [k.name for k in rep.kept]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    back = load(out)
    assert back["lm_head.weight"] is back["transformer.wte.weight"]
    assert set(back) == set(sd)


def test_gpt2_to_compressed_tensors_is_refused_before_writing_with_the_formats_that_can(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "ct"
    assert cli([str(gpt2_dir), "--format", "compressed-tensors", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr()
    assert "Conv1D" in err.err and "lowbit, gguf or onnx-qdq" in err.err and len(err.err.strip().splitlines()) == 1
    assert "infx" not in err.out and not out.exists()


def test_a_job_that_compresses_nothing_is_refused_and_writes_nothing(gpt2_dir, tmp_path):
    from lowbit.checkpoint.pipeline import NothingToCompress

    out = tmp_path / "q.safetensors"
    with pytest.raises(NothingToCompress, match="no tensor is selected.*excluded"):
        compress_checkpoint(gpt2_dir / "model.safetensors", out, "int8", include="^nothing$", progress=False)
    assert not out.exists()
    assert cli([str(gpt2_dir), "--include", "^nothing$", "--out", str(out), "--quiet"]) == 2
    assert not out.exists()


def test_the_report_of_no_compressed_tensor_prints_no_ratio_and_no_metrics_claim():
    from precision.report import KeptTensor, Report

    text = Report([], [KeptTensor("w", (4,), "float32", 16, "1-D")], "t").to_table()
    assert "compressed tensors: 0" in text and "x smaller" not in text and "inf" not in text
    assert "--no-metrics" not in text
