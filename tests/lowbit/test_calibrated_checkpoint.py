"""Calibrated checkpoint jobs: GPTQ, AWQ, SparseGPT and Wanda solutions stored in the chain's form."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.quantize import main as cli
from compress.storage import MagnitudePrune, NMPrune
from lowbit.checkpoint import Chain, CheckpointError, compress_checkpoint, load
from lowbit.checkpoint.calibrated import Calibrated, solve, text_batches
from precision.methods import Solution
from precision.blocks import BlockCast
from quant import AWQ, GPTQ, PerChannel, PerGroup, QParams, QuantSpec, dequantize, quantize
from quant.storage import IntQuant

W4 = IntQuant(QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32)), "mse")
W8 = IntQuant(QuantSpec(granularity=PerChannel(0)))


@pytest.fixture
def model_dir(tmp_path, tiny_bert) -> Path:
    """A transformers model directory: the tiny BERT's weights and config, MiniLM's tokenizer."""
    from bench.models import minilm_dir

    d = tmp_path / "tiny"
    tiny_bert.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_dir() / f, d / f)
    return d


def _write_and_load(model_dir: Path, tmp_path: Path, chain: Chain, solutions):
    out = tmp_path / "out.safetensors"
    rep = compress_checkpoint(model_dir / "model.safetensors", out, chain, solutions=solutions, progress=False,
                              include=r"^(encoder|pooler)\.")  # the embeddings stay float: only solved layers
    return rep, load(out, as_numpy=True)


CASES = {
    "gptq int4": (Chain(None, W4), Calibrated(gptq=GPTQ())),
    "awq + gptq int4": (Chain(None, W4), Calibrated(gptq=GPTQ(), awq=AWQ())),
    "awq int8": (Chain(None, W8), Calibrated(awq=AWQ())),
    "sparsegpt 2:4 + int8": (Chain(NMPrune(2, 4), W8), Calibrated(pruning="sparsegpt")),
    "sparsegpt 50% + gptq int4": (Chain(MagnitudePrune(0.5), W4), Calibrated(pruning="sparsegpt", gptq=GPTQ())),
    "wanda 50%": (Chain(MagnitudePrune(0.5), None), Calibrated(pruning="wanda")),
    "wanda 2:4": (Chain(NMPrune(2, 4), None), Calibrated(pruning="wanda")),
    "gptq fp8 per channel": (Chain.of("fp8_e4m3fn"), Calibrated(gptq=GPTQ())),
    "gptq mxfp4": (Chain.of("mxfp4"), Calibrated(gptq=GPTQ())),
    "gptq nvfp4 + awq": (Chain.of("nvfp4"), Calibrated(gptq=GPTQ(), awq=AWQ())),
    "sparsegpt 2:4 + gptq mxfp8": (Chain(NMPrune(2, 4), BlockCast("mxfp8_e4m3")), Calibrated(pruning="sparsegpt",
                                                                                         gptq=GPTQ(act_order=False))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_stored_solution_reads_back_bit_for_bit(case, tiny_bert, token_batches, model_dir, tmp_path):
    chain, calibrated = CASES[case]
    solutions = solve(tiny_bert, chain, calibrated, token_batches)
    rep, back = _write_and_load(model_dir, tmp_path, chain, solutions)
    weights = [k for k in solutions if k.endswith(".weight") and solutions[k].values.ndim == 2]
    assert len(weights) == 13  # 6 per layer + the pooler
    for k, sol in solutions.items():
        assert np.array_equal(back[k], sol.values), k
        if isinstance(sol.qparams, QParams):  # the stored codes are the solver's: its values sit on its grid
            assert np.array_equal(dequantize(quantize(sol.values, sol.qparams), sol.qparams), sol.values)
        if sol.keep is not None:
            assert bool((back[k][~sol.keep] == 0).all())
    rewritten = [k.name for k in rep.kept if "rewritten" in k.reason]
    assert set(rewritten) == {k for k, s in solutions.items() if s.values.ndim == 1} | \
        {k for k, s in solutions.items() if k.endswith(".bias")}
    if calibrated.awq is not None and isinstance(chain.values, IntQuant):
        # integer rows take any scale; a float or block grid's rows do not, so there AWQ leaves them
        assert rewritten, "an AWQ scale folds into the value projections (their biases change)"


def test_solutions_make_the_model_compute_what_the_solver_computed(tiny_bert, token_batches, model_dir, tmp_path):
    chain, calibrated = CASES["awq + gptq int4"]
    solutions = solve(tiny_bert, chain, calibrated, token_batches)
    _, back = _write_and_load(model_dir, tmp_path, chain, solutions)
    solved = type(tiny_bert)(tiny_bert.config).eval()
    solved.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=False)
    expect = type(tiny_bert)(tiny_bert.config).eval()
    state = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    state.update({k: torch.from_numpy(s.values) for k, s in solutions.items()})
    expect.load_state_dict(state)
    b = token_batches[0]
    assert torch.equal(solved(**b).last_hidden_state, expect(**b).last_hidden_state)


def test_the_report_measures_a_solution_against_its_reference(tiny_bert, token_batches, model_dir, tmp_path):
    chain, calibrated = CASES["gptq int4"]
    solutions = solve(tiny_bert, chain, calibrated, token_batches)
    rep, _ = _write_and_load(model_dir, tmp_path, chain, solutions)
    row = next(r for r in rep.tensors if r.name == "encoder.layer.0.attention.self.query.weight")
    w = tiny_bert.state_dict()["encoder.layer.0.attention.self.query.weight"].numpy()
    v = solutions["encoder.layer.0.attention.self.query.weight"].values
    assert row.mse == pytest.approx(float(np.mean((v.astype(np.float64) - w) ** 2)), rel=1e-9)


def test_a_solution_that_matches_no_tensor_is_an_error(model_dir, tmp_path):
    sol = {"nowhere.weight": Solution(np.zeros((2, 2), np.float32))}
    with pytest.raises(CheckpointError, match="matches 0 tensors"):
        compress_checkpoint(model_dir / "model.safetensors", None, "int8", solutions=sol, progress=False)
    sol = {"encoder.layer.0.attention.self.query.weight": Solution(np.zeros((2, 2), np.float32))}
    with pytest.raises(CheckpointError, match="shape"):
        compress_checkpoint(model_dir / "model.safetensors", None, "int8", solutions=sol, progress=False)


def test_a_chain_that_cannot_store_the_solver_is_refused(tiny_bert, token_batches):
    with pytest.raises(ValueError, match="ggml"):
        solve(tiny_bert, "q8_0", Calibrated(gptq=GPTQ()), token_batches)
    with pytest.raises(ValueError, match="value step"):
        solve(tiny_bert, "prune", Calibrated(gptq=GPTQ(), pruning="sparsegpt"), token_batches)
    with pytest.raises(ValueError, match="prune step"):
        solve(tiny_bert, "svd,int8", Calibrated(pruning="sparsegpt"), token_batches)
    with pytest.raises(ValueError, match="runtime"):
        Calibrated(awq=AWQ(runtime_scales=True))
    with pytest.raises(ValueError, match="refill"):
        Calibrated(pruning="wanda", gptq=GPTQ())
    with pytest.raises(ValueError, match="act-order"):
        solve(tiny_bert, Chain(NMPrune(2, 4), W4), Calibrated(pruning="sparsegpt", gptq=GPTQ()), token_batches)


def test_the_cli_solves_a_model_directory_from_a_text_file(model_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"sentence number {i} about the weather and the sea." for i in range(20)),
                    encoding="utf-8")
    out = tmp_path / "q.safetensors"
    assert cli([str(model_dir), "--method", "int4", "--granularity", "group", "--group-size", "32", "--affine",
                "--gptq", "--calibration-data", str(text), "--calibration-samples", "12", "--out", str(out),
                "--quiet", "--rows", "0"]) == 0
    back = load(out, as_numpy=True)
    from lowbit.checkpoint.calibrated import load_model
    model, tok = load_model(model_dir)
    sols = solve(model, Chain(None, IntQuant(QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32)))),
                 Calibrated(gptq=GPTQ()), text_batches(tok, text.read_text().splitlines()[:12]))
    for k, s in sols.items():
        assert np.array_equal(back[k], s.values), k


def test_the_cli_asks_for_calibration_text_and_a_model(model_dir, tmp_path, capsys):
    assert cli([str(model_dir), "--method", "int8", "--gptq"]) == 2
    assert "--calibration-data" in capsys.readouterr().err
    assert cli([str(model_dir / "model.safetensors"), "--method", "int8", "--calibration-data", "x.txt"]) == 2
    assert cli([str(model_dir), "--method", "int8", "--gptq", "--executor", "ray"]) == 2



@pytest.mark.parametrize("solver", ["--gptq", "--awq"])
def test_bf16_checkpoint_to_compressed_tensors_solves_with_the_stored_bf16_scales(solver, model_dir, tmp_path):
    """The default --scale-dtype auto stores bfloat16 scales for a bfloat16 checkpoint: the solver rounds to
    those scales, and the stored layer is exactly its codes times its bfloat16 scales."""
    from safetensors import safe_open
    from transformers import AutoModel

    src = tmp_path / "bf16"
    AutoModel.from_pretrained(str(model_dir)).to(torch.bfloat16).save_pretrained(str(src))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(model_dir / f, src / f)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"sentence number {i} about the weather and the sea." for i in range(20)),
                    encoding="utf-8")
    out = tmp_path / "ct"
    assert cli([str(src), "--method", "int8", solver, "--calibration-data", str(text), "--format",
                "compressed-tensors", "--out", str(out), "--quiet", "--rows", "0"]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        scale = f.get_tensor("encoder.layer.0.attention.self.query.weight_scale")
    assert scale.dtype == torch.bfloat16 and bool((scale > 0).all())


def test_include_and_exclude_mean_the_checkpoints_tensor_names_with_calibrated_methods(tmp_path):
    """The bundled MiniLM is a sentence-transformers model whose modules are named ``0.auto_model.encoder...``;
    its checkpoint's tensors ``encoder...``: the patterns select the same tensors with and without --gptq."""
    out = tmp_path / "q.safetensors"
    inc = r"^encoder\.layer\.0\.attention\.self\.(query|key)\.weight$"
    assert cli(["--method", "int8", "--gptq", "--calibration-samples", "8", "--include", inc,
                "--exclude", "key", "--out", str(out), "--quiet", "--rows", "0"]) == 0
    from lowbit.checkpoint import Checkpoint

    stored = {n.split("::")[0] for n in Checkpoint(out).names() if "::" in n}
    assert stored == {"encoder.layer.0.attention.self.query.weight"}


def test_the_reports_wall_time_is_the_whole_run_and_its_phases_add_up(model_dir, tmp_path):
    import json
    import time

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"sentence number {i} about the weather and the sea." for i in range(20)),
                    encoding="utf-8")
    t0 = time.perf_counter()
    assert cli([str(model_dir), "--method", "int8", "--gptq", "--calibration-data", str(text), "--report",
                str(tmp_path / "r.json"), "--quiet", "--rows", "0"]) == 0
    elapsed = time.perf_counter() - t0
    meta = json.loads((tmp_path / "r.json").read_text())["meta"]
    phases = [k for k in meta if k.startswith("time_") and k.endswith("_s")]
    assert {"time_load_model_s", "time_solve_s", "time_compress_s", "time_write_s"} <= set(phases)
    assert meta["time_solve_s"] > 0 and meta["wall_time_s"] <= elapsed
    assert sum(meta[k] for k in phases) == pytest.approx(meta["wall_time_s"], rel=1e-6)
    assert meta["wall_time_s"] > 0.8 * elapsed  # everything but argument parsing and the report's own writing
