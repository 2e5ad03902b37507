"""lowbit: numerical precision, quantization and compression of PyTorch models.

The tool is four packages, importable by their own names or through ``lowbit``
(``import lowbit.quant`` and ``import quant`` give the same module object):

* ``lowbit.precision``: float formats, bit-exact codecs, error metrics, reports;
* ``lowbit.quant``: integer quantization, QAT, PTQ, int8 kernels;
* ``lowbit.compress``: pruning and low rank;
* ``lowbit.bench``: the command-line programs and benchmarks;

plus ``lowbit.checkpoint``, the checkpoint pipeline. The main entry points are
re-exported here: :func:`compress_checkpoint`, :func:`load`, :class:`Chain`,
:func:`ptq` and :class:`PTQConfig`, and for compressed-tensors model directories
:class:`CompressedTensors`, :func:`load_quantized` and :func:`save_quantized`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

_PACKAGES = ("precision", "quant", "compress", "bench")


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolve ``lowbit.<package>[.module]`` to the already importable ``<package>[.module]``, so each
    module exists once (one registry of formats and methods, one class per name)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        parts = fullname.split(".")
        if len(parts) >= 2 and parts[0] == __name__ and parts[1] in _PACKAGES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(spec.name.partition(".")[2])

    def exec_module(self, module: ModuleType) -> None:
        pass  # the real module ran when it was imported under its own name


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())


from . import checkpoint  # noqa: E402
from .checkpoint import Chain, CompressedTensors, compress_checkpoint, load, load_quantized, save_quantized  # noqa: E402

precision = importlib.import_module(__name__ + ".precision")
quant = importlib.import_module(__name__ + ".quant")
compress = importlib.import_module(__name__ + ".compress")

from quant import PTQConfig, ptq  # noqa: E402


def __getattr__(name: str) -> Any:
    if name == "bench":  # imported on first use: it pulls in the command-line programs
        return importlib.import_module(__name__ + ".bench")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["precision", "quant", "compress", "bench", "checkpoint", "compress_checkpoint", "load", "Chain",
           "ptq", "PTQConfig", "CompressedTensors", "load_quantized", "save_quantized"]
