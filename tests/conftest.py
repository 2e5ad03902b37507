"""Shared fixtures and skips.

Markers (skip when the C pass cannot be built here, e.g. no compiler or ``LOWBIT_NATIVE=0``):
``needs_codec_c`` (the codecs' table passes), ``needs_int8_c`` (the fused passes around the
int8 GEMM) and ``needs_attention_c`` (the int8 attention kernel).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_C_PASSES = {
    "needs_codec_c": lambda: __import__("precision.codec", fromlist=["_KERNELS"])._KERNELS.get(),
    "needs_int8_c": lambda: __import__("quant._native", fromlist=["library"]).library(),
    "needs_attention_c": lambda: __import__("quant._native", fromlist=["attention_library"]).attention_library(),
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
