"""int8 attention: the C kernel against its torch reference and float attention, masks, edge cases, ptq."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quant import TOKEN_SPEC, PTQConfig, int8_attention, ptq
from quant import _native
from quant.attention import reference_int8_attention



def qkv(B, H, Lq, Lk, D, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g) * scale for n in (Lq, Lk, Lk)]


def masks(B, H, Lq, Lk, seed=1):
    """None, key padding (bool and additive), a causal pattern and a random per-head bool mask."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
    for b in range(B):
        pad[b, ..., 1 + b * Lk // (B + 1):] = b % 2 == 0  # odd rows keep every key
    pad[0, ..., 1:] = False  # one batch row attends to a single key
    return {
        "none": None,
        "padding bool": pad,
        "padding -inf": torch.zeros(pad.shape).masked_fill(~pad, float("-inf")),
        "padding finfo.min": torch.zeros(pad.shape).masked_fill(~pad, torch.finfo(torch.float32).min),
        "causal 2-D": torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq),
        "random per head": torch.rand(B, H, Lq, Lk, generator=g) > 0.3,
        "additive per query": torch.randn(B, 1, Lq, Lk, generator=g),
    }


SHAPES = [(4, 3, 32, 32, 32), (1, 2, 150, 70, 32), (2, 2, 17, 23, 20), (1, 4, 9, 40, 64), (3, 2, 5, 7, 16), (2, 1, 1, 33, 8)]


@pytest.mark.needs_attention_c
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_vnni_and_portable_loops_agree_bit_for_bit(shape):
    # integer sums are exact and the float steps are the same operations in the same order
    q, k, v = qkv(*shape)
    for name, m in masks(*shape[:4]).items():
        a = int8_attention(q, k, v, m)
        b = int8_attention(q, k, v, m, portable=True)
        assert torch.equal(a, b), name


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_its_torch_reference_and_stays_near_float_attention(shape):
    q, k, v = qkv(*shape)
    vmax = v.abs().max().item()
    for name, m in masks(*shape[:4]).items():
        out = int8_attention(q, k, v, m)
        ref = reference_int8_attention(q, k, v, m)
        # the exponentials differ in the last bits, which can move a probability code by one step
        assert (out - ref).abs().max().item() <= 2 * vmax / 255, name
        flt = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        err = (out - flt).norm() / flt.norm()
        assert err < 0.03, (name, err.item())


def test_error_is_the_size_int8_rounding_predicts():
    # every factor is rounded to 8 bits, so the relative error sits near 2^-8 and well above 2^-16
    q, k, v = qkv(8, 4, 64, 64, 32, seed=3)
    flt = F.scaled_dot_product_attention(q, k, v)
    err = ((int8_attention(q, k, v) - flt).norm() / flt.norm()).item()
    assert 1e-4 < err < 1.5e-2


def test_rows_with_every_key_masked_give_zero_as_torch_does():
    q, k, v = qkv(2, 2, 6, 8, 16)
    m = torch.ones(2, 2, 6, 8, dtype=torch.bool)
    m[0, 1, 3] = False  # one query row
    m[1] = False  # a whole batch row
    out = int8_attention(q, k, v, m)
    flt = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert torch.equal(out[0, 1, 3], torch.zeros(16)) and torch.equal(flt[0, 1, 3], torch.zeros(16))
    assert torch.equal(out[1], torch.zeros(2, 6, 16))
    assert torch.equal(reference_int8_attention(q, k, v, m)[1], torch.zeros(2, 6, 16))


@pytest.mark.needs_attention_c
def test_keys_no_query_attends_are_left_out_as_if_absent():
    # trailing padding keys: the same result as not passing them at all, including V's scales
    q, k, v = qkv(3, 2, 10, 16, 32)
    k[..., 12:, :] *= 100  # large values in the padding would otherwise dominate V's scale
    v[..., 12:, :] *= 100
    m = torch.ones(3, 1, 1, 16, dtype=torch.bool)
    m[..., 12:] = False
    m[1, ..., 5] = False  # a masked key before the last kept one stays in
    full = int8_attention(q, k, v, m)
    cut = int8_attention(q, k[..., :12, :], v[..., :12, :], m[..., :12])
    assert torch.equal(full, cut)
    ref = reference_int8_attention(q, k, v, m)
    assert (full - ref).abs().max().item() <= 2 * v[..., :12, :].abs().max().item() / 255


@pytest.mark.parametrize("where", ["query", "key", "value"])
def test_nan_or_inf_inputs_are_computed_by_float_attention(where):
    q, k, v = qkv(2, 2, 8, 8, 16)
    t = dict(query=q, key=k, value=v)[where]
    t[1, 0, 2, 3] = float("nan")
    t[0, 1, 1, 1] = float("inf")
    out = int8_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), equal_nan=True)


def test_scores_that_overflow_float32_are_computed_by_float_attention():
    q, k, v = qkv(1, 2, 4, 4, 16)
    q[0, 0] *= 1e20
    k[0, 0] *= 1e20  # q.k ~ 1e40 overflows float32 in both paths
    out = int8_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), equal_nan=True)
    assert torch.isfinite(out[0, 1]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_read_as_float32(dtype):
    q, k, v = (t.to(dtype) for t in qkv(2, 3, 8, 8, 32))
    out = int8_attention(q, k, v)
    assert out.dtype == torch.float32
    assert torch.equal(out, int8_attention(q.float(), k.float(), v.float()))


def test_no_keys_at_all_gives_zero():
    q, k, v = qkv(1, 2, 3, 0, 16)
    assert torch.equal(int8_attention(q, k, v), torch.zeros(1, 2, 3, 16))


def test_writes_into_a_given_buffer_in_the_layout_heads_are_joined_from():
    q, k, v = qkv(2, 3, 5, 5, 16)
    buf = torch.empty(2, 5, 3, 16)
    out = int8_attention(q, k, v, out=buf.transpose(1, 2))
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(buf.transpose(1, 2), int8_attention(q, k, v))


def test_the_torch_reference_runs_when_the_kernel_is_off(monkeypatch):
    q, k, v = qkv(2, 2, 7, 9, 16)
    m = masks(2, 2, 7, 9)["random per head"]
    monkeypatch.setattr("quant.attention.attention_library", lambda: None)
    assert torch.equal(int8_attention(q, k, v, m), reference_int8_attention(q, k, v, m))


def test_bad_input_is_refused_clearly():
    q, k, v = qkv(2, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="4-D"):
        int8_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="key and value"):
        int8_attention(q, k[:, :1], v)
    with pytest.raises(ValueError, match="broadcast"):
        int8_attention(q, k, v, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating"):
        int8_attention(q.to(torch.int32), k, v)
    with pytest.raises(ValueError, match="not differentiable"):
        int8_attention(q.requires_grad_(), k, v)
    with pytest.raises(ValueError, match="out must be"):
        int8_attention(q.detach(), k, v, out=torch.empty(2, 2, 4, 7))


def test_ptq_attention_needs_a_transformers_model_and_the_native_backend():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="transformers"):
        ptq(m, PTQConfig(int8_attention=True), [torch.randn(4, 8)])
    with pytest.raises(ValueError, match="native"):
        ptq(m, PTQConfig(backend="torch.ao", int8_attention=True), [torch.randn(4, 8)])


def test_minilm_with_int8_attention_keeps_the_embeddings_close(minilm_model):
    from bench.models import embed, embedding_cosine, feature_batches, sentences

    model = minilm_model
    s = sentences()
    held = s[1::2][:40]
    ref = embed(model, held)
    kw = dict(activations=TOKEN_SPEC, activation_mode="dynamic",
              smoothquant=0.6)
    q, rep = ptq(model, PTQConfig(int8_attention=True, **kw), feature_batches(model, s[::2]))
    assert rep.meta["attention"]["models"] == ["0.model"]
    assert q[0].auto_model.config._attn_implementation == "lowbit_int8"
    assert model[0].auto_model.config._attn_implementation != "lowbit_int8"  # the input model is untouched
    cos = embedding_cosine(ref, embed(q, held))["mean_cosine"]
    print(f"MiniLM W8A8 + SmoothQuant 0.6 + int8 attention: mean cosine {cos:.5f} over {len(held)} sentences")
    assert cos > 0.999
    # the switch changes only attention: float weights with int8 attention stay closer still
    from quant.attention import use_int8_attention
    import copy

    fa = copy.deepcopy(model)
    use_int8_attention(fa)
    assert embedding_cosine(ref, embed(fa, held))["mean_cosine"] > 0.9999
    assert np.isfinite(embed(q, held[:4])).all()


def tiny_models():
    import warnings

    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "bert": BertModel(BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                         intermediate_size=128, vocab_size=100)).eval(),
            "gpt2 (causal)": GPT2Model(GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=100, n_positions=64,
                                                  bos_token_id=0, eos_token_id=0)).eval(),
        }


@pytest.mark.parametrize("name", ["bert", "gpt2 (causal)"])
def test_transformers_models_run_int8_attention_with_their_masks(name, monkeypatch):
    import copy

    from quant import attention
    from quant.attention import use_int8_attention

    model = tiny_models()[name]
    q = copy.deepcopy(model)
    assert use_int8_attention(q) == [""]
    calls = []
    real = attention.int8_attention
    monkeypatch.setattr(attention, "int8_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 100, (3, 20), generator=torch.Generator().manual_seed(1))
    am = torch.ones(3, 20, dtype=torch.long)
    am[1, 12:] = 0
    with torch.no_grad():
        for mask in (am, None):  # with padding; without a mask (GPT-2 is then causal by itself)
            ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
            out = q(input_ids=ids, attention_mask=mask).last_hidden_state
            # int8 rounding error, far below what ignoring the padding or the causal order would cost
            assert ((out - ref).norm() / ref.norm()).item() < 0.01
    assert len(calls) == 2 * 2  # two layers, two calls


def test_training_and_gradients_use_float_attention(monkeypatch):
    import copy

    from quant import attention
    from quant.attention import use_int8_attention

    model = tiny_models()["bert"]
    q = copy.deepcopy(model)
    use_int8_attention(q)
    monkeypatch.setattr(attention, "int8_attention", lambda *a, **k: pytest.fail("int8 attention used"))
    ids = torch.randint(0, 100, (2, 8))
    q.train()  # dropout in attention
    q(input_ids=ids).last_hidden_state.sum().backward()
    q.eval()  # no dropout, but gradients wanted
    ref = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(q(input_ids=ids).last_hidden_state, ref)


def test_bench_attention_runs_and_reports_both_masks(capsys):
    from bench.attention import main

    assert main(["--repeat", "1"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith(("none", "key padding"))]
    assert len(rows) == 2
    for ln in rows:
        sdpa_ms, int8_ms, ratio, err = (float(x) for x in ln.split()[-4:])
        assert sdpa_ms > 0 and int8_ms > 0 and 0 < err < 0.03


def test_calls_with_terms_the_kernel_lacks_run_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from quant.attention import _hf_attention

    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = qkv(2, 4, 6, 6, 16)
    with torch.no_grad():
        for extra in (dict(s_aux=torch.zeros(4)), dict(sinks=torch.zeros(4))):
            out, _ = _hf_attention(module, q, k, v, None, scaling=0.25, **extra)
            ref, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25, **extra)
            assert torch.equal(out, ref)
        out, _ = _hf_attention(module, q, k, v, None, scaling=0.25)  # and without them, the int8 kernel
        assert torch.equal(out, int8_attention(q, k, v, None, 0.25).transpose(1, 2))


def test_a_build_for_cpus_without_avx512_gives_the_same_results(tmp_path, monkeypatch):
    # what a machine without AVX-512 VNNI compiles: only the plain loops exist in that library
    import ctypes
    import platform
    import shutil
    import subprocess
    from pathlib import Path

    from quant import attention

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or platform.machine() not in ("x86_64", "AMD64") or _native.attention_library() is None:
        pytest.skip("needs an x86-64 C compiler and the native kernel to compare with")
    src = Path(_native.__file__).with_name("attention_int8.c")
    so = tmp_path / "attention_v2.so"
    subprocess.run([cc, "-O3", "-march=x86-64-v2", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared",
                    "-fopenmp", str(src), "-o", str(so)], check=True, capture_output=True)
    plain = ctypes.CDLL(str(so))
    _native._bind_attention(plain)
    assert plain.lowbit_attention_has_vnni() == 0
    for shape in SHAPES[:3]:
        q, k, v = qkv(*shape)
        for name, m in masks(*shape[:4]).items():
            native = int8_attention(q, k, v, m)
            monkeypatch.setattr(attention, "attention_library", lambda: plain)
            assert torch.equal(int8_attention(q, k, v, m), native), (shape, name)
            monkeypatch.undo()
