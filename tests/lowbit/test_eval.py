"""lowbit.eval: perplexity, KL divergence and top-1 agreement of causal LMs, and the pinned held-out text."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from torch import nn

from bench.models import heldout_path, sentences, split_sentences
from lowbit.eval import causal_lm_quality, perplexity, token_windows

HELDOUT_SHA256 = "298eee8b1fe14a1099759fbc59a332a99c59e4679b8149dd9d9b56c7589b13b4"


class _Logits(nn.Module):
    """A toy causal LM: logits are a fixed table indexed by the previous token."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False):  # noqa: ARG002
        return (self.table[input_ids],)


def test_uniform_next_token_distributions_have_the_vocabulary_as_perplexity():
    model = _Logits(torch.zeros(50, 50))
    ids = torch.randint(0, 50, (301,), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, ids, window=64) == pytest.approx(50.0, rel=1e-12)


def test_a_model_against_itself_has_zero_kl_full_agreement_and_equal_perplexity():
    model = _Logits(torch.randn(40, 40, generator=torch.Generator().manual_seed(1)))
    ids = torch.randint(0, 40, (200,), generator=torch.Generator().manual_seed(2))
    q = causal_lm_quality(model, model, ids, window=50)
    assert q.kl_divergence == pytest.approx(0.0, abs=1e-12) and q.top1_agreement == 1.0
    assert q.perplexity == q.reference_perplexity and q.tokens == 200 - 4 and q.windows == 4


def test_kl_and_agreement_match_their_definitions_on_a_perturbed_model():
    g = torch.Generator().manual_seed(3)
    ref_t = torch.randn(30, 30, generator=g)
    other_t = ref_t + 0.5 * torch.randn(30, 30, generator=g)
    ids = torch.randint(0, 30, (120,), generator=g)
    q = causal_lm_quality(_Logits(ref_t), _Logits(other_t), ids, window=120)
    p, r = torch.log_softmax(ref_t[ids[:-1]].double(), -1), torch.log_softmax(other_t[ids[:-1]].double(), -1)
    assert q.kl_divergence == pytest.approx(float((p.exp() * (p - r)).sum(-1).mean()), rel=1e-12)
    assert q.top1_agreement == pytest.approx(float((p.argmax(-1) == r.argmax(-1)).double().mean()))
    assert q.perplexity == pytest.approx(math.exp(-float(r.gather(1, ids[1:, None]).mean())), rel=1e-12)


def test_windows_need_two_tokens():
    with pytest.raises(ValueError, match="at least 2"):
        token_windows(torch.tensor([1, 2, 3]), 1)
    with pytest.raises(ValueError, match="needs at least 2"):
        token_windows(torch.tensor([1]), 8)
    assert [w.tolist() for w in token_windows(torch.arange(7), 3)] == [[0, 1, 2], [3, 4, 5]]


def test_the_held_out_text_is_pinned_and_shares_no_sentence_with_the_calibration_text():
    """Figures measured on it stay comparable: a change of the file is a change of this hash, on purpose."""
    data = heldout_path().read_bytes()
    assert hashlib.sha256(data).hexdigest() == HELDOUT_SHA256
    held = set(split_sentences(data.decode("utf-8")))
    assert len(held) > 50 and not held & set(sentences())
