"""Quality of a compressed causal LM against its float model: perplexity, KL divergence, top-1 agreement.

The measures llama.cpp's ``perplexity --kl-divergence`` reports, computed the same way on both models:
the text's tokens (no BOS added) cut into consecutive windows of ``window`` tokens, each window run on
its own, every token after the first of a window predicted from the ones before it.

* perplexity: ``exp`` of the mean negative log-likelihood of the predicted tokens;
* KL divergence: the mean over predicted tokens of ``KL(P_reference || P_model)`` of the next-token
  distributions, in nats;
* top-1 agreement: the fraction of predicted tokens whose most likely next token is the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class CausalLMQuality:
    """Quality of ``model`` against ``reference`` on one text (see the module docstring for each measure)."""

    perplexity: float
    reference_perplexity: float
    kl_divergence: float  # nats per predicted token
    top1_agreement: float  # fraction in [0, 1]
    tokens: int  # predicted tokens
    windows: int

    def as_meta(self, prefix: str = "eval_") -> dict[str, Any]:
        """The fields as report metadata (``eval_perplexity``, ...)."""
        return {prefix + k: v for k, v in asdict(self).items()}


def token_windows(input_ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    """``input_ids`` (1-D) cut into consecutive windows of at most ``window`` tokens; a last window of one
    token predicts nothing and is dropped."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 2:
        raise ValueError(f"window must be an integer of at least 2 tokens, got {window!r}")
    ids = torch.as_tensor(input_ids).reshape(-1)
    if ids.numel() < 2:
        raise ValueError(f"the evaluation text has {ids.numel()} token(s); it needs at least 2")
    return [w for w in ids.split(window) if w.numel() >= 2]


def _log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """float64 log-probabilities (tokens - 1, vocab) of each next token in one window."""
    out = model(input_ids=ids[None], use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return torch.log_softmax(logits[0, :-1].double(), dim=-1)


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, *, window: int = 512) -> float:
    """Perplexity of ``model`` (a transformers causal LM) on ``input_ids`` (1-D token ids) in windows."""
    nll, n = 0.0, 0
    for w in token_windows(input_ids, window):
        lp = _log_probs(model, w)
        nll -= float(lp.gather(1, w[1:, None]).sum())
        n += w.numel() - 1
    return math.exp(nll / n)


@torch.no_grad()
def causal_lm_quality(reference: nn.Module, model: nn.Module, input_ids: torch.Tensor, *,
                      window: int = 512) -> CausalLMQuality:
    """Perplexity of both models, the KL divergence of ``model``'s next-token distributions from the
    ``reference``'s and their top-1 agreement, on ``input_ids`` (1-D token ids) in windows of ``window``
    tokens. The two models run one window at a time (memory: one window's logits of each)."""
    nll_ref = nll = kl = 0.0
    agree = n = 0
    windows = token_windows(input_ids, window)
    for w in windows:
        lp_ref, lp = _log_probs(reference, w), _log_probs(model, w)
        target = w[1:, None]
        nll_ref -= float(lp_ref.gather(1, target).sum())
        nll -= float(lp.gather(1, target).sum())
        kl += float((lp_ref.exp() * (lp_ref - lp)).sum())
        agree += int((lp_ref.argmax(-1) == lp.argmax(-1)).sum())
        n += w.numel() - 1
    return CausalLMQuality(math.exp(nll / n), math.exp(nll_ref / n), kl / n, agree / n, n, len(windows))
