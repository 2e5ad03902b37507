"""python -m bench.ptq: post-training quantization of the real MiniLM, native against torch.ao.

For each configuration, in one run: time to quantize, latency of encoding the
project's 200 sentences, latency of one encoder forward pass at batch 32 x 128
tokens against float32, the mean sentence-embedding cosine to float32 on the
100 sentences not used for calibration, and the ratios.
"""

from __future__ import annotations

import os
import time
import warnings

import torch

from quant import TOKEN_SPEC, TOKEN_SPEC_AFFINE, PerGroup, PTQConfig, QuantSpec, ptq
from quant.attention import status as attention_status

from .timing import benchmark_parser, Table, best_pair, best_time, write_rows

CONFIGS: dict[str, PTQConfig] = {
    "native W8 per-channel (weight-only)": PTQConfig(),
    "native W8A8 per-token dynamic + SmoothQuant 0.6": PTQConfig(
        activations=TOKEN_SPEC, activation_mode="dynamic", smoothquant=0.6),
    "native W8A8 per-token dynamic + SmoothQuant 0.6 + GELU in place": PTQConfig(
        activations=TOKEN_SPEC, activation_mode="dynamic", smoothquant=0.6,
        gelu_in_place=True),
    "native W8A8 per-token dynamic + SmoothQuant 0.6 + GELU in place + int8 attention": PTQConfig(
        activations=TOKEN_SPEC, activation_mode="dynamic", smoothquant=0.6,
        gelu_in_place=True, int8_attention=True),
    "native W8A8 per-token dynamic": PTQConfig(activations=TOKEN_SPEC, activation_mode="dynamic"),
    "native W8A8 per-token dynamic affine": PTQConfig(activations=TOKEN_SPEC_AFFINE, activation_mode="dynamic"),
    "native W8A8 per-token dynamic affine + SmoothQuant 0.6": PTQConfig(
        activations=TOKEN_SPEC_AFFINE, activation_mode="dynamic", smoothquant=0.6),
    "native W8A8 static per-tensor": PTQConfig(activations=QuantSpec()),
    "native W4 group-128 mse (weight-only)": PTQConfig(
        weights=QuantSpec(bits=4, granularity=PerGroup(128)), weight_calibration="mse"),
    "torch.ao dynamic (default, per-tensor)": PTQConfig(backend="torch.ao", weights=QuantSpec()),
    "torch.ao dynamic per-channel": PTQConfig(backend="torch.ao"),
    "torch.ao static (x86)": PTQConfig(backend="torch.ao", activations=QuantSpec(signed=False, symmetric=False)),
}


def run(repeat: int, only: list[str] | None = None, n_sentences: int = 200) -> list[dict]:
    """One row per configuration (times in seconds, weights in bytes); prints the table as it goes."""
    from bench.models import embed, embedding_cosine, feature_batches, sentence_model, sentences

    model = sentence_model()
    s = sentences()[:n_sentences]
    calib = feature_batches(model, s[::2])
    held = s[1::2]
    ref = embed(model, held)
    feats = model.tokenizer(s[:32], padding="max_length", truncation=True, max_length=128, return_tensors="pt")

    def forward(m):
        with torch.no_grad():
            return m(dict(feats))

    t_fwd = best_time(lambda: forward(model), repeat)
    t_enc = best_time(lambda: embed(model, s), max(1, repeat // 2))
    print(f"MiniLM on CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"float32: forward {len(feats['input_ids'])}x128 {t_fwd * 1e3:.1f} ms, encode {len(s)} sentences {t_enc * 1e3:.0f} ms")
    table = Table([("configuration", "configuration", "<80"), ("quantize_s", "quantize s", "10.2f"),
                   ("cosine", "cosine", "8.5f"), ("forward_ms", "fwd ms", "8.1f"), ("forward_speedup", "fwd x", "6.2f"),
                   ("encode_ms", "encode ms", "9.0f"), ("encode_speedup", "enc x", "6.2f"),
                   ("weights_mib", "weights MiB", "11.2f"), ("kernel", "kernel", "")])
    rows = []
    for name, config in CONFIGS.items():
        if only and not any(o in name for o in only):
            continue
        t0 = time.perf_counter()
        q, rep = ptq(model, config, calib)
        tq = time.perf_counter() - t0
        cos = embedding_cosine(ref, embed(q, held))["mean_cosine"]
        t_fwd, tf = best_pair(lambda: forward(model), lambda: forward(q), repeat)
        t_enc, te = best_pair(lambda: embed(model, s), lambda: embed(q, s), max(1, repeat // 2))
        kernel = rep.tensors[0].details.get("kernel", "torch.ao quantized::linear")
        if rep.meta.get("gelu_in_place"):
            kernel += f"; GELU in place after {len(rep.meta['gelu_in_place'])} layers"
        if rep.meta.get("attention"):
            kernel += f"; attention: {attention_status()}"
        rows.append(table.row(dict(configuration=name, quantize_s=tq, cosine=cos, forward_ms=tf * 1e3,
                                   forward_speedup=t_fwd / tf, encode_ms=te * 1e3, encode_speedup=t_enc / te,
                                   weights_mib=rep.totals["bytes_after"] / 2**20, kernel=kernel)))
    print(f"cosine: mean over the {len(held)} sentences not used for calibration; x: speed-up over float32 "
          "measured alternately with it (best of runs)")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("python -m bench.ptq", __doc__)
    p.add_argument("--repeat", type=int, default=5, help="timed runs per latency, best kept (default 5)")
    p.add_argument("--only", nargs="*", help="substring filter on configuration names")
    p.add_argument("--sentences", type=int, default=200, help="sentences used, half to calibrate (default 200)")
    a = p.parse_args(argv)
    if not 4 <= a.sentences <= 200:
        p.error("--sentences must be from 4 to 200")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    write_rows(run(a.repeat, a.only, a.sentences), a.json, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
