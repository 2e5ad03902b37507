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
``~/.cache/lowbit``). A library loaded from there runs as code, so the
directory is opened once without following links and must belong to the user
and be writable by nobody else; the library file must be a regular file with
the same owner and no group/other write bit, and it is built, renamed and
loaded through those open descriptors (``/proc/self/fd``), so no path
component can be swapped between the check and the load. Where any of this
fails, or the system has no descriptor paths, the library is built in a fresh
private temporary directory instead. Linked against
``libgomp``, a kernel shares the OpenMP runtime torch has already loaded, so
its threads are torch's. ``LOWBIT_NATIVE=0`` turns every kernel off; so does a
missing or failing compiler. Either way callers fall back to their numpy/torch
passes; :meth:`Library.status` says which is in use and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

try:  # loaded first: its libgomp then serves the kernels' OpenMP too
    import torch
except ImportError:  # pragma: no cover - torch is a dependency, but precision works without it
    torch = None  # type: ignore[assignment]

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
# LOWBIT_SANITIZE=1 builds every kernel with AddressSanitizer and UndefinedBehaviorSanitizer, stopping at
# the first report (for the sanitizer job: python runs with libasan preloaded, see tests/test_sanitizers.py)
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def env_flag(name: str, default: bool) -> bool:
    """The environment switch ``name``: True for 1 / true / yes / on, False for 0 / false / no / off
    (any case), ``default`` when unset or anything else."""
    value = os.environ.get(name, "").strip().lower()
    return True if value in ("1", "true", "yes", "on") else False if value in ("0", "false", "no", "off") else default


def _flags() -> list[str]:
    return FLAGS + (SANITIZE_FLAGS if env_flag("LOWBIT_SANITIZE", False) else [])


def enabled() -> bool:
    """False when ``LOWBIT_NATIVE`` is set to 0 / false / no / off."""
    return env_flag("LOWBIT_NATIVE", True)


def threads() -> int:
    """How many threads a kernel or a parallel numpy pass may use: torch's intra-op thread count
    (the available cores without torch). :func:`thread_budget` lowers it for a block of work."""
    return torch.get_num_threads() if torch is not None else min(available_cores(), 8)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def thread_budget(n: int) -> Iterator[None]:
    """Within the block, torch's intra-op pool (and so lowbit's kernels and parallel passes, see
    :func:`threads`) and the BLAS under numpy each use at most ``n`` threads; restored afterwards.
    torch's setting is process-wide: other torch work in the process sees it meanwhile."""
    old = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; without it BLAS keeps its own count
        limits: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        limits = threadpool_limits(limits=n, user_api="blas")
    try:
        with limits:
            yield
    finally:
        if torch is not None and old is not None:
            torch.set_num_threads(old)


def _cpu_identity() -> str:
    """-march=native code is for this CPU: the cache key carries its model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() + platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


# Linux names an open file or directory by /proc/self/fd/N: the build and the load then go through
# descriptors checked once, so nobody can swap a path component between the check and the use
_FD_PATHS = os.path.isdir("/proc/self/fd")
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)


def _private(st: os.stat_result) -> bool:
    """Owned by this user and writable by nobody else."""
    return not hasattr(os, "getuid") or (st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def cache_dir() -> Path:
    """lowbit's cache directory: ``$LOWBIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowbit`` or ``~/.cache/lowbit``."""
    base = os.environ.get("LOWBIT_CACHE_DIR")
    return Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowbit"


def _open_cache() -> int | None:
    """A descriptor of the build cache (created 0700), or None when it is not safely ours: a link,
    another user's, writable by others, or on a system without descriptor paths."""
    if not _FD_PATHS:
        return None
    d = cache_dir()
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(d, _DIR_FLAGS)
    except OSError:
        return None
    if stat.S_ISDIR(os.fstat(fd).st_mode) and _private(os.fstat(fd)):
        return fd
    os.close(fd)
    return None


def _install(data: bytes, dir_fd: int | None, dir_path: str, name: str) -> None:
    """Write the library under a fresh name in the directory and rename it over ``name``: a
    concurrent process never loads a half-written file."""
    tmp = f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o700, dir_fd=dir_fd) if dir_fd is not None else os.open(os.path.join(dir_path, tmp), flags, 0o700)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd) if dir_fd is not None \
            else os.replace(os.path.join(dir_path, tmp), os.path.join(dir_path, name))
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd) if dir_fd is not None else os.unlink(os.path.join(dir_path, tmp))
        except OSError:
            pass
        raise


def _load_checked(dir_path: str, dir_fd: int | None, name: str) -> ctypes.CDLL | None:
    """Load ``name`` from the directory if it is a regular file that is ours and writable by nobody else
    (None if absent or not so); through its descriptor where descriptor paths exist."""
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=dir_fd) if dir_fd is not None \
            else os.open(os.path.join(dir_path, name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) and _private(st)):
            return None
        # through the checked directory's descriptor, by the file's own name: dlopen knows a loaded library
        # by its path string, so /proc/self/fd/<file fd> (a number reused by the next load) would hand back
        # the previous library; only this user can change the file between the check and the load
        return ctypes.CDLL(os.path.join(dir_path, name))
    finally:
        os.close(fd)


def _compile(cc: str, source: Path, out: Path, openmp: bool, extra: tuple[str, ...] = ()) -> None:
    """Build ``source`` into the shared library ``out``; ``extra`` flags come last (the tests build
    the kernels without AVX-512 that way, to compare the scalar bodies with the vector ones)."""
    cmd = [cc, *_flags(), *(["-fopenmp"] if openmp else []), *extra, str(source), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise OSError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")


_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def _source_text(source: Path, seen: frozenset[Path] = frozenset()) -> str:
    """The source and, after it, every local header it includes (``#include "..."``, relative to the
    including file, recursively): all that the built library depends on, for its cache key."""
    text = source.read_text()
    seen = seen | {source.resolve()}
    parts = [text]
    for inc in _LOCAL_INCLUDE.findall(text):
        header = (source.parent / inc)
        if header.resolve() not in seen:
            parts.append(_source_text(header, seen))
    return "\0".join(parts)


def _build(source: Path) -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([_source_text(source), cc, version, " ".join(_flags()), _cpu_identity(),
                                    sys.platform]).encode()).hexdigest()[:20]
    name = f"{source.stem}-{key}.so"
    dir_fd = _open_cache()
    private = None
    if dir_fd is None:  # no cache we can trust: a fresh private directory, removed after the load
        private = tempfile.mkdtemp(prefix="lowbit-")
        dir_fd = os.open(private, _DIR_FLAGS) if _FD_PATHS else None
    dir_path = f"/proc/self/fd/{dir_fd}" if dir_fd is not None and _FD_PATHS else str(private)
    try:
        try:
            lib = _load_checked(dir_path, dir_fd, name)
            if lib is not None:
                return lib
        except OSError:  # a damaged cache entry (say, a full disk): build it again
            pass
        with tempfile.TemporaryDirectory(prefix="lowbit-build-") as build:  # private, for the compiler's path
            built = Path(build) / name
            try:
                _compile(cc, source, built, openmp=True)
            except OSError:  # e.g. Apple clang has no -fopenmp: serial, still one pass
                _compile(cc, source, built, openmp=False)
            _install(built.read_bytes(), dir_fd, dir_path, name)
        lib = _load_checked(dir_path, dir_fd, name)
        if lib is None:
            raise OSError(f"the library just built in {dir_path} is not a private regular file")
        return lib
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
        if private is not None:  # a loaded library stays mapped after its file is gone
            shutil.rmtree(private, ignore_errors=True)


LIBRARIES: list["Library"] = []  # every kernel library of lowbit, in the order its module was imported


def libraries() -> list["Library"]:
    """Every C kernel library lowbit's imported modules declare (see :class:`Library`)."""
    return list(LIBRARIES)


class Library:
    """One C source file of kernels, built and loaded on the first :meth:`get`.

    ``bind(lib)`` declares the argument and return types of the library's functions; ``fallback``
    names what runs instead (for :meth:`status`).
    """

    def __init__(self, source: Path, bind: Callable[[ctypes.CDLL], None], fallback: str) -> None:
        LIBRARIES.append(self)
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
    def loaded(self) -> bool:
        """Whether a call has built and loaded the library (without trying to)."""
        return self._lib is not None

    @property
    def reason(self) -> str | None:
        """Why the library is not in use (None before the first :meth:`get` or once it is loaded)."""
        return self._reason

    def status(self) -> str:
        """``"fused C passes"`` when the library is in use, else what runs instead and why."""
        return "fused C passes" if self.get() is not None else f"{self.fallback} passes ({self._reason or 'not in use'})"
