"""precision.testing: test your own casts, kernels and quantizers against exact ground truth.

* The oracle (:mod:`precision.testing.oracle`, :mod:`precision.testing.references`):
  :func:`reference_round`, :func:`reference_round_block`, :func:`reference_quantize`, :func:`neighbours`.
* Strategies (:mod:`precision.testing.strategies`, needs hypothesis): :func:`float_formats`,
  :func:`floats_near_boundaries`, :func:`arrays`, :func:`tensors`, :func:`quant_specs`, :func:`block_formats`.
* Assertions (:mod:`precision.testing.assertions`): :func:`assert_rounds_like`, :func:`assert_unbiased`.
* A pytest plugin (installed with lowbit; :mod:`precision.testing.plugin`): the ``lowbit_formats``
  marker and the ``lowbit_format`` fixture.
"""

from __future__ import annotations

from .assertions import RoundingMismatch, assert_rounds_like, assert_unbiased, case_class
from .oracle import neighbours, reference_round
from .references import reference_quantize, reference_round_block

__all__ = ["reference_round", "reference_round_block", "reference_quantize", "neighbours", "assert_rounds_like",
           "assert_unbiased", "RoundingMismatch", "case_class"]
