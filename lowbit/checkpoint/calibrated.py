"""Calibrated checkpoint jobs: GPTQ, AWQ, SparseGPT and Wanda decide, the chain's methods store.

A calibrated method needs the model, not only its tensors: it runs calibration text through
the model and solves the layers in forward order (:func:`quant.solve.solve_layers`). The job
is then two steps, and the stored form stays the chain's own (the RTN integer form, bitmask
or N:M plus values), so every reader takes the result unchanged::

    model = ...  # the model whose checkpoint is compressed, e.g. a sentence-transformers model
    batches = text_batches(model, texts)
    solutions = solve(model, "prune,int4", Calibrated(pruning="sparsegpt", gptq=GPTQ()), batches)
    compress_checkpoint(checkpoint, "out.safetensors", chain, solutions=solutions)

``python -m bench.quantize MODEL_DIR --method int4 --gptq --calibration-data FILE`` does both.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from compress.storage import MagnitudePrune, NMPrune
from precision.methods import Method, Solution
from quant.awq import AWQ
from quant import QParams
from quant.gptq import GPTQ, Pruning, grid_for
from quant.solve import QUANTIZERS, Solver, solve_layers

from . import hf
from .chain import Chain, names_matching
from .pipeline import IN_BLOCK, causal_lm_dir

PRUNERS = ("wanda", "sparsegpt")


@dataclass(frozen=True)
class Calibrated:
    """What a checkpoint job solves from calibration data (each optional, at least one):

    * ``pruning``: ``"wanda"`` or ``"sparsegpt"`` chooses the mask of the chain's prune step
      (``MagnitudePrune(sparsity)``: that fraction unstructured; ``NMPrune(n, m)``: N:M);
    * ``gptq``: the chain's integer step is solved by GPTQ (jointly with SparseGPT when both);
    * ``awq``: an AWQ input scale per group of layers, folded into the operation before it where
      that provably keeps the model's output (a checkpoint has no runtime scales).
    """

    pruning: str | None = None
    gptq: GPTQ | None = None
    awq: AWQ | None = None

    def __post_init__(self) -> None:
        if self.pruning is not None and self.pruning not in PRUNERS:
            raise ValueError(f"Calibrated: pruning must be one of {PRUNERS} or None, got {self.pruning!r}")
        if self.gptq is not None and not isinstance(self.gptq, GPTQ):
            raise TypeError(f"Calibrated: gptq must be a quant.GPTQ value, got {type(self.gptq).__name__}")
        if self.awq is not None:
            if not isinstance(self.awq, AWQ):
                raise TypeError(f"Calibrated: awq must be a quant.AWQ value, got {type(self.awq).__name__}")
            if self.awq.runtime_scales:
                raise ValueError("Calibrated: a checkpoint has no place for runtime input scales; "
                                 "use AWQ(runtime_scales=False)")
        if self.pruning is None and self.gptq is None and self.awq is None:
            raise ValueError("Calibrated: give pruning=, gptq= or awq=")
        if self.pruning == "wanda" and self.gptq is not None:
            raise ValueError("Calibrated: GPTQ's updates would refill Wanda's mask; use pruning='sparsegpt' "
                             "with gptq for a joint pass")

    def describe(self) -> str:
        return " + ".join(s for s in (self.awq and self.awq.describe(), self.pruning,
                                      self.gptq and self.gptq.describe()) if s)


def solver_for(chain: Chain, calibrated: Calibrated) -> Solver:
    """The layer solver that ``calibrated`` asks of ``chain`` (ValueError if the chain cannot store it)."""
    values, structure = chain.values, chain.structure
    if values is not None and not isinstance(values, QUANTIZERS):
        raise ValueError(f"the calibrated methods quantize to integers, float formats and MX/NVFP4 blocks; the "
                         f"chain's value step is {values.describe()}")
    if values is None and (calibrated.gptq is not None or calibrated.awq is not None):
        raise ValueError("GPTQ and AWQ solve quantized weights; add a value step (e.g. int4, fp8_e4m3fn, mxfp4)")
    if values is not None and (calibrated.gptq is not None or calibrated.awq is not None):
        grid_for(values, (1, 1 << 12))  # refuses what the sweep cannot round to (GGUF blocks, stochastic)
    if calibrated.pruning is not None:
        if isinstance(structure, MagnitudePrune):
            pruning = Pruning(float(structure.sparsity))
            nm = (0, 0)
        elif isinstance(structure, NMPrune):
            pruning, nm = Pruning(n=structure.n, m=structure.m), (structure.n, structure.m)
        else:
            raise ValueError(f"{calibrated.pruning} chooses the mask of a prune step (magnitude sparsity or N:M); "
                             f"the chain's structure step is {structure.describe() if structure else 'none'}")
        if calibrated.pruning == "sparsegpt":
            return Solver(quantizer=values, gptq=calibrated.gptq, awq=calibrated.awq, sparsegpt=pruning)
        from compress.calibrated import wanda_mask

        def mask(w: torch.Tensor, inputs: Any) -> torch.Tensor:
            return wanda_mask(w, inputs, None if nm[1] else pruning.sparsity, n=nm[0], m=nm[1])
        return Solver(quantizer=values, awq=calibrated.awq, mask=mask, mask_name="Wanda")
    if structure is not None:
        raise ValueError(f"the chain prunes with {structure.describe()}; give pruning='wanda' or 'sparsegpt' to "
                         "solve its mask from calibration data, or drop the calibrated methods")
    return Solver(quantizer=values, gptq=calibrated.gptq, awq=calibrated.awq)


@torch.no_grad()
def solve(model: nn.Module, method: Chain | Method | str, calibrated: Calibrated, batches: Iterable[Any], *,
          include: str | None = None, exclude: str | None = None,
          tensor_names: Iterable[str] | None = None, blocks_only: bool = False) -> dict[str, Solution]:
    """Solve every ``nn.Linear`` weight of ``model`` (on a copy; ``model`` is untouched) whose
    name matches ``include`` and not ``exclude`` (regular expressions), in forward order
    on ``batches`` (model inputs, as ``ptq`` takes them). Returns ``{parameter name: Solution}`` for
    :func:`~lowbit.checkpoint.compress_checkpoint` (``solutions=``): the solved weights, and every
    other parameter whose values changed (the LayerNorm or value-projection an AWQ scale was folded
    into).

    The name the patterns match is the checkpoint's tensor name where ``tensor_names`` (the checkpoint's)
    is given, as :func:`~lowbit.checkpoint.compress_checkpoint` matches them: a parameter stands for the
    tensor of the same name or one that ends with it after a ``.`` (sentence-transformers prefixes its
    modules with ``0.auto_model.``); without ``tensor_names``, the model's own parameter name. With
    ``tensor_names``, a layer whose weight has no tensor of its own (a head tied to the embedding) is not
    solved. ``blocks_only``: only layers inside the repeated blocks (``...layers.3...``), as
    :func:`~lowbit.checkpoint.compress_checkpoint` selects on a causal LM by default."""
    chain = Chain.of(method)
    solver = solver_for(chain, calibrated)
    work = copy.deepcopy(model).eval()
    conv = conv1d_as_linear(work)  # GPT-2's Conv1D layers, solved as the Linear layers they are
    if conv and isinstance(chain.structure, NMPrune):
        raise ValueError(f"N:M sparsity runs along the input axis, which {', '.join(sorted(conv)[:2])}... (Conv1D) "
                         "store first (in, out); lowbit's N:M storage groups the last axis: prune these "
                         "unstructured (--sparsity) or exclude them")
    names = None if tensor_names is None else list(tensor_names)

    def name_of(param: str) -> str:
        hits = [] if names is None else names_matching(param, names)
        return hits[0] if len(hits) == 1 else param

    def stored(param: str) -> bool:  # a head tied to the embedding has no tensor of its own to store
        return names is None or len(names_matching(param, names)) == 1

    layers = [(n, m) for n, m in work.named_modules() if type(m) is nn.Linear and stored(n + ".weight")
              and (include is None or re.search(include, name_of(n + ".weight")))
              and not (exclude and re.search(exclude, name_of(n + ".weight")))
              and not (blocks_only and not IN_BLOCK.search(name_of(n + ".weight")))]
    if not layers:
        raise ValueError("solve: no nn.Linear layer of the model is selected")
    data = list(batches)
    if not data:
        raise ValueError("solve: no calibration batches")
    solved, unreached = solve_layers(work, layers, data, solver)
    if unreached:
        raise ValueError(f"solve: the calibration data never reaches {', '.join(unreached[:5])}")
    out: dict[str, Solution] = {}
    for n, sol in solved.items():
        s = Solution(sol.values.numpy(), None if sol.keep is None else sol.keep.numpy(), sol.qparams,
                     sol.reference.numpy())
        out[n + ".weight"] = _stored_as_conv1d(s, chain) if n in conv else s
    before = dict(model.named_parameters())
    for n, p in work.named_parameters():
        if n not in out and n.rpartition(".")[0] in conv and n.endswith(".weight"):
            if not torch.equal(p.T, before[n]):  # an AWQ scale folded into a Conv1D that is not solved
                out[n] = Solution(p.detach().float().T.numpy().copy())
        elif n not in out and not torch.equal(p, before[n]):
            out[n] = Solution(p.detach().float().numpy().copy())
    return out


def conv1d_as_linear(model: nn.Module) -> set[str]:
    """Replace every transformers ``Conv1D`` of ``model`` (GPT-2's: ``x @ W + b`` with ``W`` stored
    (in, out)) by the ``nn.Linear`` that computes the same (``weight = W.T``), in place; returns their names."""
    names = set()
    for name, m in list(model.named_modules()):
        if type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.ndim == 2:
            w = m.weight.detach()
            lin = nn.Linear(w.shape[0], w.shape[1], bias=m.bias is not None, dtype=w.dtype, device=w.device)
            with torch.no_grad():
                lin.weight.copy_(w.T)
                if m.bias is not None:
                    lin.bias.copy_(m.bias.detach())
            model.set_submodule(name, lin)
            names.add(name)
    return names


def _stored_as_conv1d(s: Solution, chain: Chain) -> Solution:
    """A solution found on the (out, in) Linear, as the Conv1D's (in, out) tensor stores it: values, mask
    and reference transposed, integer params transposed under the chain's spec for output channels on
    axis 1 (:meth:`Chain.for_channel_axis`)."""
    qp = s.qparams
    if qp is not None:
        spec = getattr(chain.for_channel_axis(1).values, "spec", None)
        if not isinstance(qp, QParams) or spec is None:
            raise ValueError("solve: GPT-2's Conv1D weights take integer value methods (int2-int8) with the "
                             "calibrated solvers; float and block formats are not carried for them")
        qp = QParams(np.ascontiguousarray(qp.scale.T), np.ascontiguousarray(qp.zero_point.T), spec, tuple(qp.shape[::-1]))
    return Solution(np.ascontiguousarray(s.values.T), None if s.keep is None else np.ascontiguousarray(s.keep.T), qp,
                    None if s.reference is None else np.ascontiguousarray(s.reference.T))


# ------------------------------------------------------------------ models and text for the CLI
def load_model(model_dir: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(model, tokenizer-like) from a directory: a sentence-transformers model when it has
    ``modules.json``, else a transformers ``AutoModel`` with its ``AutoTokenizer``; offline."""
    d = Path(model_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if (d / "modules.json").is_file():
        st = hf.sentence_transformers()
        with hf.quiet_imports():
            m = st.SentenceTransformer(str(d), device="cpu")
        return m, m
    tf = hf.transformers()
    with hf.quiet_imports():
        auto = tf.AutoModelForCausalLM if causal_lm_dir(d) else tf.AutoModel
        return auto.from_pretrained(str(d), local_files_only=True, dtype=torch.float32).eval(), \
            tf.AutoTokenizer.from_pretrained(str(d), local_files_only=True)





def read_texts(path: str | os.PathLike, samples: int | None = None) -> list[str]:
    """The non-empty lines of a UTF-8 text file (the first ``samples`` of them)."""
    lines = [t.strip() for t in Path(path).read_text(encoding="utf-8").splitlines() if t.strip()]
    if not lines:
        raise ValueError(f"{path}: no calibration text (the file has no non-empty line)")
    return lines[:samples] if samples is not None else lines


def text_batches(model: Any, texts: list[str], batch_size: int = 32, max_length: int = 512) -> list[Any]:
    """Tokenized batches of ``texts`` for ``model`` (a sentence-transformers model tokenizes itself;
    otherwise ``model`` is the tokenizer: padded, truncated to ``max_length`` tokens)."""
    tok = getattr(model, "tokenize") if isinstance(model, nn.Module) else None  # a tokenizer's own tokenize splits words
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        out.append(tok(chunk) if tok is not None else
                   dict(model(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")))
    return out


def packed_batches(tokenizer: Any, text: str, seqlen: int, samples: int, batch_size: int = 8) -> list[Any]:
    """``text`` (documents of any length) tokenized as one stream and cut into ``samples`` sequences of
    ``seqlen`` tokens (fewer where the text runs out; a last partial sequence is dropped unless it is
    the only one), as decoder LLMs are calibrated: batches of ``batch_size`` sequences, no padding."""
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer of at least 2 tokens, got {seqlen!r}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError("the calibration text holds fewer than 2 tokens")
    n = min(samples, max(1, ids.numel() // seqlen))
    seqs = ids[:n * seqlen].reshape(n, -1) if ids.numel() >= seqlen else ids[None]
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in seqs.split(batch_size)]


def calibration_tokens(batches: Iterable[Any]) -> int:
    """The tokens the calibration batches hold (padding left out)."""
    n = 0
    for b in batches:
        if isinstance(b, dict) and "attention_mask" in b:
            n += int(torch.as_tensor(b["attention_mask"]).sum())
        elif isinstance(b, dict) and "input_ids" in b:
            n += int(torch.as_tensor(b["input_ids"]).numel())
    return n

