"""lowbit's C kernels: compiled on first use with the system C compiler, loaded with ctypes.

Some passes are memory-bound loops that numpy or eager torch can only run as
several passes with temporaries (a table lookup behind an index computed from
float bits, a per-row quantization, a rescale); in C each is one pass. The
kernels change no arithmetic: each does the very operations of the numpy/torch
path it replaces, which stays as the fallback, and the tests check the two
against each other bit for bit.

A :class:`Library` is built once per source, compiler and CPU with
``cc -O3 -march=native -ffp-contract=off -fopenmp`` (a fraction of a second)
into ``$LOWBIT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lowbit`` or
``~/.cache/lowbit``), a directory that must belong to the user and be
writable by nobody else, since a library loaded from it runs as code; anything
else is built in a fresh private temporary directory instead. Linked against
``libgomp``, a kernel shares the OpenMP runtime torch has already loaded, so
its threads are torch's. ``LOWBIT_NATIVE=0`` turns every kernel off; so does a
missing or failing compiler. Either way callers fall back to their numpy/torch
passes; :meth:`Library.status` says which is in use and why.
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
from typing import Callable

try:  # loaded first: its libgomp then serves the kernels' OpenMP too
    import torch
except ImportError:  # pragma: no cover - torch is a dependency, but precision works without it
    torch = None

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]


def enabled() -> bool:
    """False when ``LOWBIT_NATIVE`` is set to 0 / false / no / off."""
    return os.environ.get("LOWBIT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def threads() -> int:
    """How many threads a kernel may use: torch's intra-op thread count (the core count without torch)."""
    return torch.get_num_threads() if torch is not None else min(os.cpu_count() or 1, 8)


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


def _compile(cc: str, source: Path, out: Path, openmp: bool) -> None:
    cmd = [cc, *FLAGS, *(["-fopenmp"] if openmp else []), str(source), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise OSError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")


def _build(source: Path) -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([source.read_text(), cc, version, " ".join(FLAGS), _cpu_identity(),
                                    sys.platform]).encode()).hexdigest()[:20]
    cache = _cache_dir()
    private = None if cache is not None else tempfile.mkdtemp(prefix="lowbit-")
    target = Path(cache or private) / f"{source.stem}-{key}.so"
    try:
        if target.exists():
            try:
                return ctypes.CDLL(str(target))
            except OSError:  # a damaged cache entry (say, a full disk): build it again
                target.unlink(missing_ok=True)
        # build beside the target and rename: a concurrent process never loads a half-written file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            try:
                _compile(cc, source, Path(tmp), openmp=True)
            except OSError:  # e.g. Apple clang has no -fopenmp: serial, still one pass
                _compile(cc, source, Path(tmp), openmp=False)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return ctypes.CDLL(str(target))
    finally:
        if private is not None:  # a loaded library stays mapped after its file is gone
            shutil.rmtree(private, ignore_errors=True)


class Library:
    """One C source file of kernels, built and loaded on the first :meth:`get`.

    ``bind(lib)`` declares the argument and return types of the library's functions; ``fallback``
    names what runs instead (for :meth:`status`).
    """

    def __init__(self, source: Path, bind: Callable[[ctypes.CDLL], None], fallback: str) -> None:
        self.source = source
        self.fallback = fallback
        self._bind = bind
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._reason: str | None = None  # why the library is not in use; None while untried or loaded

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, building it on the first call; None if kernels are off or cannot be built."""
        if self._lib is not None or self._reason is not None:
            return self._lib
        with self._lock:
            if self._lib is None and self._reason is None:
                if not enabled():
                    self._reason = "turned off by LOWBIT_NATIVE=0"
                else:
                    try:
                        lib = _build(self.source)
                        self._bind(lib)
                        self._lib = lib
                    except (OSError, AttributeError, subprocess.SubprocessError) as e:
                        self._reason = f"not built: {e}"
        return self._lib

    @property
    def reason(self) -> str | None:
        """Why the library is not in use (None before the first :meth:`get` or once it is loaded)."""
        return self._reason

    def status(self) -> str:
        """``"fused C passes"`` when the library is in use, else what runs instead and why."""
        return "fused C passes" if self.get() is not None else f"{self.fallback} passes ({self._reason or 'not in use'})"
