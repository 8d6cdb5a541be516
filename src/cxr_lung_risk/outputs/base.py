"""What every DICOM writer of this package shares (SR, Secondary Capture), so they cannot drift.

* the patient/study/clinical-trial modules copied from the source (:data:`COPIED_KEYWORDS`,
  :func:`copy_source_modules`) and the Specific Character Set decision
  (:func:`decide_character_set`);
* UIDs: random ``2.25.<uuid4>`` or deterministic ``2.25.<uuid5>`` of a payload
  (:func:`new_uid`), and the one date/time rule of deterministic output (:func:`fixed_datetime`);
* values safe to hand to highdicom's constructors (:func:`safe_value`);
* atomic writing with the umask's file mode (:func:`write_dataset`) and file names that come from
  UIDs but never from unchecked text, unique within a run (:func:`uid_stem`,
  :class:`UniqueNames`).
"""
from __future__ import annotations

import copy
import datetime
import enum
import hashlib
import json
import os
import re
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.charset import convert_encodings, decode_bytes, encode_string
from pydicom.datadict import tag_for_keyword
from pydicom.valuerep import DA, TM

__all__ = [
    "COPIED_KEYWORDS",
    "copy_source_modules",
    "decide_character_set",
    "new_uid",
    "UidPolicy",
    "fixed_datetime",
    "safe_value",
    "write_dataset",
    "write_bytes",
    "dataset_bytes",
    "uid_stem",
    "UniqueNames",
]

_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr-lung-risk:dicom")
EPOCH = datetime.datetime(1970, 1, 1, 0, 0, 0)

#: Top-level attributes copied from the source: Patient, General Study, Patient Study,
#: Clinical Trial Subject and Clinical Trial Study modules (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2,
#: C.7.1.3, C.7.2.3).
COPIED_KEYWORDS: tuple[str, ...] = (
    # Patient
    "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "SourcePatientGroupIdentificationSequence",
    "GroupOfPatientsIdentificationSequence", "PatientBirthDate", "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar", "PatientSex", "ReferencedPatientSequence",
    "QualityControlSubject", "StrainDescription", "StrainNomenclature", "StrainStockSequence",
    "StrainAdditionalInformation", "StrainCodeSequence", "GeneticModificationsSequence",
    "OtherPatientNames", "OtherPatientIDsSequence", "ReferencedPatientPhotoSequence",
    "EthnicGroup", "EthnicGroupCodeSequence", "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence", "PatientBreedDescription", "PatientBreedCodeSequence",
    "BreedRegistrationSequence", "ResponsiblePerson", "ResponsiblePersonRole",
    "ResponsibleOrganization", "PatientComments", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    # General Study
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "RequestingServiceCodeSequence",
    "ReferencedStudySequence", "ProcedureCodeSequence", "ReasonForPerformedProcedureCodeSequence",
    "RequestingService",
    # Patient Study
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge",
    "PatientSize", "PatientSizeCodeSequence", "PatientBodyMassIndex", "MeasuredAPDimension",
    "MeasuredLateralDimension", "PatientWeight", "MedicalAlerts", "Allergies", "Occupation",
    "SmokingStatus", "AdditionalPatientHistory", "PregnancyStatus", "LastMenstrualDate",
    "PatientSexNeutered", "ReasonForVisit", "ReasonForVisitCodeSequence", "AdmissionID",
    "IssuerOfAdmissionIDSequence", "ServiceEpisodeID", "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence", "PatientState",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID", "OtherClinicalTrialProtocolIDsSequence",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "IssuerOfClinicalTrialSiteID",
    "ClinicalTrialSubjectID", "IssuerOfClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "IssuerOfClinicalTrialSubjectReadingID", "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    # Clinical Trial Study
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
    "LongitudinalTemporalOffsetFromEvent", "LongitudinalTemporalEventType",
    "ClinicalTrialTimePointTypeCodeSequence", "IssuerOfClinicalTrialTimePointID",
    "ConsentForClinicalTrialUseSequence",
)


def _scs_values(source: Dataset) -> list[str]:
    """The source's Specific Character Set as a list; a missing first value becomes
    ``ISO 2022 IR 6`` (``\\ISO 2022 IR 87`` -> ``ISO 2022 IR 6\\ISO 2022 IR 87``)."""
    elem = source.get("SpecificCharacterSet")
    if elem is None:
        return []
    values = [elem] if isinstance(elem, str) else list(elem)
    values = [str(v).strip() for v in values]
    if all(v == "" for v in values):
        return []
    if len(values) > 1 and values[0] == "":
        values[0] = "ISO 2022 IR 6"
    return values


def _encodable(text: str, encodings: list[str]) -> bool:
    """Whether ``text`` survives encoding with ``encodings`` (no replacement characters)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            raw = encode_string(text, encodings)
            return decode_bytes(raw, encodings, set()) == text
    except (UnicodeError, UserWarning, LookupError, ValueError):
        return False


def decide_character_set(source: Dataset, texts: Iterable[str]) -> str | list[str] | None:
    """Specific Character Set of the report, decided before building it.

    The source's value (normalised: empty first value -> ``ISO 2022 IR 6``) if every text
    this package adds (``texts``) can be encoded with it; otherwise ``ISO_IR 192`` (UTF-8),
    in which case person names are re-encoded rather than copied byte for byte. ``None``
    (no attribute, default repertoire) when the source has none and ``texts`` are ASCII.
    """
    values = _scs_values(source)
    encodings = convert_encodings(values or ["ISO_IR 6"])
    if all(_encodable(t, encodings) for t in texts if t):
        if not values:
            return None
        return values[0] if len(values) == 1 else values
    return "ISO_IR 192"


class UidPolicy(str, enum.Enum):
    """How a writer chooses the UIDs and dates of the DICOM objects it makes.

    * ``RANDOM``: new ``2.25.<uuid4>`` UIDs, dated now (a plain ``predict`` run).
    * ``STABLE``: UIDs derived from what identifies the result -- the source SOP Instance UID
      (or, for a series, the Study Instance UID), the model(s), the weights' identity, the
      software version and the kind of object -- never from the values, so re-scoring the same
      instance in another batch (crash recovery, resume, ``--shard``, ``--engine ray``) gives the
      same UIDs and a PACS stores nothing twice; dated now (``serve``, ``predict --stow``).
    * ``DETERMINISTIC``: the stable UIDs and the dates of the source (:func:`fixed_datetime`):
      byte-identical reruns (``predict --deterministic``).

    ``True``/``False`` are accepted wherever a policy is (DETERMINISTIC/RANDOM).
    """

    RANDOM = "random"
    STABLE = "stable"
    DETERMINISTIC = "deterministic"

    @classmethod
    def of(cls, value: "UidPolicy | bool | str | None") -> "UidPolicy":
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(value)
        return cls.DETERMINISTIC if value else cls.RANDOM

    @property
    def stable_uids(self) -> bool:
        return self is not UidPolicy.RANDOM

    @property
    def fixed_dates(self) -> bool:
        return self is UidPolicy.DETERMINISTIC


def new_uid(payload: object | None = None, *, namespace: str = "") -> str:
    """``2.25.<uuid4>`` (``payload`` None) or ``2.25.<uuid5 of namespace + payload as sorted JSON>``."""
    if payload is None:
        return f"2.25.{uuid.uuid4().int}"
    text = json.dumps(payload, sort_keys=True, ensure_ascii=True, default=str)
    ns = uuid.uuid5(_UUID_NAMESPACE, namespace) if namespace else _UUID_NAMESPACE
    return f"2.25.{uuid.uuid5(ns, text).int}"


def fixed_datetime(source: Dataset) -> datetime.datetime:
    """The time deterministic output claims: StudyDate/StudyTime, else ContentDate/ContentTime,
    else 1970-01-01 00:00:00 (a missing time is midnight)."""
    for date_kw, time_kw in (("StudyDate", "StudyTime"), ("ContentDate", "ContentTime")):
        try:
            date = DA(source.get(date_kw)) if source.get(date_kw) else None
        except (ValueError, TypeError):
            date = None
        if date is None:
            continue
        try:
            time = TM(source.get(time_kw)) if source.get(time_kw) else None
        except (ValueError, TypeError):
            time = None
        t = time if time is not None else datetime.time(0, 0, 0)
        return datetime.datetime.combine(date, datetime.time(t.hour, t.minute, t.second, t.microsecond))
    return EPOCH


def safe_value(source: Dataset, kw: str):
    """The source's value of ``kw`` as highdicom's constructors accept it, or None: malformed
    dates/times and a sex other than M/F/O become None (the source's own values are copied into
    the output afterwards by :func:`copy_source_modules`)."""
    try:
        v = source.get(kw)
    except Exception:  # noqa: BLE001 - a malformed value must not stop a writer
        return None
    if v in (None, ""):
        return None
    try:
        if kw in ("PatientBirthDate", "StudyDate", "SeriesDate", "ContentDate"):
            return DA(v)
        if kw in ("StudyTime", "SeriesTime", "ContentTime"):
            return TM(v)
    except (ValueError, TypeError):
        return None
    if kw == "PatientSex":
        return v if v in ("M", "F", "O") else None
    return v


def copy_source_modules(dst: Dataset, source: Dataset, keywords: Iterable[str] = COPIED_KEYWORDS) -> None:
    """Copy the patient/study/clinical-trial modules (``keywords``) from the source as they are
    (same bytes, same character set); private tags inside copied sequences are dropped."""
    for kw in keywords:
        tag = tag_for_keyword(kw)
        if tag is None or tag not in source:
            continue
        elem = copy.deepcopy(source[tag])
        if elem.VR == "SQ" and elem.value is not None:
            for item in elem.value:
                item.remove_private_tags()
        dst[tag] = elem


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = None


def dataset_bytes(ds: Dataset) -> bytes:
    """``ds`` as the bytes of a DICOM Part 10 file (what :func:`write_dataset` writes)."""
    import io

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_bytes(data: bytes, path: str | os.PathLike, *, suffix: str = "") -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename), with
    the mode a plain ``open()`` would give (``0666 & ~umask``). The destination is replaced, never
    written through: a symbolic link planted at ``path`` is replaced by the file. Returns the path."""
    global _UMASK
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    try:
        if _UMASK is None:
            _UMASK = _umask()
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_dataset(ds: Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` as a DICOM Part 10 file, atomically (see :func:`write_bytes`). Returns the path written."""
    return write_bytes(dataset_bytes(ds), path, suffix=".dcm")


_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


def uid_stem(uid: object, *, prefix: str = "x") -> str:
    """A file-name stem from a UID: the UID itself when well formed (digits and dots, at most 64
    characters), else ``<prefix>-<32 hex digits of its SHA-256>`` (DICOM text never goes into
    file names unchecked)."""
    text = str(uid or "").strip().rstrip("\x00").strip()
    if text and len(text) <= 64 and _UID_RE.fullmatch(text):
        return text
    digest = hashlib.sha256(str(uid).encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{prefix}-{digest}"


class UniqueNames:
    """Hands out output names that are unique within one run: the first claim of ``a/b.dcm``
    gets it, later ones ``a/b_2.dcm``, ``a/b_3.dcm`` ... (thread-safe; case-insensitive, so that
    names stay distinct on case-insensitive file systems too)."""

    def __init__(self) -> None:
        self._taken: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, rel: str) -> str:
        p = Path(rel)
        stem, suffix = p.name[: len(p.name) - len(p.suffix)] if p.suffix else p.name, p.suffix
        with self._lock:
            cand, n = rel, 1
            while cand.lower() in self._taken:
                n += 1
                cand = (p.parent / f"{stem}_{n}{suffix}").as_posix()
            self._taken.add(cand.lower())
            return cand


def output_path(out: str | os.PathLike, rel: str) -> Path:
    """``out / rel``, made safe to write: every folder between ``out`` and the file is a real
    folder (a symbolic link planted there is removed and replaced by a folder), and a symbolic
    link at the file's own place is removed. Outputs are thus never written through a link,
    whatever someone put into ``--out``. ``rel`` must be relative and stay inside ``out``."""
    base = Path(out)
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts:
        raise ValueError(f"output name {rel!r} would leave the output folder")
    d = base
    for part in parts[:-1]:
        d = d / part
        if d.is_symlink():
            d.unlink()
        d.mkdir(exist_ok=True)
    target = base / rel
    if target.is_symlink():
        target.unlink()
    return target


def open_output(out: str | os.PathLike, rel: str, mode: str = "w", **kw):
    """Open ``out / rel`` for writing (see :func:`output_path`), created with the umask's mode,
    refusing to follow a link that appears in between (``O_NOFOLLOW``)."""
    path = output_path(out, rel)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o666)
    return os.fdopen(fd, mode, **kw)
