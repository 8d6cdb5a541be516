"""Content items and templates of the measurement report (TID 1500 parts), built with highdicom.

- :class:`Measurement` / :class:`AlgorithmInfo`: what the caller reports.
- :func:`measurement_groups`: one TID 1501 Measurement Group per result (+ an optional
  group with the per-member raw outputs), each with TID 4019 Algorithm Identification and a
  reference to the source image.
- :func:`image_library`: TID 1600 Image Library built here item by item, because highdicom
  0.28's ``ImageLibrary`` needs ``ImagerPixelSpacing`` on projection radiographs (CR images
  usually have none and raise ``AttributeError``).
- :func:`observation_context`: the software as the device observer (TID 1002/1004).
- :func:`coding_scheme_item`: the private scheme's Coding Scheme Identification item.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    ContentSequence,
    DateContentItem,
    DeviceObserverIdentifyingAttributes,
    ImageContentItem,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    QualitativeEvaluation,
    ObservationContext,
    ObserverContext,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TimeContentItem,
    TrackingIdentifier,
)
from highdicom.sr import Measurement as _HdMeasurement
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM

from .enum import (
    CODING_SCHEME_DESIGNATOR,
    CODING_SCHEME_NAME,
    CODING_SCHEME_RESPONSIBLE_ORGANIZATION,
    CODING_SCHEME_VERSION,
    CxrCodes,
    StandardCodes,
)

__all__ = [
    "Measurement",
    "AlgorithmInfo",
    "coding_scheme_item",
    "concept",
    "member_concept",
    "unit_concept",
    "measurement_groups",
    "image_library",
    "observation_context",
]

_SH_MAX = 16
_LO_MAX = 64


@dataclass(frozen=True)
class Measurement:
    """One reported result, e.g. the CXR-Lung-Risk estimate of an image.

    Attributes:
        name: short identifier of the result (CSV column style, e.g. ``"CXR_Lung_Risk"``);
            used as the measurement group's tracking identifier.
        code_value: code value in the private scheme ``99CXRLR`` (at most 16 characters),
            e.g. ``CxrCodes.CXR_LUNG_RISK.value``.
        code_meaning: code meaning (at most 64 characters), e.g. ``"CXR-Lung-Risk"``; the
            key under which :func:`~cxr_lung_risk.outputs.sr.read_measurements` returns it.
        value: the estimate (must be finite).
        unit: UCUM code of the unit (default ``"a"``, the year).
        unit_meaning: meaning of the unit code (default ``"year"``).
        members: optional raw outputs of the ensemble members, by member name; written in
            a second measurement group, dimensionless (UCUM ``"1"``).
    """

    name: str
    code_value: str
    code_meaning: str
    value: float
    unit: str = "a"
    unit_meaning: str = "year"
    members: dict[str, float] | None = None
    #: a coded qualitative evaluation in the same group, e.g. the risk group:
    #: (concept code value, concept meaning, value code value, value meaning), scheme 99CXRLR
    evaluation: tuple[str, str, str, str] | None = None

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > _LO_MAX:
            raise ValueError(f"Measurement name must have 1 to {_LO_MAX} characters: {self.name!r}.")
        if not self.code_value or len(self.code_value) > _SH_MAX or "\\" in self.code_value:
            raise ValueError(f"Code value must have 1 to {_SH_MAX} characters and no backslash: {self.code_value!r}.")
        if not self.code_meaning or len(self.code_meaning) > _LO_MAX or "\\" in self.code_meaning:
            raise ValueError(f"Code meaning must have 1 to {_LO_MAX} characters and no backslash: {self.code_meaning!r}.")
        _check_finite(self.value, self.name)
        for member, v in (self.members or {}).items():
            _check_finite(v, f"{self.name} member {member}")


@dataclass(frozen=True)
class AlgorithmInfo:
    """Algorithm identification (TID 4019) written in every measurement group.

    Attributes:
        name: algorithm name (111001 DCM), e.g. ``"CXR-Lung-Risk"``.
        version: algorithm version (111003 DCM), e.g. the package version.
        parameters: algorithm parameters (111002 DCM), one ``"key=value"`` text item each,
            in the dict's order.
    """

    name: str
    version: str
    parameters: dict[str, str]


def _check_finite(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"The value of {what} must be a finite number, not {value!r}.")


def coding_scheme_item() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification item declaring the private scheme ``99CXRLR``."""
    return CodingSchemeIdentificationItem(
        designator=CODING_SCHEME_DESIGNATOR,
        name=CODING_SCHEME_NAME,
        version=CODING_SCHEME_VERSION,
        responsible_organization=CODING_SCHEME_RESPONSIBLE_ORGANIZATION,
    )


def concept(code_value: str, code_meaning: str) -> CodedConcept:
    """A concept of the private scheme ``99CXRLR``."""
    return CodedConcept(value=code_value, scheme_designator=CODING_SCHEME_DESIGNATOR, meaning=code_meaning)


def member_concept(parent: Measurement, member: str) -> CodedConcept:
    """Concept of one ensemble member's raw output.

    The code value is ``CXRLR-M`` + the first 8 hex digits of SHA-256 of
    ``"<parent code value>/<member>"`` (stable whatever subset of members is reported); the
    meaning is ``"<parent meaning> member <member>"``.
    """
    digest = hashlib.sha256(f"{parent.code_value}/{member}".encode("utf-8")).hexdigest()[:8].upper()
    meaning = f"{parent.code_meaning} member {member}"
    if len(meaning) > _LO_MAX or "\\" in meaning:
        raise ValueError(f"Member name {member!r} is too long for a code meaning (at most {_LO_MAX} characters in all).")
    return concept(CxrCodes.MEMBER_PREFIX + digest, meaning)


def unit_concept(unit: str, unit_meaning: str) -> CodedConcept:
    """A UCUM unit concept."""
    return CodedConcept(value=unit, scheme_designator="UCUM", meaning=unit_meaning)


def _hd(code: Code) -> CodedConcept:
    return CodedConcept.from_code(code)


def measurement_groups(
    measurements: Sequence[Measurement],
    algorithms: Mapping[str, AlgorithmInfo],
    source: Dataset,
    uid_for: Callable[[str], str],
) -> list[MeasurementsAndQualitativeEvaluations]:
    """TID 1501 groups: one per measurement, plus one per measurement with ``members``.

    Args:
        measurements: the results to report.
        algorithms: algorithm identification of each measurement, by measurement name.
        source: the source image (its SOP Class/Instance UIDs are referenced by each group).
        uid_for: returns the tracking UID for a label (deterministic or random).
    """

    def algo(algorithm: AlgorithmInfo) -> AlgorithmIdentification:
        return AlgorithmIdentification(
            name=algorithm.name,
            version=algorithm.version,
            parameters=[f"{k}={v}" for k, v in algorithm.parameters.items()] or None,
        )

    def source_ref() -> list[SourceImageForMeasurementGroup]:
        return [
            SourceImageForMeasurementGroup(
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
            )
        ]

    groups: list[MeasurementsAndQualitativeEvaluations] = []
    for m in measurements:
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=uid_for(f"tracking/{m.name}"), identifier=m.name),
                algorithm_id=algo(algorithms[m.name]),
                measurements=[
                    _HdMeasurement(
                        name=concept(m.code_value, m.code_meaning),
                        value=float(m.value),
                        unit=unit_concept(m.unit, m.unit_meaning),
                    )
                ],
                qualitative_evaluations=[
                    QualitativeEvaluation(name=concept(m.evaluation[0], m.evaluation[1]), value=concept(m.evaluation[2], m.evaluation[3]))
                ] if m.evaluation else None,
                source_images=source_ref(),
            )
        )
        if m.members:
            label = f"{m.name} members"
            groups.append(
                MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=TrackingIdentifier(uid=uid_for(f"tracking/{label}"), identifier=label),
                    algorithm_id=algo(algorithms[m.name]),
                    measurements=[
                        _HdMeasurement(
                            name=member_concept(m, member),
                            value=float(v),
                            unit=_hd(StandardCodes.NO_UNITS),
                        )
                        for member, v in m.members.items()
                    ],
                    source_images=source_ref(),
                )
            )
    return groups


def observation_context(
    *,
    device_uid: str,
    device_name: str,
    manufacturer: str,
    model_name: str,
    serial_number: str,
) -> ObservationContext:
    """Observation context with the software as the (only) device observer."""
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=device_uid,
                name=device_name,
                manufacturer_name=manufacturer,
                model_name=model_name,
                serial_number=serial_number,
            ),
        )
    )


def _modality_code(source: Dataset) -> Code | None:
    """CID 29 code of the source's Modality (None when the value is not in CID 29)."""
    modality = str(source.get("Modality", "") or "").strip()
    if not modality:
        return None
    for keyword in codes.cid29.dir():
        code = getattr(codes.cid29, keyword)
        if code.value == modality:
            return code
    return None


def _valid_da(value) -> DA | None:
    try:
        return DA(value) if value else None
    except (ValueError, TypeError):
        return None


def _valid_tm(value) -> TM | None:
    try:
        return TM(value) if value else None
    except (ValueError, TypeError):
        return None


def _pixel_spacing(source: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm from ImagerPixelSpacing, else PixelSpacing; None if absent/0."""
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        value = source.get(keyword)
        try:
            row, col = float(value[0]), float(value[1])
        except (TypeError, ValueError, IndexError, KeyError):
            continue
        if row > 0 and col > 0 and math.isfinite(row) and math.isfinite(col):
            return row, col
    return None


def _entry_descriptors(source: Dataset) -> list:
    """TID 1602 (+ TID 1603 projection radiography) descriptors that the source supports."""
    acq = RelationshipTypeValues.HAS_ACQ_CONTEXT
    items: list = []
    modality = _modality_code(source)
    if modality is not None:
        items.append(CodeContentItem(name=_hd(StandardCodes.MODALITY), value=modality, relationship_type=acq))
    for keyword, code, make, check in (
        ("StudyDate", StandardCodes.STUDY_DATE, DateContentItem, _valid_da),
        ("StudyTime", StandardCodes.STUDY_TIME, TimeContentItem, _valid_tm),
        ("ContentDate", StandardCodes.CONTENT_DATE, DateContentItem, _valid_da),
        ("ContentTime", StandardCodes.CONTENT_TIME, TimeContentItem, _valid_tm),
    ):
        value = check(source.get(keyword))
        if value is not None:
            items.append(make(name=_hd(code), value=value, relationship_type=acq))
    for keyword, code in (("Rows", StandardCodes.PIXEL_DATA_ROWS), ("Columns", StandardCodes.PIXEL_DATA_COLUMNS)):
        value = source.get(keyword)
        if isinstance(value, int) and value > 0:
            items.append(
                NumContentItem(name=_hd(code), value=value, unit=_hd(StandardCodes.PIXELS), relationship_type=acq)
            )
    orientation = source.get("PatientOrientation")
    if orientation is not None and not isinstance(orientation, str) and len(orientation) == 2:
        row, col = str(orientation[0]), str(orientation[1])
        if row and col:
            items.append(TextContentItem(name=_hd(StandardCodes.PATIENT_ORIENTATION_ROW), value=row, relationship_type=acq))
            items.append(
                TextContentItem(name=_hd(StandardCodes.PATIENT_ORIENTATION_COLUMN), value=col, relationship_type=acq)
            )
    spacing = _pixel_spacing(source)
    if spacing is not None:
        mm = _hd(StandardCodes.MILLIMETER)
        items.append(
            NumContentItem(name=_hd(StandardCodes.HORIZONTAL_PIXEL_SPACING), value=spacing[1], unit=mm, relationship_type=acq)
        )
        items.append(
            NumContentItem(name=_hd(StandardCodes.VERTICAL_PIXEL_SPACING), value=spacing[0], unit=mm, relationship_type=acq)
        )
    return items


def image_library(source: Dataset) -> ContainerContentItem:
    """TID 1600 Image Library with one group and one entry (TID 1601) for the source image.

    Built item by item instead of with ``highdicom.sr.ImageLibrary``, which needs
    ``ImagerPixelSpacing`` for projection radiographs (absent from most CR images); the
    descriptors written are those the source actually carries (modality, study/content
    date and time, rows/columns, patient orientation, non-zero pixel spacing).
    """
    contains = RelationshipTypeValues.CONTAINS
    entry = ImageContentItem(
        name=_hd(StandardCodes.SOURCE),
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        relationship_type=contains,
    )
    descriptors = _entry_descriptors(source)
    if descriptors:
        entry.ContentSequence = ContentSequence(descriptors)
    group = ContainerContentItem(name=_hd(StandardCodes.IMAGE_LIBRARY_GROUP), relationship_type=contains)
    group.ContentSequence = ContentSequence([entry])
    library = ContainerContentItem(name=_hd(StandardCodes.IMAGE_LIBRARY), relationship_type=contains)
    library.ContentSequence = ContentSequence([group])
    return library
