"""The DICOM SR document: a TID 1500 Imaging Measurement Report per source image.

Comprehensive 3D SR (SOP Class 1.2.840.10008.5.1.4.1.1.88.34, what IHE AI Results asks for) by
default; ``sr_class="comprehensive"`` writes Comprehensive SR (...88.33) for archives that lack
the 3D class. The content is the same in both.

Public API::

    build_measurement_report(source, measurements, *, algorithm, ...) -> pydicom.Dataset
    write_sr(ds, path) -> Path
    read_measurements(path) -> dict[str, float]
    sr_filename(source_sop_instance_uid) -> str

What is copied from the source: the Patient, General Study, Patient Study, Clinical Trial
Subject and Clinical Trial Study modules (top-level attributes, private tags removed from
their sequences), written with the source's Specific Character Set so that the raw bytes of
person names are kept. Never copied: the source's SOP/Series UIDs (except as references),
equipment, acquisition, image or private attributes.

UIDs and dates follow ``deterministic`` (a :class:`~cxr_lung_risk.outputs.base.UidPolicy` or a
bool). RANDOM (``False``): random ``2.25.<uuid4>`` UIDs and the current time. STABLE: UIDs are
``2.25.<int of a UUIDv5>`` -- the SOP Instance UID and tracking UIDs from (source SOP Instance,
Series Instance and Study Instance UIDs, the measurements reported (names and codes, never their values), the algorithms' names,
versions and weights' identity, software version, device, numbers); the Series Instance UID
from (Study Instance UID, the same algorithms and weights, device, software version, series
number), so one study's reports share a series -- and the current time: the same instance
re-scored in another batch (whose float32 noise changes the last bits of a value) gets the same
UIDs. DETERMINISTIC (``True``): the stable UIDs, and every date/time is the source's
StudyDate/StudyTime (else ContentDate/ContentTime, else 1970-01-01 00:00:00); identical input
then gives byte-identical files (with the same cxr-lung-risk, highdicom and pydicom versions).
"""
from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from highdicom import ContributingEquipment
from highdicom.sr import Comprehensive3DSR, ComprehensiveSR, MeasurementReport
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from ... import __version__ as SOFTWARE_VERSION
from ..base import (
    COPIED_KEYWORDS,
    copy_source_modules,
    decide_character_set,
    UidPolicy,
    fixed_datetime,
    new_uid,
    safe_value,
    uid_stem,
    write_dataset,
)
from .content import (
    AlgorithmInfo,
    Measurement,
    coding_scheme_item,
    image_library,
    measurement_groups,
    member_concept,
    observation_context,
)
from .enum import StandardCodes

__all__ = [
    "Measurement",
    "AlgorithmInfo",
    "COMPREHENSIVE_SR_STORAGE",
    "COMPREHENSIVE_3D_SR_STORAGE",
    "SR_CLASSES",
    "SR_STORAGE_CLASSES",
    "build_measurement_report",
    "write_sr",
    "read_measurements",
    "sr_filename",
    "decide_character_set",
    "COPIED_KEYWORDS",
]

#: SOP Class UID of Comprehensive SR Storage.
COMPREHENSIVE_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"
#: SOP Class UID of Comprehensive 3D SR Storage (IHE AI Results' class; the default).
COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"
#: ``sr_class`` option values -> SOP Class UID written.
SR_CLASSES = {"3d": COMPREHENSIVE_3D_SR_STORAGE, "comprehensive": COMPREHENSIVE_SR_STORAGE}
#: The SOP classes this package writes (and reads back).
SR_STORAGE_CLASSES = frozenset(SR_CLASSES.values())
_SR_CONSTRUCTORS = {"3d": Comprehensive3DSR, "comprehensive": ComprehensiveSR}

_NS = "sr"

# Attributes highdicom reads from its "evidence" dataset (besides the UIDs).
_EVIDENCE_KEYWORDS = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)


# ----------------------------------------------------------------------------- building
def _evidence_for_highdicom(source: Dataset, scs) -> Dataset:
    """A minimal copy of the source with exactly what highdicom's SR constructor reads.

    Values highdicom would reject (malformed dates, a sex other than M/F/O) are left empty
    here; the source's own values are copied into the report afterwards anyway.
    """
    ev = Dataset()
    for kw in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        setattr(ev, kw, source[kw].value)
    if scs is not None:
        ev.SpecificCharacterSet = scs
    for kw in _EVIDENCE_KEYWORDS:
        setattr(ev, kw, safe_value(source, kw))
    return ev


def _own_texts(
    measurements: Sequence[Measurement],
    algorithms: Iterable[AlgorithmInfo],
    device_name: str,
    manufacturer: str,
    series_description: str,
) -> list[str]:
    texts = [device_name, manufacturer, series_description]
    for algorithm in algorithms:
        texts += [algorithm.name, algorithm.version]
        texts += [f"{k}={v}" for k, v in algorithm.parameters.items()]
    for m in measurements:
        texts += [m.name, m.code_meaning, m.unit_meaning]
        for member in m.members or {}:
            texts.append(member_concept(m, member).meaning)
    return texts


def build_measurement_report(
    source: pydicom.Dataset,
    measurements: Sequence[Measurement],
    *,
    algorithm: AlgorithmInfo | Mapping[str, AlgorithmInfo],
    device_name: str = "cxr-lung-risk",
    manufacturer: str = "cxr-lung-risk open implementation",
    deterministic: UidPolicy | bool = False,
    series_number: int = 9001,
    instance_number: int = 1,
    sr_class: str = "3d",
) -> pydicom.Dataset:
    """Build a Comprehensive 3D SR or Comprehensive SR (TID 1500 Imaging Measurement Report) for one source image.

    Args:
        source: the source image's dataset (pixel data not needed: ``stop_before_pixels``).
        measurements: results to report (at least one), e.g. CXR-Lung-Risk and CXR-Age.
        algorithm: algorithm name/version/parameters written in every measurement group;
            or a mapping from measurement name to the algorithm of that measurement (e.g.
            CXR-Lung-Risk and CXR-Age are different networks); every measurement needs one.
        device_name: name of the software, used as Device Observer Name and Manufacturer's
            Model Name.
        manufacturer: Manufacturer of the report and Device Observer Manufacturer.
        deterministic: the :class:`~cxr_lung_risk.outputs.base.UidPolicy` (``True``: stable
            UIDs and the source's dates, so identical input gives a byte-identical file;
            ``UidPolicy.STABLE``: stable UIDs, dated now; ``False``: random UIDs, dated now).
        series_number: Series Number of the report.
        instance_number: Instance Number of the report.
        sr_class: ``"3d"`` (default): Comprehensive 3D SR (1.2.840.10008.5.1.4.1.1.88.34, IHE
            AIR); ``"comprehensive"``: Comprehensive SR (...88.33) for archives without the 3D
            class. The stable UIDs differ between the two (one UID, one class).

    Returns:
        A ``highdicom.sr.Comprehensive3DSR`` or ``ComprehensiveSR`` (a ``pydicom.Dataset``) ready
        for :func:`write_sr`.

    Raises:
        ValueError: unknown ``sr_class``, no measurement, or the source lacks the UIDs a report must reference, or
            its SOP class is not an image storage class.
    """
    if sr_class not in SR_CLASSES:
        raise ValueError(f"sr_class must be one of {', '.join(SR_CLASSES)} (got {sr_class!r}).")
    if not measurements:
        raise ValueError("At least one measurement is needed to build a report.")
    for kw in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not source.get(kw):
            raise ValueError(f"The source DICOM has no {kw}, so no report can reference it.")
    names = [m.name for m in measurements]
    if len(set(names)) != len(names):
        raise ValueError(f"Measurement names must be unique: {names}.")
    if isinstance(algorithm, AlgorithmInfo):
        algorithms = {m.name: algorithm for m in measurements}
    else:
        algorithms = dict(algorithm)
        missing = [n for n in names if n not in algorithms]
        if missing:
            raise ValueError(f"No algorithm identification given for {missing}.")
    used = list(
        {(a.name, a.version, tuple(a.parameters.items())): a for a in (algorithms[n] for n in names)}.values()
    )
    series_description = " + ".join(f"{a.name} {a.version}" for a in used)
    if any(a.parameters.get("weights") == "SYNTHETIC" for a in used):
        # results of synthetic (test/demo) weights must say so wherever a viewer shows the series
        series_description = ("SYNTHETIC WEIGHTS, meaningless: " + series_description)[:64]
    else:
        series_description = (series_description[:44] + " (research use only)")[:64]
    scs = decide_character_set(
        source, _own_texts(measurements, used, device_name, manufacturer, series_description)
    )

    source_uid = str(source.get("SOPInstanceUID", ""))
    policy = UidPolicy.of(deterministic)
    # What identifies this result (never the values: a re-score in another batch differs in the
    # last bits and must not make a second, different object in a PACS).
    algorithm_key = [
        [n, a.name, a.version, a.parameters.get("weights", ""), a.parameters.get("weights_sha256", "")]
        for n, a in sorted(algorithms.items()) if n in names
    ]
    content_key = {
        "source": source_uid,
        # the source's study and series too: two images that claim one SOP Instance UID (a broken
        # archive) still get two reports
        "source_series": [str(source.get("StudyInstanceUID", "")), str(source.get("SeriesInstanceUID", ""))],
        "measurements": [[m.name, m.code_value, m.code_meaning, m.unit, sorted(m.members or {})] for m in measurements],
        "algorithm": algorithm_key,
        "software": SOFTWARE_VERSION,
        "device": [manufacturer, device_name],
        "numbers": [series_number, instance_number],
    }
    # One UID, one SOP class: a 3D SR never takes the UIDs of the Comprehensive SR of the same
    # result (those stay what earlier versions wrote).
    class_key = {"sop_class": SR_CLASSES[sr_class]} if sr_class != "comprehensive" else {}
    content_key.update(class_key)
    if policy.stable_uids:
        def uid_for(label: str) -> str:
            return new_uid({"label": label, **content_key}, namespace=_NS)

        series_uid = new_uid(
            {
                "label": "series",
                "study": str(source.get("StudyInstanceUID", "")),
                "algorithm": algorithm_key,
                "software": SOFTWARE_VERSION,
                "device": [manufacturer, device_name],
                "series_number": series_number,
                **class_key,
            },
            namespace=_NS,
        )
    else:
        def uid_for(label: str) -> str:
            return new_uid()

        series_uid = uid_for("series")
    when = fixed_datetime(source) if policy.fixed_dates else datetime.datetime.now().replace(microsecond=0)
    sop_uid = uid_for("instance")
    device_uid = new_uid({"label": "device", "device": [manufacturer, device_name], "software": SOFTWARE_VERSION}, namespace=_NS)

    report = MeasurementReport(
        observation_context=observation_context(
            device_uid=device_uid,
            device_name=device_name,
            manufacturer=manufacturer,
            model_name=device_name,
            serial_number=SOFTWARE_VERSION,
        ),
        procedure_reported=StandardCodes.IMAGING_PROCEDURE,
        imaging_measurements=measurement_groups(measurements, algorithms, source, uid_for),
        title=StandardCodes.IMAGING_MEASUREMENT_REPORT,
    )
    # TID 1500 row order: ..., Procedure Reported, Image Library (TID 1600), Imaging Measurements.
    root_items = report[0].ContentSequence
    root_items.insert(len(root_items) - 1, image_library(source))

    evidence = _evidence_for_highdicom(source, scs)
    with warnings.catch_warnings():
        # The source's names are copied as they are; highdicom's style advice is not for users.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        try:
            sr = _SR_CONSTRUCTORS[sr_class](
                evidence=[evidence],
                content=report[0],
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=sop_uid,
                instance_number=instance_number,
                manufacturer=manufacturer,
                is_complete=True,
                is_final=False,
                is_verified=False,
                transfer_syntax_uid=ExplicitVRLittleEndian,
                coding_schemes=[coding_scheme_item()],
                series_description=series_description,
                manufacturer_model_name=device_name,
                software_versions=SOFTWARE_VERSION,
                content_date=when.date(),
                content_time=when.time(),
                series_date=when.date(),
                series_time=when.time(),
                # The character set is set below: highdicom rejects some valid values.
                specific_character_set=None,
            )
        except KeyError as exc:
            raise ValueError(
                f"The source's SOP class {source.get('SOPClassUID')} is not an image storage class a report can describe."
            ) from exc

    if scs is not None:
        sr.SpecificCharacterSet = scs
    elif "SpecificCharacterSet" in sr:
        del sr.SpecificCharacterSet
    copy_source_modules(sr, source)
    sr.InstanceCreationDate = DA(when.date())
    sr.InstanceCreationTime = TM(when.time())
    # Only the library that wrote the file, never the source's acquisition equipment.
    sr.ContributingEquipmentSequence = [
        ContributingEquipment(
            manufacturer="Highdicom open-source contributors",
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name="highdicom",
            software_versions=hd.__version__,
            contribution_datetime=when,
            contribution_description="Software library used to create this instance",
        )
    ]
    return sr


def _code_of(item: Dataset) -> tuple[str, str]:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return ("", "")
    return (str(seq[0].get("CodeValue", "")), str(seq[0].get("CodingSchemeDesignator", "")))


def _is(item: Dataset, code) -> bool:
    return _code_of(item) == (code.value, code.scheme_designator)


def read_measurements(path: str | os.PathLike) -> dict[str, float]:
    """Numeric values of a report's measurement groups, keyed by concept name (code meaning).

    Reads the NUM items of every Measurement Group (125007 DCM) inside Imaging Measurements
    (126010 DCM); image library descriptors are not included. Uses Floating Point Value when
    present (full double precision), else the Decimal String Numeric Value.

    Raises:
        ValueError: the file is not a DICOM SR, or a concept name occurs twice.
    """
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - one clear sentence for the user
        raise ValueError(f"{path} is not a readable DICOM file ({exc}).") from exc
    # Any SR class with a content tree: Comprehensive 3D SR (the default) and Comprehensive SR.
    if ds.get("Modality") != "SR" or "ContentSequence" not in ds:
        raise ValueError(f"{path} is not a DICOM Structured Report.")
    out: dict[str, float] = {}
    for container in ds.ContentSequence:
        if not _is(container, StandardCodes.IMAGING_MEASUREMENTS):
            continue
        for group in container.get("ContentSequence", []):
            if not _is(group, StandardCodes.MEASUREMENT_GROUP):
                continue
            for item in group.get("ContentSequence", []):
                if item.get("ValueType") != "NUM" or not item.get("MeasuredValueSequence"):
                    continue
                mv = item.MeasuredValueSequence[0]
                value = float(mv.FloatingPointValue) if "FloatingPointValue" in mv else float(mv.NumericValue)
                meaning = str(item.ConceptNameCodeSequence[0].CodeMeaning)
                if meaning in out:
                    raise ValueError(f"{path} reports {meaning!r} more than once.")
                out[meaning] = value
    return out



def sr_filename(source_sop_instance_uid: str) -> str:
    """File name ``<uid>.dcm`` for the report of a source image (``sr-<hash>.dcm`` when the UID
    is malformed; see :func:`cxr_lung_risk.outputs.base.uid_stem`)."""
    return f"{uid_stem(source_sop_instance_uid, prefix='sr')}.dcm"


def write_sr(ds: pydicom.Dataset, path: str | os.PathLike) -> Path:
    """Write the report as a DICOM Part 10 file, atomically; returns the path written."""
    return write_dataset(ds, path)

