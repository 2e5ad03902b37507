"""lowbit.precision: float formats, bit-exact codecs, error metrics and reports.

Formats: :class:`FloatFormat`, :func:`get_format`, :func:`known_formats`.
Codecs: :func:`encode`, :func:`decode`, :func:`round_to`, :func:`fields`, :func:`describe`.
Scaled storage: :func:`cast`, :func:`cast_report`.
Block-scaled formats (MX, NVFP4, GGUF): :class:`BlockFormat`, :func:`block_encode`, :func:`block_decode`, :func:`round_to_block`.
Error and memory: :func:`error_metrics` and the shared :class:`Report` type.
"""

from .blocks import BLOCK_FORMATS, MX_FORMATS, BlockCodes, BlockFormat, block_decode, block_encode, round_to_block
from .cast import Cast, cast, cast_report
from .codec import OVERFLOW_MODES, ROUNDING_MODES, SUBNORMAL_MODES, decode, describe, encode, fields, round_to
from .formats import FloatFormat, get_format, known_formats, register
from .metrics import ErrorMetrics, cosine, error_metrics, max_abs_error, mse, rel_error, sqnr_db
from .report import KeptTensor, Report, TensorReport

__all__ = [
    "FloatFormat", "get_format", "known_formats", "register",
    "encode", "decode", "round_to", "fields", "describe", "ROUNDING_MODES", "OVERFLOW_MODES", "SUBNORMAL_MODES",
    "Cast", "cast", "cast_report",
    "BlockFormat", "BlockCodes", "MX_FORMATS", "BLOCK_FORMATS", "block_encode", "block_decode", "round_to_block",
    "ErrorMetrics", "error_metrics", "mse", "rel_error", "sqnr_db", "max_abs_error", "cosine",
    "Report", "TensorReport", "KeptTensor",
]
