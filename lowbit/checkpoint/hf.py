"""transformers and sentence-transformers, imported in one guarded place, quietly.

lowbit's own output is all a user's terminal should show when lowbit loads a model: importing
sentence-transformers or loading a transformers model imports torchao where it is installed (the
``[test]`` extra installs it), and torchao's import logs a warning for each prebuilt CUDA library it
cannot load on a CPU machine and torch warns about its enum registrations; transformers draws a
progress bar for every model it loads. Those messages are silenced while lowbit imports these
packages and loads models with them (torchao is imported first, inside the quiet block, so a later
lazy import finds it loaded); warnings and errors after import are left as they are.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
from types import ModuleType
from typing import Iterator

from .io import CheckpointError

# loggers whose import-time warnings lowbit silences: torchao's library loading, torch's pytree registry
_NOISY = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Import-time warnings of torchao and torch's pytree registry raised to errors only, and torchao
    imported inside (where installed)."""
    loggers = [logging.getLogger(n) for n in _NOISY]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    bars = None
    try:
        if importlib.util.find_spec("torchao") is not None:
            try:
                importlib.import_module("torchao")
            except Exception:  # noqa: BLE001 - a broken optional package is transformers' concern, not ours
                pass
        tf_logging = sys.modules.get("transformers.utils.logging")
        if tf_logging is not None and tf_logging.is_progress_bar_enabled():  # "Loading weights" bars
            bars = tf_logging
            bars.disable_progress_bar()
        yield
    finally:
        if bars is not None:
            bars.enable_progress_bar()
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _import(name: str, extra: str) -> ModuleType:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with quiet_imports():
        try:
            return importlib.import_module(name)
        except ImportError:
            raise CheckpointError(f"this needs {name} (pip install 'lowbit[{extra}]')") from None


def transformers() -> ModuleType:
    """The ``transformers`` module (CheckpointError naming the extra when it is not installed)."""
    return _import("transformers", "models")


def sentence_transformers() -> ModuleType:
    """The ``sentence_transformers`` module (CheckpointError naming the extra when it is not installed)."""
    return _import("sentence_transformers", "models")
