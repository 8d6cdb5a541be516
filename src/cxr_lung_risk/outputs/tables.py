"""Streaming tabular outputs: ``cxr_lung_risk.csv``, ``cxr_lung_risk.json`` and ``manifest.csv``.

Rows are written (and flushed) as results come, so memory stays constant in the number of
images and an interrupted run keeps what it finished. Floats are written with ``repr`` (the
shortest string that round-trips), as pandas does.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

from .base import open_output

__all__ = [
    "RESULTS_CSV",
    "RESULTS_JSON",
    "MANIFEST_CSV",
    "MANIFEST_COLUMNS",
    "ResultWriter",
    "ManifestWriter",
    "RecordWriter",
]

RESULTS_CSV = "cxr_lung_risk.csv"
RESULTS_JSON = "cxr_lung_risk.json"
MANIFEST_CSV = "manifest.csv"
MANIFEST_COLUMNS = ("File", "status", "reason")


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


class ResultWriter:
    """Writes the results table as CSV and/or JSON (a list of objects), one row at a time."""

    def __init__(self, out_dir: Path, columns: Sequence[str], *, csv_out: bool = True, json_out: bool = False) -> None:
        self.columns = list(columns)
        self._csv_f = self._json_f = None
        self._n_json = 0
        out_dir.mkdir(parents=True, exist_ok=True)
        if csv_out:
            self._csv_f = open_output(out_dir, RESULTS_CSV, "w", newline="", encoding="utf-8")
            self._csv = csv.writer(self._csv_f)
            self._csv.writerow(self.columns)
            self._csv_f.flush()
        if json_out:
            self._json_f = open_output(out_dir, RESULTS_JSON, "w", encoding="utf-8")
            self._json_f.write("[")

    def write(self, row: dict[str, Any]) -> None:
        if self._csv_f is not None:
            self._csv.writerow([_fmt(row.get(c)) for c in self.columns])
            self._csv_f.flush()
        if self._json_f is not None:
            obj = {c: row.get(c) for c in self.columns}
            obj = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in obj.items()}
            self._json_f.write(("," if self._n_json else "") + "\n  " + json.dumps(obj, ensure_ascii=False))
            self._json_f.flush()
            self._n_json += 1

    def close(self) -> None:
        if self._csv_f is not None:
            self._csv_f.close()
            self._csv_f = None
        if self._json_f is not None:
            self._json_f.write("\n]\n" if self._n_json else "]\n")
            self._json_f.close()
            self._json_f = None

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ManifestWriter:
    """``manifest.csv``: one row per input file, ``File,status,reason`` (status ok/skipped/failed)."""

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self._f = open_output(out_dir, MANIFEST_CSV, "w", newline="", encoding="utf-8")
        self._w = csv.writer(self._f)
        self._w.writerow(MANIFEST_COLUMNS)
        self.counts = {"ok": 0, "skipped": 0, "failed": 0}

    def write(self, file: str, status: str, reason: str = "") -> None:
        status = str(status)
        self._w.writerow([file, status, reason])
        self._f.flush()
        self.counts[status] = self.counts.get(status, 0) + 1

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RecordWriter:
    """``records.jsonl``: one :class:`~cxr_lung_risk.records.InputRecord` per line, flushed as
    each input finishes (an interrupted run keeps every complete line)."""

    def __init__(self, out_dir: Path) -> None:
        from ..records import RECORDS_JSONL

        out_dir.mkdir(parents=True, exist_ok=True)
        self._f = open_output(out_dir, RECORDS_JSONL, "w", encoding="utf-8")

    def write(self, record: Any) -> None:
        self._f.write(json.dumps(record.to_json(), ensure_ascii=False, allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
