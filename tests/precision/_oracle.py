"""The exact rational oracle of lowbit's own tests: the public one, :mod:`precision.testing.oracle`."""

from __future__ import annotations

from fractions import Fraction

from precision.formats import FloatFormat
from precision.testing.oracle import reference_round_scalar


def oracle_round(x: Fraction, fmt: FloatFormat, rounding: str = "nearest_even", subnormals: str = "keep") -> float:
    """Correctly rounded value of exact ``x`` in ``fmt`` as a float (inf/nan for overflow)."""
    return reference_round_scalar(Fraction(x), fmt, rounding, "ieee", subnormals)
