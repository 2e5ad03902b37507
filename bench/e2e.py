"""python -m bench.e2e: MiniLM int8 per-channel end to end, against torch.ao quantize_dynamic.

lowbit: ``python -m bench.quantize <MiniLM> --method int8 --out ... --report ...``
(read, quantize, write, report) in a fresh process. torch.ao: load the same
model with sentence-transformers, ``quantize_dynamic`` with per-channel int8
weights, ``torch.save`` its state dict, in a fresh process. Prints wall times
and their ratio, throughput of checkpoint processed in GB/s against the
machine's file read speed (measured on the same file in the same run), and
the peak RSS of each process against the checkpoint size and its largest
tensor (and against a bare ``python -c 'import torch, numpy'`` baseline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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

RSS_SCRIPT = r"""
import resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
dt = time.perf_counter() - t
if r.returncode:
    sys.stderr.write(r.stderr.decode()); sys.exit(r.returncode)
print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def measure(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command run in a fresh process."""
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, *cmd], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip().splitlines()[-1] if out.stderr else ''}")
    t, rss = out.stdout.split()
    return float(t), int(rss)


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
        runs = {k: min((measure(c) for _ in range(repeat)), key=lambda r: r[0])
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
        rows.append(table.row(dict(program=name, wall_s=t, gbps=g, pct_of_read=100 * g / gbps_read,
                                   peak_rss_mib=rss * mb, output_mib=osz * mb)))
    rows.append(dict(program="lowbit in-process (after imports)", wall_s=t_inproc, gbps=size / t_inproc / 1e9,
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
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    write_rows(run(max(1, a.repeat)), a.json, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
