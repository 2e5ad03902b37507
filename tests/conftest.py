"""Shared fixtures and skips.

Markers (skip when the C pass cannot be built here, e.g. no compiler or ``LOWBIT_NATIVE=0``):
``needs_codec_c`` (the codecs' table passes), ``needs_int8_c`` (the fused passes around the
int8 GEMM), ``needs_attention_c`` (the int8 attention kernel) and ``needs_blocks_c`` (NVFP4 encoding).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest

pytest_plugins = ["pytester"]  # tests of lowbit's own pytest plugin

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_C_PASSES = {
    "needs_codec_c": lambda: __import__("precision.codec", fromlist=["_KERNELS"])._KERNELS.get(),
    "needs_int8_c": lambda: __import__("quant._native", fromlist=["library"]).library(),
    "needs_attention_c": lambda: __import__("quant._native", fromlist=["attention_library"]).attention_library(),
    "needs_blocks_c": lambda: __import__("precision.blocks", fromlist=["_BLOCK_KERNELS"])._BLOCK_KERNELS.get(),
}


def pytest_configure(config: pytest.Config) -> None:
    for name in _C_PASSES:
        config.addinivalue_line("markers", f"{name}: skip unless that C pass is available")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name, get in _C_PASSES.items():
        if item.get_closest_marker(name) is not None and get() is None:
            pytest.skip(f"{name}: the C pass is unavailable here")


@pytest.fixture(scope="session")
def _minilm_session() -> Any:
    from bench.models import sentence_model

    return sentence_model()


@pytest.fixture(scope="module")
def minilm_model(_minilm_session: Any) -> Any:
    """The real all-MiniLM-L6-v2 sentence-transformers model (a private copy per test module)."""
    return copy.deepcopy(_minilm_session)


def _tiny_bert() -> Any:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                     intermediate_size=128, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    with torch.no_grad():  # the init leaves biases at 0 and LayerNorms at 1: give them values a trained model has
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape) * 0.05)
    return model


def _token_batches(n: int = 3, seed: int = 1) -> list[dict]:
    """Batches of random token ids with padding at the end of some rows (attention_mask 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, 30000, (4, 16), generator=g)
        mask = torch.ones(4, 16, dtype=torch.long)
        mask[1, 10:] = 0
        mask[3, 5:] = 0
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


@pytest.fixture
def tiny_bert() -> Any:
    """A random-init 2-layer BERT (hidden 64, FFN 128, MiniLM's vocabulary; biases and LayerNorms
    perturbed), fresh per test."""
    return _tiny_bert()


@pytest.fixture
def token_batches() -> list[dict]:
    """Three batches (4 x 16 tokens, some padded) of model inputs for ``tiny_bert``."""
    return _token_batches()


@pytest.fixture
def scalar_build(tmp_path: Any) -> Any:
    """``scalar_build(library)``: the ``precision._native.Library``'s C source built again without AVX-512
    (its scalar bodies) and bound like the library, to compare with the vector bodies the library runs
    here; skips where that cannot be done or would build the same code (no AVX-512 CPU)."""
    import ctypes
    import shutil

    from precision import _native

    def build(library: Any) -> Any:
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None or library.get() is None or "avx512f" not in _native._cpu_identity():
            pytest.skip("needs a C compiler and an AVX-512 CPU (else the two builds are the same)")
        out = tmp_path / f"{library.source.stem}-scalar.so"
        _native._compile(cc, library.source, out, openmp=True, extra=("-mno-avx512f",))
        lib = ctypes.CDLL(str(out))
        library._bind(lib)
        return lib

    return build
