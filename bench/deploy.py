"""python -m bench.deploy: memory and speed of a quantized model loaded from a compressed-tensors directory.

For the bundled MiniLM and for a random-init Llama-style model of about 1 GB in bfloat16 (built from a
config in a temporary directory, removed afterwards), each checkpoint is written once per scheme with
``bench.quantize --format compressed-tensors`` and then loaded, each loader in a fresh process:

* ``dense``: transformers' ``from_pretrained`` of the float checkpoint (as stored, and in float32);
* ``transformers``: ``from_pretrained`` of the compressed-tensors directory (it decompresses the whole
  model on the first forward pass on a CPU);
* ``lowbit``: ``lowbit.load_quantized`` of the same directory (codes kept; W8A8 on int8 matmuls);
  ``lowbit+extras`` adds its optional int8 attention and GELU in place (MiniLM, W8A8).

Schemes: W8A8 (int8 weights per channel, dynamic per-token symmetric int8 inputs), for MiniLM also
W8A8 with asymmetric per-token inputs and GPTQ weights (``--method w8a8 --affine-activations --gptq``,
calibrated on the even lines of the project's sentence file), and int8 weight-only.

Per row: the parameter and buffer bytes after loading and after one forward pass, the process's peak
RSS at both points, the forward latency of a batch of 8 x 128 token ids (best of --repeat after a
warm-up) against the float32 model's, and the cosine of the output (last hidden state, or logits)
against the float32 model's on the same batch. For MiniLM also on the 100 sentences not used for
calibration (the odd lines): the mean cosine of the token outputs (padding left out) and of the
sentence embeddings (mean pooled and normalised, as all-MiniLM-L6-v2 is used).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .timing import Table, benchmark_parser, write_rows

BATCH, TOKENS = 8, 128
LLAMA: dict[str, Any] = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, tie_word_embeddings=False, max_position_embeddings=512)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _state_bytes(model: Any) -> int:
    """Bytes of every distinct parameter and buffer storage the model holds (compressed ones as stored)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def child(loader: str, model_dir: str, reference: str | None, repeat: int, dtype: str | None,
          batch: int = BATCH, tokens: int = TOKENS) -> dict[str, Any]:
    """One loader in this (fresh) process: load, measure, run ``batch`` x ``tokens`` token ids, measure;
    for an encoder with a tokenizer, also the held-out sentences."""
    import torch
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lowbit

    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if loader.startswith("lowbit"):
        model = lowbit.load_quantized(model_dir, int8_attention=loader == "lowbit+extras",
                                      gelu_in_place=loader == "lowbit+extras")
    else:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        cls = getattr(transformers, cfg["architectures"][0])
        model = cls.from_pretrained(model_dir, dtype=getattr(torch, dtype) if dtype else "auto").eval()
    load_s = time.perf_counter() - t0
    after_load = (_state_bytes(model), _status_kib("VmHWM"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, int(model.config.vocab_size), (batch, tokens), generator=g)

    def run() -> Any:
        with torch.inference_mode():
            return model(input_ids=ids)[0]

    first = run()  # transformers decompresses here
    best = float("inf")
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - t)
    outputs = {"cosine": out.float()}
    del first
    if (Path(model_dir) / "tokenizer.json").is_file() and not model.config.is_decoder:
        outputs.update(_sentence_outputs(model, model_dir))
    mask = outputs.pop("mask", None)  # the same sentences, so the same padding, in every process
    cosines: dict[str, Any] = {k: None for k in outputs}
    if reference is not None and Path(reference).is_file():
        refs = torch.load(reference)
        for k, v in outputs.items():
            r = refs[k]
            if k == "token_cosine":
                r, v = r[mask], v[mask]
            cosines[k] = float(torch.nn.functional.cosine_similarity(r.reshape(-1, r.shape[-1]), v.reshape(-1, v.shape[-1])).mean())
    elif reference is not None:
        torch.save(outputs, reference)
        cosines = {k: 1.0 for k in outputs}
    return {"load_s": load_s, "state_mib_loaded": after_load[0] / 2**20, "state_mib_run": _state_bytes(model) / 2**20,
            "peak_rss_mib_loaded": after_load[1] / 1024, "peak_rss_mib_run": _status_kib("VmHWM") / 1024,
            "import_rss_mib": base / 1024, "latency_ms": best * 1e3, **cosines}


def _sentence_outputs(model: Any, model_dir: str) -> dict[str, Any]:
    """Token outputs, their padding mask and the sentence embeddings of the held-out sentences."""
    import torch
    from transformers import AutoTokenizer

    from .models import pooled, sentences

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(sentences()[1::2], padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        h = model(**enc)[0].float()
    return {"token_cosine": h, "sentence_cosine": pooled(h, enc["attention_mask"]), "mask": enc["attention_mask"].bool()}


def _spawn(loader: str, model_dir: Path, reference: Path, repeat: int, dtype: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.deploy", "--child", loader, str(model_dir), "--reference", str(reference),
           "--repeat", str(repeat)] + (["--dtype", dtype] if dtype else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _quantize(src: Path, out: Path, args: list[str]) -> None:
    """``bench.quantize SRC ARGS --format compressed-tensors --out OUT`` (its report not printed)."""
    import contextlib
    import io

    from .quantize import main

    with contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(src), *args, "--format", "compressed-tensors", "--out", str(out), "--quiet", "--no-metrics"])
    if rc != 0:
        raise RuntimeError(f"bench.quantize {src} {' '.join(args)} --format compressed-tensors failed")


# (label, bench.quantize arguments, models); GPTQ calibrates on the even lines of the project's sentence file
SCHEMES: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("W8A8", ["--method", "w8a8"], ("minilm", "llama")),
    ("W8A8 affine+GPTQ", ["--method", "w8a8", "--affine-activations", "--gptq", "--calibration-data", "SENTENCES"],
     ("minilm",)),
    ("int8 weight-only", ["--method", "int8"], ("minilm", "llama")),
]


def _llama_dir(root: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    model: Any = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    model = model.to(torch.bfloat16)
    d = root / "llama"
    model.save_pretrained(str(d))
    del model
    return d


def run(models: list[str], repeat: int) -> list[dict]:
    from .models import minilm_dir, sentences

    table = Table([("model", "model", "<12"), ("scheme", "scheme", "<18"), ("loader", "loader", "<13"),
                   ("state_mib_loaded", "params MiB", "10.1f"), ("state_mib_run", "after fwd", "9.1f"),
                   ("peak_rss_mib_loaded", "peak RSS load", "13.0f"), ("peak_rss_mib_run", "peak RSS fwd", "12.0f"),
                   ("latency_ms", "fwd ms", "8.0f"), ("speedup_vs_f32", "x f32", "6.2f"), ("cosine", "cosine", "8.5f"),
                   ("token_cosine", "tok cos", "8.5f"), ("sentence_cosine", "sent cos", "8.5f")])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-deploy-") as tmp:
        root = Path(tmp)
        calibration = root / "calibration.txt"
        calibration.write_text("\n".join(sentences()[0::2]) + "\n", encoding="utf-8")
        for name in models:
            src = minilm_dir() if name == "minilm" else _llama_dir(root)
            reps = repeat if name == "minilm" else max(1, repeat // 3)
            ref = root / f"{name}_ref.pt"
            dense: list[tuple[str, str | None]] = [("float32", "float32")]
            if name == "llama":
                dense.append(("bfloat16", None))
            f32 = None
            for label, dt in dense:
                r = {"model": name, "scheme": f"dense {label}", "loader": "transformers", **_spawn("dense", src, ref, reps, dt)}
                f32 = f32 or r["latency_ms"]
                r["speedup_vs_f32"] = f32 / r["latency_ms"]
                rows.append(table.row(r))
            for i, (scheme, args, applies_to) in enumerate(SCHEMES):
                if name not in applies_to:
                    continue
                out = root / f"{name}_{i}"
                _quantize(src, out, [str(calibration) if x == "SENTENCES" else x for x in args])
                loaders = ["transformers", "lowbit"] + (["lowbit+extras"] if "W8A8" in scheme and name == "minilm" else [])
                for loader in loaders:
                    r = {"model": name, "scheme": scheme, "loader": loader, **_spawn(loader, out, ref, reps)}
                    assert f32 is not None
                    r["speedup_vs_f32"] = f32 / r["latency_ms"]
                    rows.append(table.row(r))
    print("params MiB: parameters and buffers held (quantized layers as stored); peak RSS: the process's high-water "
          "mark, imports included; x f32: forward speed against the dense float32 model; cosine: output against it; "
          "tok cos / sent cos: held-out sentences' token outputs / sentence embeddings against it")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("python -m bench.deploy", __doc__)
    p.add_argument("--models", nargs="+", choices=("minilm", "llama"), default=["minilm", "llama"])
    p.add_argument("--repeat", type=int, default=5, help="timed forward passes, best kept (Llama: a third)")
    p.add_argument("--child", nargs=2, metavar=("LOADER", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.reference, a.repeat, a.dtype)))
        return 0
    write_rows(run(a.models, a.repeat), a.json, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
