"""Write a compressed checkpoint as a GGUF file (``compress_checkpoint(..., format="gguf")``).

GGUF (llama.cpp's file format, version 3) holds each tensor in one of ggml's
types. lowbit writes the types it produces without converting anything:

* ``q8_0`` and ``q4_0`` tensors as GGUF ``Q8_0`` / ``Q4_0`` blocks, the bytes of
  :meth:`precision.blocks.BlockCodes.gguf_blocks` (byte-identical to the
  ``gguf`` package's own quantizers);
* ``fp16`` and ``bf16`` casts (no scaling) as ``F16`` / ``BF16``;
* tensors kept as they are in their own type: ``F32``, ``F16``, ``BF16``,
  ``F64``, ``I8``, ``I16``, ``I32``, ``I64`` (anything else is refused).

Tensors keep their checkpoint names and shapes (GGUF lists dimensions
innermost first). The metadata holds ``general.alignment`` (32) and
``lowbit.source``. A GGUF reader (``gguf.GGUFReader``) reads the tensors back;
llama.cpp's model loader also needs the architecture's metadata and its
tensor names, which a model converter adds.

The file is written like lowbit's safetensors output: tensor data streams to
a temporary file beside the output, the header (which must list every
tensor's offset) is written in front once all are known, and the finished
file is moved into place; a failed job leaves nothing.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from precision.blocks import BlockCodes, get_block_format

from .io import CheckpointError, TemporaryOutput, _fsync_dir, publish, temp_path

MAGIC = 0x46554747  # "GGUF" read as a little-endian uint32
VERSION = 3
ALIGNMENT = 32
TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 8, "I8": 24, "I16": 25, "I32": 26, "I64": 27, "F64": 28, "BF16": 30}
_KEPT = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int8": "I8", "int16": "I16",
         "int32": "I32", "int64": "I64"}
_STRING, _UINT32 = 8, 4


def gguf_type_of_chain(chain: Any) -> str:
    """The GGUF type a chain's compressed tensors take; ValueError naming the ones GGUF carries otherwise."""
    from precision.blocks import BlockCast
    from precision.cast import FloatCast

    v = chain.values
    if chain.structure is None and isinstance(v, BlockCast) and v.format in ("q8_0", "q4_0"):
        return v.format.upper()
    if chain.structure is None and isinstance(v, FloatCast) and v.format in ("fp16", "bf16") and v.scaling == "none":
        return {"fp16": "F16", "bf16": "BF16"}[v.format]
    raise ValueError(f"GGUF carries q8_0, q4_0, fp16 and bf16 (unscaled) tensors; {' + '.join(chain.describe())} "
                     "has no GGUF type: use one of those methods, or the lowbit format")


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


class GGUFWriter(TemporaryOutput):
    """Write tensors to a GGUF file one at a time, atomically (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, force: bool = False, inputs: Sequence[str | os.PathLike] = ()):
        super().__init__(path, force=force, inputs=inputs)
        self._infos: list[tuple[str, tuple[int, ...], str, int]] = []
        self._names: set[str] = set()
        self._offset = 0

    def _add_bytes(self, name: str, shape: tuple[int, ...], gtype: str, data: np.ndarray) -> None:
        if name in self._names:
            raise CheckpointError(f"{self.path}: tensor {name!r} written twice")
        raw = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        pad = -self._offset % ALIGNMENT
        try:
            self._data.write(b"\0" * pad)
            self._data.write(raw)
        except OSError as e:
            self.abort()
            raise CheckpointError(f"{self.path}: writing tensor {name!r} failed: {e.strerror or e}") from None
        self._offset += pad
        self._infos.append((name, shape, gtype, self._offset))
        self._names.add(name)
        self._offset += len(raw)

    def add_kept(self, name: str, array: np.ndarray) -> None:
        """A tensor as it is, in its own GGUF type."""
        gtype = _KEPT.get(str(array.dtype))
        if gtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r}: GGUF has no type for {array.dtype} "
                                  f"(it takes {', '.join(_KEPT)}); exclude it or use the lowbit format")
        self._add_bytes(name, tuple(array.shape), gtype, array)

    def add_compressed(self, name: str, shape: tuple[int, ...], gtype: str, codes: np.ndarray,
                       side: dict[str, np.ndarray]) -> None:
        """A compressed tensor from its unpacked codes and side arrays (``scale`` for the blocks)."""
        if gtype in ("Q8_0", "Q4_0"):
            fmt = get_block_format(gtype.lower())
            blocks = BlockCodes(codes.reshape(shape), side["scale"].reshape(*shape[:-1], shape[-1] // fmt.block), fmt)
            self._add_bytes(name, shape, gtype, blocks.gguf_blocks())
        else:
            self._add_bytes(name, shape, gtype, codes)

    def commit(self, metadata: dict[str, str] | None = None) -> Path:
        kv = [("general.alignment", _UINT32, struct.pack("<I", ALIGNMENT))]
        kv += [(k, _STRING, _string(v)) for k, v in (metadata or {}).items()]
        head = [struct.pack("<IIQQ", MAGIC, VERSION, len(self._infos), len(kv))]
        head += [_string(k) + struct.pack("<I", t) + v for k, t, v in kv]
        for name, shape, gtype, offset in self._infos:
            dims = shape[::-1] if shape else (1,)  # innermost first; a scalar is one element
            head.append(_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                        + struct.pack("<IQ", TYPES[gtype], offset))
        header = b"".join(head)
        header += b"\0" * (-len(header) % ALIGNMENT)
        final = temp_path(self.path)
        try:
            self._data.flush()
            self._data.close()
            with open(final, "xb") as out, open(self._tmp, "rb") as data:
                out.write(header)
                shutil.copyfileobj(data, out, 1 << 22)
                out.flush()
                os.fsync(out.fileno())
            publish(final, self.path, self.force)
            _fsync_dir(self.path.parent)
        except OSError as e:
            raise CheckpointError(f"{self.path}: writing the output failed: {e.strerror or e}") from None
        finally:
            self._closed = True
            self._tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
        return self.path
