"""The checkpoint job as a library call: ``compress_checkpoint`` writes, ``load`` reads back."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generator, Iterator, Mapping

import numpy as np

from precision._native import available_cores, thread_budget
from precision.arrays import all_finite
from precision.dtypes import ST_TO_NP
from precision.methods import Method, Solution, ValueStore
from precision.report import KeptTensor, Report

from . import array_pool
from .chain import (Chain, Compressed, NotApplied, compress_row_blocks, compress_tensor, names_matching, restore,
                    rows_streamable)
from .compressed_tensors import (CompressedTensors, CompressedTensorsWriter, ct_tensors, is_compressed_tensors,
                                 linear_modules, load_dense, weight_args)
from .gguf import GGUFWriter, gguf_type_of_chain
from .onnx_qdq import OnnxQDQWriter, check_chain as check_onnx_chain
from .io import Checkpoint, CheckpointError, SafetensorsWriter

Source = str | os.PathLike


def _selected(name: str, dtype: np.dtype, shape: tuple[int, ...], include: str | None, exclude: str | None,
              min_ndim: int) -> str | None:
    """None if the tensor is compressed, else the reason it is kept as it is."""
    if dtype.kind not in "fV":
        return "not floating point"
    if dtype.kind == "V" and dtype.name != "bfloat16":
        return f"already {dtype.name}"
    if len(shape) < min_ndim:
        return f"{len(shape)}-D"
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return "empty"
    if (include is not None and not re.search(include, name)) or (exclude and re.search(exclude, name)):
        return "excluded"
    return None


# a tensor inside a transformer's repeated blocks (model.layers.3.mlp..., transformer.h.0.attn...)
IN_BLOCK = re.compile(r"\.\d+\.")
OUTSIDE_BLOCKS = ("outside the repeated blocks of a causal LM (embedding, head, final norm: kept by default, "
                  "include= or --include selects them)")


def causal_lm_dir(source: Source) -> bool:
    """Whether ``source`` (a file or a model directory) sits beside a ``config.json`` that names a causal
    language model (``...ForCausalLM``)."""
    p = Path(source)
    try:
        cfg = json.loads(((p if p.is_dir() else p.parent) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    return isinstance(archs, list) and any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs)


# architectures whose checkpoints store some 2-D weights (in, out): transformers' Conv1D layers
TRANSPOSED_WEIGHTS: dict[str, str] = {
    "gpt2": r"(^|\.)(c_attn|c_proj|c_fc)\.weight$",
    "openai-gpt": r"(^|\.)(c_attn|c_proj|c_fc)\.weight$",
}


def channel_axes(source: Source, given: Mapping[str, int] | None = None) -> list[tuple[str, int]]:
    """The rules ``(name regex, output-channel axis)`` for 2-D weights, first match wins: the ``given``
    ones (e.g. ``--channel-axis``), then the architecture's own from the ``config.json`` beside the
    checkpoint (``model_type`` in :data:`TRANSPOSED_WEIGHTS`: axis 1). Every other tensor: axis 0."""
    rules: list[tuple[str, int]] = []
    for pat, axis in (given or {}).items():
        check_pattern(pat)
        if isinstance(axis, bool) or axis not in (0, 1):
            raise ValueError(f"channel axis for {pat!r} must be 0 (stored (out, in)) or 1 (stored (in, out)), got {axis!r}")
        rules.append((pat, axis))
    p = Path(source)
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    if cfg.is_file():
        try:
            model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, OSError, AttributeError):
            model_type = None
        if isinstance(model_type, str) and model_type in TRANSPOSED_WEIGHTS:
            rules.append((TRANSPOSED_WEIGHTS[model_type], 1))
    return rules


def axis_of(name: str, shape: tuple[int, ...], rules: list[tuple[str, int]]) -> int:
    """The output-channel axis of tensor ``name`` under ``rules`` (0 unless a rule matches a 2-D tensor)."""
    if len(shape) != 2:
        return 0
    return next((a for pat, a in rules if re.search(pat, name)), 0)


def check_pattern(pat: str | None) -> None:
    """ValueError if ``pat`` is not a valid regular expression (None is)."""
    if pat:
        try:
            re.compile(pat)
        except re.error as e:
            raise ValueError(f"bad regular expression {pat!r}: {e}") from None


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="tensor", file=sys.stderr, leave=False)


def compress_checkpoint(source: Source, output: Source | None, method: Chain | Method | str, *,
                        include: str | None = None, exclude: str | None = None, workers: int = 1,
                        progress: bool = True, force: bool = False, min_ndim: int = 2,
                        collect: dict[str, np.ndarray] | None = None, metrics: bool = True,
                        threads: int | None = None, executor: str = "local", address: str | None = None,
                        format: "str | CompressedTensors" = "lowbit", solutions: Mapping[str, Solution] | None = None,
                        channel_axis: Mapping[str, int] | None = None, onnx_graph: Source | None = None,
                        connect_timeout: float = 30.0) -> Report:
    """Compress every selected tensor of the checkpoint ``source`` with ``method`` and write the
    result to ``output`` (a lowbit safetensors file; ``None`` measures only).

    ``source``: a ``.safetensors`` file, a shard index (``*.safetensors.index.json``), a
    model directory, or a PyTorch ``.pt``/``.pth``/``.bin`` state dict (read with
    ``weights_only=True``). ``method``: a :class:`Chain`, one method config (``IntQuant``,
    ``FloatCast``, ``MagnitudePrune`` ...) or a name such as ``"int8"`` or ``"prune,int8"``.

    Selected: floating-point tensors with at least ``min_ndim`` dimensions whose name matches
    the regular expression ``include`` (if given) and not ``exclude``. Every selected tensor's
    shape is checked against the method before any work starts. Tensors holding NaN or inf,
    and tensors a method would not make smaller, are kept bit for bit, with the reason in
    ``report.kept``. ``workers`` tensors are compressed at once in threads; the output bytes do
    not depend on it. ``force`` replaces an existing ``output``; the input is never written.
    ``collect``: if a dict is given, it receives the dense values a reader gets back for every
    compressed tensor (source dtype), and for every kept tensor a solution rewrote. ``metrics=False``
    skips the error metrics for users who only want the output (the output bytes are the same; the
    report says the error was not measured).
    Returns the :class:`~precision.report.Report`: error and bytes per tensor, totals, and ``meta``
    (wall time, file sizes).

    Threads: at most ``threads`` busy threads in all (default: the cores this process may use).
    ``workers`` tensors are in flight (capped at ``threads``) and each gets ``threads // workers``
    threads for torch, lowbit's kernels and the BLAS under numpy (:func:`plan_threads`).

    ``executor="ray"`` compresses each tensor in a Ray task of one CPU instead (needs
    ``lowbit[ray]``; see :mod:`lowbit.checkpoint.distributed`): on the cluster at ``address``,
    or without one on a local cluster of ``threads`` CPUs (default: the available cores) started
    for the job; joining a cluster gives up after ``connect_timeout`` seconds with one error naming the
    address. ``source`` must then be a path every node can read. The output and the report's
    rows are byte-identical to a local run's; ``workers`` does not apply.

    ``format``: ``"lowbit"`` (safetensors with lowbit's stored parts and schemes, read back by
    :func:`load`; tensors tied in a PyTorch state dict, such as GPT-2's ``lm_head.weight`` and
    ``transformer.wte.weight``, are stored and counted once and come back tied) or ``"gguf"`` (a GGUF
    file of q8_0/q4_0 blocks or fp16/bf16 tensors, with the kept tensors in their own types; see
    :mod:`lowbit.checkpoint.gguf`) or ``"compressed-tensors"`` / :class:`CompressedTensors` (``output`` is a
    model directory that transformers and vLLM load: the Linear layers' codes and scales copied into
    compressed-tensors' layout, every other tensor as it is, the source directory's config.json with a
    ``quantization_config`` and its other files; ``source`` must sit beside its config.json; see
    :mod:`lowbit.checkpoint.compressed_tensors` for what each method becomes and what is refused) or
    ``"onnx-qdq"`` (an ONNX model of opset 21 whose outputs are the checkpoint's tensors, each compressed
    one its codes behind ``DequantizeLinear``; with ``onnx_graph``, the float model exported by
    ``torch.onnx.export`` with those tensors' initializers swapped for their ``DequantizeLinear``;
    :mod:`lowbit.checkpoint.onnx_qdq`).

    ``solutions``: what a calibrated solver (GPTQ, AWQ, SparseGPT, Wanda) decided, by parameter name
    of the model it ran on (:func:`lowbit.checkpoint.calibrated.solve`). Each name is matched to one
    checkpoint tensor (the same name, or one that ends with the other after a ``.``); a selected
    tensor stores the solution in the chain's form, a tensor not selected (a LayerNorm weight an
    AWQ scale was folded into) is written with the solution's values, and a solution that matches
    no tensor, or more than one, is an error. Local executor only.

    ``channel_axis``: ``{name regex: axis}`` for 2-D weights stored (in, out) (axis 1), first match
    wins; architectures known to store some that way (GPT-2's ``Conv1D``, from the ``config.json``
    beside the checkpoint) need nothing. Per-channel integer scales and float casts then follow the
    output axis and integer groups the input axis; each report row says the axis
    (``details["channel_axis"]``).
    """
    if isinstance(format, CompressedTensors) or format == "compressed-tensors":
        format = CompressedTensors.of(format)
    elif format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} or a CompressedTensors, got {format!r}")
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if address is not None and executor != "ray":
        raise ValueError("address applies to executor='ray' only")
    chain = Chain.of(method)
    rules = channel_axes(source, channel_axis)
    if format == "gguf":
        gguf_type_of_chain(chain)  # a method GGUF cannot carry is refused before any work
    if isinstance(format, CompressedTensors):
        weight_args(chain, format)  # likewise
    if format == "onnx-qdq":
        check_onnx_chain(chain)
    elif onnx_graph is not None:
        raise ValueError("onnx_graph applies to format='onnx-qdq' only")
    for pat, what in ((include, "include"), (exclude, "exclude")):
        try:
            check_pattern(pat)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer of at least 1, got {workers!r}")
    workers, per_tensor = plan_threads(workers, threads)
    if solutions is not None and executor != "local":
        raise ValueError("solutions apply to executor='local' only (the solved values live in this process)")
    if executor == "ray":
        from .distributed import RaySession

        with RaySession(address, threads or available_cores(), connect_timeout) as session:
            report = _compress(source, output, chain, include, exclude, 1, progress, force, min_ndim, collect,
                               metrics, session, format, None, rules, onnx_graph=onnx_graph)
            report.meta["threads"] = f"Ray: {session.cpus()} CPU(s), one thread per task"
        return report
    with thread_budget(per_tensor):
        report = _compress(source, output, chain, include, exclude, workers, progress, force, min_ndim, collect,
                           metrics, None, format, solutions, rules, onnx_graph=onnx_graph)
    report.meta["threads"] = f"{workers} tensor(s) at once x {per_tensor} thread(s) each"
    return report


EXECUTORS = ("local", "ray")
FORMATS = ("lowbit", "gguf", "compressed-tensors", "onnx-qdq")


def plan_threads(workers: int, threads: int | None = None) -> tuple[int, int]:
    """(tensors in flight, threads per tensor) so that their product never exceeds ``threads``
    (default: the cores this process may use)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer of at least 1, got {threads!r}")
    total = threads if threads is not None else available_cores()
    workers = max(1, min(workers, total))
    return workers, max(1, total // workers)


def _compress(source: Source, output: Source | None, chain: Chain, include: str | None, exclude: str | None,
              workers: int, progress: bool, force: bool, min_ndim: int, collect: dict[str, np.ndarray] | None,
              metrics: bool, session: Any = None, format: "str | CompressedTensors" = "lowbit",
              solutions: Mapping[str, Solution] | None = None,
              rules: list[tuple[str, int]] | None = None, *, onnx_graph: Source | None = None) -> Report:
    t0 = time.perf_counter()
    path = Path(source)
    ckpt = Checkpoint(path)
    ties = ckpt.ties() if format == "lowbit" else {}
    names = [n for n in ckpt.names() if n not in ties]  # a tied tensor is stored (and counted) once
    solved = match_solutions(solutions, names, path) if solutions else {}
    for n, sol in solved.items():
        if tuple(sol.values.shape) != tuple(ckpt.info(n)[1]):
            raise CheckpointError(f"{path}: tensor {n!r} has shape {list(ckpt.info(n)[1])}, its solution "
                                  f"{list(sol.values.shape)}")
    ct = format if isinstance(format, CompressedTensors) else None
    ct_dir = path if path.is_dir() else path.parent
    # the field's convention on a decoder LLM: its blocks' weights are compressed, the rest kept unless asked
    blocks_only = include is None and causal_lm_dir(path)
    modules = linear_modules(ct_dir, names) if ct is not None else {}
    reasons = {}
    axes: dict[str, int] = {}
    chains: dict[str, Chain] = {}
    for n in names:
        dtype, shape = ckpt.info(n)
        reasons[n] = _selected(n, dtype, shape, include, exclude, min_ndim)
        if reasons[n] is None and blocks_only and not IN_BLOCK.search(n):
            reasons[n] = OUTSIDE_BLOCKS
        if ct is not None and reasons[n] is None and n not in modules:
            reasons[n] = "not a Linear layer's weight (compressed-tensors quantizes Linear layers only)"
        axes[n] = axis_of(n, tuple(shape), rules or [])
        chains[n] = chain.for_channel_axis(axes[n])
        if reasons[n] is None:
            try:
                chains[n].check_shape(shape, n)
            except ValueError as e:
                raise CheckpointError(f"{path}: tensor {n!r}: {_unnamed(e, n)}") from None
    if not any(r is None for r in reasons.values()):
        raise NothingToCompress(_nothing_selected(path, reasons, format))
    keep_approx = collect is not None
    # room for the header: each tensor's parts and scheme take well under 2 KiB of JSON
    reserve = (1 << 16) + 2048 * len(names)
    gguf_type = gguf_type_of_chain(chain) if format == "gguf" else None  # refused before any work
    writer: Any = None
    if output is not None:
        if ct is not None:
            writer = CompressedTensorsWriter(output, force=force, copy_from=ct_dir, header_reserve=reserve)
            ct_args, ct_name = weight_args(chain, ct)
        elif format == "gguf":
            writer = GGUFWriter(output, force=force, inputs=ckpt.inputs)
        elif format == "onnx-qdq":
            writer = OnnxQDQWriter(output, force=force, inputs=ckpt.inputs, graph=onnx_graph)
        else:
            # the parts are fresh arrays nothing changes after they are handed over: written from their memory
            writer = SafetensorsWriter(output, force=force, inputs=ckpt.inputs, header_reserve=reserve, zero_copy=True)
    report = Report(title=f"{path} -> {' + '.join(chain.describe())}")
    schemes: dict[str, Any] = {}
    bar = _progress(len(names), progress)
    # one slot per tensor in flight: the threads compressing and this one writing take turns, so no
    # more than ``workers`` of them are busy at once (each with at most its share of the threads)
    slots = threading.BoundedSemaphore(workers)

    def process(name: str) -> Result:
        with slots, array_pool.active():
            return process_tensor(ckpt, name, reasons[name], chains[name], keep_approx, metrics, solved.get(name))

    write_s = [0.0]  # time this thread spends handing tensors to the writer (the write phase)

    def handle(name: str, arr: np.ndarray | None, c: Compressed | None, reason: str | None) -> None:
        t = time.perf_counter()
        try:
            _handle(name, arr, c, reason)
        finally:
            write_s[0] += time.perf_counter() - t
        if bar:
            bar.update(1)

    def _handle(name: str, arr: np.ndarray | None, c: Compressed | None, reason: str | None) -> None:
        if c is not None:
            c.row.details["channel_axis"] = axes[name]
            report.add(c.row)
            schemes[name] = c.scheme
            if isinstance(writer, CompressedTensorsWriter):
                if c.scheme["values"]["kind"] == "none":  # stored dense: the method saved nothing here
                    writer.add_kept(name, c.parts["values"])
                else:
                    assert ct is not None  # the writer is made for it
                    writer.add_layer(modules[name], ct_tensors(modules[name], c, getattr(chain.values, "scale_dtype", "float32")),
                                     ct_args, ct_name, ct.activations)
            elif isinstance(writer, OnnxQDQWriter):
                if c.scheme["values"]["kind"] == "none":  # stored dense: the method saved nothing here
                    writer.add_kept(name, c.parts["values"])
                else:
                    writer.add_compressed(name, c)
            elif isinstance(writer, GGUFWriter):
                if c.scheme["values"]["kind"] == "none":  # stored dense: the method saved nothing here
                    writer.add_kept(name, c.parts["values"])
                else:
                    assert gguf_type is not None  # set whenever the writer is a GGUFWriter
                    codes = ValueStore.codes(c.parts, c.scheme, ST_TO_NP[c.scheme["dtype"]])
                    writer.add_compressed(name, tuple(c.scheme["shape"]), gguf_type, codes, c.parts)
            elif writer:
                for part, v in c.parts.items():
                    writer.add(f"{name}::{part}", v)
            if collect is not None and c.approx is not None:
                collect[name] = c.approx
        else:
            assert arr is not None  # a kept tensor always comes back with its array
            report.kept.append(KeptTensor(name, tuple(arr.shape), str(arr.dtype), int(arr.nbytes), reason or ""))
            if collect is not None and name in solved:  # kept, but rewritten by the solver (an AWQ scale folded in)
                collect[name] = arr
            if isinstance(writer, (GGUFWriter, CompressedTensorsWriter, OnnxQDQWriter)):
                writer.add_kept(name, arr)
            elif writer:
                writer.add(name, arr)

    try:
        if session is not None:
            from .distributed import ray_in_order

            results = ray_in_order(path, names, reasons, chains, keep_approx, metrics, session)
            memory: contextlib.AbstractContextManager = contextlib.nullcontext()
        else:
            results = _in_order(names, process, workers)
            memory = array_pool.job(_pool_limit(ckpt, names, workers))
        # handing a tensor to a direct-I/O writer queues it (its thread waits on the disk): no
        # slot; any other writer copies or transforms it here, on a core, so it takes one
        queued = isinstance(writer, SafetensorsWriter) and writer.direct
        with memory:
            for name, res in results:
                with contextlib.nullcontext() if queued else slots:
                    handle(name, *res)
        if not report.tensors:  # every selected tensor was kept (not finite, or not made smaller)
            raise NothingToCompress(f"{path}: no tensor was compressed: "
                                    + _reason_summary({k.name: k.reason for k in report.kept}))
        t_commit = time.perf_counter()
        if isinstance(writer, CompressedTensorsWriter):
            writer.commit(json.loads((ct_dir / "config.json").read_text(encoding="utf-8")),
                          {"lowbit.source": str(path), "lowbit.method": " + ".join(chain.describe())})
        elif isinstance(writer, (GGUFWriter, OnnxQDQWriter)):
            writer.commit({"lowbit.source": str(path)})
        elif writer:
            writer.commit({"lowbit": json.dumps({"version": 1, "source": str(path), "tensors": schemes,
                                                 "kept": [k.name for k in report.kept], "tied": ties})})
        write_s[0] += time.perf_counter() - t_commit
    except BaseException:
        if writer:
            writer.abort()
        raise
    finally:
        if bar:
            bar.close()
    if ties:
        report.meta["tied"] = ties
    wall = time.perf_counter() - t0
    # the phases of this call: reading and compressing tensors, and handing them to the writer and
    # committing (the CLI adds loading the model and solving, and makes wall_time_s the whole run)
    report.meta["time_compress_s"] = wall - write_s[0]
    report.meta["time_write_s"] = write_s[0]
    report.meta["wall_time_s"] = wall
    report.meta["checkpoint_file_bytes"] = ckpt.nbytes
    if output is not None:
        report.meta["output"] = str(output)
        out = Path(output)
        report.meta["output_file_bytes"] = (out / "model.safetensors").stat().st_size if out.is_dir() else out.stat().st_size
        if ct is not None:
            report.meta["format"] = "compressed-tensors" + (f" with {ct.activations} activations" if ct.activations else "")
    return report


def _unnamed(e: BaseException, name: str) -> str:
    """The message of ``e`` without the tensor name a method's own check starts it with (the pipeline
    names the file and the tensor once, in front)."""
    msg = str(e)
    return msg[len(name) + 2:] if msg.startswith(name + ": ") else msg


class NothingToCompress(ValueError):
    """The job would compress no tensor: nothing is written (a usage error, not a success)."""


def _reason_summary(reasons: Mapping[str, str | None]) -> str:
    counts: dict[str, int] = {}
    for r in reasons.values():
        counts[r or "selected"] = counts.get(r or "selected", 0) + 1
    return "; ".join(f"{n} kept ({r})" for r, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _nothing_selected(path: Path, reasons: Mapping[str, str | None], format: Any) -> str:
    if isinstance(format, CompressedTensors) and any(r and r.startswith("not a Linear") for r in reasons.values()):
        return (f"{path}: compressed-tensors carries nn.Linear weights only and this model has none selected "
                f"({_reason_summary(reasons)}); transformers' Conv1D layers (GPT-2) store their weights (in, out): "
                f"write format lowbit, gguf or onnx-qdq instead")
    return f"{path}: no tensor is selected for compression ({_reason_summary(reasons)})"


Result = tuple[np.ndarray | None, Compressed | None, str | None]
# float32 bytes of one block of rows read and encoded while it is in the cache (see process_tensor)
STREAM_BLOCK_BYTES = 4 << 20


class _NotFinite(Exception):
    """A block of rows holds NaN or inf: the tensor is read whole and kept as it is."""


def _finite_blocks(blocks: Iterator[tuple[int, int, np.ndarray]]) -> Generator[tuple[int, int, np.ndarray], None, None]:
    for r0, r1, b in blocks:
        if not all_finite(b if b.dtype.kind == "f" else b.astype(np.float32)):
            raise _NotFinite
        yield r0, r1, b


def process_tensor(ckpt: Checkpoint, name: str, reason: str | None, chain: Chain, keep_approx: bool,
                   metrics: bool, solution: Solution | None = None) -> Result:
    """One tensor of the job: (the source array, or None when it is compressed; its compressed form
    or None; why it is kept as it is or None). The same call runs in this process or in a Ray task.
    A tensor not compressed but given a ``solution`` comes back with the solution's values in its
    own dtype.

    Where the chain encodes rows independently (:func:`~lowbit.checkpoint.chain.rows_streamable`),
    the tensor is read and encoded a block of rows at a time, so each block is encoded while the
    read left it in the CPU cache, instead of going out to memory and back (the same codes and
    scheme as from the whole tensor); a tensor that turns out not finite, or whose compressed
    form would not be smaller, is then read again whole."""
    dtype, shape = ckpt.info(name)
    if reason is None and solution is None and not keep_approx and rows_streamable(chain, shape):
        blocks = _finite_blocks(ckpt.row_blocks(name, STREAM_BLOCK_BYTES))
        try:
            c = compress_row_blocks(name, shape, dtype, blocks, chain, metrics=metrics)
        except _NotFinite:
            c = None
        except CheckpointError:
            raise
        except ValueError as e:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r}: {_unnamed(e, name)}") from None
        finally:
            blocks.close()  # the file, where a block was not finite
        if c is not None:
            return None, c, None
    arr = ckpt.read(name)
    if reason is not None:
        if solution is not None:
            return (solution.values.astype(arr.dtype), None,
                    f"{reason}; values rewritten by the calibrated solver (e.g. an AWQ scale folded in)")
        return arr, None, reason
    if not all_finite(arr if arr.dtype.kind == "f" else arr.astype(np.float32)):
        return arr, None, "holds NaN or inf (kept as is)"
    try:
        return arr, compress_tensor(name, arr, chain, keep_approx=keep_approx, metrics=metrics,
                                    solution=solution), None
    except NotApplied as e:
        return arr, None, str(e)
    except ValueError as e:
        raise CheckpointError(f"{ckpt.path}: tensor {name!r}: {_unnamed(e, name)}") from None


def match_solutions(solutions: Mapping[str, Solution], names: list[str], path: Path) -> dict[str, Solution]:
    """Solutions keyed by checkpoint tensor name: a model parameter name matches the tensor of the same
    name or one that ends with it (or that it ends with) after a ``.``; exactly one must match."""
    out: dict[str, Solution] = {}
    for key, sol in solutions.items():
        hits = names_matching(key, names)
        if len(hits) != 1:
            raise CheckpointError(f"{path}: the solution for {key!r} matches {len(hits)} tensors of the checkpoint"
                                  + (f" ({', '.join(hits[:3])})" if hits else "") + "; it must match exactly one")
        if hits[0] in out:
            raise CheckpointError(f"{path}: two solutions match tensor {hits[0]!r}")
        out[hits[0]] = sol
    return out


def _pool_limit(ckpt: Checkpoint, names: list[str], workers: int) -> int:
    """Free bytes the array pool may keep during the job: enough for the next tensors' reads and codes
    (``workers`` of the largest tensors), little against the job's own peak of ``workers + 1`` in flight."""
    sizes = []
    for n in names:
        dt, shape = ckpt.info(n)
        sizes.append(math.prod(shape) * dt.itemsize)
    return workers * max(sizes, default=0)


def _in_order(names: list[str], fn: Any, workers: int) -> Iterator[tuple[str, Any]]:
    """``(name, fn(name))`` in the order of ``names``, computed on ``workers`` threads (numpy
    releases the GIL) with at most ``workers + 1`` in flight, so memory stays bounded by the
    largest tensors."""
    if workers == 1:
        for n in names:
            yield n, fn(n)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowbit-tensor") as pool:
        pending: deque = deque()
        it = iter(names)
        for n in it:
            pending.append((n, pool.submit(fn, n)))
            if len(pending) >= workers + 1:
                break
        while pending:
            n, fut = pending.popleft()
            res = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fn, nxt)))
            yield n, res


def load(path: Source, *, as_numpy: bool = False) -> dict[str, Any]:
    """Dense tensors of a lowbit checkpoint: compressed tensors are rebuilt (dequantized,
    unpruned, multiplied out) exactly as the report measured them; kept tensors come back
    bit for bit. Every compressed tensor's checksum is verified (a mismatch names the tensor).
    Returns ``{name: torch.Tensor}`` (or numpy arrays with ``as_numpy=True``). A plain
    checkpoint without lowbit metadata is returned as it is. A compressed-tensors model directory (written
    with ``format="compressed-tensors"`` or by compressed-tensors itself) comes back with its quantized
    Linear weights dequantized in float32 as compressed-tensors computes them
    (:func:`~lowbit.checkpoint.compressed_tensors.load_dense`)."""
    ck = Checkpoint(path)
    raw = ck.metadata.get("lowbit")
    out: dict[str, np.ndarray] = {}
    if is_compressed_tensors(path):
        out = load_dense(path)
    elif raw is None:
        out = {n: ck.read(n) for n in ck.names()}
    else:
        try:
            meta = json.loads(raw)
            schemes, kept, tied = meta["tensors"], meta.get("kept", []), meta.get("tied", {})
            if not isinstance(schemes, dict) or not isinstance(kept, list) or not all(isinstance(k, str) for k in kept) \
                    or not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                             for k, v in tied.items()):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, RecursionError, ValueError):
            raise CheckpointError(f"{path}: the 'lowbit' metadata is not valid") from None
        names = set(ck.names())
        for n in kept:
            if n not in names:
                raise CheckpointError(f"{path}: kept tensor {n!r} is missing")
            out[n] = ck.read(n)
        by_tensor: dict[str, list[str]] = {}
        for k in ck.names():
            base, sep, _ = k.rpartition("::")
            if sep:
                by_tensor.setdefault(base, []).append(k)
        for n, scheme in schemes.items():
            stored = by_tensor.get(n, [])
            if not stored:
                raise CheckpointError(f"{path}: tensor {n!r}: its stored parts are missing")
            parts = {k[len(n) + 2:]: ck.read(k) for k in stored}
            try:
                out[n] = restore(n, scheme, parts)
            except (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError, RecursionError) as e:
                raise CheckpointError(f"{path}: tensor {n!r}: {_unnamed(e, n)}") from None
        for n, first in tied.items():  # the same tensor under a second name, as the source had it
            if first not in out or n in out:
                raise CheckpointError(f"{path}: tied tensor {n!r} names {first!r}, which is not stored, or is stored twice")
            out[n] = out[first]
    if as_numpy:
        return out
    import torch

    from precision.arrays import contiguous, like

    made: dict[int, Any] = {}  # tied names share one array, and so one tensor
    return {k: made.setdefault(id(v), like(contiguous(v), torch.empty(0))) for k, v in out.items()}
