"""The package's one error family.

Every error this package raises on purpose derives from :class:`CxrLungRiskError` and carries
one plain sentence that tells the user what is wrong and what to do. Exit codes and how a
message is shown are decided by the command-line adapter (:mod:`cxr_lung_risk.cli`), never here.

Problems with one input file are not exceptions: they become a record with a
:class:`~cxr_lung_risk.records.Status` and a reason (see :mod:`cxr_lung_risk.records`).

This module imports nothing heavy (no torch, no pydicom), so the CLI can validate options and
report mistakes before the models are imported.
"""
from __future__ import annotations

import errno

__all__ = [
    "DeliveryError",
    "CxrLungRiskError",
    "UsageError",
    "InputNotFoundError",
    "DeviceError",
    "WeightsError",
    "WeightsNotFoundError",
    "OutputError",
    "OutputLockedError",
    "DiskFullError",
    "disk_full",
]


class CxrLungRiskError(Exception):
    """Base class: an expected problem, explained in one sentence (``str(error)``)."""


class UsageError(CxrLungRiskError):
    """What was asked for cannot be done as asked (options, paths)."""


class InputNotFoundError(UsageError):
    """An INPUT path does not exist."""

    def __init__(self, path: object) -> None:
        self.path = path
        super().__init__(f"input not found: {path} (INPUT must be existing DICOM/PNG/JPEG files or folders)")


class DeviceError(UsageError):
    """The requested device or arithmetic is not available here."""


class WeightsError(CxrLungRiskError):
    """Model weights are missing, incomplete, of the wrong layout or unsafe to read."""


class WeightsNotFoundError(WeightsError):
    """No weights were found where they were looked for."""


class OutputError(CxrLungRiskError):
    """The output folder cannot be used (not writable, a file, unsafe)."""


class OutputLockedError(OutputError):
    """Another run is writing into the same output folder."""


class DiskFullError(OutputError):
    """The output folder's file system is full (or the quota is reached): no row was half written."""

    def __init__(self, message: str, path: object = None) -> None:
        super().__init__(message)
        self.path = path


#: errno values that mean "no space left" (a full disk, a quota, a file-size limit).
_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG})


def disk_full(exc: BaseException, path: object) -> DiskFullError | None:
    """A :class:`DiskFullError` about ``path`` when ``exc`` is an OSError saying the disk is full,
    else None (the caller raises it, or handles ``exc`` as before)."""
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return DiskFullError(f"{exc.strerror or exc}: {path}", path=path)
    return None


class DeliveryError(Exception):
    """A PACS node's destination (DICOM, STOW-RS, FHIR) could not be reached: nothing of this
    delivery round was delivered and the outbox retries it with backoff. Not a
    :class:`CxrLungRiskError`: it never reaches a user as a command's error."""
