"""What the README says of a peer's behaviour, checked against the installed peer.

A claim that fails on the version ``constraints.txt`` pins is a wrong README: the test fails. A claim that
fails on another version (the newest-versions run, see the README's "Against the newest releases") is a
peer that changed: the test skips and says which claim to re-check, so drift is seen without turning the
pinned run red.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from precision import encode, get_format, round_to

from .precision.test_formats import ML

ROOT = Path(__file__).resolve().parents[1]


def pinned(dist: str) -> str | None:
    """The version ``constraints.txt`` pins for ``dist`` (None: not pinned)."""
    key = re.sub(r"[-_.]+", "-", dist).lower()
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and re.sub(r"[-_.]+", "-", name.strip()).lower() == key:
            return version.strip()
    return None


def claim(holds: bool, dist: str, text: str) -> None:
    """Pass where the README's ``text`` holds of ``dist``; fail on the pinned version, skip on another."""
    if holds:
        return
    installed = importlib.metadata.version(dist).split("+")[0]
    pin = pinned(dist)
    if pin is None or installed == pin.split("+")[0]:
        pytest.fail(f"README claim false for {dist} {installed} (the pinned version): {text}")
    pytest.skip(f"README claim no longer holds for {dist} {installed} (pinned {pin}): re-check {text!r}")


def test_constraints_pin_every_peer_the_claims_name():
    for dist in ("torch", "ml_dtypes", "numpy", "torchao", "compressed-tensors", "gguf", "onnxruntime", "transformers"):
        assert pinned(dist) is not None, dist


def test_e4m3fn_overflow_ml_dtypes_gives_nan_torch_saturates():
    x = np.array([1000.0, np.inf], np.float32)
    with np.errstate(all="ignore"):
        ml = x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    claim(np.array_equal(ml, encode(x, "fp8_e4m3fn")) and np.isnan(x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)).all(),
          "ml_dtypes", "ieee mode: 1000 -> NaN (as ml_dtypes)")
    th = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    claim(np.array_equal(th, encode(x, "fp8_e4m3fn", overflow="saturate")), "torch",
          "1000 and inf -> 448 (as torch .to())")


def test_torch_rounds_float64_and_int64_through_float32():
    fp8 = torch.tensor(-431.99999959766865, dtype=torch.float64).to(torch.float8_e4m3fn).item()
    claim(fp8 == -448.0 and float(round_to(np.float64(-431.99999959766865), "fp8_e4m3fn")) == -416.0, "torch",
          "-416.0 (torch says -448)")
    bf = torch.tensor([16842753]).to(torch.bfloat16).item()
    claim(bf == 16777216 and round_to(np.array([16842753]), "bf16")[0] == 16908288, "torch",
          "[16908288.] (torch says 16777216)")


def test_torch_nan_patterns_differ_from_the_canonical_ones():
    e5m2 = torch.tensor([float("nan")]).to(torch.float8_e5m2).view(torch.uint8).item()
    bf16 = torch.tensor([float("nan")]).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF
    ours_e5m2 = int(encode(np.array([np.nan], np.float32), "fp8_e5m2")[0])
    ours_bf16 = int(encode(np.array([np.nan], np.float32), "bf16")[0])
    claim(e5m2 == 0x7F and bf16 == 0xFFFF and ours_e5m2 != e5m2 and ours_bf16 != bf16, "torch",
          "torch picks other NaN patterns: 0x7F for e5m2, 0xFFFF for bf16")


@pytest.mark.parametrize("name", ["fp8_e4m3fn", "fp8_e5m2", "bf16", "fp16"])
def test_both_references_round_nearest_even_on_float32(name):
    """'nearest_even (default, as ml_dtypes and torch)': on float32 input all three agree bit for bit."""
    fmt = get_format(name)
    x = np.random.default_rng(0).standard_normal(20_000).astype(np.float32) * min(float(fmt.max_finite), 1e30) / 8
    ours = encode(x, fmt)
    ml = x.astype(ML[name]).view(fmt.storage_dtype)
    th = torch.from_numpy(x).to(fmt.torch_dtype).view(getattr(torch, np.dtype(fmt.storage_dtype).name)).numpy()
    claim(np.array_equal(ours, ml), "ml_dtypes", "nearest_even (default, as ml_dtypes)")
    claim(np.array_equal(ours.view(th.dtype), th), "torch", "nearest_even (default, as torch)")


def test_the_conformance_summary_in_the_readme_holds():
    """README, "Testing your own kernels": ml_dtypes agrees everywhere; torch agrees from float32 (fp8 e4m3fn
    saturating, the others with IEEE overflow), rounds float64 through float32, and its quantize_per_tensor
    with a zero point disagrees at ties; lowbit agrees everywhere."""
    from bench.conformance import run

    rows = run(sample=500)
    ml = [r for r in rows if r["library"] == "ml_dtypes"]
    claim(all(r["disagree"] == 0 for r in ml), "ml_dtypes", "ml_dtypes agrees everywhere")
    th = [r for r in rows if r["library"] == "torch" and r["function"] == ".to()"]
    f32 = {(r["format"], r["mode"]): r["disagree"] for r in th if r["input"] == "float32"}
    claim(f32[("fp8_e4m3fn", "saturate")] == 0 and all(v == 0 for (f, m), v in f32.items() if f != "fp8_e4m3fn" and m == "ieee"),
          "torch", "torch agrees from float32 (fp8 e4m3fn saturates; the others follow IEEE overflow)")
    claim(all(r["disagree"] > 0 for r in th if r["input"] == "float64" and r["mode"] == "ieee" and r["format"] != "fp8_e4m3fn"),
          "torch", "torch rounds float64 through float32 first")
    qpt = [r for r in rows if r["function"] == "quantize_per_tensor"]
    claim(all((r["disagree"] > 0) == ("zp 0" not in r["format"]) for r in qpt), "torch",
          "quantize_per_tensor with a nonzero zero point rounds ties after adding the zero point")
    ao = [r for r in rows if r["library"] == "torchao"]
    if ao:
        claim(all(r["disagree"] == 0 for r in ao), "torchao", "torchao's to_mx agrees with reference_round_block")
    assert all(r["disagree"] == 0 for r in rows if r["library"] == "lowbit")
