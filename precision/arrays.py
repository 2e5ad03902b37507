"""Array input for every lowbit function: torch tensors, numpy arrays and Python numbers.

The checkpoint, calibration and report paths work on numpy arrays: torch
tensors cross into numpy without a copy (CPU tensors share memory; bf16 and
fp8 are viewed through their bit patterns) and results go back as the same
kind (``like``). The training path (``round_to``, ``round_to_block`` for MX,
``fake_quantize``, ``FakeQuantize``) stays in torch on the tensor's device,
with the same rounding steps written once for both (tested bit for bit). ``real_array`` is the one validated entry point: it states which
dtypes are accepted and how they are widened, and ``require_finite`` is the
one NaN/inf check, so every package words these errors the same way.
"""

from __future__ import annotations

from typing import Any, Literal

import ml_dtypes
import numpy as np

try:  # torch is a dependency, but keep precision importable without it
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]

# numpy dtypes of the small floats that ml_dtypes adds; each converts to float32 exactly.
SMALL_FLOAT_DTYPES = frozenset(
    np.dtype(getattr(ml_dtypes, n))
    for n in (
        "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
        "float8_e4m3b11fnuz", "float8_e3m4", "float8_e4m3", "float8_e8m0fnu",
        "float6_e2m3fn", "float6_e3m2fn", "float4_e2m1fn",
    )
    if hasattr(ml_dtypes, n)
)


_EXPECTED = "expected real floating-point or integer values"

_TORCH_FP8 = {} if torch is None else {
    np.dtype(ml_dtypes.float8_e4m3fn): torch.float8_e4m3fn,
    np.dtype(ml_dtypes.float8_e5m2): torch.float8_e5m2,
}


def contiguous(a: np.ndarray) -> np.ndarray:
    """C-contiguous array with the same shape (np.ascontiguousarray turns 0-d into 1-d)."""
    return a if a.flags.c_contiguous else a.copy(order="C")


def is_torch(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def dtype_name(x: Any) -> str:
    if is_torch(x):
        return str(x.dtype).replace("torch.", "")
    return str(np.asarray(x).dtype) if not hasattr(x, "dtype") else str(x.dtype)


def torch_to_numpy(t: "torch.Tensor") -> np.ndarray:
    """A numpy view of a tensor's values (bf16/fp8 viewed as ml_dtypes arrays)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    if t.dtype == torch.float8_e5m2:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e5m2)
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"unsupported dtype {t.dtype}: {_EXPECTED}")
    return t.numpy()


def as_numpy(x: Any, name: str = "x") -> np.ndarray:
    """Any supported input as a numpy array (no copy where possible)."""
    if is_torch(x):
        return torch_to_numpy(x)
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name}: unsupported dtype bool: {_EXPECTED}")
    if isinstance(x, (int, float, np.generic, list, tuple)):
        return np.asarray(x)
    raise TypeError(f"{name}: expected a numpy array, torch tensor or Python number, got {type(x).__name__}")


def like(result: np.ndarray, ref: Any) -> Any:
    """Return ``result`` as the same kind as ``ref`` (tensor on ref's device, array, or scalar)."""
    if is_torch(ref):
        if result.dtype == ml_dtypes.bfloat16:
            out = torch.from_numpy(contiguous(result).view(np.int16)).view(torch.bfloat16)
        elif result.dtype in (np.uint16, np.uint32):
            # torch's uint16/uint32 support is thin; keep the bit pattern in the signed type of the same width
            out = torch.from_numpy(contiguous(result).view(np.int16 if result.dtype == np.uint16 else np.int32))
            out = out.view(torch.uint16 if result.dtype == np.uint16 else torch.uint32)
        elif result.dtype in _TORCH_FP8:
            out = torch.from_numpy(contiguous(result).view(np.uint8)).view(_TORCH_FP8[result.dtype])
        elif result.dtype in SMALL_FLOAT_DTYPES:  # a small float torch has no dtype for: widen exactly
            out = torch.from_numpy(result.astype(np.float32))
        else:
            out = torch.from_numpy(contiguous(result))
        return out.to(ref.device) if ref.device.type != "cpu" else out
    if isinstance(ref, np.ndarray):
        return result
    return result.item() if result.ndim == 0 else result


def real_array(x: Any, name: str = "x", *, integers: Literal["keep", "float"] = "keep", min_ndim: int = 0) -> np.ndarray:
    """``x`` as a numpy array of real values, without a copy where none is needed.

    float16 and the ml_dtypes small floats (bfloat16, fp8, fp6, fp4) are
    widened to float32, which holds each of their values exactly; float32
    and float64 pass unchanged. Integers are kept (``integers="keep"``) or
    converted exactly (``"float"``): to float32 up to 16 bits, float64 above.
    bool, complex, object and string input is a TypeError; fewer than
    ``min_ndim`` dimensions is a ValueError. Errors start with ``name``.
    """
    a = as_numpy(x, name)
    dt = a.dtype
    if dt in SMALL_FLOAT_DTYPES or dt == np.float16:
        a = a.astype(np.float32)
    elif dt.kind in "iu":
        if integers == "float":
            a = a.astype(np.float64 if dt.itemsize > 2 else np.float32)
    elif dt not in (np.float32, np.float64):
        raise TypeError(f"{name}: unsupported dtype {dt}: {_EXPECTED}")
    if a.ndim < min_ndim:
        raise ValueError(f"{name}: needs at least {min_ndim} dimension(s), got shape {a.shape}")
    return a


def all_finite(a: np.ndarray) -> bool:
    """True when the real array ``a`` holds no NaN or inf (one pass over the bits of float32 data)."""
    if not a.size or a.dtype.kind in "iub":
        return True
    from .metrics import all_finite_c  # metrics imports this module

    fast = all_finite_c(a)
    return fast if fast is not None else bool(np.isfinite(a).all())


def require_finite(a: np.ndarray, name: str, purpose: str, magnitude: np.ndarray | None = None) -> None:
    """ValueError naming the tensor and counting its NaN/inf values, if it has any.

    ``purpose`` completes the message ("quantization", "pruning", ...).
    ``magnitude`` (``|a|``, when the caller already has it) turns the check
    into one reduction.
    """
    if not a.size or a.dtype.kind in "iu":
        return
    ok = np.isfinite(np.max(magnitude)) if magnitude is not None else all_finite(a)
    if not ok:
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise ValueError(f"{name}: {bad} of {a.size} values are NaN or inf; {purpose} needs finite values")
