"""Resume and shards, for every engine.

**Resume.** Every record in ``records.jsonl`` carries the input's *identity*: the absolute path
(or URL), the size and modification time as listed, and the SHA-256 of the bytes read. A rerun
with the same ``--out`` (and the same options, see :func:`resume_key`) keeps an input when

* its record has status ``ok`` or ``skipped`` (a ``failed`` input is tried again: failures may be
  transient, e.g. a worker killed for memory),
* the input is still there with the same path, size and modification time, and the same ``File``
  name in this run,
* every output file the record lists exists, and a scored input's row is in every table of the
  run (CSV, JSON, Parquet);

everything else is done again, and the tables are rewritten to hold the kept inputs' rows once
(never truncated to nothing, never duplicated). A file changed in place *with the same size and
modification time* is not noticed (its recorded SHA-256 tells afterwards).

**Shards.** ``--shard K/N`` keeps the inputs whose ``File`` name hashes (SHA-256) to ``K`` modulo
``N``: stable across machines, runs and input order, so N array jobs (SLURM) cover every input
exactly once; :func:`cxr_lung_risk.merge.merge_outputs` joins their output folders.
"""
from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import UsageError
from .records import RECORDS_JSONL, InputRecord, Status, json_lines

__all__ = [
    "IDENTITY_KEYS",
    "input_identity",
    "same_input",
    "shard_of",
    "parse_shard",
    "resume_key",
    "completed_records",
    "read_records_tolerant",
]

#: What must be equal for a recorded input to count as this run's input (sha256 is kept as evidence).
IDENTITY_KEYS = ("input", "size", "mtime")


def input_identity(source: str | os.PathLike, *, size: int | None = None, mtime: Any = None) -> dict[str, Any]:
    """The identity of one input: ``{"input", "size", "mtime"}``.

    A local path is stat'ed (its absolute path, not resolved through links; size and mtime in
    nanoseconds of what it points to); a URL (``s3://...``) takes the ``size`` and ``mtime`` its
    file system listed. :func:`cxr_lung_risk.pipeline.prepare` adds ``sha256`` of the bytes read.
    """
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if "://" in text:
        return {"input": text, "size": size, "mtime": mtime}
    try:
        st = os.stat(text)
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        pass
    printable = os.path.abspath(text).encode("utf-8", "backslashreplace").decode("utf-8")
    return {"input": printable, "size": size, "mtime": mtime}


def same_input(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    return bool(recorded) and all(recorded.get(k) == current.get(k) for k in IDENTITY_KEYS) and current.get("size") is not None


def shard_of(name: str, n: int) -> int:
    """The shard (0 .. n-1) of an input named ``name`` (its ``File`` column)."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % n


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 0 <= K < N."""
    try:
        k, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise UsageError(f"--shard takes K/N with 0 <= K < N, e.g. 0/4 (got {text!r})") from None
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard takes K/N with 0 <= K < N, e.g. 0/4 (got {text!r})")
    return k, n


def resume_key(opts: Any) -> dict[str, Any]:
    """The options that change what a run writes: a rerun resumes only when they are equal
    (weights are compared by the paths given; replace weights files in place and you must rerun
    with ``--no-resume``)."""
    sel = opts.selection
    return {
        "models": list(opts.models),
        "weights": {k: str(v) for k, v in sorted(dict(opts.weights).items())},
        "precision": opts.precision,
        "per_model": opts.per_model,
        "all_members": opts.all_members,
        "formats": sorted(opts.formats),
        "deterministic": opts.deterministic,
        "tta": opts.tta,
        "saliency": opts.saliency_method if opts.saliency else None,
        "selection": repr(sel),
        "im_version": opts.im_version,
        "sr_class": getattr(opts, "sr_class", "3d"),
        "linkage": bool(getattr(opts, "linkage", False)),
    }


def read_records_tolerant(out: Path) -> list[InputRecord]:
    """The records in ``out`` (none when there is no file); a line cut by an interruption is ignored."""
    recs: list[InputRecord] = []
    for d in json_lines(Path(out) / RECORDS_JSONL):
        try:
            recs.append(InputRecord.from_json(d))
        except (KeyError, TypeError, ValueError):
            continue
    return recs


def _table_files(out: Path, formats: Iterable[str]) -> list[set[str]]:
    """For each table the run writes, the ``File`` names it holds."""
    from .outputs.tables import RESULTS_CSV, RESULTS_JSON, read_json_rows, read_parquet_files

    sets: list[set[str]] = []
    formats = set(formats)
    if "csv" in formats:
        try:
            with open(out / RESULTS_CSV, newline="", encoding="utf-8") as f:
                sets.append({r.get("File", "") for r in csv.DictReader(f)})
        except OSError:
            sets.append(set())
    if "json" in formats:
        sets.append({r.get("File", "") for r in read_json_rows(out / RESULTS_JSON)})
    if "parquet" in formats:
        sets.append(read_parquet_files(out))
    return sets


def completed_records(out: Path, current: Mapping[str, Mapping[str, Any]], formats: Sequence[str]) -> list[InputRecord]:
    """The records in ``out`` of inputs that need not be done again (see the module docstring).

    ``current``: this run's inputs, ``File`` name -> identity (:func:`input_identity`).
    """
    out = Path(out)
    recs = read_records_tolerant(out)
    if not recs:
        return []
    tables = _table_files(out, formats)
    kept: list[InputRecord] = []
    seen: set[str] = set()
    for r in recs:
        if r.file in seen or r.file not in current:
            continue
        if r.status not in (Status.OK, Status.SKIPPED) or not same_input(r.identity, current[r.file]):
            continue
        if not all((out / rel).is_file() for rels in r.outputs.values() for rel in rels):
            continue
        if r.status is Status.OK and not all(r.file in t for t in tables):
            continue
        seen.add(r.file)
        kept.append(r)
    return kept
