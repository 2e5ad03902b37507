"""python -m bench.llm: decoder-LLM accuracy of lowbit's methods on the bundled SmolLM2-135M-Instruct.

Each row is one ``python -m bench.quantize`` job on the model (its blocks' Linear layers; the tied
embedding/head kept), run in a fresh process: perplexity of the compressed and the float model, KL
divergence of the next-token distributions and top-1 agreement on the project's held-out text
(``bench/data/heldout.txt``, 512-token windows), the stored bytes of the compressed tensors, the job's
wall time and the process's peak RSS. Calibration (GPTQ, AWQ, SparseGPT, Wanda): the project's
calibration sentences (``bench/data/sentences.txt``, no source shared with the held-out text) packed
into sequences of ``--seqlen`` tokens.

Groups are of 64: SmolLM2's 576 input features are 4.5 groups of 128 (lowbit does not yet store a
ragged last group). Asymmetric int4 in groups of 32 along the rows reproduces the model's own Q4_1
weights exactly, so that scheme is never a row.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .models import heldout_path
from .timing import Table, benchmark_parser, write_rows

W4 = ["--method", "int4", "--granularity", "group", "--group-size", "64"]
ROWS: dict[str, list[str]] = {
    "W8 per-channel RTN": ["--method", "int8"],
    "W4 g64 sym RTN": W4,
    "W4 g64 sym GPTQ": [*W4, "--gptq"],
    "W4 g64 affine RTN": [*W4, "--affine"],
    "W4 g64 affine GPTQ": [*W4, "--affine", "--gptq"],
    "W4 g64 affine AWQ": [*W4, "--affine", "--awq"],
    "fp8 e4m3 per-channel": ["--method", "fp8_e4m3fn"],
    "SparseGPT 50%": ["--method", "prune", "--prune", "sparsegpt"],
    "Wanda 50%": ["--method", "prune", "--prune", "wanda"],
}
CALIBRATED = ("--gptq", "--awq", "sparsegpt", "wanda")

_CHILD = """
import sys
from bench.quantize import main
rc = main(sys.argv[1:])
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
print("LOWBIT_PEAK_KIB", hwm[0].split()[1] if hwm else -1)
sys.exit(rc)
"""


def run_row(model: str, args: list[str], seqlen: int, samples: int, eval_data: Path) -> dict:
    """One job in a fresh process: the report's measures, its bytes, wall time and peak RSS."""
    with tempfile.TemporaryDirectory() as d:
        rep = Path(d) / "r.json"
        cal = ["--calibration-data", str(Path(__file__).with_name("data") / "sentences.txt"), "--calibration-seqlen",
               str(seqlen), "--calibration-samples", str(samples)] if any(c in args for c in CALIBRATED) else []
        cmd = [sys.executable, "-c", _CHILD, model, *args, *cal, "--eval", "--eval-data", str(eval_data),
               "--report", str(rep), "--quiet", "--rows", "0"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        data = json.loads(rep.read_text())
        peak = [ln for ln in r.stdout.splitlines() if ln.startswith("LOWBIT_PEAK_KIB")]
    m, t = data["meta"], data["totals"]
    return {"perplexity": m["eval_perplexity"], "float_perplexity": m["eval_reference_perplexity"],
            "kl": m["eval_kl_divergence"], "top1": m["eval_top1_agreement"],
            "stored_mib": t["bytes_after"] / 2**20, "float_mib": t["bytes_before"] / 2**20,
            "calibration_tokens": m.get("calibration_tokens"), "time_s": m["wall_time_s"] - m.get("time_eval_s", 0.0),
            "peak_rss_mib": int(peak[0].split()[1]) / 1024 if peak else None}


def run(model: str, rows: list[str], seqlen: int, samples: int, eval_data: Path) -> list[dict]:
    table = Table([("method", "method", "<22"), ("perplexity", "ppl", "8.3f"), ("float_perplexity", "float ppl", "9.3f"),
                   ("kl", "KL", "8.4f"), ("top1", "top-1", "7.4f"), ("stored_mib", "stored MiB", "10.2f"),
                   ("time_s", "time s", "7.1f"), ("peak_rss_mib", "peak MiB", "8.0f")])
    out = []
    for name in rows:
        out.append(table.row({"method": name, **run_row(model, ROWS[name], seqlen, samples, eval_data)}))
    print("ppl: perplexity on the held-out text (float ppl: the float model's); KL: mean KL divergence of the "
          "next-token distributions from the float model's, nats; top-1: agreement of the most likely next token; "
          "stored MiB: the compressed tensors as stored (float32 before); time s: the job without its evaluation")
    return out


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("python -m bench.llm", __doc__)
    p.add_argument("--model", default="smollm2", help="a causal LM directory or bundled name (default smollm2)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seqlen", type=int, default=256, help="calibration sequence length in tokens (default 256)")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--eval-data", default=str(heldout_path()), help="held-out text (default: the project's)")
    a = p.parse_args(argv)
    write_rows(run(a.model, a.rows, a.seqlen, a.samples, Path(a.eval_data)), a.json, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
