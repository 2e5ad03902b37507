"""int8 attention: both matrix products of scaled dot-product attention on int8 codes.

The W8A8 linear layers leave attention's two products, ``Q Kᵀ`` and ``P V``, in
float32; at BERT sizes they are a third of a W8A8 forward. :func:`int8_attention`
runs them on int8 codes (AVX-512 VNNI where the CPU has it), with this scheme,
chosen so that every scale factors out of the integer sums:

- ``Q`` and ``K``: symmetric int8 per row (each query, each key; over the head
  dimension), scale ``amax / 127``, round half to even;
- scores ``s_ij = (Σ_d q_id k_jd) · (sq_i · scale) · sk_j``, then ``+ mask``
  (a bool mask keeps the keys where it is True);
- ``e_ij = exp(s_ij − max_j s_ij)`` in [0, 1], probability codes
  ``p_ij = rint(255 · e_ij)`` (unsigned 8 bit: the row's largest probability
  lands on 255);
- ``V``: symmetric int8 per channel (each head dimension, over the keys);
  keys after the last one that any query of a batch row may attend (padding)
  get probability 0 and are left out, of the work and of V's scale;
- ``out_id = (Σ_j p_ij v_jd) · sv_d / (255 · Σ_j e_ij)``.

On MiniLM this costs 4e-5 of embedding cosine (W8A8 with SmoothQuant: 0.99918
without, 0.99914 with). A row whose keys are all masked gives 0, as torch's
``scaled_dot_product_attention`` does. Q, K or V holding NaN or inf, or a
score beyond float32's range: the call is computed by float
``scaled_dot_product_attention`` instead, so non-finite values propagate as in
the float model.

:func:`ptq` with ``PTQConfig(int8_attention=True)`` switches the Hugging Face transformers models
inside the quantized copy to this attention (:func:`use_int8_attention`).
"""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F
from torch import nn

from precision._native import threads

from ._native import attention_library

IMPLEMENTATION = "lowbit_int8"  # the name registered with transformers' AttentionInterface


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes (as float32) of each row of ``x`` over its last dimension, and the scales."""
    m = x.abs().amax(-1, keepdim=True)
    inv = torch.where(m > 0, 127.0 / m, torch.zeros_like(m))
    return torch.round(x * inv), m / 127.0


def reference_int8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The scheme of :func:`int8_attention` in torch operations (the fallback and the tests' reference).

    The integer sums are exact in float32 up to head dimension 1040 and 518 keys (beyond, they round
    as float32 sums do); the exponential is torch's. So results agree with the C kernels to float
    rounding, which can move a probability code by one step, not bit for bit.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    value = value.float()
    if attn_mask is not None:  # keys after the last one any query of a batch row may attend are left out
        keep = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
        keep = torch.broadcast_to(keep, (*query.shape[:-1], key.shape[-2]))
        idx = torch.arange(key.shape[-2], device=key.device)
        last = torch.where(keep.any(1).any(1), idx, -1).amax(-1)
        value = torch.where((idx <= last[:, None])[:, None, :, None], value, 0.0)
    q, sq = _rows(query.float())
    k, sk = _rows(key.float())
    v, sv = _rows(value.transpose(-1, -2))
    s = ((q @ k.transpose(-1, -2)) * (sq * scale)) * sk.transpose(-1, -2)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.float()
    m = s.amax(-1, keepdim=True)
    dead = m == float("-inf")
    e = torch.exp(s - torch.where(dead, torch.zeros_like(m), m))
    p = torch.round(e * 255.0)
    out = ((p @ v.transpose(-1, -2)) * sv.transpose(-1, -2)) * (1.0 / (e.sum(-1, keepdim=True) * 255.0))
    return out.masked_fill(dead, 0.0)


def status() -> str:
    """Which implementation :func:`int8_attention` runs, and why when it is not the C kernel."""
    lib = attention_library()
    if lib is None:
        from ._native import _ATTENTION

        return f"torch reference ({_ATTENTION.reason or 'kernels not in use'})"
    return "int8 C kernel (" + ("AVX-512 VNNI" if lib.lowbit_attention_has_vnni() else "portable loops") + ")"


def _strides(t: torch.Tensor, n: int) -> ctypes.Array:
    return (ctypes.c_int64 * n)(*t.stride()[:n])


_MAX_DIM = 1 << 31
_MAX_ELEMENTS = 1 << 40


def int8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, scale: float | None = None, *,
                   out: torch.Tensor | None = None, portable: bool = False) -> torch.Tensor:
    """``softmax(query @ keyᵀ · scale + attn_mask) @ value`` with both products on int8 codes.

    ``query``: float (batch, heads, queries, dim; float16 and bfloat16 are read as float32, and the
    output is float32); ``key``, ``value``: (batch, heads, keys, dim),
    any strides with unit stride along ``dim`` (the views of a linear layer's output that attention
    modules make are fine). ``attn_mask``: None, bool (True keeps a key) or float (added to the
    scores), broadcastable to (batch, heads, queries, keys). ``scale``: default ``dim ** -0.5``.
    ``out``: optional float32 (batch, heads, queries, dim) to write into (unit stride along dim; a
    transposed view of a (batch, queries, heads, dim) buffer gives the layout attention modules
    concatenate heads from). ``portable``: use the C kernels' plain loops instead of AVX-512 VNNI
    (same results; for tests). Returns the (batch, heads, queries, dim) output.

    Runs on lowbit's C kernels, or on :func:`reference_int8_attention` when they are not in use.
    See the module docstring for the scheme, masked rows and non-finite input.
    """
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("int8_attention: query, key and value must be 4-D (batch, heads, length, dim), "
                         f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    B, H, Lq, D = query.shape
    Lk = key.shape[2]
    if key.shape != (B, H, Lk, D) or value.shape != (B, H, Lk, D):
        raise ValueError(f"int8_attention: key and value must be (batch, heads, keys, dim) = ({B}, {H}, keys, {D}); "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    if not (query.is_floating_point() and key.is_floating_point() and value.is_floating_point()):
        raise TypeError("int8_attention: query, key and value must be floating point")
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        raise ValueError("int8_attention is not differentiable (it is for inference); call it under "
                         "torch.no_grad(), or use float attention for training")
    # broadcast (stride-0) inputs can claim any length without memory; refuse what no scratch could hold
    if max(B, H, Lq, Lk, D) > _MAX_DIM or B * H * max(Lq, Lk) * max(D, 1) > _MAX_ELEMENTS:
        raise ValueError(f"int8_attention: shapes {tuple(query.shape)} and {tuple(key.shape)} exceed "
                         f"{_MAX_ELEMENTS} elements per input")
    if attn_mask is not None and attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"int8_attention: attn_mask must be bool (True keeps a key) or floating point (added to the "
                        f"scores), got {attn_mask.dtype}; an integer 0/1 mask would be added, as torch refuses too")
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"int8_attention: scale must be finite, got {scale}")
    scale = (D ** -0.5 if D else 1.0) if scale is None else float(scale)
    if attn_mask is not None:
        try:
            attn_mask = torch.broadcast_to(attn_mask, (B, H, Lq, Lk))
        except RuntimeError:
            raise ValueError(f"int8_attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"(batch, heads, queries, keys) = {(B, H, Lq, Lk)}") from None
    if out is None:
        out = torch.empty(B, Lq, H, D, dtype=torch.float32, device=query.device).transpose(1, 2)
    elif out.shape != (B, H, Lq, D) or out.dtype != torch.float32 or (D > 1 and out.stride(3) != 1):
        raise ValueError(f"int8_attention: out must be float32 {(B, H, Lq, D)} with unit stride along dim")
    if B * H * Lq == 0 or D == 0:  # nothing to write: a (..., 0)-dim output is empty
        return out
    if Lk == 0:  # nothing to attend to: zero, as for rows whose keys are all masked
        return out.zero_()
    lib = attention_library()
    if query.device.type == "cpu":  # half-precision models: the kernel reads float32
        query, key, value = (t.float() for t in (query, key, value))
    args = [query, key, value]
    usable = (lib is not None and all(t.device.type == "cpu" and t.dtype == torch.float32
                                      and (D == 1 or t.stride(3) == 1) for t in args)
              and out.device.type == "cpu" and D <= 65536 and Lk <= 65536)  # int32 sums cannot overflow
    kind, mptr, ms = 0, None, (ctypes.c_int64 * 4)(0, 0, 0, 0)
    if usable and attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            m, kind = attn_mask.view(torch.uint8), 2  # a view, strides (and broadcast zeros) kept
        else:
            m, kind = attn_mask.to(torch.float32), 1
            # NaN or +inf in an additive mask is outside what the kernel's softmax handles
            usable = not bool((torch.isnan(m) | (m == math.inf)).any())
        mptr, ms = m.data_ptr(), _strides(m, 4)
    if not usable:
        r = None
        if all(torch.isfinite(t).all() for t in args):
            r = reference_int8_attention(query, key, value, attn_mask, scale)
        if r is None or not torch.isfinite(r).all():  # non-finite input, or a score overflowed: as the kernel
            r = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=attn_mask,
                                               scale=scale)
        return out.copy_(r)
    assert lib is not None  # usable says so
    bad = lib.lowbit_attention_int8(query.data_ptr(), _strides(query, 3), key.data_ptr(), _strides(key, 3),
                                    value.data_ptr(), _strides(value, 3), B, H, Lq, Lk, D, mptr, kind, ms,
                                    scale, out.data_ptr(), _strides(out, 3), 0 if portable else 1, threads())
    if bad < 0:
        raise MemoryError("int8_attention: could not allocate the kernels' scratch memory")
    if bad:  # NaN or inf somewhere in Q, K or V, or a score beyond float32: float attention defines the result
        out.copy_(F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=attn_mask,
                                                 scale=scale))
    return out


# attention-function arguments that change the arithmetic (a bias on the scores, logit soft-capping,
# attention sinks, a paged cache): calls that carry one run transformers' own sdpa
_FLOAT_ONLY = ("position_bias", "cache", "softcap", "s_aux", "sinks")


def _hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns (batch, queries, heads, dim) as its sdpa does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    H, Hk = query.shape[1], key.shape[1]
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if grad or (dropout and module.training) or Hk != H or any(kwargs.get(n) is not None for n in _FLOAT_ONLY):
        # gradients, training-time dropout, grouped KV heads, and the extra terms in _FLOAT_ONLY: outside this kernel
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    Lq, Lk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if attention_mask is None and causal and Lq > 1:
        attention_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril(Lk - Lq)
    B, _, _, D = query.shape
    buf = torch.empty(B, Lq, H, D, dtype=torch.float32, device=query.device)
    int8_attention(query, key, value, attention_mask, scaling, out=buf.transpose(1, 2))
    return buf.to(query.dtype), None


def register() -> None:
    """Register ``"lowbit_int8"`` with transformers (attention function and its mask: bool, as sdpa's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _hf_attention)
    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def use_int8_attention(model: nn.Module) -> list[str]:
    """Switch every Hugging Face transformers model inside ``model`` to :func:`int8_attention`.

    Changes ``model`` in place (its config's attention implementation); returns the names of the
    switched submodules ("" for ``model`` itself). ValueError if there is no transformers model in it.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:
        raise ValueError("int8 attention is wired into Hugging Face transformers models; "
                         "transformers is not installed") from None
    register()
    switched: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and not any(name.startswith(s + ".") or s == "" for s in switched):
            try:
                m.set_attn_implementation(IMPLEMENTATION)
            except (ValueError, NotImplementedError) as e:  # a model class without the attention interface
                raise ValueError(f"int8 attention: {type(m).__name__} ({name or 'the model'}) cannot switch its "
                                 f"attention implementation: {e}") from e
            switched.append(name)
    if not switched:
        raise ValueError("int8 attention: no Hugging Face transformers model (PreTrainedModel) inside the model; "
                         "other models can call quant.attention.int8_attention directly")
    return switched
