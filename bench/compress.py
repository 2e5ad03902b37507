"""python -m bench.compress: pruning and low rank on the real MiniLM, against the peers.

Part 1 (quality): for each method, the fraction of Linear-weight bytes kept
(in the storage format that ``compress`` writes), the mean relative weight
error and the mean sentence-embedding cosine to float32 over the project's 200
sentences; peers: ``torch.nn.utils.prune`` (no memory saved) and int8
per-channel for scale. Saves a PNG of cosine and error against memory kept
(matplotlib, optional extra ``lowbit[plot]``).

Part 2 (speed, one 4096 x 4096 float32 weight): lowbit magnitude pruning
against ``torch.nn.utils.prune.l1_unstructured`` (masks checked identical),
structured against ``ln_structured``, and exact against randomized low rank.
"""

from __future__ import annotations

import copy
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.utils.prune as tprune

from compress import factorize_model, low_rank, magnitude_prune, prune_model, structured_prune

from .timing import benchmark_parser, Table, best_pair, write_rows


def quality(plot: str | None, only: list[str] | None = None, n_sentences: int = 200) -> list[dict]:
    """One row per method: memory kept (fraction), mean relative weight error, embedding cosine."""
    from bench.models import embed, embedding_cosine, sentence_model, sentences
    from quant import PTQConfig, ptq

    model = sentence_model()
    s = sentences()[:n_sentences]
    ref = embed(model, s)
    cases = [("magnitude 25%", lambda: prune_model(model, 0.25)), ("magnitude 50%", lambda: prune_model(model, 0.5)),
             ("magnitude 75%", lambda: prune_model(model, 0.75)),
             ("global magnitude 50%", lambda: prune_model(model, 0.5, method="global")),
             ("2:4", lambda: prune_model(model, 0.5, method="nm")),
             ("FFN structured 25%", lambda: prune_model(model, 0.25, method="ffn")),
             ("FFN structured 50%", lambda: prune_model(model, 0.5, method="ffn")),
             ("heads 25%", lambda: prune_model(model, 0.25, method="heads")),
             ("low rank 75% params", lambda: factorize_model(model, ratio=0.75)),
             ("low rank 50% params", lambda: factorize_model(model, ratio=0.5)),
             ("low rank 25% params", lambda: factorize_model(model, ratio=0.25)),
             ("int8 per-channel (quant)", lambda: ptq(model, PTQConfig()))]
    rows = []
    table = Table([("method", "method", "<38"), ("kept", "memory kept", "11.3f"), ("rel", "weight rel err", "14.3f"),
                   ("cos", "cosine", "8.4f"), ("note", "", "")])
    for name, f in cases:
        if only and not any(o in name for o in only):
            continue
        q, rep = f()
        t = rep.totals
        rows.append(table.row(dict(part="quality", method=name, kept=t["bytes_after"] / t["bytes_before"],
                                   rel=t["mean_rel_error"], cos=embedding_cosine(ref, embed(q, s))["mean_cosine"])))
    # the peer: torch.nn.utils.prune keeps the dense weight and adds weight_orig + weight_mask
    for peer, glob in (("torch.nn.utils.prune 50% (per layer)", False), ("torch.nn.utils.prune 50% (global)", True)):
        if only and not any(o in peer for o in only):
            continue
        m = copy.deepcopy(model)
        lins = [mod for mod in m.modules() if type(mod) is torch.nn.Linear]
        before = sum(mod.weight.numel() * 4 for mod in lins)
        if glob:
            tprune.global_unstructured([(mod, "weight") for mod in lins], tprune.L1Unstructured, amount=0.5)
        else:
            for mod in lins:
                tprune.l1_unstructured(mod, "weight", 0.5)
        orig = [mod.get_parameter("weight_orig") for mod in lins]
        held = sum(o.numel() * 4 + mod.get_buffer("weight_mask").numel() * 4 for o, mod in zip(orig, lins))
        rel = float(np.mean([float((mod.weight - o).norm() / o.norm()) for o, mod in zip(orig, lins)]))
        rows.append(table.row(dict(part="quality", method=peer, kept=held / before, rel=rel,
                                   cos=embedding_cosine(ref, embed(m, s))["mean_cosine"],
                                   note="weight_orig + mask before prune.remove; dense 1.000 after")))
    print("memory kept: bytes stored / dense float32 bytes of the compressed Linear weights; "
          f"cosine: mean over {len(s)} sentences")
    if plot:
        save_plot(rows, plot)
    return rows


def save_plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'lowbit[plot]'): no plot written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for r in rows:
        for ax, key in zip(axes, ("cos", "rel")):
            ax.scatter(r["kept"], r[key], s=40)
            ax.annotate(r["method"], (r["kept"], r[key]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    axes[0].set(xlabel="memory kept (fraction of dense float32)", ylabel="sentence-embedding cosine to float32",
                title="MiniLM: quality vs memory")
    axes[1].set(xlabel="memory kept (fraction of dense float32)", ylabel="mean relative weight error",
                title="MiniLM: weight error vs memory")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def speed(n: int, repeat: int, rank: int) -> list[dict]:
    """One row per comparison on an n x n float32 weight (times in milliseconds)."""
    torch.manual_seed(0)
    w = torch.randn(n, n)
    a = w.numpy()

    def torch_l1():
        lin = torch.nn.Linear(1, 1)
        lin.weight = torch.nn.Parameter(w.clone())
        tprune.l1_unstructured(lin, "weight", 0.5)
        return lin.weight_mask

    def torch_ln():
        lin = torch.nn.Linear(1, 1)
        lin.weight = torch.nn.Parameter(w.clone())
        tprune.ln_structured(lin, "weight", 0.5, n=2, dim=0)
        return lin.weight_mask

    table = Table([("task", "task", "<34"), ("peer", "peer", "<26"), ("lowbit_ms", "lowbit ms", "10.1f"),
                   ("peer_ms", "peer ms", "10.1f"), ("speedup", "speed-up", "8.1f"), ("check", "check", "")])
    rows = []
    same = torch.equal(magnitude_prune(w, 0.5).mask, torch_l1().bool())
    t_ours, t_torch = best_pair(lambda: magnitude_prune(a, 0.5), torch_l1, repeat)
    rows.append(table.row(dict(part="speed", task=f"{n}x{n} magnitude 50%", peer="torch l1_unstructured",
                               lowbit_ms=t_ours * 1e3, peer_ms=t_torch * 1e3, speedup=t_torch / t_ours,
                               check=f"identical masks: {same}", identical=same)))
    kept_t = torch_ln().any(dim=1).nonzero().ravel()
    same_s = torch.equal(structured_prune(w, 0.5).kept, kept_t)
    t_ours, t_torch = best_pair(lambda: structured_prune(a, 0.5), torch_ln, repeat)
    rows.append(table.row(dict(part="speed", task=f"{n}x{n} structured 50%", peer="torch ln_structured",
                               lowbit_ms=t_ours * 1e3, peer_ms=t_torch * 1e3, speedup=t_torch / t_ours,
                               check=f"identical rows: {same_s}", identical=same_s)))
    t0 = time.perf_counter()
    ex = low_rank(a, rank, method="exact")
    t_ex = time.perf_counter() - t0
    t0 = time.perf_counter()
    rn = low_rank(a, rank, method="randomized")
    t_rn = time.perf_counter() - t0
    e_ex, e_rn = ex.report.tensors[0].rel_error, rn.report.tensors[0].rel_error
    rows.append(table.row(dict(part="speed", task=f"{n}x{n} low rank r={rank} randomized", peer="exact SVD (lowbit)",
                               lowbit_ms=t_rn * 1e3, peer_ms=t_ex * 1e3, speedup=t_ex / t_rn,
                               check=f"rel err {e_rn:.4f} vs optimum {e_ex:.4f}", rel_error=e_rn, optimal_rel_error=e_ex)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("python -m bench.compress", __doc__)
    p.add_argument("--plot", default="compress_tradeoff.png", help="PNG path ('' for none)")
    p.add_argument("--size", type=int, default=4096, help="matrix size for the speed part (default 4096)")
    p.add_argument("--rank", type=int, default=512, help="rank for the low-rank speed comparison")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", nargs="*", help="substring filter on the quality part's method names")
    p.add_argument("--sentences", type=int, default=200, help="sentences for the cosine (default 200)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    a = p.parse_args(argv)
    if not 1 <= a.rank < a.size or not 1 <= a.sentences <= 200:
        p.error("--rank must be from 1 to --size - 1, --sentences from 1 to 200")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    rows = []
    if not a.skip_quality:
        rows += quality(a.plot or None, a.only, a.sentences)
    if not a.skip_speed:
        rows += speed(a.size, a.repeat, a.rank)
    write_rows(rows, a.json, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
