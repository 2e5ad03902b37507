"""dtype names across numpy, torch and safetensors: floats come from each FloatFormat's twins,
the rest (float64, integers, bool) are listed here once."""

from __future__ import annotations

import numpy as np

from .formats import get_format, known_formats

_OTHER = {"F64": np.float64, "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
          "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


def _float_dtypes() -> dict[str, np.dtype]:
    out: dict[str, np.dtype] = {}
    for name in known_formats():
        f = get_format(name)
        if f.safetensors_dtype is not None and f.numpy_dtype is not None:
            out[f.safetensors_dtype] = f.numpy_dtype
    return out


ST_TO_NP: dict[str, np.dtype] = {**_float_dtypes(), **{k: np.dtype(v) for k, v in _OTHER.items()}}
"""safetensors dtype name -> numpy dtype."""
NP_TO_ST: dict[np.dtype, str] = {v: k for k, v in ST_TO_NP.items()}
"""numpy dtype -> safetensors dtype name."""
