"""Streaming tabular outputs: ``cxr_lung_risk.csv``, ``cxr_lung_risk.json`` and ``manifest.csv``.

Rows are written (and flushed) as results come, so memory stays constant in the number of
images and an interrupted run keeps what it finished. Floats are written with ``repr`` (the
shortest string that round-trips), as pandas does.

A writer given ``keep`` (a set of ``File`` names; resume, see :mod:`cxr_lung_risk.resume`) first
rewrites its existing file to hold the rows of those inputs once, then appends: a resumed run
never loses what an earlier run finished, nor repeats it. The Parquet table
(``parquet/part-NNNNN.parquet``, with ``--format parquet`` and always with ``--engine ray``) is
written in parts of :data:`PARQUET_ROWS` rows (and at the end); it needs pyarrow.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import DiskFullError, disk_full
from .base import open_output

__all__ = [
    "RESULTS_CSV",
    "RESULTS_JSON",
    "MANIFEST_CSV",
    "MANIFEST_COLUMNS",
    "ResultWriter",
    "ManifestWriter",
    "RecordWriter",
    "PARQUET_DIR",
    "read_json_rows",
    "read_parquet_files",
]

PARQUET_DIR = "parquet"
PARQUET_ROWS = 512

RESULTS_CSV = "cxr_lung_risk.csv"
RESULTS_JSON = "cxr_lung_risk.json"
MANIFEST_CSV = "manifest.csv"
MANIFEST_COLUMNS = ("File", "status", "reason")


class _RowFile:
    """An output file written a whole row at a time: a row is in the file completely or not at
    all (a write that fails, e.g. on a full disk, is cut back to the last whole row), and the
    file always ends with its ``tail`` (the JSON list's closing bracket), so it is complete
    after every row, also when the run is killed or the disk fills up. Unbuffered: each row is
    in the file (the page cache) when :meth:`append` returns."""

    def __init__(self, out_dir: Path, rel: str) -> None:
        self.path = Path(out_dir) / rel
        self._f = open_output(out_dir, rel, "wb", buffering=0)
        self.size = 0  # bytes of whole rows
        self.tail = b""

    def append(self, data: bytes, tail: bytes | None = None) -> None:
        tail = self.tail if tail is None else tail
        blob, fd = data + tail, self._f.fileno()
        try:
            done = 0
            while done < len(blob):
                done += os.pwrite(fd, blob[done:], self.size + done)
        except OSError as e:
            self.rollback((self.size, self.tail))  # back to the last whole row
            full = disk_full(e, self.path)
            if full is not None:
                raise full from None
            raise
        old_end, self.size, self.tail = self.size + len(self.tail), self.size + len(data), tail
        if old_end > self.size + len(tail):  # pragma: no cover - tails only grow
            os.ftruncate(fd, self.size + len(tail))

    def mark(self) -> tuple[int, bytes]:
        return self.size, self.tail

    def rollback(self, mark: tuple[int, bytes]) -> None:
        """Cut the file back to ``mark`` (:meth:`mark`); the tail's bytes were in the file there
        before, so rewriting them needs no new space."""
        self.size, self.tail = mark
        try:
            os.ftruncate(self._f.fileno(), self.size + len(self.tail))
            os.pwrite(self._f.fileno(), self.tail, self.size)
        except OSError:
            pass

    @property
    def closed(self) -> bool:
        return self._f.closed

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def _csv_bytes(rows: Sequence[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode("utf-8")


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


def _kept_csv_rows(path: Path, keep: set[str], header: Sequence[str] | None = None) -> list[list[str]]:
    """The rows of an existing CSV whose ``File`` is in ``keep`` (first one each), header excluded.
    A header other than ``header`` means another run's table: nothing is kept."""
    rows: list[list[str]] = []
    try:
        f = open(path, newline="", encoding="utf-8", errors="replace")
    except OSError:
        return rows
    seen: set[str] = set()
    with f:
        r = csv.reader(f)
        head = next(r, None)
        if head is None or (header is not None and list(head) != list(header)):
            return rows
        for row in r:
            if row and row[0] in keep and row[0] not in seen and len(row) == len(head):
                seen.add(row[0])
                rows.append(row)
    return rows


def read_json_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``cxr_lung_risk.json`` written by :class:`ResultWriter`, also one cut short by
    an interruption (one object per line)."""
    from ..records import json_lines

    clean = lambda line: line.strip().lstrip("[").rstrip("]").strip().rstrip(",")  # noqa: E731
    return [r for r in json_lines(path, clean) if isinstance(r, dict)]


def _parquet_parts(out_dir: Path) -> list[Path]:
    d = out_dir / PARQUET_DIR
    return sorted(d.glob("part-*.parquet")) if d.is_dir() else []


def read_parquet_files(out_dir: Path) -> set[str]:
    """The ``File`` names in ``out_dir/parquet/part-*.parquet``."""
    names: set[str] = set()
    parts = _parquet_parts(out_dir)
    if not parts:
        return names
    import pyarrow.parquet as pq

    for part in parts:
        try:
            names.update(pq.read_table(part, columns=["File"]).column("File").to_pylist())
        except Exception:  # noqa: BLE001 - a part cut short: its rows count as missing
            continue
    return names


class ParquetWriter:
    """``parquet/part-NNNNN.parquet``: the result rows, in parts of ``rows_per_part`` (atomic files)."""

    def __init__(self, out_dir: Path, columns: Sequence[str], value_columns: Sequence[str], *, keep: set[str] | None = None,
                 rows_per_part: int = PARQUET_ROWS) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa, self.pq = pa, pq
        self.out = out_dir
        self.columns = list(columns)
        from ..risk_groups import AGE_COLUMN, AGE_GAP_COLUMN

        numeric = set(value_columns) | {AGE_COLUMN, AGE_GAP_COLUMN}  # the derived numbers too
        self.schema = pa.schema([(c, pa.float64() if c in numeric else pa.string()) for c in self.columns])
        self.rows_per_part = rows_per_part
        self._rows: list[dict[str, Any]] = []
        parts = _parquet_parts(out_dir)
        if keep is None:
            for p in parts:
                p.unlink()
            parts = []
        else:  # resume: the kept inputs' rows stay, once
            seen: set[str] = set()
            for p in parts:
                try:
                    t = pq.read_table(p)
                    rows = [r for r in t.to_pylist() if r.get("File") in keep and r.get("File") not in seen]
                    ok = list(t.schema.names) == self.columns
                except Exception:  # noqa: BLE001 - unreadable part: dropped (its inputs are redone)
                    rows, ok = [], False
                seen.update(r["File"] for r in rows)
                if not ok or not rows:
                    p.unlink()
                elif len(rows) != t.num_rows:
                    self._write_part(p, rows)
            parts = _parquet_parts(out_dir)
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in parts), default=-1)

    def _write_part(self, path: Path, rows: list[dict[str, Any]]) -> None:
        table = self.pa.Table.from_pylist([{c: r.get(c) for c in self.columns} for r in rows], schema=self.schema)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        self.pq.write_table(table, tmp)
        os.replace(tmp, path)

    def write(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if self._rows:
            self._write_part(self.out / PARQUET_DIR / f"part-{self._next:05d}.parquet", self._rows)
            self._next += 1
            self._rows = []

    def close(self) -> None:
        self.flush()


class ResultWriter:
    """Writes the results table as CSV and/or JSON (a list of objects) and/or Parquet, one row at a time."""

    def __init__(self, out_dir: Path, columns: Sequence[str], *, csv_out: bool = True, json_out: bool = False,
                 parquet_out: bool = False, value_columns: Sequence[str] = (), keep: set[str] | None = None) -> None:
        self.columns = list(columns)
        self._csv_f = self._json_f = None
        self._parquet = None
        self._n_json = 0
        out_dir.mkdir(parents=True, exist_ok=True)
        if csv_out:
            old = _kept_csv_rows(out_dir / RESULTS_CSV, keep, self.columns) if keep else []
            self._csv_f = _RowFile(out_dir, RESULTS_CSV)
            self._csv_f.append(_csv_bytes([self.columns, *old]))
        if json_out:
            old_json = []
            if keep:
                seen: set[str] = set()
                for r in read_json_rows(out_dir / RESULTS_JSON):
                    if r.get("File") in keep and r.get("File") not in seen and list(r) == self.columns:
                        seen.add(r["File"])
                        old_json.append(r)
            self._json_f = _RowFile(out_dir, RESULTS_JSON)
            self._json_f.append(b"[", b"]\n")  # a complete (empty) list from the start
            for r in old_json:
                self._write_json(r)
        if parquet_out:
            self._parquet = ParquetWriter(out_dir, self.columns, value_columns, keep=keep)

    def _write_json(self, obj: dict[str, Any]) -> None:
        text = ("," if self._n_json else "") + "\n  " + json.dumps(obj, ensure_ascii=False)
        self._json_f.append(text.encode("utf-8"), b"\n]\n")
        self._n_json += 1

    def write(self, row: dict[str, Any]) -> None:
        """One row into every table; on a full disk (:class:`DiskFullError`) no table holds it
        (a table that took it already is cut back)."""
        mark = self.mark()
        try:
            if self._csv_f is not None:
                self._csv_f.append(_csv_bytes([[_fmt(row.get(c)) for c in self.columns]]))
            if self._json_f is not None:
                obj = {c: row.get(c) for c in self.columns}
                obj = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in obj.items()}
                self._write_json(obj)
        except (OSError, DiskFullError):
            self.rollback(mark)
            raise
        if self._parquet is not None:
            self._parquet.write(row)

    def mark(self) -> Any:
        """Where the CSV and JSON tables end now (:meth:`rollback` cuts them back to it)."""
        return self._n_json, [(f, f.mark()) for f in (self._csv_f, self._json_f) if f is not None]

    def rollback(self, mark: Any) -> None:
        self._n_json, marks = mark
        for f, m in marks:
            f.rollback(m)

    def flush(self) -> None:
        """Write the Parquet rows gathered so far (CSV and JSON are written row by row)."""
        if self._parquet is not None:
            self._parquet.flush()

    def close(self) -> None:
        """Close the tables; the JSON list is already closed after every row (nothing to write)."""
        if self._parquet is not None:
            try:
                self._parquet.close()
            finally:
                self._parquet = None
        if self._csv_f is not None:
            self._csv_f.close()
            self._csv_f = None
        if self._json_f is not None:
            self._json_f.close()
            self._json_f = None

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ManifestWriter:
    """``manifest.csv``: one row per input file, ``File,status,reason`` (status ok/skipped/failed)."""

    def __init__(self, out_dir: Path, keep: set[str] | None = None) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        old = _kept_csv_rows(out_dir / MANIFEST_CSV, keep, MANIFEST_COLUMNS) if keep else []
        self._f = _RowFile(out_dir, MANIFEST_CSV)
        self._f.append(_csv_bytes([MANIFEST_COLUMNS, *old]))
        self.counts = {"ok": 0, "skipped": 0, "failed": 0}

    def write(self, file: str, status: str, reason: str = "") -> None:
        status = str(status)
        self._f.append(_csv_bytes([[file, status, reason]]))
        self.counts[status] = self.counts.get(status, 0) + 1

    def mark(self) -> tuple[int, bytes]:
        """Where the manifest ends now (:meth:`rollback` cuts it back to it)."""
        return self._f.mark()

    def rollback(self, mark: tuple[int, bytes]) -> None:
        self._f.rollback(mark)

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

    def __init__(self, out_dir: Path, keep: Sequence[Any] | None = None) -> None:
        from ..records import RECORDS_JSONL

        out_dir.mkdir(parents=True, exist_ok=True)
        self._f = _RowFile(out_dir, RECORDS_JSONL)
        for rec in keep or ():  # resume: the kept inputs' records (InputRecord objects), first
            self.write(rec)

    def write(self, record: Any) -> None:
        self._f.append((json.dumps(record.to_json(), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
