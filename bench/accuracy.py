"""python -m bench.accuracy: accuracy beyond round to nearest on the real MiniLM, in one run.

Weights (the 36 encoder Linear layers): round to nearest (absmax, minmax, MSE clip), GPTQ,
AWQ and AWQ + GPTQ at W4 group 128 (symmetric and affine), W3 group 128 and W8 per channel;
fp8 e4m3 per channel, MXFP4 and NVFP4, each as its own encoding and with GPTQ.
Pruning: magnitude, Wanda and SparseGPT at 50% unstructured and 2:4, 2:4 with int8, and 50%
with W4 group 128 jointly (SparseGPT + GPTQ in one sweep). When llm-compressor imports, its
GPTQ and SparseGPT run in the same process on the same data as the peers (their ``stored MiB``
is not measured: llm-compressor keeps fake-quantized float weights in the model).

Calibration: the even sentences of the project's file (100); the cosine is the mean
sentence-embedding cosine to float32 on the 100 odd sentences, never seen in calibration.
``stored MiB``: the Linear weights as the lowbit checkpoint stores them (codes packed, scales,
masks); ``time s``: the compression alone (no evaluation), on this machine's threads.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch

from compress import prune_model
from quant import AWQ, GPTQ, PerChannel, PerGroup, PTQConfig, QuantSpec, ptq
from quant.modules import QuantizedLinear

from .timing import Table, benchmark_parser, write_rows

W4_SYM = QuantSpec(bits=4, symmetric=True, granularity=PerGroup(128))
W4 = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(128))
W3 = QuantSpec(bits=3, symmetric=False, granularity=PerGroup(128))
W8 = QuantSpec(granularity=PerChannel(0))


def _weights(spec: QuantSpec, calibration: str = "minmax", **kw: Any) -> PTQConfig:
    return PTQConfig(weights=spec, weight_calibration=calibration, **kw)


def weight_configs() -> dict[str, PTQConfig]:
    """The weight-quantization rows: name -> PTQConfig."""
    out: dict[str, PTQConfig] = {}
    for label, spec in (("W4 g128 sym", W4_SYM), ("W4 g128 affine", W4), ("W3 g128 affine", W3),
                        ("W8 per-channel", W8)):
        if spec is W4_SYM:
            out[f"{label} RTN absmax"] = _weights(spec)
        if spec is not W4_SYM:
            out[f"{label} RTN minmax"] = _weights(spec)
        out[f"{label} RTN mse"] = _weights(spec, "mse")
        out[f"{label} AWQ (runtime scales) mse"] = _weights(spec, "mse", awq=AWQ(runtime_scales=True))
        out[f"{label} GPTQ act-order minmax"] = _weights(spec, gptq=GPTQ())
        out[f"{label} GPTQ act-order mse"] = _weights(spec, "mse", gptq=GPTQ())
        if spec is W4:
            out[f"{label} GPTQ mse (no act-order)"] = _weights(spec, "mse", gptq=GPTQ(act_order=False))
            out[f"{label} AWQ (runtime scales) + GPTQ mse"] = _weights(spec, "mse", gptq=GPTQ(),
                                                                         awq=AWQ(runtime_scales=True))
            out[f"{label} AWQ (folded only) + GPTQ mse"] = _weights(spec, "mse", gptq=GPTQ(), awq=AWQ())
    return out


def format_configs() -> dict[str, tuple[Any, bool]]:
    """Float and block formats, round to nearest and GPTQ (through the checkpoint path's
    solver): name -> (value method, GPTQ or not)."""
    from precision.blocks import BlockCast
    from precision.cast import FloatCast

    out: dict[str, tuple[Any, bool]] = {}
    for label, method in (("fp8 e4m3 per-channel", FloatCast.for_format("fp8_e4m3fn")),
                          ("MXFP4", BlockCast("mxfp4")), ("NVFP4", BlockCast("nvfp4"))):
        out[f"{label} RTN"] = (method, False)
        out[f"{label} GPTQ act-order"] = (method, True)
    return out


def _with_formats(model: Any, method: Any, gptq: bool, calib: list[Any]) -> Any:
    """A copy of ``model`` whose encoder Linear weights are ``method``'s values: its own encoding, or
    GPTQ's solution (:func:`lowbit.checkpoint.calibrated.solve`, as a checkpoint job stores it)."""
    from lowbit.checkpoint.calibrated import Calibrated, solve

    q = copy.deepcopy(model)
    layers = {n + ".weight": m for n, m in q.named_modules() if type(m) is torch.nn.Linear}
    if gptq:
        values = {n: torch.from_numpy(s.values) for n, s in
                  solve(model, method, Calibrated(gptq=GPTQ()), calib).items()}
    else:
        values = {n: torch.from_numpy(method.encode(m.weight.detach().numpy()).values) for n, m in layers.items()}
    with torch.no_grad():
        for n, v in values.items():
            layers[n].weight.copy_(v)
    return q


def _format_mib(model: Any, method: Any) -> float:
    from precision.methods import ValueStore, parts_nbytes

    store = ValueStore(method, np.dtype(np.float32))
    return sum(parts_nbytes(store.store(method.encode(m.weight.detach().numpy()))[0])
               for m in model.modules() if type(m) is torch.nn.Linear) / 2**20


def prune_configs() -> dict[str, dict[str, Any]]:
    """The pruning rows: name -> keyword arguments of ``prune_model`` (sparsity 0.5)."""
    cal = ("wanda", "wanda_nm", "sparsegpt", "sparsegpt_nm")
    rows: dict[str, dict[str, Any]] = {
        "50% magnitude": dict(method="magnitude"),
        "50% Wanda": dict(method="wanda"),
        "50% SparseGPT": dict(method="sparsegpt"),
        "2:4 magnitude": dict(method="nm"),
        "2:4 Wanda": dict(method="wanda_nm"),
        "2:4 SparseGPT": dict(method="sparsegpt_nm"),
        "2:4 Wanda + int8": dict(method="wanda_nm", quantize=W8),
        "2:4 SparseGPT + int8": dict(method="sparsegpt_nm", quantize=W8),
        "50% SparseGPT + W4 g128 GPTQ (joint) mse": dict(method="sparsegpt", quantize=W4, gptq=GPTQ(act_order=False),
                                                          calibration="mse"),
    }
    for kw in rows.values():
        kw["needs_calibration"] = kw["method"] in cal
    return rows


def _stored_mib(model: torch.nn.Module) -> float:
    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            total += m.stored_bytes - (0 if m.bias is None else m.bias.numel() * m.bias.element_size())
    return total / 2**20


def _llmcompressor(model: Any, texts: list[str], recipe: Callable[[], Any]) -> Callable[[], Any]:
    """A call that runs llm-compressor's ``oneshot`` with ``recipe()`` on a copy of the model's BERT."""
    from datasets import Dataset
    from llmcompressor import oneshot

    enc = [model.tokenizer(t, truncation=True, max_length=128) for t in texts]
    ds = Dataset.from_list([{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in enc])

    def run() -> Any:
        m = copy.deepcopy(model)
        oneshot(model=m[0].auto_model, dataset=ds, recipe=recipe(), num_calibration_samples=len(ds),
                max_seq_length=128, pipeline="basic")
        return m
    return run


def peer_recipes() -> dict[str, Callable[[], Any]] | None:
    """llm-compressor's GPTQ and SparseGPT for the peer rows, or None when it is not installed."""
    try:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.pruning import SparseGPTModifier
        from llmcompressor.modifiers.quantization import GPTQModifier
    except ImportError:
        return None

    def gptq(symmetric: bool) -> Callable[[], Any]:
        args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=128,
                                actorder="static")
        return lambda: GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)},
                                    ignore=[])
    return {"W4 g128 sym GPTQ act-order (static)": gptq(True),
            "W4 g128 affine GPTQ act-order (static)": gptq(False),
            "50% SparseGPT": lambda: SparseGPTModifier(sparsity=0.5, mask_structure="0:0", targets=["Linear"]),
            "2:4 SparseGPT": lambda: SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"])}


def run(only: list[str] | None = None, peer: bool = True) -> list[dict]:
    """One row per configuration; prints the table as it goes."""
    from bench.models import embed, embedding_cosine, feature_batches, sentence_model, sentences

    model = sentence_model()
    s = sentences()
    calib_texts, held = s[::2], s[1::2]
    calib = feature_batches(model, calib_texts)
    ref = embed(model, held)
    dense_mib = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear)) / 2**20
    print(f"MiniLM on CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; {len(calib_texts)} calibration "
          f"sentences, {len(held)} held out; float32 Linear weights {dense_mib:.2f} MiB")
    table = Table([("configuration", "configuration", "<48"), ("implementation", "implementation", "<14"),
                   ("cosine", "cosine", "8.5f"), ("stored_mib", "stored MiB", "10.2f"), ("time_s", "time s", "7.2f")])
    rows: list[dict] = []

    def want(name: str) -> bool:
        return not only or any(o in name for o in only)

    def add(name: str, impl: str, qmodel: Any, seconds: float, mib: float) -> None:
        cos = embedding_cosine(ref, embed(qmodel, held))["mean_cosine"]
        rows.append(table.row(dict(configuration=name, implementation=impl, cosine=cos, stored_mib=mib,
                                   time_s=seconds)))

    for name, config in weight_configs().items():
        if want(name):
            t0 = time.perf_counter()
            q, _ = ptq(model, config, calib if config.needs_calibration else None, eval_data=[])
            add(name, "lowbit", q, time.perf_counter() - t0, _stored_mib(q))
    recipes = peer_recipes() if peer else None
    if peer and recipes is None:
        print("  (llm-compressor is not installed: no peer rows)")
    peers = {n: r for n, r in (recipes or {}).items() if want(n)}
    for name in [n for n in peers if "GPTQ" in n]:
        t0 = time.perf_counter()
        q = _llmcompressor(model, calib_texts, peers[name])()
        add(name, "llm-compressor", q, time.perf_counter() - t0, float("nan"))
    for name, (method, use_gptq) in format_configs().items():
        if want(name):
            t0 = time.perf_counter()
            q = _with_formats(model, method, use_gptq, calib)
            add(name, "lowbit", q, time.perf_counter() - t0, _format_mib(model, method))
    for name, kw in prune_configs().items():
        if want(name):
            kw = dict(kw)
            cal = kw.pop("needs_calibration")
            t0 = time.perf_counter()
            q, rep = prune_model(model, 0.5, calibration_data=calib if cal else None, **kw)
            add(name, "lowbit", q, time.perf_counter() - t0, rep.totals["bytes_after"] / 2**20)
            if name in peers:  # the peer right after lowbit's row, on the same data
                t0 = time.perf_counter()
                q = _llmcompressor(model, calib_texts, peers[name])()
                add(name, "llm-compressor", q, time.perf_counter() - t0, float("nan"))
    print("cosine: mean sentence-embedding cosine to float32 on the held-out sentences")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("python -m bench.accuracy", __doc__)
    p.add_argument("--only", nargs="*", help="substring filter on configuration names")
    p.add_argument("--no-peer", action="store_true", help="skip llm-compressor even when it is installed")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    write_rows(run(a.only, not a.no_peer), a.json, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
