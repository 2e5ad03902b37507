"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import argparse
import time
from typing import Callable


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` runs of ``fn`` after one warm-up run (seconds)."""
    fn()
    best = float("inf")
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def best_pair(f_ref: Callable[[], object], f_new: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Best times of two functions measured alternately, so machine noise hits both alike."""
    f_ref(), f_new()
    a = b = float("inf")
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        f_ref()
        a = min(a, time.perf_counter() - t)
        t = time.perf_counter()
        f_new()
        b = min(b, time.perf_counter() - t)
    return a, b


def best_times(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best time of each function, measured round-robin (all warmed up first), so that a noisy
    machine slows every contender alike instead of whichever happened to run during the noise."""
    for f in fns.values():
        f()
    best = {k: float("inf") for k in fns}
    for _ in range(max(1, repeat)):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def benchmark_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser every benchmark starts from: its module docstring as help, and the
    options for its rows, --json FILE and --markdown FILE."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--markdown", metavar="FILE", help="also write the rows as a Markdown table (as the README quotes them)")
    return p


def markdown(rows: list[dict]) -> str:
    """The rows as Markdown: one table per ``part`` (one table when rows have none), a column per key
    that some row of the table fills (in first-seen order), numbers to 4 significant digits, except values
    just below 1 (cosines), which keep two significant digits of their distance to 1."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            if 0.99 < abs(v) < 1:  # 0.99897 must not read as 0.999
                return f"{v:.6g}" if abs(v) > 0.9999 else f"{v:.5f}"
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v).replace("|", "\\|")

    parts = list(dict.fromkeys(r.get("part") for r in rows))
    out = []
    for part in parts:
        group = [r for r in rows if r.get("part") == part]
        keys = [k for k in dict.fromkeys(k for r in group for k in r) if k != "part" and any(r.get(k) is not None for r in group)]
        lines = [f"{part}:\n"] if part is not None else []
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in group]
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def write_rows(rows: list[dict], json_path: str | None = None, markdown_path: str | None = None) -> None:
    """Write a benchmark's rows as JSON and/or as a Markdown table (nothing for a None path)."""
    from pathlib import Path

    if json_path:
        import json

        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    if markdown_path:
        Path(markdown_path).write_text(markdown(rows), encoding="utf-8")


class Table:
    """A benchmark's printed table, one row as each is measured. ``columns`` are
    (row key, header, format spec such as '8.3f' or '<40'); a missing value prints '-'."""

    def __init__(self, columns: list[tuple[str, str, str]]) -> None:
        self.columns = columns
        head = " ".join(f"{h:<{self._width(f)}}" if f.startswith("<") else f"{h:>{self._width(f)}}"
                        for _, h, f in columns)
        print(head + "\n" + "-" * len(head), flush=True)

    @staticmethod
    def _width(fmt: str) -> int:
        digits = "".join(c for c in fmt.split(".")[0] if c.isdigit())
        return int(digits) if digits else 0

    def row(self, r: dict) -> dict:
        print(" ".join(format(r[k], f) if r.get(k) is not None else ("-".rjust(self._width(f)) if self._width(f) else "")
                       for k, _, f in self.columns), flush=True)
        return r
