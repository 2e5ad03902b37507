"""python -m bench.attention: lowbit's int8 attention against torch's scaled_dot_product_attention.

One MiniLM attention layer's shapes (batch 32, 12 heads, 128 tokens, head
dimension 32) on random Q, K, V laid out as a linear layer's output leaves them
(heads side by side in each token's row). Masks: none, and the key-padding mask
of the project's first 32 sentences padded to 128 tokens (as ``bench.ptq``'s
forward pass has them). Prints the best time of each, measured round-robin,
the ratio to torch's float32 attention, and the relative error against it.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from quant.attention import int8_attention, status

from .timing import benchmark_parser, Table, best_times, write_rows


def run(repeat: int, batch: int = 32) -> list[dict]:
    """One row per mask (times in milliseconds); prints the table as it goes."""
    from bench.models import sentence_model, sentences

    tok = sentence_model().tokenizer
    keep = tok(sentences()[:batch], padding="max_length", truncation=True, max_length=128,
               return_tensors="pt")["attention_mask"].bool()
    B, H, L, D = batch, 12, 128, 32
    g = torch.Generator().manual_seed(0)
    q, k, v = (t.transpose(1, 2) for t in torch.randn(B, L, 3, H, D, generator=g).unbind(2))
    print(f"attention at batch {B} x {H} heads x {L} tokens x dim {D}, {torch.get_num_threads()} threads; "
          f"lowbit: {status()}")
    table = Table([("mask", "mask", "<42"), ("torch_ms", "torch float32 ms", "16.2f"),
                   ("lowbit_ms", "lowbit int8 ms", "14.2f"), ("speedup", "x", "6.2f"), ("rel_error", "rel. error", "10.4f")])
    rows = []
    with torch.no_grad():
        for name, mask in ((f"none (all {L} keys)", None),
                           (f"key padding ({keep.sum(1).float().mean():.1f} real tokens on average)",
                            keep[:, None, None, :])):
            t = best_times({"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                            "int8": lambda: int8_attention(q, k, v, mask)}, repeat)
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            err = ((int8_attention(q, k, v, mask) - ref).norm() / ref.norm()).item()
            rows.append(table.row(dict(mask=name, torch_ms=t["sdpa"] * 1e3, lowbit_ms=t["int8"] * 1e3,
                                       speedup=t["sdpa"] / t["int8"], rel_error=err, kernel=status())))
    print("x: speed-up over torch.nn.functional.scaled_dot_product_attention in the same run (best of runs)")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("python -m bench.attention", __doc__)
    p.add_argument("--repeat", type=int, default=20, help="timed runs of each, best kept (default 20)")
    p.add_argument("--batch", type=int, default=32, help="sequences per batch (default 32)")
    a = p.parse_args(argv)
    if not 1 <= a.batch <= 200:
        p.error("--batch must be from 1 to 200")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    write_rows(run(a.repeat, a.batch), a.json, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
