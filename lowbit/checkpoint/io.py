"""Safe, streaming checkpoint reading and writing.

Reading: a ``.safetensors`` file, a sharded checkpoint (``*.safetensors.index.json``
and its shards), a directory holding either (or a PyTorch state dict), or a
PyTorch ``.pt``/``.pth``/``.bin`` state dict loaded with
``torch.load(..., weights_only=True)`` only. Tensors are read one at a time.

Writing: a safetensors file is produced tensor by tensor into one temporary
file in the target directory, behind room reserved for the header, which is
written in front at the end; the result is fsynced and moved into place
(never over an existing file without ``force``), so a failure leaves no
partial output and never touches the input.

Every error is a ``CheckpointError`` whose message names the file (and the
tensor where there is one).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import secrets
import shutil
import stat
import struct
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from precision._native import env_flag
from precision.arrays import contiguous
from precision.dtypes import NP_TO_ST, ST_TO_NP
from precision.methods import MAX_DIMS

MAX_HEADER = 100 * 1024 * 1024



class CheckpointError(ValueError):
    """A checkpoint could not be read or written; the message names the file and tensor."""


MAX_DIM = 1 << 62  # bound on a dimension, an offset and a tensor's indexed extent in bytes


def _short(v: Any, limit: int = 80) -> str:
    """``repr(v)`` cut to ``limit`` characters, for error messages about hostile values (an integer of
    thousands of digits cannot even be formatted)."""
    try:
        r = repr(v)
    except ValueError:
        return f"<{type(v).__name__} too large to print>"
    return r if len(r) <= limit else r[:limit] + "..."


def _torch():
    import torch

    return torch


def _tensor_to_numpy(t, where: str) -> np.ndarray:
    from precision.arrays import torch_to_numpy

    if t.dtype == _torch().bool:  # masks pass through as they are
        return contiguous(t.detach().cpu().numpy())
    try:
        return contiguous(torch_to_numpy(t))
    except TypeError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _check_pickled(t, where: str) -> None:
    """Refuse a tensor from a pickle that lowbit cannot read as the values it declares, before
    anything is allocated: not a plain strided CPU tensor, a zero stride (one element standing for
    many), overlapping strides, or a storage smaller than the strides reach."""
    torch = _torch()
    kind = ("sparse" if t.layout != torch.strided else "quantized" if t.is_quantized else
            "nested" if getattr(t, "is_nested", False) else "meta" if t.device.type == "meta" else
            t.device.type if t.device.type != "cpu" else None)
    if kind is not None:
        raise CheckpointError(f"{where}: {kind} tensors are not supported; save plain dense tensors")
    if t.numel() == 0:
        return
    need = 1
    for stride, size in sorted((s, d) for s, d in zip(t.stride(), t.shape) if d > 1):
        if stride < need:  # zero or overlapping strides: fewer stored values than declared elements
            raise CheckpointError(f"{where}: strides {tuple(t.stride())} for shape {tuple(t.shape)} make elements share "
                                  "storage; save the tensor with .contiguous()")
        need = stride * size
    extent = t.storage_offset() + sum((d - 1) * s for d, s in zip(t.shape, t.stride())) + 1
    have = t.untyped_storage().nbytes()
    if extent * t.element_size() > have:
        raise CheckpointError(f"{where}: shape {tuple(t.shape)} reaches {extent * t.element_size()} bytes into a storage "
                              f"of {have}")


def open_regular(path: Path):
    """Open ``path`` for reading if it is a regular file, checked on the opened descriptor (a FIFO or
    device named like a checkpoint would block or never end); CheckpointError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file")
    return os.fdopen(fd, "rb", buffering=0)


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list) -> dict:
    d = {}
    for k, v in pairs:
        if k in d:
            raise _Duplicate(k)
        d[k] = v
    return d


def row_spans(rows: int, row_bytes: int, block_bytes: int) -> list[tuple[int, int]]:
    """``(first row, end row)`` of consecutive blocks of ``rows`` rows of ``row_bytes`` bytes, each
    of about ``block_bytes`` bytes and at least one row; the last may be shorter."""
    per = max(1, block_bytes // max(1, row_bytes))
    return [(r0, min(rows, r0 + per)) for r0 in range(0, rows, per)]


class SafetensorsFile:
    """One safetensors file, parsed and validated by lowbit itself (header, offsets, dtypes),
    read tensor by tensor through a memory map."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            with open_regular(self.path) as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file (only {len(head)} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > min(MAX_HEADER, size - 8):  # the field's value is not echoed: it is the file's own bytes
                    raise CheckpointError(f"{self.path}: not a safetensors file (its header length field exceeds "
                                          f"the file's {size} bytes or the {MAX_HEADER}-byte limit)")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e.strerror or e}") from None
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except _Duplicate as e:
            raise CheckpointError(f"{self.path}: tensor {e.args[0]!r} appears twice in the header") from None
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, or an integer too long to parse
            raise CheckpointError(f"{self.path}: header is not valid JSON ({type(e).__name__})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise CheckpointError(f"{self.path}: __metadata__ must map strings to strings")
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        spans = []
        for name, ent in header.items():
            where = f"{self.path}: tensor {name!r}"
            if not isinstance(ent, dict) or set(ent) - {"dtype", "shape", "data_offsets"} or len(ent) != 3:
                raise CheckpointError(f"{where}: entry must have dtype, shape and data_offsets")
            dt = ST_TO_NP.get(ent["dtype"]) if isinstance(ent["dtype"], str) else None
            if dt is None:
                raise CheckpointError(f"{where}: unsupported dtype {ent['dtype']!r}")
            shape, off = ent["shape"], ent["data_offsets"]
            if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                    or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < MAX_DIM for s in shape)):
                raise CheckpointError(f"{where}: bad shape {_short(shape)}")
            extent = dt.itemsize
            for d in shape:  # what numpy must index, zero dimensions aside (np.zeros refuses more)
                extent *= max(d, 1)
            if extent >= MAX_DIM:
                raise CheckpointError(f"{where}: shape {shape} is too large for an array")
            if (not isinstance(off, list) or len(off) != 2 or not all(isinstance(o, int) and not isinstance(o, bool)
                                                                      and 0 <= o < MAX_DIM for o in off)
                    or not off[0] <= off[1]):
                raise CheckpointError(f"{where}: bad data_offsets {_short(off)}")
            if off[1] > data_len:
                raise CheckpointError(f"{where}: data_offsets {off} run past the end of the file "
                                      f"({data_len} data bytes; truncated?)")
            nbytes = dt.itemsize
            for d in shape:  # Python ints: no silent int64 overflow on hostile shapes
                nbytes *= d
            if off[1] - off[0] != nbytes:
                raise CheckpointError(f"{where}: {off[1] - off[0]} bytes stored for shape {shape} of {ent['dtype']} "
                                      f"({nbytes} expected)")
            self.entries[name] = (dt, tuple(shape), off[0], off[1])
            spans.append((off[0], off[1], name))
        spans.sort()
        end = 0
        for b, e_, name in spans:
            if b < end:
                raise CheckpointError(f"{self.path}: tensor {name!r} overlaps another tensor's bytes")
            end = max(end, e_)
        if end != data_len:
            raise CheckpointError(f"{self.path}: {data_len - end} bytes after the last tensor (trailing junk "
                                  "or a truncated header)")

    def names(self) -> list[str]:
        return list(self.entries)

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        dt, shape, _, _ = self.entries[name]
        return dt, shape

    def read(self, name: str) -> np.ndarray:
        dt, shape, b, e = self.entries[name]
        if e == b:
            return np.zeros(shape, dt)
        # read into a fresh array (no memory map: mapped pages would stay in the RSS of a long run)
        out = np.empty(e - b, np.uint8)
        try:
            with open_regular(self.path) as f:
                f.seek(self.data_start + b)
                got = f.readinto(memoryview(out))  # type: ignore[arg-type]  # numpy arrays are buffers
        except OSError as err:
            raise CheckpointError(f"{self.path}: tensor {name!r}: cannot read ({err.strerror or err})") from None
        if got != e - b:
            raise CheckpointError(f"{self.path}: tensor {name!r}: file ended after {got} of {e - b} bytes")
        return out.view(dt).reshape(shape)

    def row_blocks(self, name: str, block_bytes: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(first row, end row, rows)`` of a tensor of at least one dimension, in blocks of
        about ``block_bytes`` (at least one row) along its first axis, read from the file one
        block at a time into one reused buffer: a block is valid until the next is read."""
        dt, shape, b, e = self.entries[name]
        rows = shape[0]
        if not rows or e == b:
            return
        row_bytes = (e - b) // rows
        spans = row_spans(rows, row_bytes, block_bytes)
        buf = np.empty((spans[0][1] - spans[0][0]) * row_bytes, np.uint8)  # the first block is the largest
        try:
            with open_regular(self.path) as f:
                for r0, r1 in spans:
                    n = (r1 - r0) * row_bytes
                    f.seek(self.data_start + b + r0 * row_bytes)
                    got = f.readinto(memoryview(buf[:n]))  # type: ignore[arg-type]  # numpy arrays are buffers
                    if got != n:
                        raise CheckpointError(f"{self.path}: tensor {name!r}: file ended within rows {r0}..{r1}")
                    yield r0, r1, buf[:n].view(dt).reshape((r1 - r0, *shape[1:]))
        except OSError as err:
            raise CheckpointError(f"{self.path}: tensor {name!r}: cannot read ({err.strerror or err})") from None


class Checkpoint:
    """A read-only view of a checkpoint: ``names()``, ``info(name)`` and ``read(name)`` (numpy)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.files: list[Path] = []
        self.index: Path | None = None
        self.metadata: dict[str, str] = {}
        self._metadata_from: dict[str, Path] = {}
        self._where: dict[str, Any] = {}
        self._pickle: dict[str, Any] | None = None
        p = self.path
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or directory")
        if p.is_dir():
            p = self._from_dir(p)
        name = p.name
        if name.endswith(".index.json"):
            self._open_index(p)
        elif name.endswith(".safetensors"):
            self._add_safetensors(p)
        elif p.suffix in (".pt", ".pth", ".bin"):
            self._open_pickle(p)
        else:
            raise CheckpointError(f"{p}: unknown checkpoint kind; expected .safetensors, "
                                  "*.safetensors.index.json, .pt, .pth or .bin")

    @staticmethod
    def _from_dir(d: Path) -> Path:
        for cand in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                     "pytorch_model.bin", "model.pt", "model.pth"):
            if (d / cand).is_file():
                if cand == "pytorch_model.bin.index.json":
                    raise CheckpointError(f"{d / cand}: sharded pickle checkpoints are not supported; "
                                          "convert them to safetensors")
                return d / cand
        found = sorted(d.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise CheckpointError(f"{d}: no checkpoint found (looked for model.safetensors[.index.json], "
                              "pytorch_model.bin, model.pt)")

    @property
    def inputs(self) -> list[Path]:
        """Every file this checkpoint was read from: the shards, the index, the pickle."""
        return self.files + ([self.index] if self.index is not None else [])

    def _merge_metadata(self, f: SafetensorsFile) -> None:
        for k, v in f.metadata.items():
            if k in self.metadata and self.metadata[k] != v:
                raise CheckpointError(f"{f.path}: metadata {k!r} differs from the value in {self._metadata_from[k]}")
            self.metadata[k] = v
            self._metadata_from.setdefault(k, f.path)

    def _add_safetensors(self, p: Path) -> SafetensorsFile:
        f = SafetensorsFile(p)
        self.files.append(p)
        self._merge_metadata(f)
        for n in f.names():
            if n in self._where:
                raise CheckpointError(f"{p}: tensor {n!r} is also in {self._where[n].path}")
            self._where[n] = f
        return f

    def _open_index(self, p: Path) -> None:
        self.index = p
        try:
            with open_regular(p) as fh:
                text = fh.read(MAX_HEADER + 1)
            if len(text) > MAX_HEADER:
                raise CheckpointError(f"{p}: the shard index is larger than {MAX_HEADER} bytes")
            idx = json.loads(text.decode("utf-8"))
            wm = idx["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{p}: not a valid shard index with a 'weight_map' ({type(e).__name__})") from None
        shards: dict[str, SafetensorsFile] = {}
        for tensor, shard in wm.items():
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", "..") \
                    or len(shard.encode("utf-8", "surrogatepass")) > 255 or "\0" in shard:
                raise CheckpointError(f"{p}: tensor {_short(tensor)} names a bad shard file {_short(shard)}")
            sp = p.parent / shard
            if shard not in shards:
                try:
                    exists = sp.is_file()
                except OSError as e:
                    raise CheckpointError(f"{p}: shard {_short(shard)}: {e.strerror or type(e).__name__}") from None
                if not exists:
                    raise CheckpointError(f"{p}: tensor {tensor!r} is in shard {shard!r}, which does not exist")
                f = SafetensorsFile(sp)
                shards[shard] = f
                self.files.append(sp)
                self._merge_metadata(f)
            if tensor not in shards[shard].entries:
                raise CheckpointError(f"{sp}: tensor {tensor!r} listed in {p.name} is missing from the shard")
            self._where[tensor] = shards[shard]
        seen: dict[str, str] = {}
        for shard, f in shards.items():
            extra = set(f.names()) - set(wm)
            if extra:
                raise CheckpointError(f"{p.parent / shard}: tensor {sorted(extra)[0]!r} is not listed in {p.name}")
            for n in f.names():  # the index names one shard; a second copy elsewhere would be silently ignored
                if n in seen:
                    raise CheckpointError(f"{p.parent / shard}: tensor {n!r} is also in shard {seen[n]!r}")
                seen[n] = shard

    def _open_pickle(self, p: Path) -> None:
        torch = _torch()
        try:
            # weights_only=True: a checkpoint from a stranger can fail, never run code
            with open_regular(p) as fh:
                sd = torch.load(fh, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types; all mean "refused/unreadable"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{p}: refused or unreadable PyTorch checkpoint (weights_only=True): {first}") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
            raise CheckpointError(f"{p}: expected a state dict mapping names to tensors")
        for n, t in sd.items():
            _check_pickled(t, f"{p}: tensor {n!r}")
        self.files.append(p)
        self._pickle = sd
        for n in sd:
            self._where[n] = None

    def names(self) -> list[str]:
        return list(self._where)

    def ties(self) -> dict[str, str]:
        """Tensors that are the very same tensor as an earlier name (a PyTorch state dict of a model with
        tied weights holds GPT-2's ``lm_head.weight`` and ``transformer.wte.weight`` as one storage):
        ``{later name: first name}``. safetensors files store each tensor once, so they have none."""
        if self._pickle is None:
            return {}
        first: dict[tuple, str] = {}
        out: dict[str, str] = {}
        for n, t in self._pickle.items():
            if t.numel() == 0:
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if key in first:
                out[n] = first[key]
            else:
                first[key] = n
        return out

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        if self._pickle is not None:
            t = self._pickle[name]
            return _tensor_to_numpy(t[:0] if t.dim() else t, f"{self.path}: tensor {name!r}").dtype, tuple(t.shape)
        return self._where[name].info(name)

    def read(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        if self._pickle is not None:
            t = self._pickle[name]
            return _tensor_to_numpy(t.contiguous(), f"{self.files[0]}: tensor {name!r}").copy()
        return self._where[name].read(name)

    def row_blocks(self, name: str, block_bytes: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """The tensor's rows in blocks of about ``block_bytes`` (see :meth:`SafetensorsFile.row_blocks`):
        read block by block from a safetensors file, sliced from the loaded tensor otherwise."""
        if name not in self._where:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        if self._pickle is None:
            yield from self._where[name].row_blocks(name, block_bytes)
            return
        a = self.read(name)
        if a.ndim and a.size:
            yield from ((r0, r1, a[r0:r1]) for r0, r1 in row_spans(a.shape[0], a.nbytes // a.shape[0], block_bytes))

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for n in self.names():
            yield n, self.read(n)

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


_TMP = re.compile(r"^\.(?P<name>.+)\.lowbit-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def temp_path(final: Path) -> Path:
    """A fresh temporary name beside ``final``, in lowbit's own pattern (so a later run can sweep it)."""
    return final.with_name(f".{final.name}.lowbit-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def sweep_stale_temporaries(d: Path) -> list[Path]:
    """Remove temporaries of lowbit's own naming in ``d`` that a killed run left behind: files of
    this user whose writing process is gone. Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(d if str(d) else "."))
    except OSError:
        return removed
    for e in entries:
        m = _TMP.match(e.name)
        if not m or not e.is_file(follow_symlinks=False):
            continue
        try:
            if hasattr(os, "getuid") and e.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            pid = int(m["pid"])
            if pid == os.getpid() or _alive(pid):
                continue
            os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def check_output(path: str | os.PathLike, *, force: bool, inputs: Sequence[str | os.PathLike] = (),
                 what: str = "output") -> Path:
    """The output path, refused (CheckpointError) when it is a directory, any file of the input
    checkpoint (same path, or the same file by another name), an existing file without ``force``,
    or in a directory that does not exist."""
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p}: the {what} path is a directory")
    for i in inputs:
        same = p.resolve() == Path(i).resolve() or (p.exists() and Path(i).exists() and os.path.samefile(p, i))
        if same:
            raise CheckpointError(f"{p}: the {what} would overwrite a file of the input checkpoint")
    if (p.exists() or p.is_symlink()) and not force:
        raise CheckpointError(f"{p}: already exists (pass force=True, or --force, to replace it)")
    d = p.parent if str(p.parent) else Path(".")
    if not d.is_dir():
        raise CheckpointError(f"{d}: {what} directory does not exist")
    return p


def publish(tmp: Path, final: Path, force: bool) -> None:
    """Move the finished ``tmp`` to ``final``: replacing it with ``force``; otherwise atomically
    refusing a file that appeared there meanwhile (a hard link fails if the name exists)."""
    if force:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise CheckpointError(f"{final}: a file appeared there while lowbit was writing; it was left as it is "
                              "(pass --force to replace it)") from None
    except OSError:  # a file system without hard links: the check and the rename are two steps there
        if final.exists():
            raise CheckpointError(f"{final}: already exists (pass --force to replace it)") from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


def write_text_file(path: str | os.PathLike, text: str, *, force: bool, inputs: Sequence[str | os.PathLike] = (),
                    what: str = "report") -> Path:
    """Write ``text`` (UTF-8; characters it cannot encode escaped) under the same rules as the
    checkpoint output: temporary file, fsync, then :func:`publish`; nothing is left behind on failure."""
    p = check_output(path, force=force, inputs=inputs, what=what)
    tmp = temp_path(p)
    try:
        with open(tmp, "x", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, p, force)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot write the {what}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return p


def _libc_sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        f = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from ``offset`` to disk now, without
    waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; nothing elsewhere). The disk then writes
    one tensor while the next is compressed, and the fsync at commit waits for the last ones only. A
    hint: durability still comes from that fsync, so a failure here is ignored."""
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


DIRECT_BLOCK = 4096  # O_DIRECT offsets, lengths and buffers are multiples of this (any block size up to a page)
_DIRECT_CHUNK = 8 << 20
_HUGE_PAGE = 2 << 20


def direct_io_enabled() -> bool:
    """False when ``LOWBIT_DIRECT_IO`` is set to 0 / false / no / off, or where the system has no O_DIRECT."""
    return hasattr(os, "O_DIRECT") and env_flag("LOWBIT_DIRECT_IO", True)


class DirectAppend:
    """Bytes appended to a file from a block-aligned offset with ``O_DIRECT``, past the page cache,
    by a background thread.

    Why: a buffered write copies every byte into page-cache pages that the kernel must allocate
    (and, on a virtual machine that hands free pages back to its host, fault in from the host),
    and the fsync at commit writes them out anyway. Here :meth:`write` queues the array and
    returns; one thread (waiting on the disk most of the time) writes the queue in order: an
    array whose address and file offset are block-aligned goes to the device straight from its
    memory, the rest through a reused, page-aligned 8 MiB buffer. Arrays up to ``max_queued``
    bytes in all (or one larger array) wait in the queue, so a tensor's bytes go to the disk while
    the next is compressed; the caller must not change a queued array. :meth:`close` writes the
    last partial block padded with zeros, waits for the device and truncates the file to the bytes
    appended. Opening writes one zero block where the data starts (the data overwrites it), so a
    file system without direct I/O for this file refuses at once with ``OSError`` and the caller
    writes buffered instead. The error of a background write is raised by the next
    :meth:`write` or by :meth:`close`.
    """

    def __init__(self, path: Path, offset: int, max_queued: int = 64 << 20) -> None:
        if offset % DIRECT_BLOCK:
            raise ValueError(f"offset {offset} is not a multiple of {DIRECT_BLOCK}")
        self._fd = os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        self._thread: threading.Thread | None = None
        try:
            # the staging buffer on a huge-page boundary (fewer page faults)
            self._map = mmap.mmap(-1, _DIRECT_CHUNK + _HUGE_PAGE)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                self._map.madvise(mmap.MADV_HUGEPAGE)
            base = -ctypes.addressof(ctypes.c_char.from_buffer(self._map)) % _HUGE_PAGE
            self._buf = memoryview(self._map)[base:base + _DIRECT_CHUNK]
            os.pwrite(self._fd, self._buf[:DIRECT_BLOCK], offset)  # the probe: EINVAL without direct I/O
        except BaseException:
            self.discard()
            raise
        self._fill = 0
        self._offset = offset  # where the staged bytes go
        self._max_queued = max_queued
        self._queue: deque[np.ndarray | None] = deque()  # None: stop
        self._queued = 0
        self._error: BaseException | None = None
        self._abandoned = False  # discarded: what is still queued is dropped, not written
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="lowbit-direct-write", daemon=True)
        self._thread.start()

    def write(self, data: np.ndarray) -> None:
        """Queue the bytes of ``data`` (a contiguous array, left unchanged until written)."""
        b = data.reshape(-1).view(np.uint8)
        with self._cond:
            while self._error is None and self._queued and self._queued + b.size > self._max_queued:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            self._queue.append(b)
            self._queued += b.size
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                b = self._queue[0]
            if b is None:
                return
            try:
                if self._error is None and not self._abandoned:
                    self._write_array(b)
            except BaseException as e:  # kept for the caller; the queue still drains
                self._error = e
            with self._cond:
                self._queue.popleft()
                self._queued -= b.size
                self._cond.notify_all()

    def _write_array(self, b: np.ndarray) -> None:
        i, n = 0, b.size
        if not self._fill and not b.ctypes.data % DIRECT_BLOCK:
            i = n - n % DIRECT_BLOCK  # straight from the array's memory: no copy
            self._pwrite(memoryview(b[:i]))  # type: ignore[arg-type]  # numpy arrays are buffers
        while i < n:
            k = min(n - i, _DIRECT_CHUNK - self._fill)
            self._buf[self._fill:self._fill + k] = memoryview(b[i:i + k])  # type: ignore[arg-type]
            self._fill += k
            i += k
            if self._fill == _DIRECT_CHUNK:
                self._pwrite(self._buf)
                self._fill = 0

    def _pwrite(self, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            done += os.pwrite(self._fd, buf[done:], self._offset + done)
        self._offset += len(buf)

    def close(self) -> int:
        """Write what is queued, wait for the device and close; returns the file size (the offset
        after the last byte appended). Raises the error of any write."""
        try:
            self._stop()
            if self._error is not None:
                raise self._error
            end = self._offset + self._fill
            if self._fill:
                padded = self._fill + (-self._fill % DIRECT_BLOCK)
                self._buf[self._fill:padded] = bytes(padded - self._fill)
                self._pwrite(self._buf[:padded])
            os.ftruncate(self._fd, end)
            return end
        finally:
            self.discard()

    def _stop(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._queue.append(None)
                self._cond.notify_all()
            self._thread.join()
            self._thread = None

    def discard(self) -> None:
        """Close without writing what is queued or staged (a write under way finishes first)."""
        if self._fd < 0:
            return
        self._abandoned = True
        self._stop()
        os.close(self._fd)
        self._fd = -1
        try:
            if hasattr(self, "_buf"):
                self._buf.release()
            if hasattr(self, "_map"):
                self._map.close()
        except BufferError:  # a slice still alive (say, in a traceback): unmapped when it goes
            pass


class TemporaryOutput:
    """An output file written through a temporary file beside it: ``path`` follows
    :func:`check_output`'s rules, temporaries a killed run left in that directory are removed,
    and :meth:`abort` (or leaving a ``with`` block on an error) removes what was written."""

    def __init__(self, path: str | os.PathLike, *, force: bool = False,
                 inputs: Sequence[str | os.PathLike] = ()) -> None:
        self.path = check_output(path, force=force, inputs=inputs)
        self.force = force
        d = self.path.parent if str(self.path.parent) else Path(".")
        sweep_stale_temporaries(d)
        self._tmp = temp_path(self.path)
        try:
            self._data = open(self._tmp, "xb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot create the output in {d} ({e.strerror or type(e).__name__}); "
                                  "write it to a directory you can write to") from None
        self._closed = False

    def abort(self) -> None:
        if not self._closed:
            try:
                self._data.close()
            finally:
                self._tmp.unlink(missing_ok=True)
                self._closed = True

    def __enter__(self) -> "TemporaryOutput":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()
        return False


COMPACT_MIN_UNUSED = 4096  # header padding worth removing at commit ...
COMPACT_RATIO = 64  # ... when it exceeds 1/64 of the data (the data is then copied once behind the header)


class SafetensorsWriter(TemporaryOutput):
    """Write a safetensors file one tensor at a time, atomically, in one temporary file.

    The data goes into a temporary file beside the output, after room reserved for the header
    (``header_reserve`` bytes; the header is padded with spaces to fill it, as safetensors allows).
    ``commit`` writes the header in front, fsyncs and moves the file into place, so the output
    needs free space for itself only. A header larger than the reserve, or one that leaves most of
    a reserve empty in front of little data (the padding would be a large part of the file), has
    the data copied behind it instead. Without ``force`` an output that appears meanwhile is never replaced.
    Temporaries left by a killed run in the same directory are removed when the next writer starts.

    The reserve is rounded up to a multiple of 4096 bytes, so the data starts on a block boundary.
    Where the file system allows it (and ``LOWBIT_DIRECT_IO`` is not 0), the data is written with
    direct I/O from a background thread (:class:`DirectAppend`): ``add`` queues a copy of the array,
    or the array itself with ``zero_copy=True``, a promise that the caller leaves it unchanged.
    Errors of those writes surface in a later ``add`` or in ``commit``. Elsewhere ``add`` writes
    through the page cache and asks the kernel to start writing it out at once.
    """

    def __init__(self, path: str | os.PathLike, *, force: bool = False, inputs: Sequence[str | os.PathLike] = (),
                 header_reserve: int = 1 << 16, zero_copy: bool = False) -> None:
        super().__init__(path, force=force, inputs=inputs)
        self._zero_copy = zero_copy
        # the data starts on a block boundary, for direct I/O; always, so the bytes never depend on it
        self._reserve = max(DIRECT_BLOCK, header_reserve + (-header_reserve % DIRECT_BLOCK))
        self._data.seek(self._reserve)  # a seek past the end only moves the position
        self._header: dict[str, Any] = {}
        self._offset = 0
        self._direct: DirectAppend | None = None
        if direct_io_enabled():
            try:
                self._direct = DirectAppend(self._tmp, self._reserve)
            except OSError:  # no direct I/O on this file system: buffered writes
                pass

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self._header:
            raise CheckpointError(f"{self.path}: tensor {name!r} written twice")
        a = contiguous(array)
        dt = NP_TO_ST.get(a.dtype)
        if dt is None:
            raise CheckpointError(f"{self.path}: tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
        try:
            self._append(a)
        except OSError as e:
            self.abort()
            raise CheckpointError(f"{self.path}: writing tensor {name!r} failed: {e.strerror or e}") from None
        self._header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [self._offset, self._offset + a.nbytes]}
        self._offset += a.nbytes

    def commit(self, metadata: dict[str, str] | None = None) -> Path:
        header = dict(self._header)
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        try:
            if self._direct is not None:
                direct, self._direct = self._direct, None
                direct.close()
            unused = self._reserve - 8 - len(raw)
            # a reserve the header leaves mostly empty is dropped when the data is small enough that copying
            # it behind the header costs little (a small checkpoint would otherwise be mostly padding)
            if 0 <= unused and not (unused >= COMPACT_MIN_UNUSED and unused * COMPACT_RATIO > self._offset):
                raw += b" " * unused
                self._data.seek(0)
                self._data.write(struct.pack("<Q", len(raw)) + raw)
                self._data.flush()
                os.fsync(self._data.fileno())
                self._data.close()
            else:
                self._copy_behind(raw)
            publish(self._tmp, self.path, self.force)
            _fsync_dir(self.path.parent)
        except OSError as e:
            raise CheckpointError(f"{self.path}: writing the output failed: {e.strerror or e}") from None
        finally:
            self._data.close()
            self._tmp.unlink(missing_ok=True)
            self._closed = True
        return self.path

    @property
    def direct(self) -> bool:
        """Whether ``add`` queues the data for the direct-I/O thread (else it writes it through the page cache)."""
        return self._direct is not None

    def _append(self, a: np.ndarray) -> None:
        if self._direct is not None:
            # queued and written later: a copy, unless the caller promised to leave the array alone
            self._direct.write(a if self._zero_copy else a.copy())
            return
        self._data.write(memoryview(a.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]  # the bytes in place
        start_writeback(self._data.fileno(), self._reserve + self._offset, a.nbytes)

    def abort(self) -> None:
        if self._direct is not None:
            self._direct.discard()
            self._direct = None
        super().abort()

    def _copy_behind(self, raw: bytes) -> None:
        raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as safetensors does
        self._data.flush()
        self._data.close()
        final = temp_path(self.path)
        try:
            with open(final, "xb") as out, open(self._tmp, "rb") as data:
                out.write(struct.pack("<Q", len(raw)) + raw)
                data.seek(self._reserve)
                shutil.copyfileobj(data, out, 1 << 22)
                out.flush()
                os.fsync(out.fileno())
            os.replace(final, self._tmp)
        finally:
            final.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d if str(d) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
