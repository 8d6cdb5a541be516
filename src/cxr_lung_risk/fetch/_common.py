"""What the fetch modules share (private to the package): the error, the read size, the SHA-256
pattern, byte counts for people, and a folder's fsync."""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from ..errors import CxrLungRiskError

#: Bytes read or written at a time (downloads, extraction, hashing).
CHUNK = 1 << 20
#: A SHA-256 written as 64 hexadecimal digits.
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


class FetchError(CxrLungRiskError):
    """A download, verification, extraction or lookup failed; the message is one sentence."""


FetchError.__module__ = "cxr_lung_risk.fetch"  # where it has always been imported from


def fmt_bytes(n: int) -> str:
    """``n`` bytes for people: ``512 bytes``, ``2.2 GB``."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0  # type: ignore[assignment]
    return str(n)


def fsync_dir(d: Path) -> None:
    """Make a rename in folder ``d`` durable (POSIX; best effort)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
