"""Decoder LLMs as transformers saves them (``use_cache: true``): every calibrated method through the CLI
on random-init Llama, Mistral, Qwen2, Gemma, Phi-3 and GPT-2 (Conv1D) configurations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.quantize import main as cli
from lowbit.checkpoint import load

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "gemma": lambda: transformers.GemmaConfig(**SMALL, head_dim=16),
    "phi3": lambda: transformers.Phi3Config(**SMALL, pad_token_id=0),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=30522, n_embd=64, n_layer=2, n_head=4, n_positions=128),
}


def causal_lm_dir(root: Path, arch: str) -> Path:
    """A random-init causal LM saved by transformers (``use_cache: true`` in config.json), with MiniLM's tokenizer."""
    from bench.models import minilm_dir

    torch.manual_seed(0)
    cfg = CONFIGS[arch]()
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    d = root / arch
    model.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_dir() / f, d / f)
    assert json.loads((d / "config.json").read_text()).get("use_cache", True) is True
    return d


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    # lines of different lengths: batches are padded, so the blocks run with a padding mask (a replay that
    # appended to a KV cache would then fail on the mask's shape, not only compute the wrong statistics)
    p.write_text("\n".join(f"line {i}: the harbour lights" + " were reflected in the water" * (i % 4) + "."
                           for i in range(24)), encoding="utf-8")
    return p


METHODS = {
    "gptq": ["--method", "int4", "--granularity", "group", "--group-size", "32", "--gptq"],
    "awq": ["--method", "int4", "--granularity", "group", "--group-size", "32", "--awq"],
    "wanda": ["--method", "prune", "--prune", "wanda"],
    "sparsegpt": ["--method", "prune,int4", "--prune", "sparsegpt:2:4", "--granularity", "group", "--group-size",
                  "32", "--gptq"],
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_calibrated_methods_run_on_causal_lms_saved_with_use_cache(arch, method, tmp_path, calib):
    d = causal_lm_dir(tmp_path, arch)
    out = tmp_path / "q.safetensors"
    if arch == "gpt2" and method == "sparsegpt":  # N:M along the input axis of an (in, out) Conv1D: refused
        assert cli([str(d), *METHODS[method], "--calibration-data", str(calib), "--out", str(out), "--quiet"]) == 1
        assert not out.exists()
        return
    assert cli([str(d), *METHODS[method], "--calibration-data", str(calib), "--calibration-samples", "8",
                "--out", str(out), "--quiet", "--rows", "0"]) == 0
    back = load(out, as_numpy=True)
    # every decoder here has o_proj (Phi-3 fuses q, k, v); GPT-2's Conv1D c_proj is stored (in, out)
    w = back["transformer.h.0.attn.c_proj.weight" if arch == "gpt2" else "model.layers.0.self_attn.o_proj.weight"]
    assert w.shape == (64, 64) and np.isfinite(w).all()
    if arch == "gpt2":  # the MLP's Conv1D (64 in, 256 out): solved on its transpose, stored as it was
        assert back["transformer.h.0.mlp.c_fc.weight"].shape == (64, 256)
        assert back["transformer.h.0.mlp.c_fc.weight"].tolist() != load(d / "model.safetensors", as_numpy=True)[
            "transformer.h.0.mlp.c_fc.weight"].tolist()
    if method in ("wanda", "sparsegpt"):
        assert float((w == 0).mean()) >= 0.5


def test_calibration_documents_are_packed_into_sequences_and_the_tokens_counted(tmp_path):
    import json

    from lowbit.checkpoint.calibrated import calibration_tokens, packed_batches
    from transformers import AutoTokenizer

    d = causal_lm_dir(tmp_path, "llama")
    doc = tmp_path / "doc.txt"
    doc.write_text(("A long document about harbours, ships and the weather of the northern sea. " * 40 + "\n\n") * 3,
                   encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(str(d))
    batches = packed_batches(tok, doc.read_text(), 64, 5, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 64), (2, 64), (1, 64)]
    assert calibration_tokens(batches) == 5 * 64
    rep = tmp_path / "r.json"
    assert cli([str(d), "--method", "int4", "--granularity", "group", "--group-size", "32", "--gptq",
                "--calibration-data", str(doc), "--calibration-seqlen", "64", "--calibration-samples", "5",
                "--report", str(rep), "--quiet", "--rows", "0"]) == 0
    assert json.loads(rep.read_text())["meta"]["calibration_tokens"] == 5 * 64
    with pytest.raises(ValueError, match="at least 2"):
        packed_batches(tok, "x", 1, 3)
    assert cli([str(d), "--method", "int8", "--gptq", "--calibration-data", str(doc), "--calibration-seqlen", "1"]) == 2


def test_eval_of_awq_includes_the_norms_its_scales_were_folded_into(tmp_path, calib):
    """AWQ folds input scales into RMSNorm weights that are kept, not compressed: --eval must run the model
    with them, or the scaled Linear weights meet unscaled inputs (a perplexity in the hundred thousands)."""
    import json

    d = causal_lm_dir(tmp_path, "llama")
    text = tmp_path / "held.txt"
    text.write_text("the harbour lights were reflected in the water of the bay. " * 40, encoding="utf-8")
    kl = {}
    for name, extra in (("rtn", []), ("awq", ["--awq"])):
        rep = tmp_path / f"{name}.json"
        cal = ["--calibration-data", str(calib)] if extra else []
        assert cli([str(d), "--method", "int4", "--granularity", "group", "--group-size", "32", "--affine", *extra,
                    *cal, "--eval", "--eval-data", str(text), "--report", str(rep),
                    "--quiet", "--rows", "0"]) == 0
        report = json.loads(rep.read_text())
        kl[name] = report["meta"]["eval_kl_divergence"]
        if name == "awq":
            rewritten = [k for k in report["kept"] if "rewritten" in k["reason"]]
            assert rewritten  # some norm took a scale
    assert kl["awq"] < 2 * kl["rtn"] + 0.01


def test_collect_holds_the_kept_tensors_a_solution_rewrote(tmp_path, calib):
    from lowbit.checkpoint import Chain, compress_checkpoint
    from lowbit.checkpoint.calibrated import Calibrated, load_model, solve, text_batches
    from quant import AWQ, PerGroup, QuantSpec
    from quant.storage import IntQuant

    d = causal_lm_dir(tmp_path, "llama")
    chain = Chain(None, IntQuant(QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))))
    model, tok = load_model(d)
    sols = solve(model, chain, Calibrated(awq=AWQ()), text_batches(tok, calib.read_text().splitlines()[:8]),
                 blocks_only=True)
    norms = [n for n in sols if "norm" in n]
    assert norms  # AWQ folded scales into RMSNorm weights, which are 1-D and kept
    approx: dict = {}
    compress_checkpoint(d, None, chain, solutions=sols, collect=approx, progress=False)
    for n in norms:
        assert np.array_equal(approx[n], sols[n].values.astype(approx[n].dtype)), n
