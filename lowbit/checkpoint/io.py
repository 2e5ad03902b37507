"""Safe, streaming checkpoint reading and writing.

Reading: a ``.safetensors`` file, a sharded checkpoint (``*.safetensors.index.json``
and its shards), a directory holding either (or a PyTorch state dict), or a
PyTorch ``.pt``/``.pth``/``.bin`` state dict loaded with
``torch.load(..., weights_only=True)`` only. Tensors are read one at a time.

Writing: a safetensors file is produced tensor by tensor: data goes to a
temporary file in the target directory, the header is written in front of it
at the end, the result is flushed, fsynced and renamed into place, so a
failure leaves no partial output and never touches the input.

Every error is a ``CheckpointError`` whose message names the file (and the
tensor where there is one).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from precision.arrays import contiguous
from precision.dtypes import NP_TO_ST, ST_TO_NP

MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint could not be read or written; the message names the file and tensor."""


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


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list) -> dict:
    d = {}
    for k, v in pairs:
        if k in d:
            raise _Duplicate(k)
        d[k] = v
    return d


class SafetensorsFile:
    """One safetensors file, parsed and validated by lowbit itself (header, offsets, dtypes),
    read tensor by tensor through a memory map."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file (only {len(head)} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > min(MAX_HEADER, size - 8):
                    raise CheckpointError(f"{self.path}: header length {n} is larger than the file ({size} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e.strerror or e}") from None
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except _Duplicate as e:
            raise CheckpointError(f"{self.path}: tensor {e.args[0]!r} appears twice in the header") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
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
            if (not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                        for s in shape)):
                raise CheckpointError(f"{where}: bad shape {shape!r}")
            if (not isinstance(off, list) or len(off) != 2 or not all(isinstance(o, int) and not isinstance(o, bool)
                                                                      for o in off) or not 0 <= off[0] <= off[1]):
                raise CheckpointError(f"{where}: bad data_offsets {off!r}")
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
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.data_start + b)
                got = f.readinto(memoryview(out))  # type: ignore[arg-type]  # numpy arrays are buffers
        except OSError as err:
            raise CheckpointError(f"{self.path}: tensor {name!r}: cannot read ({err.strerror or err})") from None
        if got != e - b:
            raise CheckpointError(f"{self.path}: tensor {name!r}: file ended after {got} of {e - b} bytes")
        return out.view(dt).reshape(shape)


class Checkpoint:
    """A read-only view of a checkpoint: ``names()``, ``info(name)`` and ``read(name)`` (numpy)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.files: list[Path] = []
        self.metadata: dict[str, str] = {}
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

    def _add_safetensors(self, p: Path) -> SafetensorsFile:
        f = SafetensorsFile(p)
        self.files.append(p)
        self.metadata.update(f.metadata)
        for n in f.names():
            if n in self._where:
                raise CheckpointError(f"{p}: tensor {n!r} is also in {self._where[n].path}")
            self._where[n] = f
        return f

    def _open_index(self, p: Path) -> None:
        try:
            idx = json.loads(p.read_text(encoding="utf-8"))
            wm = idx["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{p}: not a valid shard index with a 'weight_map' ({type(e).__name__})") from None
        shards: dict[str, SafetensorsFile] = {}
        for tensor, shard in wm.items():
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                raise CheckpointError(f"{p}: tensor {tensor!r} names a bad shard file {shard!r}")
            sp = p.parent / shard
            if shard not in shards:
                if not sp.is_file():
                    raise CheckpointError(f"{p}: tensor {tensor!r} is in shard {shard!r}, which does not exist")
                f = SafetensorsFile(sp)
                shards[shard] = f
                self.files.append(sp)
                self.metadata.update(f.metadata)
            if tensor not in shards[shard].entries:
                raise CheckpointError(f"{sp}: tensor {tensor!r} listed in {p.name} is missing from the shard")
            self._where[tensor] = shards[shard]
        for shard, f in shards.items():
            extra = set(f.names()) - set(wm)
            if extra:
                raise CheckpointError(f"{p.parent / shard}: tensor {sorted(extra)[0]!r} is not listed in {p.name}")

    def _open_pickle(self, p: Path) -> None:
        torch = _torch()
        try:
            # weights_only=True: a checkpoint from a stranger can fail, never run code
            sd = torch.load(p, map_location="cpu", weights_only=True)
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

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for n in self.names():
            yield n, self.read(n)

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time, atomically (temp file + fsync + rename)."""

    def __init__(self, path: str | os.PathLike, *, force: bool = False, inputs: Sequence[Path] = ()) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise CheckpointError(f"{self.path}: the output path is a directory")
        for i in inputs:
            same = self.path.resolve() == Path(i).resolve() or (
                self.path.exists() and Path(i).exists() and os.path.samefile(self.path, i))
            if same:
                raise CheckpointError(f"{self.path}: the output would overwrite the input checkpoint")
        if self.path.exists() and not force:
            raise CheckpointError(f"{self.path}: already exists (pass force=True, or --force, to replace it)")
        d = self.path.parent if str(self.path.parent) else Path(".")
        if not d.is_dir():
            raise CheckpointError(f"{d}: output directory does not exist")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".data.tmp", dir=d)
        except OSError as e:
            raise CheckpointError(f"{d}: cannot write there: {e.strerror or e}") from None
        self._data_path = Path(tmp)
        self._data = os.fdopen(fd, "wb")
        self._header: dict[str, Any] = {}
        self._offset = 0
        self._closed = False

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self._header:
            raise CheckpointError(f"{self.path}: tensor {name!r} written twice")
        a = contiguous(array)
        dt = NP_TO_ST.get(a.dtype)
        if dt is None:
            raise CheckpointError(f"{self.path}: tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
        b = a.tobytes()
        try:
            self._data.write(b)
        except OSError as e:
            self.abort()
            raise CheckpointError(f"{self.path}: writing tensor {name!r} failed: {e.strerror or e}") from None
        self._header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [self._offset, self._offset + len(b)]}
        self._offset += len(b)

    def commit(self, metadata: dict[str, str] | None = None) -> Path:
        header = dict(self._header)
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as safetensors does
        final_tmp = None
        try:
            self._data.flush()
            self._data.close()
            fd, final_tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent or ".")
            with os.fdopen(fd, "wb") as out, open(self._data_path, "rb") as data:
                out.write(struct.pack("<Q", len(raw)))
                out.write(raw)
                shutil.copyfileobj(data, out, 1 << 22)
                out.flush()
                os.fsync(out.fileno())
            os.replace(final_tmp, self.path)
            final_tmp = None
            _fsync_dir(self.path.parent)
        except OSError as e:
            raise CheckpointError(f"{self.path}: writing the output failed: {e.strerror or e}") from None
        finally:
            if final_tmp is not None:
                Path(final_tmp).unlink(missing_ok=True)
            self._data_path.unlink(missing_ok=True)
            self._closed = True
        return self.path

    def abort(self) -> None:
        if not self._closed:
            try:
                self._data.close()
            finally:
                self._data_path.unlink(missing_ok=True)
                self._closed = True

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()
        return False


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
