"""Read a checkpoint written by ``python -m bench.quantize`` back as dense tensors."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from precision._bridge import contiguous

from .checkpoint import Checkpoint, CheckpointError


def load(path: str | os.PathLike, *, as_numpy: bool = False) -> dict[str, Any]:
    """Dense tensors of a lowbit checkpoint: compressed tensors are rebuilt (dequantized,
    unpruned, multiplied out) exactly as the report measured them; kept tensors come back
    bit-exact. Every compressed tensor's checksum is verified (a mismatch names the tensor).
    Returns ``{name: torch.Tensor}`` (or numpy arrays with ``as_numpy=True``). A plain
    checkpoint without lowbit metadata is returned as it is."""
    from .methods import restore

    ck = Checkpoint(path)
    raw = ck.metadata.get("lowbit")
    out: dict[str, np.ndarray] = {}
    if raw is None:
        out = {n: ck.read(n) for n in ck.names()}
    else:
        try:
            meta = json.loads(raw)
            schemes = meta["tensors"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{path}: the 'lowbit' metadata is not valid") from None
        names = set(ck.names())
        for n in meta.get("kept", []):
            if n not in names:
                raise CheckpointError(f"{path}: kept tensor {n!r} is missing")
            out[n] = ck.read(n)
        for n, scheme in schemes.items():
            prefix = n + "::"
            parts = {k[len(prefix):]: ck.read(k) for k in ck.names() if k.startswith(prefix)}
            if not parts:
                raise CheckpointError(f"{path}: tensor {n!r}: its stored parts are missing")
            try:
                out[n] = restore(n, scheme, parts)
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path}: tensor {n!r}: {e}") from None
    if as_numpy:
        return out
    from precision._bridge import like
    import torch

    return {k: like(contiguous(v), torch.empty(0)) for k, v in out.items()}
