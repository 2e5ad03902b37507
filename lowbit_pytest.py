"""lowbit's pytest plugin, registered as the ``lowbit`` entry point of ``pytest11`` (installing lowbit
enables it). It stays light: lowbit itself is imported only by a test that uses the marker or fixture.

    from precision.testing import lowbit_formats

    @lowbit_formats(max_bits=8)          # every known format of at most 8 bits
    def test_my_cast(lowbit_format):     # lowbit_format: a precision.FloatFormat
        ...

``@pytest.mark.lowbit_formats(max_bits=16, names=None, random=0)`` is the same marker: ``names`` lists
formats by name instead, ``random`` adds that many random ExMy formats (a fixed seed: every run is the
same). The ``lowbit_settings`` fixture gives hypothesis settings by ``--lowbit-profile``:
``deterministic`` (the default: derandomized, 200 examples) or ``long`` (20,000 examples).
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("lowbit")
    group.addoption("--lowbit-profile", choices=("deterministic", "long"), default="deterministic",
                    help="hypothesis settings of lowbit's lowbit_settings fixture (default: deterministic)")


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "lowbit_formats(max_bits=16, names=None, random=0): parametrize the "
                            "lowbit_format argument over float formats (lowbit)")


def pytest_generate_tests(metafunc: Any) -> None:
    marker = metafunc.definition.get_closest_marker("lowbit_formats")
    if marker is None:
        return
    if "lowbit_format" not in metafunc.fixturenames:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: @lowbit_formats needs a lowbit_format argument")
    from precision.testing.plugin import formats_for

    fmts = formats_for(*marker.args, **marker.kwargs)
    metafunc.parametrize("lowbit_format", fmts, ids=[f.name for f in fmts])


@pytest.fixture
def lowbit_settings(request: Any) -> Any:
    """hypothesis ``settings`` of the ``--lowbit-profile`` (decorate an inner test with it)."""
    from hypothesis import settings

    from precision.testing.plugin import PROFILES

    return settings(**PROFILES[request.config.getoption("--lowbit-profile")])
