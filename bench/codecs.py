"""python -m bench.codecs: encode/decode throughput of lowbit against ml_dtypes and torch.

For each of fp16, bf16, fp8_e4m3fn and fp8_e5m2, on the same float32 array
(16M elements by default) in the same run: lowbit ``encode``/``decode``,
ml_dtypes ``astype`` (numpy's own float16 for fp16) and torch ``.to()``, in
G elements/s, with the ratios lowbit/ml_dtypes and lowbit/torch, and the
machine's memory-copy bandwidth as the limit (bytes read + written).
"""

from __future__ import annotations

import time

import ml_dtypes
import numpy as np
import torch

from precision import decode, encode, get_format

from .timing import benchmark_parser, best_time, best_times, write_rows

PEERS = {"fp16": (np.float16, torch.float16), "bf16": (ml_dtypes.bfloat16, torch.bfloat16),
         "fp8_e4m3fn": (ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn),
         "fp8_e5m2": (ml_dtypes.float8_e5m2, torch.float8_e5m2)}


def memcpy_gbps(x: np.ndarray, repeat: int) -> float:
    dst = np.empty_like(x)
    t = best_time(lambda: np.copyto(dst, x), repeat)
    return 2 * x.nbytes / t / 1e9


def run(n: int, repeat: int, formats: list[str]) -> list[dict]:
    x = (np.random.default_rng(0).standard_normal(n) * 3).astype(np.float32)
    xt = torch.from_numpy(x)
    bw = memcpy_gbps(x, repeat)
    print(f"{n / 1e6:.0f}M float32 elements; memory copy {bw:.1f} GB/s (read + write); torch threads {torch.get_num_threads()}")
    head = f"{'format':<11} {'op':<6} {'lowbit':>8} {'ml_dtypes':>9} {'torch':>8} {'/ml_dtypes':>10} {'/torch':>7} {'% of copy':>9}"
    print(head + "\n" + "-" * len(head))
    rows = []
    for name in formats:
        fmt = get_format(name)
        md_t, th_t = PEERS[name]
        codes = encode(x, fmt, overflow="saturate" if name == "fp8_e4m3fn" else "ieee")
        y_md = x.astype(md_t)
        y_th = xt.to(th_t)
        # lowbit and ml_dtypes round-robin; torch on its own afterwards, because its OpenMP workers
        # spin on both cores for a while after each call and would slow whatever runs next
        enc = best_times({"lowbit": lambda: encode(x, fmt), "ml_dtypes": lambda: x.astype(md_t)}, repeat)
        dec = best_times({"lowbit": lambda: decode(codes, fmt), "ml_dtypes": lambda: y_md.astype(np.float32)},
                         repeat)
        enc["torch"] = best_time(lambda: xt.to(th_t), repeat)
        dec["torch"] = best_time(lambda: y_th.to(torch.float32), repeat)
        time.sleep(0.5)  # let torch's workers go idle before the next format
        moved = n * (4 + fmt.storage_dtype.itemsize)
        for op, t in (("encode", enc), ("decode", dec)):
            g = {k: n / v / 1e9 for k, v in t.items()}
            row = dict(format=name, op=op, **{k + "_gels": v for k, v in g.items()},
                       ratio_ml_dtypes=g["lowbit"] / g["ml_dtypes"], ratio_torch=g["lowbit"] / g["torch"],
                       pct_copy=100 * moved / t["lowbit"] / 1e9 / bw)
            rows.append(row)
            print(f"{name:<11} {op:<6} {g['lowbit']:8.3f} {g['ml_dtypes']:9.3f} {g['torch']:8.3f} "
                  f"{row['ratio_ml_dtypes']:10.2f} {row['ratio_torch']:7.2f} {row['pct_copy']:8.0f}%")
    print("G elements/s, best of runs measured round-robin; '% of copy': lowbit's bytes moved per second over the memory-copy rate")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("python -m bench.codecs", __doc__)
    p.add_argument("--n", type=int, default=1 << 24, help="elements (default 16M)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per measurement, best kept (default 5)")
    p.add_argument("--formats", nargs="+", default=list(PEERS), choices=list(PEERS))
    a = p.parse_args(argv)
    write_rows(run(a.n, a.repeat, a.formats), a.json, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
