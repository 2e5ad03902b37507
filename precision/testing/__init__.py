"""precision.testing: test your own casts, kernels and quantizers against exact ground truth.

* The oracle (:mod:`precision.testing.oracle`, :mod:`precision.testing.references`):
  :func:`reference_round`, :func:`reference_round_block`, :func:`reference_quantize`, :func:`neighbours`.
* Strategies (:mod:`precision.testing.strategies`, needs hypothesis): :func:`float_formats`,
  :func:`floats_near_boundaries`, :func:`arrays`, :func:`tensors`, :func:`quant_specs`, :func:`block_formats`.
* Assertions (:mod:`precision.testing.assertions`): :func:`assert_rounds_like`, :func:`assert_unbiased`.
* A pytest plugin (the ``lowbit_pytest`` module, enabled by installing lowbit): the
  :data:`lowbit_formats` marker that parametrizes a test's ``lowbit_format`` argument over float
  formats, and the ``lowbit_settings`` fixture (``--lowbit-profile``).
"""

from __future__ import annotations

from typing import Any

from .assertions import RoundingMismatch, assert_rounds_like, assert_unbiased, case_class
from .oracle import neighbours, reference_round
from .references import reference_quantize, reference_round_block

try:
    import pytest as _pytest

    lowbit_formats: Any = _pytest.mark.lowbit_formats  # @lowbit_formats(max_bits=8): see lowbit_pytest
except ImportError:  # the oracle and the assertions need no pytest
    lowbit_formats = None

__all__ = ["lowbit_formats", "reference_round", "reference_round_block", "reference_quantize", "neighbours", "assert_rounds_like",
           "assert_unbiased", "RoundingMismatch", "case_class"]
