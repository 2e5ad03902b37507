"""Hypothesis strategies for rounding tests: formats, the hard inputs of a format, arrays and tensors.

They build on one another, as ``hypothesis.extra.numpy``'s do: :func:`floats_near_boundaries` draws the
inputs where rounding goes wrong (ties, a hair either side of a midpoint, the edges of the subnormal
range, the largest finite value and just beyond it, zeros, inf and NaN where the dtype has them), and
:func:`arrays` / :func:`tensors` fill arrays with them. Needs ``hypothesis`` (lowbit's ``[test]`` extra).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ..arrays import torch
from ..blocks import BLOCK_FORMATS, get_block_format
from ..formats import SPECIALS, FloatFormat, get_format
from .oracle import _float_table


@st.composite
def float_formats(draw: Any, max_bits: int = 8, specials: tuple[str, ...] | None = None) -> FloatFormat:
    """Random ExMy :class:`~precision.FloatFormat` values of at most ``max_bits`` bits (sign included for
    signed layouts), over the special-value layouts ``specials`` (default: every one that fits)."""
    layouts = [s for s in (specials or SPECIALS) if s != "fnu"] if max_bits < 8 else list(specials or SPECIALS)
    kind = draw(st.sampled_from(layouts))
    if kind == "fnu":
        return FloatFormat(exponent_bits=8, mantissa_bits=0, specials="fnu")
    low_m = 1 if kind == "ieee" else 0  # ieee: inf and NaN differ in the mantissa
    e = draw(st.integers(2, max(2, min(8, max_bits - 1 - low_m))))
    m = draw(st.integers(low_m, max(low_m, max_bits - 1 - e)))
    return FloatFormat(exponent_bits=e, mantissa_bits=m, specials=kind)


def _boundaries(fmt: FloatFormat) -> np.ndarray:
    """float64 points where rounding to ``fmt`` changes: values, midpoints, the overflow threshold."""
    values, _, top = _float_table(fmt)
    mids = (values[:-1] + values[1:]) / 2
    return np.unique(np.concatenate([values, mids, [(values[-1] + top) / 2, top, values[1] / 2 if values.size > 1 else 0]]))


def floats_near_boundaries(fmt: "FloatFormat | str", dtype: Any = np.float64, *, nan: bool = True,
                           inf: bool = True) -> st.SearchStrategy[float]:
    """Floats of ``dtype`` (float16, float32 or float64; returned as Python floats) that stress rounding
    to ``fmt``: each value of ``fmt``, each midpoint, the overflow threshold, each with either sign,
    exactly or moved a few ulps of ``dtype`` either way; plus zeros, inf and NaN (``nan``/``inf``), and
    now and then any float of ``dtype``. ``fmt`` of at most 16 bits."""
    fmt = get_format(fmt)
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"floats_near_boundaries draws float16, float32 or float64, got {dt}")
    if fmt.bits > 16:
        raise ValueError(f"floats_near_boundaries takes formats of at most 16 bits, got {fmt.name}")
    with np.errstate(over="ignore"):
        pts = _boundaries(fmt).astype(dt)
    pts = pts[np.isfinite(pts)]
    uint = np.dtype(f"u{dt.itemsize}")
    width = 8 * dt.itemsize

    def moved(p: Any, d: int, negative: bool) -> float:
        b = int(np.array(p, dt).view(uint)) + d
        b = min(max(b, 0), (1 << (width - 1)) - 1)
        v = float(np.array(b, uint).view(dt))
        return -v if negative else v

    near = st.builds(moved, st.sampled_from(list(pts)), st.integers(-3, 3), st.booleans())
    special = [0.0, -0.0] + ([float("inf"), float("-inf")] if inf else []) + ([float("nan")] if nan else [])
    anything = st.floats(width=width, allow_nan=nan, allow_infinity=inf)
    return st.one_of(near, near, near, st.sampled_from(special), anything)


def arrays(fmt: "FloatFormat | str", dtype: Any = np.float32, shape: Any = None, **kwargs: Any) -> st.SearchStrategy:
    """numpy arrays of ``dtype`` filled from :func:`floats_near_boundaries` (``shape``: an int, a tuple,
    or a strategy; default 1-D of 1 to 64 elements). ``kwargs`` go to :func:`floats_near_boundaries`."""
    dt = np.dtype(dtype)
    return hnp.arrays(dt, shape if shape is not None else hnp.array_shapes(max_dims=1, min_side=1, max_side=64),
                      elements=floats_near_boundaries(fmt, dt, **kwargs))


@st.composite
def tensors(draw: Any, fmt: "FloatFormat | str", dtype: Any = None, shape: Any = None, device: str = "cpu",
            **kwargs: Any) -> Any:
    """torch tensors of ``dtype`` (default: drawn from float16, bfloat16, float32, float64) on ``device``
    with values from :func:`floats_near_boundaries`, and varied layouts: contiguous, transposed, or a
    strided slice of a larger tensor. Needs torch."""
    if torch is None:
        raise RuntimeError("tensors() needs torch")
    tdt = dtype if dtype is not None else draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
    src = {torch.float16: np.float16, torch.bfloat16: np.float32, torch.float32: np.float32, torch.float64: np.float64}[tdt]
    shp = draw(shape) if isinstance(shape, st.SearchStrategy) else shape or draw(hnp.array_shapes(min_dims=2, max_dims=2,
                                                                                                  min_side=1, max_side=16))
    a = draw(hnp.arrays(np.dtype(src), shp, elements=floats_near_boundaries(fmt, src, **kwargs)))
    t = torch.from_numpy(a).to(tdt)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "transposed" and t.ndim == 2:
        t = t.T.contiguous().T  # the same values, column-major
    elif layout == "strided":
        big = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=tdt)
        big[..., ::2] = t
        t = big[..., ::2]
    return t.to(device)


@st.composite
def quant_specs(draw: Any, max_group: int = 64) -> Any:
    """Random valid :class:`quant.QuantSpec` values: 2 to 8 bits, signed or not, symmetric or affine,
    narrow range where it applies, per tensor, per channel (axis 0) or per group along the last axis
    (powers of two up to ``max_group``)."""
    # QuantSpec lives in quant, the layer below precision: imported on use, so importing precision never
    # imports quant
    from quant import PerChannel, PerGroup, PerTensor, QuantSpec

    signed = draw(st.booleans())
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    sizes = [1 << k for k in range(max(0, max_group.bit_length()))]
    g = PerTensor() if gran == "tensor" else PerChannel(0) if gran == "channel" else PerGroup(draw(st.sampled_from(sizes)))
    return QuantSpec(bits=draw(st.integers(2, 8)), signed=signed, symmetric=draw(st.booleans()),
                     narrow_range=signed and draw(st.booleans()), granularity=g)


def block_formats(names: tuple[str, ...] | None = None) -> st.SearchStrategy:
    """lowbit's registered block formats (MX, NVFP4, GGUF Q8_0/Q4_0), or those ``names``."""
    return st.sampled_from([get_block_format(n) for n in (names or tuple(BLOCK_FORMATS))])
