"""Float-cast codes are stored in safetensors' own dtypes where it has one; older files still read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lowbit.checkpoint import compress_checkpoint, load
from precision import round_to
from precision.cast import FloatCast


@pytest.fixture
def weights(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    p = tmp_path / "w.safetensors"
    save_file({"a.weight": rng.standard_normal((16, 32)).astype(np.float32)}, str(p))
    return p


@pytest.mark.parametrize("method,dtype", [("fp8_e4m3fn", "F8_E4M3"), ("fp8_e5m2", "F8_E5M2"), ("bf16", "BF16"),
                                          ("fp16", "F16"), ("fp6_e2m3fn", "U8")])
def test_codes_are_stored_in_the_dtype_safetensors_names_and_read_back(weights, tmp_path, method, dtype):
    out = tmp_path / "q.safetensors"
    compress_checkpoint(weights, out, method, progress=False)
    with safe_open(str(out), "pt") as f:
        assert f.get_slice("a.weight::values").get_dtype() == dtype
        if dtype.startswith("F8") or dtype in ("BF16", "F16"):
            values = f.get_tensor("a.weight::values").float()  # any reader sees the format's values
            assert torch.isfinite(values).all()
    back = load(out, as_numpy=True)["a.weight"]
    src = load(weights, as_numpy=True)["a.weight"]
    cast = FloatCast.for_format(method)
    assert np.array_equal(back, cast.encode(src).values.astype(np.float32))
    if method in ("bf16", "fp16"):
        assert np.array_equal(back, np.asarray(round_to(src, method), np.float32))


def test_files_with_unsigned_codes_still_read(weights, tmp_path, monkeypatch):
    monkeypatch.setattr(FloatCast, "pack", classmethod(lambda cls, codes, scheme: (codes, {})))
    out = tmp_path / "old.safetensors"
    compress_checkpoint(weights, out, "fp8_e4m3fn", progress=False)
    with safe_open(str(out), "pt") as f:
        assert f.get_slice("a.weight::values").get_dtype() == "U8"
    monkeypatch.undo()
    new = tmp_path / "new.safetensors"
    compress_checkpoint(weights, new, "fp8_e4m3fn", progress=False)
    assert np.array_equal(load(out, as_numpy=True)["a.weight"], load(new, as_numpy=True)["a.weight"])
