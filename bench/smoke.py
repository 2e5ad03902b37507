"""python -m bench.smoke: a small job through every C kernel lowbit ships; prints each kernel and exits 1
if one is missing or did not load (a wheel that lost a source file, a machine without a C compiler).

It writes its files into a temporary directory and compresses a random checkpoint with a float cast,
int8 and int4 (RTN), NVFP4 blocks, magnitude pruning (alone and with int8), runs a W8A8 layer and int8 attention. A kernel
counts as used when the job itself loaded it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import lowbit  # noqa: F401  (imports every package, so every kernel library is declared)
from lowbit.checkpoint import SafetensorsWriter, compress_checkpoint, load
from precision._native import libraries
from quant import TOKEN_SPEC_FULL, PerChannel, QuantizedLinear, QuantSpec, calibrate, int8_attention, quantize


def run_job(d: Path) -> None:
    rng = np.random.default_rng(0)
    src = d / "model.safetensors"
    with SafetensorsWriter(src) as w:
        for i in range(2):
            w.add(f"layers.{i}.weight", rng.standard_normal((256, 512)).astype(np.float32))
        w.commit()
    for method in ("fp8_e4m3fn", "int8", "int4", "nvfp4", "prune", "prune,int8"):
        out = d / f"{method.replace(',', '_')}.safetensors"
        compress_checkpoint(src, out, method, progress=False)
        load(out, as_numpy=True)
    wt = torch.from_numpy(rng.standard_normal((64, 128)).astype(np.float32))
    spec = QuantSpec(granularity=PerChannel(0))
    qp = calibrate(wt.numpy(), spec)
    layer = QuantizedLinear(np.asarray(quantize(wt.numpy(), qp)), qp, None, "dynamic",
                            act_spec=TOKEN_SPEC_FULL)
    layer(torch.randn(4, 16, 128))
    q = torch.randn(2, 4, 16, 32)
    int8_attention(q, q, q)


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        run_job(Path(d))
    bad = 0
    for lib in libraries():
        why = "source missing" if not lib.source.is_file() else lib.reason or "not loaded by the job"
        state = "used" if lib.loaded else f"NOT USED ({why})"
        bad += not lib.loaded
        print(f"{lib.source.name:24s} {state}")
    print(f"{len(libraries()) - bad} of {len(libraries())} kernels used")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
