"""Smoke tests: the benchmark programs run on tiny inputs and write their rows as data."""

from __future__ import annotations

import json

from bench import codecs


def test_codecs_benchmark_returns_and_writes_one_row_per_format_and_direction(tmp_path):
    out = tmp_path / "rows.json"
    assert codecs.main(["--n", "4096", "--repeat", "1", "--formats", "fp16", "fp8_e4m3fn", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["format"], r["op"]) for r in rows} >= {("fp16", "encode"), ("fp8_e4m3fn", "decode")}
    assert all(v > 0 for r in rows for k, v in r.items() if isinstance(v, float))
