"""python -m bench.quantize: compress a checkpoint, write what is really stored, report error and bytes.

With no arguments it quantizes the bundled all-MiniLM-L6-v2 checkpoint to int8
(per output channel, symmetric, minmax) and prints the report.

Examples:
  python -m bench.quantize
  python -m bench.quantize model.safetensors --method int8 --out q.safetensors --report r.json
  python -m bench.quantize ckpt_dir --method int4 --granularity group --group-size 128 --calibration mse
  python -m bench.quantize --method fp8_e4m3fn --scaling channel --overflow saturate
  python -m bench.quantize --method prune,int8 --prune magnitude --sparsity 0.5 --out pruned_int8.safetensors
  python -m bench.quantize --method svd --rank-ratio 0.5 --eval

Exit codes: 0 success, 2 usage error, 1 any other failure (one line naming the file or tensor).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from precision._bridge import contiguous

from precision import OVERFLOW_MODES, ROUNDING_MODES, get_format, known_formats
from precision.report import KeptTensor, Report

from .checkpoint import Checkpoint, CheckpointError, SafetensorsWriter
from .methods import NotApplied, Step, compress_tensor, int_step, validate_chain

FLOAT_METHODS = ("fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")
PROG = "python -m bench.quantize"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"{PROG}: usage error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a .safetensors file, a shard index (*.safetensors.index.json), "
                   "a model directory, or a PyTorch .pt/.pth/.bin state dict (read with weights_only=True). "
                   "Default: the bundled all-MiniLM-L6-v2 checkpoint.")
    p.add_argument("--method", default="int8", help="a method or a comma-separated chain, structure first: "
                   f"{', '.join(FLOAT_METHODS)} (or any precision format name), int8/int4/intN, prune, svd. "
                   "Example: prune,int8. Default: int8")
    g = p.add_argument_group("float formats")
    g.add_argument("--scaling", choices=("none", "tensor", "channel"), default=None,
                   help="scale so absmax maps to max_finite (stored as float32). Default: none for fp16/bf16, "
                   "channel for 8-bit and smaller formats")
    g.add_argument("--rounding", choices=[r for r in ROUNDING_MODES], default="nearest_even")
    g.add_argument("--overflow", choices=list(OVERFLOW_MODES), default="ieee")
    g.add_argument("--seed", type=int, default=None, help="seed for --rounding stochastic")
    g = p.add_argument_group("integer quantization")
    g.add_argument("--granularity", choices=("tensor", "channel", "group"), default="channel",
                   help="one scale per tensor, per output channel (row), or per group along the input axis")
    g.add_argument("--group-size", type=int, default=128, help="elements per group for --granularity group")
    g.add_argument("--affine", action="store_true", help="affine (zero point) instead of symmetric")
    g.add_argument("--narrow-range", action="store_true", help="drop the most negative code, e.g. [-127, 127]")
    g.add_argument("--calibration", choices=("minmax", "percentile", "mse"), default="minmax")
    g.add_argument("--percentile", type=float, default=99.99, help="for --calibration percentile")
    g = p.add_argument_group("pruning")
    g.add_argument("--prune", default="magnitude", help="magnitude, structured, or N:M such as 2:4")
    g.add_argument("--sparsity", type=float, default=0.5, help="fraction pruned, in [0, 1] (default 0.5)")
    g.add_argument("--norm", type=int, choices=(1, 2), default=2, help="row norm for structured pruning")
    g = p.add_argument_group("low rank (svd)")
    g.add_argument("--rank-ratio", type=float, default=None, help="fraction of parameters kept (default 0.5)")
    g.add_argument("--energy", type=float, default=None, help="fraction of squared singular-value energy kept")
    g.add_argument("--svd-method", choices=("exact", "randomized"), default="exact")
    g.add_argument("--force-svd", action="store_true", help="factor even where it saves no memory")
    g = p.add_argument_group("selection and output")
    g.add_argument("--include", help="regex: compress only matching tensor names")
    g.add_argument("--exclude", help="regex: never compress matching tensor names")
    g.add_argument("--min-ndim", type=int, default=2, help="compress float tensors with at least this many dims")
    g.add_argument("--out", help="write the compressed checkpoint (safetensors) here")
    g.add_argument("--force", action="store_true", help="replace an existing --out file")
    g.add_argument("--report", action="append", default=[], metavar="FILE",
                   help="write the report as JSON (.json) or Markdown (.md); may repeat")
    g.add_argument("--eval", action="store_true", help="sentence-embedding cosine of the compressed model against "
                   "the original on the project's sentence set (MiniLM or a sentence-transformers directory)")
    g.add_argument("--workers", type=int, default=1, help="compress this many tensors in parallel threads "
                   "(output order and bytes are the same; default 1)")
    g.add_argument("--rows", type=int, default=40, help="tensor rows shown on the terminal (default 40)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_chain(a: argparse.Namespace) -> list[Step]:
    chain = []
    for m in [t.strip() for t in a.method.split(",") if t.strip()]:
        if m in known_formats() or m in FLOAT_METHODS:
            small = get_format(m).bits <= 8
            scaling = a.scaling or ("channel" if small else "none")
            o = {"format": m, "scaling": scaling, "rounding": a.rounding, "overflow": a.overflow}
            if a.rounding == "stochastic":
                if a.seed is None:
                    raise UsageError("--rounding stochastic needs --seed")
                o["seed"] = a.seed
            chain.append(Step("float", o))
        elif re.fullmatch(r"int([2-8])", m):
            bits = int(m[3:])
            try:
                chain.append(int_step(bits, a.granularity, a.group_size, a.affine, a.narrow_range, a.calibration,
                                      a.percentile if a.calibration == "percentile" else None))
            except (ValueError, TypeError) as e:
                raise UsageError(str(e)) from None
        elif m == "prune":
            if not 0 <= a.sparsity <= 1:
                raise UsageError(f"--sparsity must be in [0, 1], got {a.sparsity}")
            nm = re.fullmatch(r"(\d+):(\d+)", a.prune)
            if nm:
                n, mm = int(nm.group(1)), int(nm.group(2))
                if not 0 <= n <= mm or mm < 1:
                    raise UsageError(f"--prune {a.prune}: N:M needs 0 <= N <= M")
                chain.append(Step("prune", {"how": "nm", "n": n, "m": mm}))
            elif a.prune in ("magnitude", "structured"):
                chain.append(Step("prune", {"how": a.prune, "sparsity": a.sparsity, "norm": a.norm, "axis": 0}))
            else:
                raise UsageError(f"--prune must be magnitude, structured or N:M (e.g. 2:4), got {a.prune!r}")
        elif m == "svd":
            if a.rank_ratio is not None and a.energy is not None:
                raise UsageError("give --rank-ratio or --energy, not both")
            o = {"method": a.svd_method, "force": a.force_svd}
            if a.energy is not None:
                o["energy"] = a.energy
            else:
                o["ratio"] = 0.5 if a.rank_ratio is None else a.rank_ratio
            for k in ("ratio", "energy"):
                if k in o and not 0 <= o[k] <= 1:
                    raise UsageError(f"--{'rank-ratio' if k == 'ratio' else k} must be in [0, 1], got {o[k]}")
            chain.append(Step("svd", o))
        else:
            raise UsageError(f"unknown method {m!r}; use {', '.join(FLOAT_METHODS)}, int8 (int2..int8), prune, svd "
                             "or a chain such as prune,int8")
    if not chain:
        raise UsageError("--method is empty")
    try:
        validate_chain(chain)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return chain


def _progress(total: int, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="tensor", file=sys.stderr, leave=False)


def _process(ckpt: Checkpoint, name: str, chain: list[Step], a: argparse.Namespace, path: Path):
    """Read one tensor and compress it if selected: (array, Compressed or None, reason kept)."""
    arr = ckpt.read(name)
    selected = (arr.dtype.kind == "f" or arr.dtype.name == "bfloat16") and arr.ndim >= a.min_ndim \
        and arr.size > 0 and (a.include is None or re.search(a.include, name)) \
        and not (a.exclude and re.search(a.exclude, name))
    if selected:
        if not np.isfinite(arr.astype(np.float32, copy=False)).all():
            # nothing is lost: a tensor that cannot be quantized is carried through bit-exact and reported
            return arr, None, "holds NaN or inf (kept as is)"
        try:
            return arr, compress_tensor(name, arr, chain, keep_approx=a.eval), None
        except NotApplied as e:
            return arr, None, str(e)
        except ValueError as e:
            raise CheckpointError(f"{path}: tensor {name!r}: {e}") from None
    if arr.dtype.kind not in "fV":
        reason = "not floating point"
    elif arr.dtype.kind == "V" and arr.dtype.name != "bfloat16":
        reason = f"already {arr.dtype.name}"
    else:
        reason = f"{arr.ndim}-D" if arr.ndim < a.min_ndim else "empty" if arr.size == 0 else "excluded"
    return arr, None, reason


def run(a: argparse.Namespace) -> Report:
    """Carry out one CLI invocation (parsed arguments) and return the report."""
    for pat in (a.include, a.exclude):
        if pat:
            try:
                re.compile(pat)
            except re.error as e:
                raise UsageError(f"bad regular expression {pat!r}: {e}") from None
    chain = parse_chain(a)
    if a.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {a.workers}")
    if a.checkpoint is None:
        from .models import minilm_checkpoint

        path = minilm_checkpoint()
    else:
        path = Path(a.checkpoint)
    t0 = time.perf_counter()
    ckpt = Checkpoint(path)
    writer = SafetensorsWriter(a.out, force=a.force, inputs=ckpt.files) if a.out else None
    report = Report(title=f"{path} -> {' + '.join(s.describe() for s in chain)}")
    schemes: dict[str, Any] = {}
    approx: dict[str, np.ndarray] = {}
    bar = _progress(len(ckpt.names()), a.quiet)

    def handle(name: str, arr: np.ndarray, c: Any, reason: str | None) -> None:
        if c is not None:
            report.add(c.row)
            schemes[name] = c.scheme
            if writer:
                for part, v in c.parts.items():
                    writer.add(f"{name}::{part}", v)
            if a.eval:
                approx[name] = c.approx
        else:
            report.kept.append(KeptTensor(name, tuple(arr.shape), str(arr.dtype), int(arr.nbytes), reason))
            if writer:
                writer.add(name, arr)
        if bar:
            bar.update(1)

    try:
        names = ckpt.names()
        if a.workers == 1:
            for name in names:
                handle(name, *_process(ckpt, name, chain, a, path))
        else:
            # tensors are compressed on a.workers threads (numpy releases the GIL) and written in order;
            # at most workers + 1 tensors are in flight, so memory stays bounded by the largest ones
            with ThreadPoolExecutor(max_workers=a.workers, thread_name_prefix="lowbit-tensor") as pool:
                pending: deque = deque()
                it = iter(names)
                for name in it:
                    pending.append((name, pool.submit(_process, ckpt, name, chain, a, path)))
                    if len(pending) >= a.workers + 1:
                        break
                while pending:
                    name, fut = pending.popleft()
                    res = fut.result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append((nxt, pool.submit(_process, ckpt, nxt, chain, a, path)))
                    handle(name, *res)
        meta = {"lowbit": json.dumps({"version": 1, "source": str(path), "tensors": schemes,
                                      "kept": [k.name for k in report.kept]})}
        if writer:
            writer.commit(meta)
    except BaseException:
        if writer:
            writer.abort()
        raise
    finally:
        if bar:
            bar.close()
    report.meta["wall_time_s"] = time.perf_counter() - t0
    report.meta["checkpoint_file_bytes"] = ckpt.nbytes
    if a.out:
        report.meta["output"] = str(a.out)
        report.meta["output_file_bytes"] = Path(a.out).stat().st_size
    if a.eval:
        report.meta.update(evaluate(path if a.checkpoint else None, ckpt, approx))
    return report


def evaluate(model_dir: Path | None, ckpt: Checkpoint, approx: dict[str, np.ndarray]) -> dict[str, Any]:
    """Cosine similarity of sentence embeddings: original model vs the model with ``approx`` weights."""
    import torch

    from .models import embed, embedding_cosine, sentence_model

    d = None if model_dir is None else (model_dir if model_dir.is_dir() else model_dir.parent)
    try:
        ref_model = sentence_model(d)
    except Exception as e:  # noqa: BLE001 - sentence-transformers raises many kinds
        raise CheckpointError(f"{d}: --eval needs a sentence-transformers model directory ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    ref = embed(ref_model)
    sd = ref_model.state_dict()
    new = {}
    for name, v in approx.items():
        keys = [k for k in sd if k == name or k.endswith("." + name)]
        if len(keys) != 1:
            raise CheckpointError(f"--eval: tensor {name!r} matches {len(keys)} model parameters")
        new[keys[0]] = torch.from_numpy(contiguous(v.astype(np.float32))).to(sd[keys[0]].dtype)
    ref_model.load_state_dict(new, strict=False)
    res = embedding_cosine(ref, embed(ref_model))
    return {"eval_mean_cosine": res["mean_cosine"], "eval_min_cosine": res["min_cosine"],
            "eval_sentences": res["sentences"]}


def write_reports(report: Report, files: list[str]) -> None:
    for f in files:
        p = Path(f)
        text = report.to_json() if p.suffix == ".json" else report.to_markdown() if p.suffix == ".md" else None
        if text is None:
            raise UsageError(f"--report {f}: use a .json or .md file name")
        tmp = p.with_name(f".{p.name}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, p)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"{p}: cannot write the report: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a = build_parser().parse_args(argv)
    try:
        for f in a.report:
            if Path(f).suffix not in (".json", ".md"):
                raise UsageError(f"--report {f}: use a .json or .md file name")
        report = run(a)
        write_reports(report, a.report)
    except UsageError as e:
        print(f"{PROG}: usage error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, TypeError, OSError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output was written", file=sys.stderr)
        return 1
    print(report.to_table(max_rows=a.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
