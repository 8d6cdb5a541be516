"""One result record per input: what happened to it and every file written for it.

A run writes ``records.jsonl`` in its output folder: one JSON object per input path the walk
met, in input order, written as soon as the input is finished::

    {"input": "/data/a/x.dcm", "file": "a/x.dcm", "status": "ok", "reason": "",
     "warnings": [], "study_uid": "1.2...", "series_uid": "1.2...", "sop_uid": "1.2...",
     "values": {"CXR_Lung_Risk": 3.1}, "outputs": {"sr": ["sr/1.2....dcm"]},
     "identity": {"input": "/data/a/x.dcm", "size": 1234, "mtime": 1700000000000000000, "sha256": "..."}}

``outputs`` paths are relative to the output folder, by kind (``sr``, ``sc``, ``saliency``,
``png``). ``identity`` is what a rerun into the same folder compares to decide that an input is
already done (see :mod:`cxr_lung_risk.resume`): the absolute path or URL, the size and modification
time as listed, and the SHA-256 of the bytes that were read. Adapters (MHub, the PACS node, the cluster runner) read these records instead of
re-deriving file names. :func:`read_records` reads them back.
"""
from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["Status", "InputRecord", "RECORDS_JSONL", "read_records", "json_lines", "add_warnings"]

RECORDS_JSONL = "records.jsonl"


class Status(str, enum.Enum):
    """What happened to one input."""

    OK = "ok"  # scored (or, for ``preprocess``, converted)
    SKIPPED = "skipped"  # deliberately not scored: not a frontal chest radiograph, not an image, ...
    FAILED = "failed"  # could not be scored: broken file, undecodable, a write error, ...

    def __str__(self) -> str:  # "ok", not "Status.OK", in CSV cells and messages
        return self.value


@dataclass
class InputRecord:
    """The machine-readable account of one input."""

    input: str  # the path as found (file-system form, printable)
    file: str  # unique name within the run (the CSV/manifest ``File`` column)
    status: Status
    reason: str = ""  # one sentence when not ok ("skipped: ...", "failed: ...")
    warnings: list[str] = field(default_factory=list)
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    values: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)  # input, size, mtime, sha256 (resume)

    def add_output(self, kind: str, rel_path: str) -> None:
        self.outputs.setdefault(kind, []).append(rel_path)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = str(self.status)
        d["values"] = {k: (float(v) if v is not None and math.isfinite(v) else None) for k, v in self.values.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "InputRecord":
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        kw["status"] = Status(kw["status"])
        return cls(**kw)


def add_warnings(caught: Any, into: list[str]) -> None:
    """Append the messages of caught :class:`warnings.WarningMessage` s to an input's warnings:
    one line each, at most 200 characters, each message once."""
    for w in caught:
        msg = " ".join(str(w.message).split())[:200]
        if msg and not any(msg[:150] in note for note in into):  # also once when a reader already has it as 'pydicom: ...'
            into.append(msg)


def read_records(out_dir: str | Path) -> Iterator[InputRecord]:
    """The records of a finished (or interrupted) run, in the order they were written."""
    path = Path(out_dir) / RECORDS_JSONL
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield InputRecord.from_json(json.loads(line))


def json_lines(path: str | Path, clean: Callable[[str], str] = str.strip) -> Iterator[Any]:
    """The JSON values of a file with one per line (none when it cannot be opened); a line that
    does not parse (cut by an interruption) is passed over. ``clean`` prepares each line."""
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError:
        return
    with f:
        for line in f:
            line = clean(line)
            if line:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue
