"""python -m bench.quantize: every input kind, every method, chains, pass-through, round trip, errors."""

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import lowbit
from lowbit.checkpoint import Checkpoint
from bench.quantize import main

RNG = np.random.default_rng(0)


def tensors():
    return {
        "layer.0.weight": RNG.standard_normal((32, 64)).astype(np.float32),
        "layer.0.bias": RNG.standard_normal(32).astype(np.float32),
        "layer.1.weight": RNG.standard_normal((16, 32)).astype(np.float16),
        "emb.weight": RNG.standard_normal((10, 128)).astype(ml_dtypes.bfloat16),
        "position_ids": np.arange(12, dtype=np.int64).reshape(1, 12),
        "mask": np.array([[True, False], [False, True]]),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def write_single(d: Path) -> Path:
    p = d / "model.safetensors"
    t = {k: v for k, v in tensors().items() if v.dtype != ml_dtypes.bfloat16}
    # safetensors.numpy cannot write bf16: go through torch for that one
    from safetensors.torch import save_file as save_pt

    pt = {k: torch.from_numpy(v.copy()) for k, v in t.items()}
    pt["emb.weight"] = torch.from_numpy(tensors()["emb.weight"].view(np.int16).copy()).view(torch.bfloat16)
    save_pt(pt, str(p))
    return p


def write_sharded(d: Path) -> Path:
    t = {k: v for k, v in tensors().items() if v.dtype != ml_dtypes.bfloat16}
    names = list(t)
    a, b = names[: len(names) // 2], names[len(names) // 2:]
    save_file({k: t[k] for k in a}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: t[k] for k in b}, str(d / "model-00002-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in a} | {k: "model-00002-of-00002.safetensors" for k in b}
    p = d / "model.safetensors.index.json"
    p.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return p


def write_pickle(d: Path, suffix: str) -> Path:
    p = d / f"model{suffix}"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors().items() if v.dtype != ml_dtypes.bfloat16}, p)
    return p


@pytest.mark.parametrize("kind", ["single", "sharded", "dir", ".pt", ".bin"])
def test_every_input_kind_round_trips(tmp_path, kind):
    src = {"single": write_single, "sharded": write_sharded, "dir": lambda d: write_single(d).parent,
           ".pt": lambda d: write_pickle(d, ".pt"), ".bin": lambda d: write_pickle(d, ".bin")}[kind](tmp_path)
    out = tmp_path / "out" / "q.safetensors"
    out.parent.mkdir()
    rep = tmp_path / "r.json"
    assert main([str(src), "--method", "int8", "--out", str(out), "--report", str(rep), "--quiet"]) == 0
    report = json.loads(rep.read_text())
    compressed = {r["name"] for r in report["tensors"]}
    assert "layer.0.weight" in compressed and "layer.1.weight" in compressed
    kept = {k["name"]: k["reason"] for k in report["kept"]}
    assert kept["position_ids"] == "not floating point" and kept["layer.0.bias"] == "1-D"
    back = lowbit.load(out, as_numpy=True)
    orig = Checkpoint(src)
    for n in ("position_ids", "mask", "layer.0.bias", "scalar", "empty"):
        a, b = back[n], orig.read(n)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()  # bit-exact pass-through
    assert back["layer.1.weight"].dtype == np.float16
    assert report["totals"]["bytes_after"] < report["totals"]["bytes_before"] / 2.5  # fp16/bf16 sources halve


CHAINS = [
    ["--method", "fp16"], ["--method", "bf16"], ["--method", "fp8_e4m3fn", "--scaling", "tensor"],
    ["--method", "fp8_e5m2", "--overflow", "saturate"], ["--method", "int8", "--granularity", "tensor", "--affine"],
    ["--method", "int4", "--granularity", "group", "--group-size", "16", "--calibration", "mse"],
    ["--method", "int8", "--calibration", "percentile", "--percentile", "99"],
    ["--method", "prune", "--sparsity", "0.5"], ["--method", "prune", "--prune", "2:4"],
    ["--method", "prune", "--prune", "structured", "--sparsity", "0.25"],
    ["--method", "svd", "--rank-ratio", "0.3"], ["--method", "svd", "--energy", "0.9", "--force-svd"],
    ["--method", "prune,int8"], ["--method", "prune,fp8_e4m3fn", "--prune", "2:4"],
    ["--method", "prune,int4", "--prune", "structured"], ["--method", "svd,int8", "--rank-ratio", "0.3"],
    ["--method", "fp8_e4m3fn", "--rounding", "stochastic", "--seed", "1"],
]


@pytest.mark.parametrize("args", CHAINS, ids=lambda a: " ".join(a[1:]))
def test_every_method_and_chain_reproduces_the_measured_tensors(tmp_path, args):
    """load() returns exactly the tensors whose error the report measured."""
    src = write_single(tmp_path)
    out, rep = tmp_path / "q.safetensors", tmp_path / "r.json"
    assert main([str(src), *args, "--out", str(out), "--report", str(rep), "--quiet"]) == 0
    back = lowbit.load(out, as_numpy=True)
    from precision.metrics import error_metrics

    orig = Checkpoint(src)
    for row in json.loads(rep.read_text())["tensors"]:
        m = error_metrics(orig.read(row["name"]), back[row["name"]])
        assert m.mse == pytest.approx(row["mse"], rel=1e-12, abs=1e-30)
        assert m.max_abs_error == row["max_abs_error"]
        assert back[row["name"]].shape == orig.read(row["name"]).shape
    meta = Checkpoint(out).metadata
    assert "lowbit" in meta and json.loads(meta["lowbit"])["tensors"]


def test_chain_reports_combined_error_and_bytes(tmp_path):
    src = write_single(tmp_path)
    r_prune, r_chain = tmp_path / "a.json", tmp_path / "b.json"
    main([str(src), "--method", "prune", "--report", str(r_prune), "--quiet"])
    main([str(src), "--method", "prune,int8", "--report", str(r_chain), "--quiet"])
    a, b = json.loads(r_prune.read_text())["totals"], json.loads(r_chain.read_text())["totals"]
    assert b["bytes_after"] < a["bytes_after"] and b["mean_rel_error"] > a["mean_rel_error"]


@pytest.mark.parametrize("args, code, msg", [
    (["--method", "int9"], 2, "unknown method"),
    (["--method", "int8,prune"], 2, "before"),
    (["--method", "prune", "--sparsity", "1.5"], 2, "sparsity"),
    (["--method", "prune", "--prune", "5:4"], 2, "N:M"),
    (["--include", "("], 2, "regular expression"),
    (["--report", "r.txt"], 2, ".json or .md"),
    (["--bogus"], 2, "unrecognized"),
    (["--method", "int4", "--granularity", "group", "--group-size", "7"], 1, "does not divide"),
])
def test_usage_and_method_errors_have_exit_codes_and_one_line_messages(tmp_path, capsys, args, code, msg):
    src = write_single(tmp_path)
    with pytest.raises(SystemExit) if "--bogus" in args else _noop():
        rc = main([str(src), *args, "--quiet"])
        assert rc == code
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


class _noop:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_output_rules_existing_needs_force_and_never_over_the_input(tmp_path, capsys):
    src = write_single(tmp_path)
    out = tmp_path / "q.safetensors"
    assert main([str(src), "--out", str(out), "--quiet"]) == 0
    before = out.read_bytes()
    assert main([str(src), "--out", str(out), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main([str(src), "--out", str(out), "--force", "--method", "bf16", "--quiet"]) == 0
    orig = src.read_bytes()
    assert main([str(src), "--out", str(src), "--force", "--quiet"]) == 1
    assert "of the input checkpoint" in capsys.readouterr().err and src.read_bytes() == orig
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_missing_and_broken_checkpoints_name_the_file(tmp_path, capsys):
    assert main([str(tmp_path / "nope.safetensors"), "--quiet"]) == 1
    assert "nope.safetensors" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    good = write_single(tmp_path).read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    assert main([str(bad), "--quiet"]) == 1
    assert "bad.safetensors" in capsys.readouterr().err


def test_cli_help_documents_every_option_with_an_example():
    r = subprocess.run([sys.executable, "-m", "bench.quantize", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for opt in ("--method", "--out", "--force", "--report", "--eval", "--include", "--exclude", "--granularity",
                "--sparsity", "--rank-ratio", "Examples:"):
        assert opt in r.stdout


def test_default_run_quantizes_the_bundled_minilm(capsys):
    """python -m bench.quantize with no arguments: MiniLM int8 per-channel report."""
    assert main(["--quiet"]) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.0.attention.self.query.weight" in out and "74.7% saved" in out
    assert "embeddings.position_ids (not floating point)" in out


def test_acceptance_command_and_eval_on_minilm(tmp_path):
    from bench.models import minilm_checkpoint

    out, rep = tmp_path / "q.safetensors", tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "bench.quantize", str(minilm_checkpoint()), "--method", "int8",
                        "--out", str(out), "--report", str(rep), "--eval", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = json.loads(rep.read_text())["meta"]
    assert meta["eval_mean_cosine"] > 0.999
    d = lowbit.load(out)
    assert isinstance(d["encoder.layer.0.output.dense.weight"], torch.Tensor) and len(d) == 104


def test_workers_give_the_same_bytes_as_one_worker(tmp_path):
    src = write_single(tmp_path)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main([str(src), "--method", "prune,int8", "--out", str(a), "--quiet"]) == 0
    assert main([str(src), "--method", "prune,int8", "--out", str(b), "--quiet", "--workers", "3"]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert main([str(src), "--workers", "0", "--quiet"]) == 2


def test_a_run_that_loads_models_prints_lowbits_output_only(tmp_path):
    """--eval loads MiniLM through sentence-transformers (which imports torchao where it is installed): no
    import-time warnings, no progress bars of other packages on the terminal."""
    r = subprocess.run([sys.executable, "-m", "bench.quantize", "--eval", "--rows", "0", "--quiet"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr == "", r.stderr[-2000:]
    assert "eval_mean_cosine" in r.stdout


@pytest.mark.parametrize("extra,needle", [
    (["--method", "nvfp4"], "tensor 'a.weight': nvfp4 needs"),
    (["--method", "int4", "--granularity", "group", "--group-size", "4"], "tensor 'a.weight': PerGroup"),
    (["--out", "/proc/x.safetensors"], "/proc/x.safetensors: cannot create the output in /proc"),
])
def test_error_lines_name_the_file_and_tensor_once_and_say_what_to_do(tmp_path, capsys, extra, needle):
    src = tmp_path / "m.safetensors"
    save_file({"a.weight": np.ones((4, 6), np.float32)}, str(src))
    assert main([str(src), *extra, "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert err.count("a.weight") <= 1
