"""Reused memory for the large arrays of a checkpoint job (``_kernels/array_pool.c``).

A job allocates the same few large arrays for every tensor: the tensor read
from the file, its codes, its mask. Each is a fresh mapping from the system
allocator, whose pages the kernel faults in and zeroes on first touch and takes
back when the array is freed; on a virtual machine that reports free pages to
its host (virtio-balloon free page reporting), every such fault is also a trip
to the host. That costs more system time than the compression itself for the
fast methods. :func:`job` keeps large freed blocks (1 MiB or more) for the
next tensor instead, up to a limit of free bytes, and releases them when the
job ends.

It works through numpy's data-allocation hook (NEP 49): within
:func:`active`, arrays that numpy allocates on this thread come from the pool;
an array remembers its allocator, so one freed after the job still goes back
to the pool, which then unmaps it at once. Where the hook or the C compiler is
not available (``LOWBIT_NATIVE=0``, an unexpected numpy ABI), or with
``LOWBIT_ARRAY_POOL=0``, both context managers do nothing and numpy allocates
as usual. Builds for the sanitizer job (``LOWBIT_SANITIZE=1``) leave the pool
off, so AddressSanitizer sees every array's own allocation, unless
``LOWBIT_ARRAY_POOL=1`` asks for it (the job's run of the pool's own tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from precision._native import Library, env_flag

_NUMPY_SET_HANDLER, _NUMPY_GET_HANDLER, _NUMPY_FEATURE_VERSION = 304, 305, 211  # slots of numpy's C API table
_NUMPY_1_22_API = 0x0F  # the C API version that brought the allocation hook
_CAPSULE_NAME = ctypes.create_string_buffer(b"mem_handler")  # kept alive: a capsule holds on to its name


def _bind(lib: ctypes.CDLL) -> None:
    lib.lowbit_array_pool_limit.argtypes = [ctypes.c_size_t]
    lib.lowbit_array_pool_limit.restype = None
    lib.lowbit_array_pool_stats.argtypes = [ctypes.c_void_p]
    lib.lowbit_array_pool_stats.restype = None


KERNELS = Library(Path(__file__).with_name("_kernels") / "array_pool.c", _bind, fallback="system allocator")


class _Hook:
    """numpy's PyDataMem_SetHandler and the pool's handler capsule, found once."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        api = ctypes.pythonapi
        api.PyCapsule_GetName.argtypes = [ctypes.py_object]
        api.PyCapsule_GetName.restype = ctypes.c_char_p
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        api.PyCapsule_New.restype = ctypes.py_object
        api.PyCapsule_IsValid.argtypes = [ctypes.py_object, ctypes.c_char_p]
        api.PyCapsule_IsValid.restype = ctypes.c_int
        try:
            umath: Any = importlib.import_module("numpy._core._multiarray_umath")  # numpy 2
        except ImportError:  # pragma: no cover - numpy 1.x
            umath = importlib.import_module("numpy.core._multiarray_umath")
        table_capsule = umath._ARRAY_API
        table = api.PyCapsule_GetPointer(table_capsule, api.PyCapsule_GetName(table_capsule))
        slots = (ctypes.c_void_p * (_NUMPY_GET_HANDLER + 1)).from_address(table)
        version, set_, get_ = (slots[i] for i in (_NUMPY_FEATURE_VERSION, _NUMPY_SET_HANDLER, _NUMPY_GET_HANDLER))
        if not (version and set_ and get_) or ctypes.CFUNCTYPE(ctypes.c_uint)(version)() < _NUMPY_1_22_API:
            raise OSError("numpy has no data-allocation hook (NEP 49)")
        self.set = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(set_)
        get = ctypes.PYFUNCTYPE(ctypes.py_object)(get_)
        current = get()
        # the slots must be what this module expects: a handler capsule whose name numpy reports
        if not api.PyCapsule_IsValid(current, b"mem_handler"):
            raise OSError("numpy's C API table is not laid out as expected")
        name = ctypes.string_at(api.PyCapsule_GetPointer(current, b"mem_handler"))
        if name.decode() != umath.get_handler_name():
            raise OSError("numpy's C API table is not laid out as expected")
        handler = ctypes.addressof(ctypes.c_char.in_dll(lib, "lowbit_array_pool_handler"))
        self.capsule = api.PyCapsule_New(handler, ctypes.addressof(_CAPSULE_NAME), None)


_hook_lock = threading.Lock()
_hook: _Hook | None = None
_hook_reason: str | None = None
_limits: list[int] = []  # the limit of each job running now; the pool keeps up to their sum


def _get_hook() -> _Hook | None:
    global _hook, _hook_reason
    if _hook is not None or _hook_reason is not None:
        return _hook
    with _hook_lock:
        if _hook is None and _hook_reason is None:
            sanitized = env_flag("LOWBIT_SANITIZE", False)
            if not env_flag("LOWBIT_ARRAY_POOL", not sanitized):
                _hook_reason = "off in sanitizer builds (LOWBIT_ARRAY_POOL=1 turns it on)" \
                    if env_flag("LOWBIT_ARRAY_POOL", True) else "turned off by LOWBIT_ARRAY_POOL=0"
            elif (lib := KERNELS.get()) is None:
                _hook_reason = KERNELS.reason
            else:
                try:
                    _hook = _Hook(lib)
                except (OSError, AttributeError, ImportError, ValueError) as e:
                    _hook_reason = str(e)
    return _hook


def status() -> str:
    """Whether the pool is in use, and if not, why."""
    return "pooled large arrays" if _get_hook() is not None else f"system allocator ({_hook_reason})"


@contextlib.contextmanager
def job(limit_bytes: int) -> Iterator[None]:
    """For the block, the pool keeps up to ``limit_bytes`` more of freed large blocks (bytes;
    concurrent jobs add up); at the end it releases what it holds beyond the other jobs' limits."""
    hook = _get_hook()
    if hook is None or limit_bytes <= 0:
        yield
        return
    lib = KERNELS.get()
    assert lib is not None  # the hook exists only with the library
    with _hook_lock:
        _limits.append(int(limit_bytes))
        lib.lowbit_array_pool_limit(sum(_limits))
    try:
        yield
    finally:
        with _hook_lock:
            _limits.remove(int(limit_bytes))
            lib.lowbit_array_pool_limit(sum(_limits))


@contextlib.contextmanager
def active() -> Iterator[None]:
    """Within the block, numpy allocates this thread's (this context's) arrays from the pool."""
    hook = _get_hook()
    if hook is None:
        yield
        return
    old = hook.set(hook.capsule)
    try:
        yield
    finally:
        hook.set(old)


def stats() -> dict[str, Any]:
    """``free_bytes`` held now, and since the process began: ``reused`` (requests served from free
    blocks), ``mapped`` and ``unmapped`` (blocks made and released)."""
    lib = KERNELS.get() if _get_hook() is not None else None
    if lib is None:
        return dict(free_bytes=0, reused=0, mapped=0, unmapped=0)
    out = np.zeros(4, np.uint64)
    lib.lowbit_array_pool_stats(out.ctypes.data)
    return dict(zip(("free_bytes", "reused", "mapped", "unmapped"), (int(v) for v in out)))
