"""python -m bench.blocks: MX and NVFP4 quantize throughput of lowbit against torchao's references.

For each MX preset and NVFP4, on the same float32 weight (4096 x 4096 by
default) in the same run: lowbit ``block_encode`` (scales and element codes)
and torchao's pure-torch CPU path, ``to_mx`` with the floor scale rule or
``nvfp4_quantize`` with a per-tensor scale from the tensor's amax, in G
elements/s, alternating the two, best of ``--repeat`` runs. Each row also
says whether the two gave the same scales and element values on that weight
(the E8M0 code 0 aside, where torchao divides by 2**-126 instead of 2**-127;
for NVFP4, elements where torchao's rounded reciprocal rounds them twice are
counted in ``elements_differ``).

``--parts accuracy`` puts the block formats side by side with lowbit's integer schemes on the bundled
MiniLM: every 2-D weight (the embeddings included) stored weight-only in each method, then the mean
sentence-embedding cosine to float32 over the project's sentences and the bytes stored, against float32.
"""

from __future__ import annotations

import numpy as np
import torch

from precision import decode
from precision.methods import Method
from precision.blocks import BLOCK_FORMATS, block_encode

from .timing import Table, benchmark_parser, best_times, write_rows

TORCHAO = {"mxfp8_e4m3": "float8_e4m3fn", "mxfp8_e5m2": "float8_e5m2", "mxfp6_e3m2": "fp6_e3m2",
           "mxfp6_e2m3": "fp6_e2m3", "mxfp4": "float4_e2m1fn_x2", "nvfp4": "nvfp4"}


def _torchao_values(name: str, scale: torch.Tensor, data: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    from torchao.prototype.mx_formats import kernels

    if name.startswith("mxfp8"):
        return data.to(torch.float32).numpy()
    if name in ("mxfp4", "nvfp4"):
        return kernels.f4_unpacked_to_f32(kernels.unpack_uint4(data.view(torch.uint8))).reshape(shape).numpy()
    f = kernels.f6_e2m3_unpacked_to_f32 if name == "mxfp6_e2m3" else kernels.f6_e3m2_unpacked_to_f32
    return f(data).reshape(shape).numpy()


def run(rows: int, cols: int, repeat: int, formats: list[str]) -> list[dict]:
    """One row per format: G elements/s of both, their ratio, and whether they agree."""
    try:
        from torchao.prototype.mx_formats import nvfp4_tensor as nv
        from torchao.prototype.mx_formats.mx_tensor import to_mx
    except ImportError:
        raise SystemExit("bench.blocks needs torchao (pip install 'lowbit[test]')") from None
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    n = x.numel()
    table = Table([("format", "format", "<11"), ("lowbit_gels", "lowbit", "8.3f"), ("torchao_gels", "torchao", "8.3f"),
                   ("speedup", "speedup", "8.2f"), ("scales_identical", "scales", ">6"),
                   ("elements_differ", "elements differ", "15d")])
    out = []
    for name in formats:
        fmt = BLOCK_FORMATS[name]
        if name == "nvfp4":
            def ref() -> tuple:
                return nv.nvfp4_quantize(x, 16, nv.per_tensor_amax_to_scale(x.abs().max()))
        else:
            dt = TORCHAO[name]
            elem = getattr(torch, dt) if hasattr(torch, dt) else dt

            def ref() -> tuple:
                return to_mx(x, elem, 32)
        t = best_times({"lowbit": lambda: block_encode(xn, name), "torchao": ref}, repeat)
        ours = block_encode(xn, name)
        scale, data = ref()
        ref_scales = scale.view(torch.uint8).numpy().reshape(ours.scales.shape)
        ref_vals = _torchao_values(name, scale, data, tuple(x.shape))
        ok = (ours.scales != 0).repeat(fmt.block, axis=-1)  # E8M0 code 0: torchao's 2**-126 (module docstring)
        g = {k: n / v / 1e9 for k, v in t.items()}
        out.append(table.row(dict(
            format=name, lowbit_gels=g["lowbit"], torchao_gels=g["torchao"], speedup=g["lowbit"] / g["torchao"],
            scales_identical="yes" if np.array_equal(ours.scales, ref_scales) else "NO",
            elements_differ=int(np.count_nonzero(decode(ours.codes, fmt.element_format)[ok] != ref_vals[ok])))))
    print(f"{rows}x{cols} float32; G elements/s, best of {repeat}, measured alternately; torch threads "
          f"{torch.get_num_threads()}")
    return out


ACCURACY = {"int8 per channel": "int8", "int4 g128 symmetric": "int4:g128", "int4 g128 affine": "int4:g128:affine",
            "Q8_0": "q8_0", "MXFP8 e4m3": "mxfp8_e4m3", "MXFP6 e2m3": "mxfp6_e2m3", "MXFP6 e3m2": "mxfp6_e3m2",
            "NVFP4": "nvfp4", "MXFP4": "mxfp4", "Q4_0": "q4_0"}


def _method(spec: str) -> "str | Method":
    from quant import PerGroup, QuantSpec
    from quant.storage import IntQuant

    if spec.startswith("int4:"):
        return IntQuant(QuantSpec(bits=4, symmetric=not spec.endswith("affine"), granularity=PerGroup(128)))
    return spec


def run_accuracy() -> list[dict]:
    """One row per method on MiniLM: mean and minimum sentence-embedding cosine to float32, and the bytes
    of the 2-D weights as stored (float32: their dense bytes)."""
    from lowbit import compress_checkpoint

    from .models import minilm_checkpoint, sentences
    from .quantize import evaluate, load_eval_model

    table = Table([("method", "method", "<20"), ("bits_per_weight", "bits/weight", "11.3f"),
                   ("stored_mib", "stored MiB", "10.2f"), ("mean_cosine", "cosine", "8.5f"),
                   ("min_cosine", "min cosine", "10.5f")])
    out = []
    for label, spec in ACCURACY.items():
        approx: dict = {}
        rep = compress_checkpoint(minilm_checkpoint(), None, _method(spec), collect=approx, progress=False, metrics=False)
        res = evaluate(load_eval_model(None), approx, sentences())
        weights = sum(r.bytes_before for r in rep.tensors) / 4
        stored = sum(r.bytes_after for r in rep.tensors)
        out.append(table.row(dict(part="accuracy", method=label, bits_per_weight=stored * 8 / weights,
                                  stored_mib=stored / 2**20, mean_cosine=res["eval_mean_cosine"],
                                  min_cosine=res["eval_min_cosine"])))
    print("MiniLM: every 2-D float weight stored weight-only (float32: "
          f"{sum(r.bytes_before for r in rep.tensors) / 2**20:.2f} MiB); cosine over the project's sentences")
    return out


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("python -m bench.blocks", __doc__)
    p.add_argument("--parts", nargs="+", choices=("speed", "accuracy"), default=["speed", "accuracy"])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096, help="a multiple of 32 (default 4096)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per contender, best kept (default 5)")
    p.add_argument("--formats", nargs="+", default=list(TORCHAO), choices=list(TORCHAO))
    a = p.parse_args(argv)
    if a.rows < 1 or a.cols < 32 or a.cols % 32:
        p.error("--rows must be positive and --cols a positive multiple of 32")
    rows = [dict(part="speed", **r) for r in run(a.rows, a.cols, max(1, a.repeat), a.formats)] if "speed" in a.parts else []
    if "accuracy" in a.parts:
        rows += run_accuracy()
    write_rows(rows, a.json, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
