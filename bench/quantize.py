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
  python -m bench.quantize --method int4 --granularity group --affine --calibration mse --gptq --eval
  python -m bench.quantize --method prune,int8 --prune sparsegpt:2:4 --calibration-data my_text.txt
  python -m bench.quantize model_dir --method w8a8 --format compressed-tensors --out model_w8a8
  python -m bench.quantize model_dir --method w8a8 --affine-activations --gptq --format compressed-tensors --out m

Exit codes: 0 success, 2 usage error, 1 any other failure (one line naming the file or tensor).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from compress.lowrank import METHODS as SVD_METHODS
from compress.storage import LowRankSVD, MagnitudePrune, NMPrune, StructuredPrune
from lowbit.checkpoint import Chain, Checkpoint, CheckpointError, compress_checkpoint
from lowbit.checkpoint.calibrated import (PRUNERS, Calibrated, calibration_tokens, load_model, packed_batches, read_texts,
                                          solve, solver_for, text_batches)
from lowbit.checkpoint.compressed_tensors import CompressedTensors, weight_args
from lowbit.checkpoint.gguf import gguf_type_of_chain
from lowbit.checkpoint.onnx_qdq import check_chain as check_onnx_chain
from lowbit.checkpoint.chain import names_matching
from lowbit.checkpoint.io import check_output, write_text_file
from lowbit.eval import causal_lm_quality
from lowbit.checkpoint.pipeline import NothingToCompress, causal_lm_dir, check_pattern
from precision import OVERFLOW_MODES, ROUNDING_MODES, SUBNORMAL_MODES
from precision.arrays import contiguous
from precision.blocks import BlockCast
from precision.cast import SCALINGS, FloatCast
from precision.methods import StructureMethod, ValueMethod
from precision.report import Report
from quant import AWQ, GPTQ, PerChannel, PerGroup, PerTensor, QuantSpec
from quant.spec import Granularity
from quant.storage import SCALE_DTYPES, IntQuant

from .models import (MODELS, embed, embedding_cosine, heldout_path, minilm_checkpoint, minilm_dir, model_path,
                     sentence_model, sentences, split_sentences)

PROG = "python -m bench.quantize"
W8A8 = "w8a8"  # int8 weights per channel + dynamic per-token int8 inputs (compressed-tensors' int-quantized)
CALIBRATIONS = ("minmax", "percentile", "mse")  # the calibration methods that apply to one weight tensor


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        print(f"{PROG}: usage error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a .safetensors file, a shard index (*.safetensors.index.json), "
                   "a model directory, a PyTorch .pt/.pth/.bin state dict (read with weights_only=True), or a "
                   "bundled model by name: minilm (all-MiniLM-L6-v2), smollm2 (SmolLM2-135M-Instruct, a Llama "
                   "causal LM). Default: minilm.")
    p.add_argument("--method", default="int8", help="a method or a comma-separated chain, structure first: "
                   "a float format (fp16, bf16, fp8_e4m3fn, fp8_e5m2 or any precision format name), int2..int8, "
                   "a block format (mxfp4, mxfp6_e2m3, mxfp6_e3m2, mxfp8_e4m3, mxfp8_e5m2, mxint8, nvfp4, q8_0, q4_0), prune, "
                   "svd; or w8a8 (int8 per-channel weights declared with dynamic per-token int8 inputs, for "
                   "--format compressed-tensors). "
                   "Example: prune,int8. Default: int8")
    g = p.add_argument_group("float formats")
    g.add_argument("--scaling", choices=SCALINGS, default=None,
                   help="scale so absmax maps to max_finite (stored as float32). Default: none for fp16/bf16, "
                   "channel for 8-bit and smaller formats")
    g.add_argument("--rounding", choices=ROUNDING_MODES, default="nearest_even")
    g.add_argument("--overflow", choices=OVERFLOW_MODES, default="ieee")
    g.add_argument("--subnormals", choices=SUBNORMAL_MODES, default="keep",
                   help="flush: results that round to a subnormal become zero of the same sign (default keep)")
    g.add_argument("--seed", type=int, default=None, help="seed for --rounding stochastic")
    g = p.add_argument_group("integer quantization")
    g.add_argument("--granularity", choices=("tensor", "channel", "group"), default="channel",
                   help="one scale per tensor, per output channel (row), or per group along the input axis")
    g.add_argument("--group-size", type=int, default=128, help="elements per group for --granularity group")
    g.add_argument("--affine", action="store_true", help="affine (zero point) instead of symmetric")
    g.add_argument("--affine-activations", action="store_true",
                   help="with --method w8a8: declare asymmetric per-token int8 inputs (a scale and a zero point per "
                   "token, compressed-tensors' symmetric: false) instead of symmetric ones; more accurate where "
                   "inputs are skewed (a GELU's output), run by vLLM's zero-point kernels and lowbit.load_quantized")
    g.add_argument("--narrow-range", action="store_true", help="drop the most negative code, e.g. [-127, 127]")
    g.add_argument("--scale-dtype", choices=("auto", *SCALE_DTYPES), default="auto",
                   help="symmetric integers: round each scale up to this dtype before computing the codes, so readers "
                   "that hold scales in it read them exactly; auto: the checkpoint's weight dtype (bfloat16, float16) "
                   "with --format compressed-tensors, else float32")
    g.add_argument("--calibration", choices=CALIBRATIONS, default="minmax")
    g.add_argument("--percentile", type=float, default=99.99, help="for --calibration percentile")
    g = p.add_argument_group("pruning")
    g.add_argument("--prune", default="magnitude", help="magnitude, structured, N:M such as 2:4, or from calibration "
                   "data: wanda, sparsegpt (at --sparsity), wanda:N:M, sparsegpt:N:M (e.g. sparsegpt:2:4)")
    g.add_argument("--sparsity", type=float, default=0.5, help="fraction pruned, in [0, 1] (default 0.5)")
    g.add_argument("--norm", type=int, choices=(1, 2), default=2, help="row norm for structured pruning")
    g = p.add_argument_group("calibrated methods (need a model directory and calibration text)")
    g.add_argument("--gptq", action="store_true", help="solve the integer step with GPTQ (same stored form as RTN)")
    g.add_argument("--gptq-damp", type=float, default=0.01, help="GPTQ damping, fraction of the mean Hessian "
                   "diagonal (default 0.01)")
    g.add_argument("--no-act-order", action="store_true", help="GPTQ in storage order instead of act-order "
                   "(always so for N:M pruning, whose groups follow the storage order)")
    g.add_argument("--awq", action="store_true", help="AWQ input scales, folded into the preceding LayerNorm or "
                   "Linear where that keeps the model's output")
    g.add_argument("--calibration-data", metavar="FILE", help="UTF-8 text, one sample per line (default for the "
                   "bundled MiniLM: the even lines of the project's sentence file)")
    g.add_argument("--calibration-samples", type=int, default=128, metavar="N",
                   help="use the first N samples of --calibration-data (default 128): lines, or with "
                   "--calibration-seqlen packed sequences")
    g.add_argument("--calibration-seqlen", type=int, default=None, metavar="T",
                   help="transformers models: the whole --calibration-data text (documents of any length) "
                   "tokenized and packed into sequences of T tokens, instead of one sample per line")
    g = p.add_argument_group("low rank (svd)")
    g.add_argument("--rank-ratio", type=float, default=None, help="fraction of parameters kept (default 0.5)")
    g.add_argument("--energy", type=float, default=None, help="fraction of squared singular-value energy kept")
    g.add_argument("--svd-method", choices=SVD_METHODS, default="exact")
    g.add_argument("--force-svd", action="store_true", help="factor even where it saves no memory")
    g = p.add_argument_group("selection and output")
    g.add_argument("--include", help="regex: compress only matching tensor names")
    g.add_argument("--exclude", help="regex: never compress matching tensor names")
    g.add_argument("--min-ndim", type=int, default=2, help="compress float tensors with at least this many dims")
    g.add_argument("--channel-axis", action="append", default=[], metavar="REGEX=AXIS",
                   help="2-D weights whose name matches REGEX store their output channels along AXIS (1: stored "
                   "(in, out)); may repeat; GPT-2's Conv1D weights are known from config.json")
    g.add_argument("--out", help="write the compressed checkpoint (safetensors) here")
    g.add_argument("--force", action="store_true", help="replace an existing --out file")
    g.add_argument("--format", choices=("lowbit", "gguf", "compressed-tensors", "onnx-qdq"), default="lowbit",
                   help="--out as lowbit's safetensors (default; read back by lowbit.load), a GGUF file "
                   "(q8_0, q4_0, fp16, bf16; kept tensors in their own types), or a compressed-tensors model "
                   "directory that transformers, vLLM and lowbit.load_quantized load (int2-int8, w8a8, "
                   "fp8_e4m3fn; the checkpoint must sit beside its config.json), or an ONNX file whose outputs are the "
                   "tensors, each compressed one behind DequantizeLinear (int8, int4, fp8; opset 21)")
    g.add_argument("--onnx-graph", metavar="FILE.onnx", help="with --format onnx-qdq: the float model exported by "
                   "torch.onnx.export; --out is that graph with the compressed tensors' initializers swapped for "
                   "DequantizeLinear of their codes")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="busy threads in all, --workers times each tensor's threads (default: the available cores)")
    g.add_argument("--no-metrics", action="store_true",
                   help="skip the error metrics (same output; the report gives bytes only)")
    g.add_argument("--report", action="append", default=[], metavar="FILE",
                   help="write the report as JSON (.json) or Markdown (.md); may repeat")
    g.add_argument("--eval", action="store_true", help="the compressed model against the original: for a causal "
                   "LM perplexity, KL divergence of the next-token distributions and top-1 agreement; for a "
                   "sentence-transformers model (MiniLM) sentence-embedding cosine; on --eval-data")
    g.add_argument("--eval-data", metavar="FILE", help="UTF-8 text --eval runs on (default: the project's held-out "
                   "text bench/data/heldout.txt, which shares no source with the default calibration text; for a "
                   "sentence model, its sentences)")
    g.add_argument("--eval-window", type=int, default=512, metavar="N",
                   help="causal LMs: tokens per evaluation window (default 512)")
    g.add_argument("--workers", type=int, default=1, help="compress this many tensors in parallel threads "
                   "(output order and bytes are the same; default 1)")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where tensors are compressed: this process (default), or Ray tasks (pip install "
                   "'lowbit[ray]'; same output bytes)")
    g.add_argument("--address", default=None, help="with --executor ray: the Ray cluster to join (e.g. "
                   "ray://head:10001, or auto); default: a local cluster of --threads CPUs started for the job")
    g.add_argument("--connect-timeout", type=float, default=30.0, metavar="S",
                   help="with --executor ray --address: give up joining the cluster after S seconds (default 30)")
    g.add_argument("--rows", type=int, default=40, help="tensor rows shown on the terminal (default 40)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _value_method(name: str, kind: str, a: argparse.Namespace) -> ValueMethod:
    if kind == "block":
        if a.rounding == "stochastic":
            raise UsageError(f"{name}: block formats round nearest_even, nearest_away or toward_zero")
        try:
            return BlockCast(name, rounding=a.rounding)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if kind == "float":
        return FloatCast.for_format(name, scaling=a.scaling, rounding=a.rounding, overflow=a.overflow,
                                    seed=a.seed if a.rounding == "stochastic" else None, subnormals=a.subnormals)
    granularities: dict[str, Granularity] = {"tensor": PerTensor(), "channel": PerChannel(0), "group": PerGroup(a.group_size)}
    gran = granularities[a.granularity]
    spec = QuantSpec(bits=int(name[3:]), signed=True, symmetric=not a.affine, narrow_range=a.narrow_range,
                     granularity=gran)
    return IntQuant(spec, a.calibration, a.percentile if a.calibration == "percentile" else None,
                    scale_dtype=getattr(a, "resolved_scale_dtype", "float32"))


def _structure_method(kind: str, a: argparse.Namespace) -> StructureMethod:
    if kind == "svd":
        if a.rank_ratio is not None and a.energy is not None:
            raise UsageError("give --rank-ratio or --energy, not both")
        ratio = None if a.energy is not None else (0.5 if a.rank_ratio is None else a.rank_ratio)
        return LowRankSVD(ratio=ratio, energy=a.energy, method=a.svd_method, force=a.force_svd)
    nm = a.prune.split(":")
    if nm[0] in PRUNERS:  # the mask comes from calibration data; the prune step stores it
        nm = nm[1:]
        if not nm:
            return MagnitudePrune(a.sparsity)
    if len(nm) == 2 and all(t.isdigit() for t in nm):
        return NMPrune(int(nm[0]), int(nm[1]))
    if a.prune == "magnitude":
        return MagnitudePrune(a.sparsity)
    if a.prune == "structured":
        return StructuredPrune(a.sparsity, axis=0, norm=a.norm)
    raise UsageError(f"--prune must be magnitude, structured, N:M (e.g. 2:4), wanda, sparsegpt, wanda:N:M or "
                     f"sparsegpt:N:M, got {a.prune!r}")


def calibrated_of(a: argparse.Namespace) -> Calibrated | None:
    """The calibrated methods the arguments ask for (None: none)."""
    pruner = a.prune.split(":")[0] if "prune" in [t.strip() for t in a.method.split(",")] else None
    pruning = pruner if pruner in PRUNERS else None
    if not (pruning or a.gptq or a.awq):
        if a.calibration_data is not None:
            raise UsageError("--calibration-data applies to --gptq, --awq and --prune wanda/sparsegpt")
        return None
    # N:M groups run in storage order, which act-order would permute: joint N:M + GPTQ sweeps in order
    nm = pruning is not None and len(a.prune.split(":")) == 3
    try:
        return Calibrated(pruning=pruning, gptq=GPTQ(damp=a.gptq_damp, act_order=not (a.no_act_order or nm))
                          if a.gptq else None,
                          awq=AWQ() if a.awq else None)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def solve_calibrated(a: argparse.Namespace, chain: Chain, calibrated: Calibrated, path: Path,
                     phases: dict[str, float], loaded: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Load the model of the checkpoint ``path``, tokenize the calibration text, and solve; the time of
    each goes into ``phases`` (``time_load_model_s``, ``time_solve_s``). ``loaded``: the model and tokenizer,
    already loaded (for --eval), instead of loading them again."""
    if a.executor != "local":
        raise UsageError("the calibrated methods run with --executor local")
    if a.calibration_samples < 1:
        raise UsageError(f"--calibration-samples must be at least 1, got {a.calibration_samples}")
    if a.calibration_seqlen is not None and a.calibration_seqlen < 2:
        raise UsageError(f"--calibration-seqlen must be at least 2 tokens, got {a.calibration_seqlen}")
    d = path if path.is_dir() else path.parent
    bundled = a.checkpoint is None or (a.checkpoint in MODELS and not Path(a.checkpoint).exists())
    if a.calibration_data is not None:
        texts = read_texts(a.calibration_data, None if a.calibration_seqlen else a.calibration_samples)
    elif bundled:
        texts = sentences()[::2][:a.calibration_samples]  # the project's calibration sentences (even lines)
    else:
        raise UsageError(f"{calibrated.describe()} needs calibration text: give --calibration-data FILE")
    t = time.perf_counter()
    try:
        model, tok = loaded if loaded is not None else load_model(minilm_dir() if a.checkpoint is None else d)
    except Exception as e:  # noqa: BLE001 - transformers and sentence-transformers raise many kinds
        raise CheckpointError(f"{d}: the calibrated methods need a model directory that sentence-transformers or "
                              f"transformers loads ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    phases["time_load_model_s"] = time.perf_counter() - t
    if a.calibration_seqlen is not None:
        if isinstance(tok, torch.nn.Module):
            raise UsageError("--calibration-seqlen packs text for a transformers model; sentence-transformers "
                             "models take one sample per line")
        batches = packed_batches(tok, "\n\n".join(texts), a.calibration_seqlen, a.calibration_samples)
    else:
        batches = text_batches(tok, texts)
    tokens = calibration_tokens(batches)
    t = time.perf_counter()
    try:
        out = solve(model, chain, calibrated, batches, include=a.include, exclude=a.exclude,
                    tensor_names=Checkpoint(path).names(), blocks_only=a.include is None and causal_lm_dir(path))
        phases["calibration_tokens"] = tokens  # reported beside the phases
    except ValueError as e:
        raise CheckpointError(f"{d}: {e}") from None
    finally:
        phases["time_solve_s"] = time.perf_counter() - t
    return out


def build_chain(a: argparse.Namespace) -> Chain:
    """The method config the arguments describe (every range is checked by the config itself)."""
    def build(kind: str, name: str) -> ValueMethod | StructureMethod:
        return _structure_method(kind, a) if kind in ("prune", "svd") else _value_method(name, kind, a)

    try:
        return Chain.parse("int8" if a.method == W8A8 else a.method, build)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def scale_dtype_of(a: argparse.Namespace, path: Path) -> str:
    """``--scale-dtype``, with auto resolved: for symmetric integers written as compressed-tensors, the dtype
    of the checkpoint's 2-D floating-point tensors when they are all bfloat16 or all float16 (transformers
    holds a layer's scales in that dtype), else float32."""
    if a.scale_dtype != "auto":
        return str(a.scale_dtype)
    if a.format != "compressed-tensors" or a.affine:
        return "float32"
    ck = Checkpoint(path)
    kinds = {str(ck.info(n)[0]) for n in ck.names() if len(ck.info(n)[1]) == 2 and ck.info(n)[0].kind in "fV"}
    return kinds.pop() if kinds in ({"bfloat16"}, {"float16"}) else "float32"


def run(a: argparse.Namespace) -> tuple[Report, list[Path]]:
    """Carry out one CLI invocation (parsed arguments); return the report and the input's files. The
    report's ``wall_time_s`` is the whole run; ``time_*_s`` its phases."""
    t0 = time.perf_counter()
    path = minilm_checkpoint() if a.checkpoint is None else model_path(a.checkpoint)
    a.resolved_scale_dtype = scale_dtype_of(a, path)
    chain = build_chain(a)
    if a.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {a.workers}")
    if a.threads is not None and a.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {a.threads}")
    if not 0 < a.connect_timeout < float("inf"):
        raise UsageError(f"--connect-timeout must be a positive number of seconds, got {a.connect_timeout}")
    if a.address is not None and a.executor != "ray":
        raise UsageError("--address applies to --executor ray only")
    if a.format == "gguf":
        try:
            gguf_type_of_chain(chain)
        except ValueError as e:
            raise UsageError(f"--format gguf: {e}") from None
    if a.format == "onnx-qdq":
        try:
            check_onnx_chain(chain)
        except ValueError as e:
            raise UsageError(f"--format onnx-qdq: {e}") from None
    if a.onnx_graph is not None and a.format != "onnx-qdq":
        raise UsageError("--onnx-graph applies to --format onnx-qdq only")
    fmt: str | CompressedTensors = a.format
    if a.method == W8A8 and a.format != "compressed-tensors":
        raise UsageError("--method w8a8 declares int8 activations, which only --format compressed-tensors records; "
                         "for weights alone use --method int8")
    if a.affine_activations and a.method != W8A8:
        raise UsageError("--affine-activations applies to --method w8a8 only")
    if a.format == "compressed-tensors":
        fmt = CompressedTensors(activations=None if a.method != W8A8 else "int8_affine" if a.affine_activations
                                else "int8")
        try:
            weight_args(chain, fmt)
        except ValueError as e:
            raise UsageError(f"--format compressed-tensors: {e}") from None
        if a.out is None:
            raise UsageError("--format compressed-tensors writes a model directory: give it with --out")
    for pat, flag in ((a.include, "--include"), (a.exclude, "--exclude")):
        try:
            check_pattern(pat)
        except ValueError as e:
            raise UsageError(f"{flag}: {e}") from None
    inputs = check_reports(a, path)
    calibrated = calibrated_of(a)
    if calibrated is not None:
        try:
            solver_for(chain, calibrated)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if (a.eval_data is not None or a.eval_window != 512) and not a.eval:
        raise UsageError("--eval-data and --eval-window apply to --eval")
    if a.eval_window < 2:
        raise UsageError(f"--eval-window must be at least 2 tokens, got {a.eval_window}")
    eval_text = read_eval_text(a.eval_data) if a.eval else None
    ref_model = load_eval_model(path if a.checkpoint else None) if a.eval else None  # fail before the work
    approx: dict[str, np.ndarray] | None = {} if a.eval else None
    phases: dict[str, float] = {}
    # a causal LM loaded for --eval is the float model the solver needs too: loaded once (the solver copies it)
    loaded = (ref_model.model, ref_model.tokenizer) if isinstance(ref_model, CausalLM) else None
    solutions = solve_calibrated(a, chain, calibrated, path, phases, loaded) if calibrated is not None else None
    report = compress_checkpoint(path, a.out, chain, include=a.include, exclude=a.exclude, workers=a.workers,
                                 progress=not a.quiet, force=a.force, min_ndim=a.min_ndim, collect=approx,
                                 metrics=not a.no_metrics, threads=a.threads, executor=a.executor,
                                 address=a.address, connect_timeout=a.connect_timeout, format=fmt, solutions=solutions,
                                 channel_axis=parse_channel_axes(a.channel_axis), onnx_graph=a.onnx_graph)
    if calibrated is not None:
        report.meta["calibrated"] = calibrated.describe()
    if ref_model is not None and approx is not None:
        t = time.perf_counter()
        assert eval_text is not None
        report.meta.update(evaluate(ref_model, approx, eval_text, a.eval_window))
        phases["time_eval_s"] = time.perf_counter() - t
    wall = report.meta.pop("wall_time_s")
    report.meta.update(phases)
    total = time.perf_counter() - t0
    # checks, reading headers, the eval model
    report.meta["time_other_s"] = total - wall - sum(v for k, v in phases.items() if k.startswith("time_"))
    report.meta["wall_time_s"] = total
    return report, inputs


def parse_channel_axes(items: list[str]) -> dict[str, int]:
    """``--channel-axis REGEX=AXIS`` arguments as ``{regex: axis}`` (axis 0 or 1)."""
    out: dict[str, int] = {}
    for item in items:
        pat, sep, axis = item.rpartition("=")
        if not sep or not pat or axis not in ("0", "1"):
            raise UsageError(f"--channel-axis {item!r}: give REGEX=0 or REGEX=1")
        try:
            check_pattern(pat)
        except ValueError as e:
            raise UsageError(f"--channel-axis: {e}") from None
        out[pat] = int(axis)
    return out


def read_eval_text(path: str | None) -> str:
    """The text --eval runs on: ``path``'s, or the project's held-out text."""
    p = Path(path) if path is not None else heldout_path()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"--eval-data {p}: cannot read it as UTF-8 text ({type(e).__name__})") from None
    if not text.strip():
        raise CheckpointError(f"--eval-data {p}: the file holds no text")
    return text


def load_eval_model(model_path: Path | None) -> Any:
    """What --eval runs, loaded up front: a causal LM directory's float model and tokenizer
    (:class:`CausalLM`), else the sentence-transformers model (MiniLM by default)."""
    d = None if model_path is None else (model_path if model_path.is_dir() else model_path.parent)
    if d is not None and causal_lm_dir(d):
        try:
            model, tok = load_model(d)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise CheckpointError(f"{d}: --eval cannot load the causal LM ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
        return CausalLM(model, tok)
    try:
        return sentence_model(d)
    except Exception as e:  # noqa: BLE001 - sentence-transformers raises many kinds
        raise CheckpointError(f"{d}: --eval needs a sentence-transformers model directory or a causal LM "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


@dataclass(frozen=True)
class CausalLM:
    model: Any
    tokenizer: Any


def _with_weights(model: Any, approx: dict[str, np.ndarray]) -> None:
    """Load ``approx`` (checkpoint names) into ``model`` in place, each name matched to one parameter."""
    import torch

    sd = model.state_dict()
    new = {}
    for name, v in approx.items():
        keys = names_matching(name, list(sd))
        if len(keys) != 1:
            raise CheckpointError(f"--eval: tensor {name!r} matches {len(keys)} model parameters")
        new[keys[0]] = torch.from_numpy(contiguous(v.astype(np.float32))).to(sd[keys[0]].dtype)
    model.load_state_dict(new, strict=False)


def evaluate(ref: Any, approx: dict[str, np.ndarray], text: str | list[str], window: int = 512) -> dict[str, Any]:
    """The compressed model (``ref`` with the ``approx`` weights) against ``ref`` on ``text``: perplexity, KL
    and top-1 for a causal LM; sentence-embedding cosine for a sentence model (over the text's sentences,
    or the list of sentences given)."""
    import copy

    import torch

    if isinstance(ref, CausalLM):
        joined = text if isinstance(text, str) else "\n".join(text)
        ids = torch.tensor(ref.tokenizer(joined, add_special_tokens=False)["input_ids"])
        compressed = copy.deepcopy(ref.model)
        _with_weights(compressed, approx)
        return causal_lm_quality(ref.model, compressed, ids, window=window).as_meta()
    texts = split_sentences(text) if isinstance(text, str) else text
    before = embed(ref, texts)
    _with_weights(ref, approx)
    cos = embedding_cosine(before, embed(ref, texts))
    return {"eval_mean_cosine": cos["mean_cosine"], "eval_min_cosine": cos["min_cosine"],
            "eval_sentences": cos["sentences"]}


def check_reports(a: argparse.Namespace, path: Path) -> list[Path]:
    """Every file the job would write is checked before the work: reports follow --out's rules (never a
    file of the input checkpoint, never an existing file without --force, never --out itself)."""
    inputs = Checkpoint(path).inputs
    for f in a.report:
        if Path(f).suffix not in (".json", ".md"):
            raise UsageError(f"--report {f}: use a .json or .md file name")
        check_output(f, force=a.force, inputs=inputs, what="report")
        if a.out is not None and Path(f).resolve() == Path(a.out).resolve():
            raise UsageError(f"--report {f} is also the --out file")
    if len({Path(f).resolve() for f in a.report}) != len(a.report):
        raise UsageError("--report names the same file twice")
    return inputs


def write_reports(report: Report, files: list[str], *, force: bool = False, inputs: list[Path] | None = None) -> None:
    for f in files:
        p = Path(f)
        text = report.to_json() if p.suffix == ".json" else report.to_markdown() if p.suffix == ".md" else None
        if text is None:
            raise UsageError(f"--report {f}: use a .json or .md file name")
        write_text_file(p, text, force=force, inputs=inputs or [], what="report")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a = build_parser().parse_args(argv)
    try:
        report, inputs = run(a)
        write_reports(report, a.report, force=a.force, inputs=inputs)
    except (UsageError, NothingToCompress) as e:
        print(f"{PROG}: usage error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, TypeError, OSError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output was written", file=sys.stderr)
        return 1
    # a tensor name may hold characters the terminal cannot encode (a lone surrogate from a hostile header)
    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(report.to_table(max_rows=a.rows).encode(enc, "backslashreplace").decode(enc, "replace"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
