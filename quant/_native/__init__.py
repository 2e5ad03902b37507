"""Fused C passes around the int8 GEMM (``int8_kernels.c``, built by :mod:`precision._native`).

Eager torch needs three to five passes over an activation to quantize it per
token (scale, row max, multiply, round, convert) and three to rescale the
int32 result (convert, row scale, column scale plus bias); for MiniLM at
32 x 128 tokens those passes cost about as much as a third of the int8 GEMMs.
``int8_kernels.c`` does each in one pass, with the same float32 operations in
the same order, so its codes are bit-identical to :func:`quant.quantize`'s.
Where the library is off or cannot be built, each function here returns a
"no" and the caller runs its torch passes, which give the same results.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from precision._native import Library, threads


def _bind(lib: ctypes.CDLL) -> None:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.lowbit_quantize_tokens.argtypes = [p, i64, i64, i64, p, f32, f32, f32, f32, p, p, i32]
    lib.lowbit_quantize_tokens.restype = i64
    lib.lowbit_quantize_tokens_affine.argtypes = [p, i64, i64, i64, p, f32, f32, f32, p, p, p, i32]
    lib.lowbit_quantize_tokens_affine.restype = i64
    lib.lowbit_rescale.argtypes = [p, i64, i64, p, p, i64, p, p, p, p, i32]
    lib.lowbit_rescale.restype = None
    lib.lowbit_dequantize_int8.argtypes = [p, i64, i64, i64, p, p, p, p, i32]
    lib.lowbit_dequantize_int8.restype = None


_LIB = Library(Path(__file__).with_name("int8_kernels.c"), _bind, fallback="torch")


def _bind_attention(lib: ctypes.CDLL) -> None:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.lowbit_attention_int8.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, p, i32, p, f32, p, p, i32, i32]
    lib.lowbit_attention_int8.restype = i64
    lib.lowbit_attention_has_vnni.argtypes = []
    lib.lowbit_attention_has_vnni.restype = i32


_ATTENTION = Library(Path(__file__).with_name("attention_int8.c"), _bind_attention, fallback="torch")


def attention_library() -> ctypes.CDLL | None:
    """The compiled int8 attention kernel (``attention_int8.c``), or None if kernels are off or cannot be built."""
    return _ATTENTION.get()


def library() -> ctypes.CDLL | None:
    """The compiled kernels, building them on the first call; None if they are off or cannot be built."""
    return _LIB.get()


def status() -> str:
    """``"fused C passes"`` when the kernels are in use, else why not."""
    return "fused C passes" if library() is not None else f"torch passes ({_LIB.reason or 'not in use'})"


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _usable(t: torch.Tensor | None, n: int | None = None) -> bool:
    return t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                         and (n is None or t.numel() == n))


def quantize_tokens(x: torch.Tensor, smooth: torch.Tensor | None, half_range: float, eps: float,
                    qmin: int, qmax: int, codes: torch.Tensor, scales: torch.Tensor) -> bool:
    """Per-row symmetric int8 codes of ``x * smooth`` into ``codes`` and scales into ``scales``.

    ``x``: float32 (rows, cols) on the CPU with unit column stride; ``smooth``: float32 (cols,) or
    None; ``codes``: contiguous int8 (rows, cols); ``scales``: contiguous float32 with ``rows``
    elements. Returns False, having written nothing the caller may use, when the kernels are
    unavailable, an argument does not fit, or a row holds NaN or inf: the caller's reference path
    then defines the result.
    """
    lib = library()
    if lib is None or not _token_buffers_fit(x, smooth, codes, scales):
        return False
    rows, cols = x.shape
    bad = lib.lowbit_quantize_tokens(x.data_ptr(), rows, cols, x.stride(0) if rows > 1 else cols, _ptr(smooth),
                                     half_range, eps, qmin, qmax, codes.data_ptr(), scales.data_ptr(), threads())
    return bad == 0


def _token_buffers_fit(x: torch.Tensor, smooth: torch.Tensor | None, codes: torch.Tensor, scales: torch.Tensor) -> bool:
    """Every size and layout the token passes trust: they write rows x cols codes and rows scales."""
    if x.dim() != 2:
        return False
    rows, cols = x.shape
    return not (x.device.type != "cpu" or x.dtype != torch.float32 or (cols > 1 and x.stride(1) != 1)
                or (rows > 1 and x.stride(0) < cols)
                or not _usable(smooth, cols) or not codes.is_contiguous() or codes.dtype != torch.int8
                or codes.device.type != "cpu" or codes.numel() != rows * cols or not _usable(scales, rows))


def quantize_tokens_affine(x: torch.Tensor, smooth: torch.Tensor | None, eps: float, qmin: int, qmax: int,
                           codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor) -> bool:
    """Per-row affine int8 codes of ``x * smooth`` into ``codes``, scales into ``scales`` and int32 zero
    points into ``zero_points`` (contiguous, ``rows`` elements): the arithmetic of :func:`quant.calibrate`
    and :func:`quant.quantize` for an affine per-row spec, bit for bit. The other arguments and the
    False answer are those of :func:`quantize_tokens`."""
    lib = library()
    if lib is None or not _token_buffers_fit(x, smooth, codes, scales) or not _int32s(zero_points, x.shape[0]):
        return False
    rows, cols = x.shape
    bad = lib.lowbit_quantize_tokens_affine(x.data_ptr(), rows, cols, x.stride(0) if rows > 1 else cols,
                                            _ptr(smooth), eps, qmin, qmax, codes.data_ptr(), scales.data_ptr(),
                                            zero_points.data_ptr(), threads())
    return bad == 0


def _int32s(t: torch.Tensor | None, n: int) -> bool:
    return t is not None and t.device.type == "cpu" and t.dtype == torch.int32 and t.is_contiguous() and t.numel() == n


def rescale(acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
            bias: torch.Tensor | None, row_zero_point: torch.Tensor | None = None,
            col_sum: torch.Tensor | None = None) -> torch.Tensor | None:
    """``float(acc) * row_scale * col_scale + bias`` written over ``acc``'s memory, as a float32 view.

    ``acc``: contiguous int32 (rows, cols); ``row_scale``: rows float32; ``col_scale``: cols or 1
    float32; ``bias``: cols float32 or None. Each product and the sum are rounded to float32 in that
    order. With affine inputs, ``row_zero_point`` (rows int32) and ``col_sum`` (cols int32, the weight
    codes summed over the input axis) first turn ``acc`` into ``acc - row_zero_point * col_sum``, the
    exact int32 accumulation over ``code - zero_point``. Returns None (``acc`` untouched) when the
    kernels are unavailable or an argument does not fit.
    """
    lib = library()
    if acc.dim() != 2:
        return None
    rows, cols = acc.shape
    if (lib is None or acc.device.type != "cpu" or acc.dtype != torch.int32 or not acc.is_contiguous()
            or not _usable(row_scale, rows) or not _usable(bias, cols)
            or not (_usable(col_scale, cols) or _usable(col_scale, 1))
            or (row_zero_point is None) != (col_sum is None)
            or (row_zero_point is not None and not (_int32s(row_zero_point, rows) and _int32s(col_sum, cols)))):
        return None
    y = acc.view(torch.float32)
    lib.lowbit_rescale(acc.data_ptr(), rows, cols, row_scale.data_ptr(), col_scale.data_ptr(), col_scale.numel(),
                       _ptr(bias), _ptr(row_zero_point), _ptr(col_sum), y.data_ptr(), threads())
    return y


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor | None:
    """``(codes - zero_point) * scale`` of int8 ``codes`` (rows, cols) with one float32 scale (and int32 zero
    point, None for 0) per row or per group of columns (``scale`` (rows, groups)), as ``dtype`` (float32, or
    bfloat16 rounded to nearest even from the float32 value) in one pass: the values of
    ``quant.quantize.dequantize_tensor(...).to(dtype)``. None when the kernels are unavailable or an
    argument does not fit (the caller's torch path then defines the result)."""
    lib = library()
    if (lib is None or codes.dim() != 2 or codes.dtype != torch.int8 or not codes.is_contiguous()
            or codes.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16)):
        return None
    rows, cols = codes.shape
    groups = scale.numel() // max(rows, 1)
    if (rows == 0 or groups < 1 or groups * rows != scale.numel() or cols % groups or not _usable(scale.reshape(-1))
            or (zero_point is not None and (zero_point.dtype != torch.int32 or not zero_point.is_contiguous()
                                            or zero_point.numel() != scale.numel()))):
        return None
    out = torch.empty(rows, cols, dtype=dtype)
    o32, o16 = (out, None) if dtype == torch.float32 else (None, out.view(torch.int16))
    lib.lowbit_dequantize_int8(codes.data_ptr(), rows, cols, cols // groups, scale.data_ptr(), _ptr(zero_point),
                               _ptr(o32), _ptr(o16), threads())
    return out
