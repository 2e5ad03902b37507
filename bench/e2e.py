"""python -m bench.e2e: checkpoint throughput per method, and MiniLM int8 end to end against torch.ao.

Part "throughput": a synthetic sharded float32 checkpoint (``--size`` GiB of
``--tensor-mib`` MiB tensors, made in a temporary directory) goes through
``compress_checkpoint`` in this process (after imports and kernel builds) for
int8 per channel, int4 group 128, fp8_e4m3fn per channel, bf16 and 50%
magnitude pruning, each with 1 and 2 workers, with the page cache warm and
cold (the shards evicted with ``posix_fadvise(DONTNEED)`` before each run).
Printed per run: GB/s of checkpoint processed against the file read speed
measured the same way (warm or cold) in the same run. Contenders alternate and
the best of ``--repeat`` runs is kept.

Part "minilm": ``python -m bench.quantize <MiniLM> --method int8 --out ...
--report ...`` (read, quantize, write, report) in a fresh process against
torch.ao: load the same model with sentence-transformers, ``quantize_dynamic``
with per-channel int8 weights, ``torch.save`` its state dict, in a fresh
process. Printed: wall times and their ratio, throughput, and the peak RSS of
each process against the checkpoint size and its largest tensor (and against a
bare ``python -c 'import torch, numpy'`` baseline).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .timing import benchmark_parser, Table, write_rows

AO_SCRIPT = r"""
import os, sys, warnings, torch
warnings.filterwarnings("ignore")
os.environ["HF_HUB_OFFLINE"] = "1"
from sentence_transformers import SentenceTransformer
m = SentenceTransformer(sys.argv[1], device="cpu")
q = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                                           dtype=torch.qint8)
torch.save(q.state_dict(), sys.argv[2])
"""

def measure(cmd: list[str], interval: float = 0.02) -> tuple[float, int, float]:
    """(wall seconds, peak RSS bytes, CPU seconds) of a command run in a fresh process, counting every
    process it starts (a Ray cluster's too): see :mod:`bench.proctree`, which runs it (a small
    process of its own, so the command's peak is not that of a large parent forking it)."""
    out = subprocess.run([sys.executable, "-m", "bench.proctree", str(interval), *cmd], capture_output=True, text=True)
    if out.returncode:
        lines = out.stderr.strip().splitlines()
        raise RuntimeError(f"{' '.join(cmd)} failed: {lines[-1] if lines else ''}")
    t, rss, cpu = out.stdout.split()
    return float(t), int(rss), float(cpu)


def read_speed(path: Path, repeat: int = 3) -> float:
    """GB/s of reading the file with large sequential reads (page cache warm, as for the runs)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 24):
                pass
        best = min(best, time.perf_counter() - t)
    return path.stat().st_size / best / 1e9


def write_speed(d: Path, mib: int = 256, repeat: int = 3) -> float:
    """GB/s of lowbit's durable output path: one ``mib`` MiB tensor through :class:`SafetensorsWriter`
    (direct I/O where the file system allows it), committed (fsynced and renamed): the pace at which
    any job's output can reach the disk here."""
    from lowbit.checkpoint import SafetensorsWriter

    a = np.ones(mib << 20, np.uint8)
    best = float("inf")
    for _ in range(repeat):
        out = d / "write-speed.safetensors"
        out.unlink(missing_ok=True)
        t = time.perf_counter()
        w = SafetensorsWriter(out)
        w.add("x", a)
        w.commit()
        best = min(best, time.perf_counter() - t)
    out.unlink(missing_ok=True)
    return a.nbytes / best / 1e9


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (they are clean: the file was written and synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def throughput_methods() -> dict[str, Any]:
    """The methods of the throughput table: label -> what ``compress_checkpoint`` takes."""
    from lowbit.checkpoint import Chain
    from quant import IntQuant, PerGroup, QuantSpec

    return {"int8 per channel": "int8",
            "int4 group 128": Chain(values=IntQuant(QuantSpec(bits=4, granularity=PerGroup(128)))),
            "fp8_e4m3fn per channel": "fp8_e4m3fn",
            "bf16": "bf16",
            "magnitude 50%": "prune"}


def run_throughput(size_gib: float, tensor_mib: int, workers: list[int], repeat: int, where: str | None,
                   only: list[str] | None = None) -> list[dict]:
    """One row per (cache state, method, workers): best GB/s of ``repeat`` alternating runs."""
    from lowbit.checkpoint import compress_checkpoint

    from .scale import make_checkpoint

    methods = {k: v for k, v in throughput_methods().items() if not only or k in only}
    table = Table([("cache", "cache", "<5"), ("method", "method", "<24"), ("workers", "workers", "7d"),
                   ("seconds", "s", "6.2f"), ("gbps", "GB/s", "6.3f"), ("read_gbps", "read GB/s", "9.2f"),
                   ("pct_of_read", "% of read", "9.1f")])
    rows = []
    d = Path(tempfile.mkdtemp(prefix="lowbit-e2e-", dir=where))
    try:
        idx, _ = make_checkpoint(d, size_gib, tensor_mib)
        shards = sorted(d.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in shards)
        out = d / "out" / "q.safetensors"
        out.parent.mkdir()
        for cache in ("warm", "cold"):
            def prepare() -> None:
                # the last run's output goes first, untimed: a job normally writes a new file, and
                # deleting a large one costs the file system time that is not the job's
                out.unlink(missing_ok=True)
                for f in shards:
                    evict(f) if cache == "cold" else read_speed(f, repeat=1)

            def read() -> float:
                prepare()
                t = time.perf_counter()
                for f in shards:
                    read_speed(f, repeat=1)
                return time.perf_counter() - t

            best: dict[tuple[str, int], float] = {}
            t_read = float("inf")
            for _ in range(max(1, repeat)):
                t_read = min(t_read, read())
                for label, method in methods.items():
                    for w in workers:
                        prepare()
                        t = time.perf_counter()
                        compress_checkpoint(idx, out, method, workers=w, progress=False, force=True)
                        best[label, w] = min(best.get((label, w), float("inf")), time.perf_counter() - t)
            read_gbps = size / t_read / 1e9
            for (label, w), t in best.items():
                rows.append(table.row(dict(part="throughput", cache=cache, method=label, workers=w, seconds=t,
                                           gbps=size / t / 1e9, read_gbps=read_gbps,
                                           pct_of_read=100 * size / t / 1e9 / read_gbps)))
        write_gbps = write_speed(d)
        rows.append(dict(part="write", program="SafetensorsWriter, 256 MiB, committed", gbps=write_gbps))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"durable write of the output (256 MiB through lowbit's writer, fsynced): {write_gbps:.2f} GB/s")
    print(f"checkpoint: {size / 2**30:.2f} GiB of float32 in {tensor_mib} MiB tensors; GB/s: checkpoint bytes over "
          "compress_checkpoint's time (read, compress, measure, write, fsync); read GB/s: reading the same shards")
    return rows


def run(repeat: int) -> list[dict]:
    """One row per program (wall seconds, bytes); prints the table and the ratios."""
    from lowbit.checkpoint import Checkpoint
    from bench.models import minilm_checkpoint, minilm_dir

    ck_path = minilm_checkpoint()
    ck = Checkpoint(ck_path)
    size = ck_path.stat().st_size
    largest = max(int(ck.read(n).nbytes) for n in ck.names())
    gbps_read = read_speed(ck_path)
    with tempfile.TemporaryDirectory() as d:
        ours_cmd = [sys.executable, "-m", "bench.quantize", str(ck_path), "--method", "int8", "--out",
                    f"{d}/q.safetensors", "--force", "--report", f"{d}/r.json", "--quiet"]
        ao_cmd = [sys.executable, "-c", AO_SCRIPT, str(minilm_dir()), f"{d}/ao.pt"]
        base_cmd = [sys.executable, "-c", "import torch, numpy, safetensors"]
        runs = {k: min((measure(c)[:2] for _ in range(repeat)), key=lambda r: r[0])
                for k, c in (("lowbit", ours_cmd), ("torch.ao", ao_cmd), ("baseline", base_cmd))}
        out_size = Path(f"{d}/q.safetensors").stat().st_size
        t_inproc = json.loads(Path(f"{d}/r.json").read_text())["meta"]["wall_time_s"]
        ao_size = Path(f"{d}/ao.pt").stat().st_size
    mb = 1 / 2**20
    print(f"MiniLM checkpoint {size * mb:.1f} MiB, largest tensor {largest * mb:.1f} MiB; "
          f"file read speed {gbps_read:.2f} GB/s (warm page cache)")
    table = Table([("program", "program", "<44"), ("wall_s", "wall s", "7.2f"), ("gbps", "GB/s", "6.3f"),
                   ("pct_of_read", "% of read", "9.1f"), ("peak_rss_mib", "peak RSS MiB", "12.1f"),
                   ("output_mib", "output MiB", "10.1f")])
    rows = []
    for key, name, osz in (("lowbit", "lowbit bench.quantize int8 per-channel", out_size),
                           ("torch.ao", "torch.ao quantize_dynamic per-channel + save", ao_size),
                           ("baseline", "python -c 'import torch, numpy' (baseline)", 0)):
        t, rss = runs[key]
        g = size / t / 1e9
        rows.append(table.row(dict(part="minilm", program=name, wall_s=t, gbps=g, pct_of_read=100 * g / gbps_read,
                                   peak_rss_mib=rss * mb, output_mib=osz * mb)))
    rows.append(dict(part="minilm", program="lowbit in-process (after imports)", wall_s=t_inproc, gbps=size / t_inproc / 1e9,
                     pct_of_read=100 * size / t_inproc / 1e9 / gbps_read))
    (t_ours, rss_ours), (t_ao, _), (_, rss_base) = runs["lowbit"], runs["torch.ao"], runs["baseline"]
    print(f"lowbit in-process (read + quantize + write + report, after imports): {t_inproc:.2f} s = "
          f"{rows[-1]['gbps']:.3f} GB/s, {rows[-1]['pct_of_read']:.1f}% of the file read speed")
    print(f"lowbit / torch.ao wall time: {t_ours / t_ao:.2f} (lower is faster: {t_ao / t_ours:.2f}x)")
    print(f"lowbit peak RSS above the import baseline: {(rss_ours - rss_base) * mb:.1f} MiB "
          f"= {(rss_ours - rss_base) / size:.2f}x the checkpoint, {(rss_ours - rss_base) / largest:.2f}x the largest tensor")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("python -m bench.e2e", __doc__)
    p.add_argument("--repeat", type=int, default=3, help="runs of each program, best kept (default 3)")
    p.add_argument("--parts", nargs="+", choices=("throughput", "minilm"), default=["throughput", "minilm"],
                   help="which parts to run (default both)")
    p.add_argument("--size", type=float, default=1.0, help="throughput: checkpoint size in GiB (default 1)")
    p.add_argument("--tensor-mib", type=int, default=64, help="throughput: size of each tensor (default 64 MiB)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="throughput: --workers values (default 1 2)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(throughput_methods()), metavar="METHOD",
                   help=f"throughput: these methods only (of: {', '.join(throughput_methods())})")
    p.add_argument("--dir", default=None, help="throughput: where to make the checkpoint (default: system temp)")
    a = p.parse_args(argv)
    if a.size <= 0 or a.tensor_mib < 1 or any(w < 1 for w in a.workers):
        p.error("--size must be positive, --tensor-mib and --workers at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    if "throughput" in a.parts:
        rows += run_throughput(a.size, a.tensor_mib, a.workers, a.repeat, a.dir, a.methods)
    if "minilm" in a.parts:
        rows += run(max(1, a.repeat))
    write_rows(rows, a.json, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
