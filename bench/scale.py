"""python -m bench.scale: bench.quantize on synthetic sharded checkpoints of any size, in bounded memory.

For each size (GiB) a sharded safetensors checkpoint of float32 tensors is made
in a temporary directory (removed afterwards; nothing is committed), then
``python -m bench.quantize <index> --method int8 --out ...`` runs in a fresh
process. Printed per run: wall time, throughput of checkpoint processed in
GB/s against the file read speed measured on the same shards in the same run,
peak RSS, and the bound ``2 x largest tensor + 600 MB`` it must stay under.

With ``--executors local ray`` each size also runs with ``--executor ray`` (a
local Ray cluster of ``--ray-cpus`` CPUs started by the job). Ray rows add the
whole process tree's peak RSS and CPU seconds (Ray's processes included) and
the overhead per tensor against the local run with as many workers as Ray has
CPUs (in-process times, cluster start-up excluded; start-up is in the wall time).
The memory bound applies to local runs (Ray's own processes are not tensors).

Examples:
  python -m bench.scale                      # 4 GiB, 1 worker
  python -m bench.scale --sizes 1 4 8 --workers 1 2
  python -m bench.scale --sizes 1 --workers 1 2 --executors local ray
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lowbit.checkpoint import SafetensorsWriter
from .e2e import measure, read_speed
from .timing import benchmark_parser, Table, write_rows

COLS = 4096


def make_checkpoint(d: Path, gib: float, tensor_mib: int, shard_gib: float = 1.0) -> tuple[Path, int]:
    """Write a sharded checkpoint of about ``gib`` GiB; return (index path, largest tensor bytes)."""
    rows = max(1, tensor_mib * 2**20 // (4 * COLS))
    per = rows * COLS * 4
    n = max(1, int(gib * 2**30 // per))
    per_shard = max(1, int(shard_gib * 2**30 // per))
    base = np.random.default_rng(0).standard_normal((rows, COLS)).astype(np.float32)
    weight_map: dict[str, str] = {}
    shards = -(-n // per_shard)
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        with SafetensorsWriter(d / fname) as w:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                name = f"layers.{i}.weight"
                w.add(name, base * np.float32(1 + 0.001 * i))
                w.add(f"layers.{i}.bias", base[0, :64].copy())
                weight_map[name] = weight_map[f"layers.{i}.bias"] = fname
            w.commit()
    idx = d / "model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return idx, per


def run(sizes: list[float], workers: list[int], tensor_mib: int, where: str | None,
        executors: tuple[str, ...] = ("local",), ray_cpus: int = 2) -> list[dict]:
    """One row per (size, executor, workers); prints the table as it goes."""
    table = Table([("size_gib", "size GiB", "8.2f"), ("executor", "executor", "<8"), ("workers", "workers", "7d"),
                   ("wall_s", "wall s", "7.1f"), ("cpu_s", "CPU s", "6.1f"), ("gbps", "GB/s", "6.3f"),
                   ("read_gbps", "read GB/s", "9.2f"), ("pct_of_read", "% of read", "9.1f"),
                   ("peak_rss_mib", "peak RSS MiB", "12.0f"), ("bound_mib", "bound MiB", "9.0f"),
                   ("within_bound", "within", ">6"), ("overhead_ms_per_tensor", "ms/tensor", "9.1f")])
    rows = []
    for gib in sizes:
        d = Path(tempfile.mkdtemp(prefix="lowbit-scale-", dir=where))
        try:
            idx, largest = make_checkpoint(d, gib, tensor_mib)
            shards = sorted(d.glob("*.safetensors"))
            size = sum(s.stat().st_size for s in shards)
            tensors = len(json.loads(idx.read_text())["weight_map"])  # every tensor is one task
            for s in shards:  # lowbit wrote them with direct I/O: into the page cache first, as for the runs
                read_speed(s, repeat=1)
            t0 = time.perf_counter()
            for s in shards:
                read_speed(s, repeat=1)
            read_gbps = size / (time.perf_counter() - t0) / 1e9
            local_in: dict[int, float] = {}
            runs = [("local", w) for w in workers] * ("local" in executors) + [("ray", ray_cpus)] * ("ray" in executors)
            for executor, w in runs:
                out, rep = d / "q.safetensors", d / "r.json"
                cmd = [sys.executable, "-m", "bench.quantize", str(idx), "--method", "int8", "--out", str(out),
                       "--force", "--report", str(rep), "--quiet"]
                cmd += ["--workers", str(w)] if executor == "local" else ["--executor", "ray", "--threads", str(w)]
                wall, rss, cpu = measure(cmd)
                t_in = json.loads(rep.read_text())["meta"]["wall_time_s"]
                if executor == "local":
                    local_in[w] = t_in
                base = local_in.get(w, next(iter(local_in.values()), None))
                bound = 2 * largest + 600 * 2**20
                gbps = size / t_in / 1e9
                rows.append(table.row(dict(
                    size_gib=size / 2**30, executor=executor, workers=w, wall_s=wall, cpu_s=cpu, gbps=gbps,
                    read_gbps=read_gbps, pct_of_read=100 * gbps / read_gbps, peak_rss_mib=rss / 2**20,
                    bound_mib=bound / 2**20 if executor == "local" else None,
                    within_bound=("yes" if rss < bound else "NO") if executor == "local" else None,
                    overhead_ms_per_tensor=1e3 * (t_in - base) / tensors if executor == "ray" and base else None)))
                out.unlink(missing_ok=True)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    print("GB/s: checkpoint bytes over bench.quantize's own processing time (after imports and, for Ray, after the "
          "cluster started); read GB/s: reading the same shards once more after a first read (page cache warm); "
          "peak RSS and CPU s: the whole process tree, sampled")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("python -m bench.scale", __doc__)
    p.add_argument("--sizes", type=float, nargs="+", default=[4.0], help="checkpoint sizes in GiB (default 4)")
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="--workers values to run (default 1)")
    p.add_argument("--tensor-mib", type=int, default=64, help="size of each weight tensor (default 64 MiB)")
    p.add_argument("--dir", default=None, help="where to make the temporary checkpoints (default: system temp)")
    p.add_argument("--executors", nargs="+", choices=("local", "ray"), default=["local"],
                   help="run locally (--workers values) and/or on a local Ray cluster (default local)")
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    a = p.parse_args(argv)
    if any(s <= 0 for s in a.sizes) or a.tensor_mib < 1 or any(w < 1 for w in a.workers) or a.ray_cpus < 1:
        p.error("--sizes must be positive, --tensor-mib, --workers and --ray-cpus at least 1")
    write_rows(run(a.sizes, a.workers, a.tensor_mib, a.dir, tuple(a.executors), a.ray_cpus), a.json, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
