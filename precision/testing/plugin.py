"""lowbit's pytest plugin (registered as the ``lowbit`` entry point of ``pytest11``, so installing lowbit
enables it): parametrize a test over float formats with a marker, and choose how long property runs are.

    import pytest
    from precision.testing import lowbit_formats

    @lowbit_formats(max_bits=8)          # every known format of at most 8 bits
    def test_my_cast(lowbit_format):     # lowbit_format: a precision.FloatFormat
        ...

``@pytest.mark.lowbit_formats(...)`` is the same marker. Its arguments: ``max_bits`` (default 16),
``names`` (a list of format names instead), ``random`` (that many random formats from
:func:`~precision.testing.strategies.float_formats`, drawn with a fixed seed, so the run is the same
each time). ``--lowbit-profile=long`` raises the hypothesis examples of tests that use lowbit's
``lowbit_settings`` fixture (default ``deterministic``: derandomized, 200 examples).
"""

from __future__ import annotations

import random as _random

from ..formats import SPECIALS, FloatFormat, get_format, known_formats

PROFILES = {"deterministic": {"derandomize": True, "max_examples": 200, "deadline": None},
            "long": {"derandomize": False, "max_examples": 20_000, "deadline": None}}


def formats_for(max_bits: int = 16, names: list[str] | None = None, random: int = 0) -> list[FloatFormat]:
    """The formats a ``lowbit_formats`` marker asks for: the known ones of at most ``max_bits`` bits (or
    ``names``), then ``random`` random ExMy formats of at most 8 bits drawn with a fixed seed."""
    if names is not None:
        out = [get_format(n) for n in names]
    else:
        out = [get_format(n) for n in known_formats() if get_format(n).bits <= max_bits]
    rng = _random.Random(0)
    seen = {f.name for f in out}
    want = len(out) + random
    while len(out) < want:
        kind = rng.choice([s for s in SPECIALS if s != "fnu"])
        e = rng.randint(2, 5)
        f = FloatFormat(exponent_bits=e, mantissa_bits=rng.randint(1 if kind == "ieee" else 0, 7 - e), specials=kind)
        if f.name not in seen:
            seen.add(f.name)
            out.append(f)
    return out
