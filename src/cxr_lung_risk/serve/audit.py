"""The JSON-lines audit log: every association, instance received and result sent.

One JSON object per line: ``{"time": ISO-8601 UTC, "event": ..., ...}``. Only identifiers go in
(AE titles, peer addresses, UIDs, SOP classes, statuses, reasons, destinations): never pixel data
and never patient names or IDs. Lines are written whole and flushed at once (a crash of the node
loses no acknowledged line); the file is appended to across restarts.
"""
from __future__ import annotations

import datetime
import json
import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["AuditLog", "FORBIDDEN_KEYS"]

#: Keys the audit log refuses to carry (defence in depth: callers never pass them).
FORBIDDEN_KEYS = frozenset({"PatientName", "PatientID", "patient_name", "patient_id", "PixelData", "pixels"})


class AuditLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.path, flags, 0o640)
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        rec: dict[str, Any] = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "event": event,
        }
        for k, v in fields.items():
            if k in FORBIDDEN_KEYS or v is None:
                continue
            rec[k] = v if isinstance(v, (int, float, bool, list, dict)) else str(v)
        line = (json.dumps(rec, ensure_ascii=True, default=str) + "\n").encode("ascii")
        with self._lock:
            if self._fd is not None:
                os.write(self._fd, line)  # one write() of a whole line, O_APPEND: lines never interleave

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                finally:
                    os.close(self._fd)
                    self._fd = None
