"""python -m bench.conformance: the installed peers against lowbit's exact reference (precision.testing).

For each library, version, function, format, input dtype and mode: how many inputs were checked and how
many disagree with the exact reference, with a few examples and the class of each (a tie, a value
double-rounded through float32, the tie at the largest finite value, a subnormal ...). Inputs: every
float16 bit pattern (float16 in), and for float32 and float64 the neighbourhood of every value, midpoint
and threshold of the format plus a fixed sample (``--sample``); float64 inputs also a hair either side of
each midpoint, where rounding through float32 first lands on the midpoint.

Peers checked where installed: ml_dtypes ``astype`` (every small float it ships), torch ``.to()``
(bfloat16, float16, the fp8 dtypes), torch's ``fake_quantize_per_tensor_affine`` and
``quantize_per_tensor`` (int8, against :func:`precision.testing.reference_quantize`), torchao's MX
reference ``to_mx`` (mxfp8 e4m3 and mxfp4, floor rule, against
:func:`precision.testing.reference_round_block`), and lowbit's own
``round_to`` as a control. Versions change behaviour (ml_dtypes 0.7 stopped double-rounding float64 to
fp8): every row names the version it ran on.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from typing import Any, Callable

import ml_dtypes
import numpy as np
import torch

from lowbit.checkpoint.hf import quiet_imports
from precision import get_format, round_to
from precision.testing import case_class, reference_quantize, reference_round, reference_round_block
from precision.testing.assertions import _inputs, _same
from quant import PerTensor, QParams, QuantSpec

from .timing import Table, benchmark_parser, write_rows

ML = {"bf16": ml_dtypes.bfloat16, "fp8_e4m3fn": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2,
      "fp8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "fp8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
      "fp8_e4m3b11fnuz": ml_dtypes.float8_e4m3b11fnuz, "fp8_e3m4": ml_dtypes.float8_e3m4,
      "fp8_e4m3": ml_dtypes.float8_e4m3, "fp6_e2m3fn": ml_dtypes.float6_e2m3fn, "fp6_e3m2fn": ml_dtypes.float6_e3m2fn,
      "fp4_e2m1fn": ml_dtypes.float4_e2m1fn}
TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3fn": torch.float8_e4m3fn,
         "fp8_e5m2": torch.float8_e5m2, "fp8_e4m3fnuz": torch.float8_e4m3fnuz, "fp8_e5m2fnuz": torch.float8_e5m2fnuz}


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def inputs(name: str, dtype: Any, sample: int) -> np.ndarray:
    """The inputs of one row (see the module docstring)."""
    fmt = get_format(name)
    dt = np.dtype(dtype)
    x, _ = _inputs(fmt, dt)
    if dt.itemsize > 2:
        x = np.concatenate([x[: x.size - 20_005], x[x.size - 20_005:][:sample], x[-5:]])
    if dt == np.float64:  # a hair either side of each midpoint: rounding through float32 lands on it
        vals = np.unique(np.abs(round_to(x[np.isfinite(x)], fmt, overflow="saturate")).astype(np.float64))
        mids = (vals[:-1] + vals[1:]) / 2
        hair = np.concatenate([mids * (1 + 2.0 ** -40), mids * (1 - 2.0 ** -40)])
        x = np.concatenate([x, hair, -hair])
    return x if fmt.has_nan else x[~np.isnan(x)]


def compare(fn: Callable[[np.ndarray], Any], x: np.ndarray, name: str, overflow: str, examples: int = 3) -> dict:
    """Inputs checked, disagreements with the reference, and a few examples with their class."""
    fmt = get_format(name)
    with np.errstate(all="ignore"):
        want = np.asarray(reference_round(x, fmt, overflow=overflow), np.float64)
        got = np.asarray(fn(x), np.float64).reshape(-1)
    bad = np.flatnonzero(~_same(want, got, fmt))
    x64 = x.astype(np.float64)
    classes: dict[str, int] = {}
    for i in bad:
        k = case_class(float(x64[i]), fmt)
        if k == "normal" and x.dtype == np.float64 and float(np.float32(x64[i])) != x64[i]:
            k = "double-rounded via float32"
        classes[k] = classes.get(k, 0) + 1
    ex = "; ".join(f"{float(x64[i])!r} -> {float(got[i])!r} (exact {float(want[i])!r})" for i in bad[:examples])
    return {"inputs": int(x.size), "disagree": int(bad.size),
            "classes": ", ".join(f"{k} {v}" for k, v in sorted(classes.items(), key=lambda kv: -kv[1])), "examples": ex}


def quantize_rows(sample: int) -> list[dict]:
    """torch's int8 per-tensor ops against reference_quantize, on values near every rounding threshold."""
    rng = np.random.default_rng(1)
    rows = []
    for scale, zp in ((0.0123, 0), (0.05, 3), (1 / 3, -7)):
        qp = QParams(np.array([scale], np.float32), np.array([zp], np.int32), QuantSpec(granularity=PerTensor()), (sample,))
        s32 = float(np.float32(scale))
        k = rng.integers(-140, 140, sample).astype(np.float64)
        x = (((k + 0.5) * s32).astype(np.float32).view(np.int32) + rng.integers(-2, 3, sample).astype(np.int32)).view(
            np.float32)  # a few ulps around every tie
        want = np.asarray(reference_quantize(x, qp), np.int64)
        t = torch.from_numpy(x)
        fq = torch.fake_quantize_per_tensor_affine(t, s32, zp, -128, 127).numpy()
        fq_codes = np.round(fq.astype(np.float64) / s32).astype(np.int64) + zp
        with warnings.catch_warnings():  # torch 2.13 deprecates its quantized tensors; still the reference users have
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_tensor(t, s32, zp, torch.qint8).int_repr().numpy().astype(np.int64)
        for fn_name, got in (("fake_quantize_per_tensor_affine", fq_codes), ("quantize_per_tensor", q)):
            bad = np.flatnonzero(got != want)
            rows.append({"library": "torch", "version": version("torch"), "function": fn_name,
                         "format": f"int8 scale {s32:.6g} zp {zp}", "input": "float32", "mode": "nearest_even",
                         "inputs": int(x.size), "disagree": int(bad.size),
                         "classes": "tie: the zero point added before rounding" if bad.size else "",
                         "examples": "; ".join(f"{float(x[i])!r} -> {got[i]} (exact {want[i]})" for i in bad[:3])})
    return rows


def torchao_rows(sample: int) -> list[dict]:
    """torchao's MX reference ``to_mx`` (floor rule, the OCP spec's) against reference_round_block, where
    torchao imports: blocks of 32 around every element value and tie, at many scales."""
    try:
        with warnings.catch_warnings(), quiet_imports():  # torchao's import-time noise on a CPU machine
            warnings.simplefilter("ignore")
            from torchao.prototype.mx_formats import kernels
            from torchao.prototype.mx_formats.config import ScaleCalculationMode
            from torchao.prototype.mx_formats.mx_tensor import to_mx
    except Exception:  # noqa: BLE001 - torchao's prototype modules move between releases
        return []
    rng = np.random.default_rng(2)
    rows = []
    for name, elem in (("mxfp8_e4m3", torch.float8_e4m3fn), ("mxfp4", torch.float4_e2m1fn_x2)):
        el = get_format("fp8_e4m3fn" if name == "mxfp8_e4m3" else "fp4_e2m1fn")
        vals = np.unique(np.abs(round_to(np.linspace(0, float(el.max_finite), 4000), el)))
        pts = np.concatenate([vals, (vals[:-1] + vals[1:]) / 2])
        n_blocks = max(8, sample // 32)
        x = rng.choice(pts, (n_blocks, 32)) * rng.choice([-1.0, 1.0], (n_blocks, 32))
        x[:, 0] = float(el.max_finite) * rng.choice([1.0, 1.5, 1.9], n_blocks)  # amax near a power of two
        x = (x * np.exp2(rng.integers(-20, 20, (n_blocks, 1)))).astype(np.float32)
        scale, data = to_mx(torch.from_numpy(x), elem, 32, ScaleCalculationMode.FLOOR)
        e = scale.view(torch.uint8).numpy().astype(np.int64).reshape(n_blocks, 1) - 127
        if name == "mxfp4":
            els = kernels.f4_unpacked_to_f32(kernels.unpack_uint4(data.view(torch.uint8))).numpy()
        else:
            els = data.to(torch.float32).numpy()
        got = els.reshape(x.shape).astype(np.float64) * np.exp2(e.astype(np.float64))
        want = np.asarray(reference_round_block(x, name), np.float64)
        bad = np.flatnonzero(~_same(want.reshape(-1), got.reshape(-1), get_format("fp32")))
        rows.append({"library": "torchao", "version": version("torchao"), "function": "to_mx (floor)", "format": name,
                     "input": "float32", "mode": "saturate", "inputs": int(x.size), "disagree": int(bad.size),
                     "classes": "E8M0 code 0 blocks (torchao divides by 2**-126)" if bad.size else "",
                     "examples": "; ".join(f"{float(x.reshape(-1)[i])!r} -> {float(got.reshape(-1)[i])!r} "
                                           f"(exact {float(want.reshape(-1)[i])!r})" for i in bad[:3])})
    return rows


def run(sample: int) -> list[dict]:
    table = Table([("library", "library", "<10"), ("version", "version", "<9"), ("function", "function", "<32"),
                   ("format", "format", "<16"), ("input", "input", "<8"), ("mode", "mode", "<9"),
                   ("inputs", "inputs", "8d"), ("disagree", "disagree", "8d"), ("classes", "classes", "<40")])
    rows: list[dict] = []

    def add(library: str, function: str, name: str, dtype: Any, overflow: str, fn: Callable) -> None:
        x = inputs(name, dtype, sample)
        r = {"library": library, "version": version(library),
             "function": function, "format": name, "input": np.dtype(dtype).name, "mode": overflow,
             **compare(fn, x, name, overflow)}
        rows.append(table.row(r))

    for name, dt in ML.items():
        for src in (np.float32, np.float64):
            add("ml_dtypes", "astype", name, src, "ieee", lambda x, dt=dt: x.astype(dt).astype(np.float64))
    for name, tdt in TORCH.items():
        for src in (np.float32, np.float64):
            for overflow in ("ieee", "saturate"):
                add("torch", ".to()", name, src, overflow,
                    lambda x, tdt=tdt: torch.from_numpy(x).to(tdt).double().numpy())
    for r in quantize_rows(sample):
        rows.append(table.row(r))
    for r in torchao_rows(sample):
        rows.append(table.row(r))
    for name in ("bf16", "fp8_e4m3fn", "fp4_e2m1fn"):
        add("lowbit", "round_to (control)", name, np.float64, "ieee", lambda x, n=name: round_to(x, n))
    print("disagree: inputs whose result differs from the exact reference (bit for bit; NaN equals NaN; the sign "
          "of zero counts where the format has -0)")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("python -m bench.conformance", __doc__)
    p.add_argument("--sample", type=int, default=20_000, help="random bit patterns per float32/float64 row "
                   "(default 20,000; the neighbourhoods of every value are always checked)")
    a = p.parse_args(argv)
    write_rows(run(a.sample), a.json, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
