"""Compare a workflow's output folder with the reference folder of the MHub test data, the way
MHub's test routine compares them (its documented behaviour, re-implemented here):

* the same file tree (every reference file produced, nothing else);
* JSON and CSV by content: numbers within a tolerance, everything else equal;
* DICOM by content, not bytes: every data element compared (recursing into sequences), numbers
  within the tolerance; the file meta header and creation timestamps are not compared;
* any other file byte for byte.

    python tools/mhub_compare.py OUTPUT_DIR REFERENCE_DIR [--rel-tol 1e-5] [--abs-tol 1e-6]

Prints one line per difference; exit status 0 when they match, 1 when they differ.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

# creation timestamps are not content (MHub's comparison does not pin them either)
DICOM_IGNORED = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime"}


def _tree(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}


def _num(x: Any) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _close(a: Any, b: Any, rel: float, abs_: float) -> bool:
    na, nb = _num(a), _num(b)
    if na is not None and nb is not None:
        if math.isnan(na) or math.isnan(nb):
            return math.isnan(na) and math.isnan(nb)
        return math.isclose(na, nb, rel_tol=rel, abs_tol=abs_)
    return a == b


def _compare_values(a: Any, b: Any, where: str, rel: float, abs_: float, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            out.append(f"{where}: keys differ: {sorted(set(a) ^ set(b))}")
        for k in sorted(set(a) & set(b)):
            _compare_values(a[k], b[k], f"{where}.{k}", rel, abs_, out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} items, reference {len(b)}")
        for k, (x, y) in enumerate(zip(a, b)):
            _compare_values(x, y, f"{where}[{k}]", rel, abs_, out)
    elif not _close(a, b, rel, abs_):
        out.append(f"{where}: {a!r} != reference {b!r}")


def _csv_rows(p: Path) -> list[list[str]]:
    with open(p, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _dicom_values(ds: Any) -> dict[str, Any]:
    """A dataset's elements as plain values (sequences as lists of dicts), by tag keyword."""
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.keyword in DICOM_IGNORED:
            continue
        key = elem.keyword or str(elem.tag)
        if elem.VR == "SQ":
            out[key] = [_dicom_values(item) for item in elem.value]
        elif elem.VR in ("OB", "OW", "OF", "OD", "OL", "UN"):
            out[key] = bytes(elem.value or b"").hex()
        elif elem.VM > 1:
            out[key] = [str(v) for v in elem.value]
        else:
            out[key] = None if elem.value is None else str(elem.value)
    return out


def compare_file(a: Path, b: Path, rel: str, rel_tol: float, abs_tol: float) -> list[str]:
    out: list[str] = []
    suffix = a.suffix.lower()
    try:
        if suffix == ".json":
            _compare_values(json.loads(a.read_text("utf-8")), json.loads(b.read_text("utf-8")), rel, rel_tol, abs_tol, out)
        elif suffix == ".csv":
            _compare_values(_csv_rows(a), _csv_rows(b), rel, rel_tol, abs_tol, out)
        elif suffix == ".dcm":
            import pydicom

            _compare_values(_dicom_values(pydicom.dcmread(a)), _dicom_values(pydicom.dcmread(b)), rel, rel_tol, abs_tol, out)
        elif a.read_bytes() != b.read_bytes():
            out.append(f"{rel}: contents differ")
    except Exception as e:  # an unreadable output is a difference, not a crash of the comparison
        out.append(f"{rel}: cannot be compared ({type(e).__name__}: {e})")
    return out


def compare_dirs(output: Path, reference: Path, rel_tol: float = 1e-5, abs_tol: float = 1e-6) -> list[str]:
    """Every difference between ``output`` and ``reference`` (empty list: they match)."""
    got, want = _tree(output), _tree(reference)
    diffs = [f"missing: {p}" for p in sorted(want - got)] + [f"unexpected: {p}" for p in sorted(got - want)]
    for rel in sorted(got & want):
        diffs += compare_file(output / rel, reference / rel, rel, rel_tol, abs_tol)
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("reference", type=Path)
    ap.add_argument("--rel-tol", type=float, default=1e-5)
    ap.add_argument("--abs-tol", type=float, default=1e-6)
    a = ap.parse_args(argv)
    diffs = compare_dirs(a.output, a.reference, a.rel_tol, a.abs_tol)
    for d in diffs:
        print(d)
    print("match" if not diffs else f"{len(diffs)} difference(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
