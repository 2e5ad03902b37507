"""Fused C passes around the int8 GEMM, compiled on first use with the system C compiler.

Eager torch needs three to five passes over an activation to quantize it per
token (scale, row max, multiply, round, convert) and three to rescale the
int32 result (convert, row scale, column scale plus bias); for MiniLM at
32 x 128 tokens those passes cost about as much as a third of the int8 GEMMs.
``int8_kernels.c`` does each in one pass, with the same float32 operations in
the same order, so its codes are bit-identical to :func:`quant.quantize`'s.

The library is built once per source, compiler and CPU with
``cc -O3 -march=native -ffp-contract=off -fopenmp`` (about 0.3 s) into
``$LOWBIT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lowbit`` or
``~/.cache/lowbit``), a directory that must belong to the user and be
writable by nobody else, since a library loaded from it runs as code; anything
else is built in a fresh private temporary directory instead. Linked against
``libgomp``, it shares the OpenMP runtime torch has already loaded, so its
threads are torch's. ``LOWBIT_NATIVE=0`` turns it off; so does a missing or
failing compiler. Either way callers fall back to the torch passes, which give
the same codes; :func:`status` says which is in use and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("int8_kernels.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None  # why the library is not in use; None while untried or when loaded


def _cpu_identity() -> str:
    """-march=native code is for this CPU: the cache key carries its model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() + platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _cache_dir() -> Path | None:
    """The build cache, created private; None when it exists but others could write to it."""
    base = os.environ.get("LOWBIT_CACHE_DIR")
    if base:
        d = Path(base)
    else:
        d = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowbit"
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.stat()
    except OSError:
        return None
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        return None
    return d


def _compile(cc: str, out: Path, openmp: bool) -> None:
    cmd = [cc, *FLAGS, *(["-fopenmp"] if openmp else []), str(SOURCE), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise OSError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu_identity(),
                                    sys.platform]).encode()).hexdigest()[:20]
    cache = _cache_dir()
    private = None if cache is not None else tempfile.mkdtemp(prefix="lowbit-")
    target = Path(cache or private) / f"int8_kernels-{key}.so"
    if not target.exists():
        # build beside the target and rename: a concurrent process never loads a half-written file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            try:
                _compile(cc, Path(tmp), openmp=True)
            except OSError:  # e.g. Apple clang has no -fopenmp: serial, still one pass
                _compile(cc, Path(tmp), openmp=False)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(str(target))
    finally:
        if private is not None:  # a loaded library stays mapped after its file is gone
            shutil.rmtree(private, ignore_errors=True)
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.lowbit_quantize_tokens.argtypes = [p, i64, i64, i64, p, f32, f32, f32, f32, p, p, i32]
    lib.lowbit_quantize_tokens.restype = i64
    lib.lowbit_rescale.argtypes = [p, i64, i64, p, p, i64, p, p, i32]
    lib.lowbit_rescale.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, building them on the first call; None if they are off or cannot be built."""
    global _lib, _reason
    if _lib is not None or _reason is not None:
        return _lib
    with _lock:
        if _lib is None and _reason is None:
            if os.environ.get("LOWBIT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
                _reason = "turned off by LOWBIT_NATIVE=0"
            else:
                try:
                    _lib = _build()
                except (OSError, subprocess.SubprocessError) as e:
                    _reason = f"not built: {e}"
    return _lib


def status() -> str:
    """``"fused C passes"`` when the kernels are in use, else why not."""
    return "fused C passes" if library() is not None else f"torch passes ({_reason})"


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _usable(t: torch.Tensor | None, n: int | None = None) -> bool:
    return t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                         and (n is None or t.numel() == n))


def quantize_tokens(x: torch.Tensor, smooth: torch.Tensor | None, half_range: float, eps: float,
                    qmin: int, qmax: int, codes: torch.Tensor, scales: torch.Tensor) -> bool:
    """Per-row symmetric int8 codes of ``x * smooth`` into ``codes`` and scales into ``scales``.

    ``x``: float32 (rows, cols) on the CPU with unit column stride; ``smooth``: float32 (cols,) or
    None; ``codes``: contiguous int8 (rows, cols); ``scales``: contiguous float32 with ``rows``
    elements. Returns False, having written nothing the caller may use, when the kernels are
    unavailable, an argument does not fit, or a row holds NaN or inf: the caller's reference path
    then defines the result.
    """
    lib = library()
    rows, cols = x.shape
    if (lib is None or x.device.type != "cpu" or x.dtype != torch.float32 or (cols > 1 and x.stride(1) != 1)
            or not _usable(smooth, cols) or not codes.is_contiguous() or codes.dtype != torch.int8
            or not _usable(scales, rows)):
        return False
    bad = lib.lowbit_quantize_tokens(x.data_ptr(), rows, cols, x.stride(0) if rows > 1 else cols, _ptr(smooth),
                                     half_range, eps, qmin, qmax, codes.data_ptr(), scales.data_ptr(),
                                     torch.get_num_threads())
    return bad == 0


def rescale(acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor | None:
    """``float(acc) * row_scale * col_scale + bias`` written over ``acc``'s memory, as a float32 view.

    ``acc``: contiguous int32 (rows, cols); ``row_scale``: rows float32; ``col_scale``: cols or 1
    float32; ``bias``: cols float32 or None. Each product and the sum are rounded to float32 in that
    order. Returns None (``acc`` untouched) when the kernels are unavailable or an argument does not fit.
    """
    lib = library()
    rows, cols = acc.shape
    if (lib is None or acc.device.type != "cpu" or acc.dtype != torch.int32 or not acc.is_contiguous()
            or not _usable(row_scale, rows) or not _usable(bias, cols)
            or not (_usable(col_scale, cols) or _usable(col_scale, 1))):
        return None
    y = acc.view(torch.float32)
    lib.lowbit_rescale(acc.data_ptr(), rows, cols, row_scale.data_ptr(), col_scale.data_ptr(), col_scale.numel(),
                       _ptr(bias), y.data_ptr(), torch.get_num_threads())
    return y
