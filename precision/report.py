"""One report type for every method in lowbit: error and stored bytes, per tensor and in total.

``TensorReport`` is one compressed tensor; ``KeptTensor`` one tensor passed
through unchanged; ``Report`` holds both lists, computes the totals, and
renders as a terminal table, Markdown or JSON.

JSON schema (``Report.to_json``), version ``lowbit.report/1``::

    {
      "schema": "lowbit.report/1",
      "title": str,
      "tensors": [ {"name": str, "shape": [int], "dtype": str, "method": str,
                    "bytes_before": int, "bytes_after": int,
                    "mse": float, "rel_error": float, "sqnr_db": float,
                    "max_abs_error": float, "cosine": float,
                    "clipped": int, "nonfinite": int,
                    "zeroed": int,          # nonzero inputs that came back exactly 0
                    "details": {str: any}} ],
      "kept":    [ {"name": str, "shape": [int], "dtype": str, "bytes": int, "reason": str} ],
      "totals":  {"tensors": int, "kept": int,
                  "bytes_before": int, "bytes_after": int,          # compressed tensors only
                  "checkpoint_bytes_before": int, "checkpoint_bytes_after": int,  # incl. kept
                  "percent_saved": float, "ratio": float,
                  "mean_sqnr_db": float, "worst_sqnr_db": float,
                  "mean_rel_error": float, "clipped": int, "nonfinite": int, "zeroed": int},
      "meta":    {str: any}      # wall_time_s, method options, evaluation results
    }

Non-finite floats are written as the strings "inf", "-inf" and "nan".
``mean_sqnr_db`` averages the tensors whose error is not zero (SQNR finite);
exact tensors would make it inf. ``worst_sqnr_db`` is the minimum over all.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .metrics import ErrorMetrics, error_metrics

NOT_MEASURED = ErrorMetrics(mse=math.nan, rel_error=math.nan, sqnr_db=math.nan, max_abs_error=math.nan,
                             cosine=math.nan, nonfinite=0, zeroed=0)

SCHEMA = "lowbit.report/1"


def nbytes(x: Any) -> int:
    """Bytes of the dense tensor or array ``x`` as stored."""
    if hasattr(x, "element_size"):
        return int(x.numel() * x.element_size())
    return int(x.nbytes)


@dataclass
class TensorReport:
    """Error and stored bytes of one compressed tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    method: str
    bytes_before: int
    bytes_after: int
    mse: float
    rel_error: float
    sqnr_db: float
    max_abs_error: float
    cosine: float
    clipped: int = 0
    nonfinite: int = 0
    zeroed: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    measured: bool = True  # False: the error metrics were skipped (metrics=False); they read NaN

    @classmethod
    def measure(cls, name: str, reference: Any, approx: Any, *, method: str, bytes_after: int,
                bytes_before: int | None = None, clipped: int = 0, details: dict | None = None) -> "TensorReport":
        """Measure ``approx`` against ``reference`` (numpy or torch) and build the row."""
        return cls.from_metrics(name, reference, error_metrics(reference, approx), method=method,
                                bytes_after=bytes_after, bytes_before=bytes_before, clipped=clipped, details=details)

    @classmethod
    def from_metrics(cls, name: str, reference: Any, m: ErrorMetrics, *, method: str, bytes_after: int,
                     bytes_before: int | None = None, clipped: int = 0, details: dict | None = None) -> "TensorReport":
        """The row for ``reference`` (for its name, shape, dtype, bytes) with metrics measured elsewhere
        (e.g. accumulated block by block)."""
        dtype = str(reference.dtype).replace("torch.", "")
        return cls(
            name=name, shape=tuple(int(s) for s in reference.shape), dtype=dtype, method=method,
            bytes_before=nbytes(reference) if bytes_before is None else int(bytes_before),
            bytes_after=int(bytes_after), mse=m.mse, rel_error=m.rel_error, sqnr_db=m.sqnr_db,
            max_abs_error=m.max_abs_error, cosine=m.cosine, clipped=int(clipped), nonfinite=m.nonfinite,
            zeroed=m.zeroed, details=dict(details or {}),
        )

    @classmethod
    def unmeasured(cls, name: str, reference: Any, *, method: str, bytes_after: int,
                   bytes_before: int | None = None) -> "TensorReport":
        """The row of a tensor whose error was not measured: bytes only, metrics NaN."""
        row = cls.from_metrics(name, reference, NOT_MEASURED, method=method, bytes_after=bytes_after,
                               bytes_before=bytes_before)
        row.measured = False
        return row

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")


@dataclass
class KeptTensor:
    """A tensor passed through unchanged (bit-exact), and why."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    reason: str


@dataclass
class Report:
    """Rows of compressed tensors, kept tensors, totals, and free-form ``meta``."""

    tensors: list[TensorReport] = field(default_factory=list)
    kept: list[KeptTensor] = field(default_factory=list)
    title: str = "lowbit report"
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, row: TensorReport) -> TensorReport:
        self.tensors.append(row)
        return row

    def extend(self, other: "Report") -> "Report":
        self.tensors.extend(other.tensors)
        self.kept.extend(other.kept)
        return self

    def __getitem__(self, name: str) -> TensorReport:
        for r in self.tensors:
            if r.name == name:
                return r
        raise KeyError(name)

    # ------------------------------------------------------------ totals
    @property
    def totals(self) -> dict[str, Any]:
        before = sum(r.bytes_before for r in self.tensors)
        after = sum(r.bytes_after for r in self.tensors)
        kept = sum(k.bytes for k in self.kept)
        measured = [r for r in self.tensors if r.measured]
        finite = [r.sqnr_db for r in measured if math.isfinite(r.sqnr_db)]
        sq = [r.sqnr_db for r in measured if r.sqnr_db == r.sqnr_db]
        rel = [r.rel_error for r in measured]
        none = bool(self.tensors) and not measured  # every metric below is NaN then
        return {
            "tensors": len(self.tensors),
            "kept": len(self.kept),
            "bytes_before": before,
            "bytes_after": after,
            "checkpoint_bytes_before": before + kept,
            "checkpoint_bytes_after": after + kept,
            "percent_saved": 100.0 * (1 - (after + kept) / (before + kept)) if before + kept else 0.0,
            "ratio": before / after if after else float("inf"),
            "mean_sqnr_db": math.nan if none else sum(finite) / len(finite) if finite else float("inf"),
            "worst_sqnr_db": math.nan if none else min(sq) if sq else float("inf"),
            "mean_rel_error": math.nan if none else sum(rel) / len(rel) if rel else 0.0,
            "measured": len(measured),
            "clipped": sum(r.clipped for r in self.tensors),
            "nonfinite": sum(r.nonfinite for r in self.tensors),
            "zeroed": sum(r.zeroed for r in self.tensors),
            **self._file_totals(),
        }

    def _file_totals(self) -> dict[str, Any]:
        """The saving of the files as written (headers and padding included), where the job wrote one."""
        fin, fout = self.meta.get("checkpoint_file_bytes"), self.meta.get("output_file_bytes")
        if not (isinstance(fin, int) and isinstance(fout, int) and fin > 0):
            return {}
        return {"file_bytes_before": fin, "file_bytes_after": fout, "file_percent_saved": 100.0 * (1 - fout / fin)}

    # ---------------------------------------------------------- renderers
    def to_dict(self) -> dict[str, Any]:
        return _jsonable({
            "schema": SCHEMA, "title": self.title,
            "tensors": [asdict(r) for r in self.tensors],
            "kept": [asdict(k) for k in self.kept],
            "totals": self.totals, "meta": self.meta,
        })

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        d = json.loads(text)
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} report (schema={d.get('schema')!r})")
        rows = [TensorReport(**{**_unjson(r), "shape": tuple(r["shape"])}) for r in d["tensors"]]
        kept = [KeptTensor(**{**k, "shape": tuple(k["shape"])}) for k in d["kept"]]
        return cls(rows, kept, d.get("title", ""), d.get("meta", {}))

    @property
    def _unit(self) -> str:
        """One unit for every size in the rendered report: the one that suits the whole checkpoint."""
        return byte_unit(self.totals["checkpoint_bytes_before"])

    def _rows(self) -> tuple[list[str], list[list[str]]]:
        u = self._unit
        head = ["tensor", "shape", "dtype", "method", "before", "after", "rel err", "SQNR dB", "max abs", "clipped"]
        body = [[r.name, "x".join(map(str, r.shape)) or "()", r.dtype, r.method, human_bytes(r.bytes_before, u),
                 human_bytes(r.bytes_after, u), *([f"{r.rel_error:.4g}", f"{r.sqnr_db:.2f}", f"{r.max_abs_error:.3g}"]
                                                  if r.measured else ["-", "-", "-"]),
                 str(r.clipped)] for r in self.tensors]
        return head, body

    def _total_lines(self) -> list[str]:
        t, u = self.totals, self._unit
        lines = [f"compressed tensors: 0  kept unchanged: {t['kept']}",  # no ratio over zero bytes
                 f"checkpoint bytes: {human_bytes(t['checkpoint_bytes_before'], u)} (nothing compressed)"]
        if t["tensors"]:
            lines = self._compressed_lines()
        lines += self._meta_lines()
        return lines

    def _compressed_lines(self) -> list[str]:
        t, u = self.totals, self._unit
        saved = t["percent_saved"]
        lines = [
            f"compressed tensors: {t['tensors']}  kept unchanged: {t['kept']}",
            f"compressed tensors' bytes: {human_bytes(t['bytes_before'], u)} -> {human_bytes(t['bytes_after'], u)} "
            f"({t['ratio']:.3g}x smaller)" if t["ratio"] >= 1 else
            f"compressed tensors' bytes: {human_bytes(t['bytes_before'], u)} -> {human_bytes(t['bytes_after'], u)} "
            f"({1 / t['ratio']:.3g}x larger)",
            f"checkpoint bytes: {human_bytes(t['checkpoint_bytes_before'], u)} -> "
            f"{human_bytes(t['checkpoint_bytes_after'], u)} "
            + (f"({saved:.1f}% saved)" if saved >= 0 else f"({-saved:.1f}% more)")
            + (" in tensor data" if "file_percent_saved" in t else ""),
            f"SQNR dB: mean {t['mean_sqnr_db']:.2f} (tensors with nonzero error), worst {t['worst_sqnr_db']:.2f}; "
            f"mean rel. error {t['mean_rel_error']:.4g}" if t["measured"] else
            "error metrics: not measured (metrics=False, --no-metrics)",
        ]
        if "file_percent_saved" in t:
            fs = t["file_percent_saved"]
            lines.insert(3, f"file bytes: {human_bytes(t['file_bytes_before'], u)} -> {human_bytes(t['file_bytes_after'], u)} "
                         + (f"({fs:.1f}% saved)" if fs >= 0 else f"({-fs:.1f}% more)") + " as written, headers included")
        if 0 < t["measured"] < t["tensors"]:
            lines.append(f"error metrics measured on {t['measured']} of {t['tensors']} tensors")
        if t["clipped"] or t["nonfinite"]:
            lines.append(f"clipped values: {t['clipped']}  non-finite outputs: {t['nonfinite']}")
        if t["zeroed"]:
            n = sum(math.prod(r.shape) for r in self.tensors)
            lines.append(f"weights read back as 0: {t['zeroed']} of {n} ({100 * t['zeroed'] / max(n, 1):.2f}%): "
                         "pruned, or smaller than half a quantization step (expected for tiny weights)")
        return lines

    def _meta_lines(self) -> list[str]:
        u = self._unit
        lines = []
        for k, v in self.meta.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k.endswith("_bytes"):
                lines.append(f"{k}: {human_bytes(v, u)}")
            elif isinstance(v, (int, float, str)):
                lines.append(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
        return lines

    def to_table(self, max_rows: int | None = None) -> str:
        """Plain-text table for a terminal."""
        head, body = self._rows()
        shown = body if max_rows is None or len(body) <= max_rows else body[:max_rows]
        w = [max(len(h), *(len(r[i]) for r in shown)) if shown else len(h) for i, h in enumerate(head)]
        fmt_row = lambda r: "  ".join(c.ljust(w[i]) if i < 4 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
        out = [self.title, fmt_row(head), "  ".join("-" * x for x in w)] + [fmt_row(r) for r in shown]
        if len(shown) < len(body):
            out.append(f"... {len(body) - len(shown)} more tensors (see --report)")
        if self.kept:
            out.append("kept unchanged: " + ", ".join(f"{k.name} ({k.reason})" for k in self.kept[:12])
                       + (f", ... {len(self.kept) - 12} more" if len(self.kept) > 12 else ""))
        out += self._total_lines()
        return "\n".join(out)

    def to_markdown(self) -> str:
        head, body = self._rows()
        out = [f"# {self.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in body]
        if self.kept:
            out += ["", "## Kept unchanged", "", "| tensor | shape | dtype | bytes | reason |", "|---|---|---|---|---|"]
            out += [f"| {k.name} | {'x'.join(map(str, k.shape))} | {k.dtype} | {k.bytes} | {k.reason} |" for k in self.kept]
        out += ["", "## Totals", ""] + [f"- {line}" for line in self._total_lines()]
        return "\n".join(out) + "\n"

    def __str__(self) -> str:
        return self.to_table()


_UNITS = ("B", "KiB", "MiB", "GiB")


def byte_unit(n: float) -> str:
    """The binary unit in which ``n`` bytes reads as a number below 1024 (GiB at most)."""
    for i, unit in enumerate(_UNITS):
        if abs(n) < 1024 ** (i + 1) or unit == "GiB":
            return unit
    return "GiB"


def human_bytes(n: float, unit: str | None = None) -> str:
    """``n`` bytes in ``unit`` (one of B, KiB, MiB, GiB; default: the one that suits ``n``)."""
    unit = unit or byte_unit(n)
    v = n / 1024 ** _UNITS.index(unit)
    return f"{v:.0f} {unit}" if unit == "B" else f"{v:.2f} {unit}"


def _jsonable(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else ("nan" if o != o else ("inf" if o > 0 else "-inf"))
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if hasattr(o, "item") and callable(o.item):
        return _jsonable(o.item())
    return o


def _unjson(d: dict) -> dict:
    return {k: (float(v) if v in ("inf", "-inf", "nan") else v) for k, v in d.items()}
