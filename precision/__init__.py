"""lowbit.precision: float formats, bit-exact codecs, error metrics and reports."""

from .codec import OVERFLOW_MODES, ROUNDING_MODES, decode, describe, encode, fields, round_to
from .formats import FloatFormat, get_format, known_formats, register
