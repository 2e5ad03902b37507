"""The checkpoint fuzzer (tests/fuzz.py) in the suite: a few thousand cases by default, more under ``slow``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _fuzz(cases: int, seed: int, tmp_path) -> dict:
    out = tmp_path / "fuzz.json"
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "tests.fuzz", "--cases", str(cases), "--seed", str(seed),
                        "--json", str(out)], capture_output=True, text=True, timeout=3000)
    assert out.exists(), r.stderr[-2000:]
    return json.loads(out.read_text())


def _check(summary: dict, cases: int) -> None:
    assert summary["cases"] == cases
    assert summary["foreign"] == 0 and summary["hangs"] == 0, summary["examples"]
    assert summary["documented"] > cases // 2 and summary["read"] > 0  # both outcomes are exercised
    assert summary["peak_rss_mib"] < 1024


def test_fuzzed_checkpoints_fail_only_with_documented_errors_in_bounded_memory(tmp_path):
    _check(_fuzz(3000, 0, tmp_path), 3000)


@pytest.mark.slow
def test_twenty_thousand_fuzzed_checkpoints(tmp_path):
    _check(_fuzz(20000, 1, tmp_path), 20000)
