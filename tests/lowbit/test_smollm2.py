"""SmolLM2-135M-Instruct, the bundled causal LM: its float directory, and the CLI on it end to end
(slow: conversion, calibration and evaluation of a 135M-parameter model; CI runs them)."""

from __future__ import annotations

import json

import pytest

from bench.models import ModelNotInstalled, smollm2_dir
from bench.quantize import main as cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    try:
        return smollm2_dir()
    except ModelNotInstalled as e:
        pytest.skip(str(e))


def test_the_float_directory_is_the_llama_causal_lm_the_gguf_holds(smol):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = json.loads((smol / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and cfg["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(str(smol), dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("args,limit", [
    (["--method", "int8"], 1.02),
    (["--method", "int4", "--granularity", "group", "--group-size", "64", "--gptq"], 1.6),
])
def test_the_cli_compresses_and_evaluates_smollm2_by_its_short_name(tmp_path, args, limit):
    rep = tmp_path / "r.json"
    assert cli(["smollm2", *args, "--eval", "--report", str(rep), "--quiet", "--rows", "0"]) == 0
    meta = json.loads(rep.read_text())["meta"]
    assert meta["eval_reference_perplexity"] < meta["eval_perplexity"] < limit * meta["eval_reference_perplexity"]
    assert 0 < meta["eval_kl_divergence"] and 0.5 < meta["eval_top1_agreement"] <= 1
    kept = {k["name"]: k["reason"] for k in json.loads(rep.read_text())["kept"]}
    assert "outside the repeated blocks" in kept["model.embed_tokens.weight"]  # the tied head/embedding is kept
