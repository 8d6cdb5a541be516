"""FHIR R4 (4.0.1) output: one Bundle per scored DICOM image, following HL7's "DICOM SR to FHIR
Resource Mapping" implementation guide as far as FHIR R4 allows (the guide is written against R5,
whose ImagingSelection R4 lacks).

Built from the same :class:`~cxr_lung_risk.outputs.results.ImageResult` as the SR, and from the SR
itself (its UIDs and content date), so codes, values and identifiers are the SR's:

* an **Observation** per reported item (:meth:`ImageResult.items`): a measurement gets
  ``valueQuantity`` (UCUM, e.g. ``a`` = year), a coded evaluation ``valueCodeableConcept``; ``code``
  is the SR's concept name (private scheme ``99CXRLR`` as :data:`CODE_SYSTEMS` says);
  ``identifier`` the group's Tracking Unique Identifier; ``subject`` the patient by identifier
  (Patient ID, its issuer as assigner); ``partOf`` and ``derivedFrom`` the ImagingStudy by
  identifier (Study Instance UID, ``urn:dicom:uid``); ``basedOn`` the ServiceRequest by accession
  number; ``device`` the algorithm's Device; a member's raw output is in its parent's
  ``derivedFrom``; the research-use disclaimer in ``note``;
* a **Device** per algorithm (TID 4019: name, version, parameters, the weights' identity and
  whether they are synthetic);
* a **DiagnosticReport** (code 126000 DCM "Imaging Measurement Report", the SR's title; identifier
  the SR's SOP Instance UID) whose ``result`` lists every Observation, with the disclaimer as
  ``conclusion``.

The Bundle is a ``transaction`` whose entries are ``PUT``\\ s of ids derived from the SR's UIDs (a
Device's from its identity): POSTing it to a FHIR server's base URL twice (a retry) updates the
same resources instead of making new ones. Plain dicts and JSON: no FHIR library is needed to
write it (the tests validate every bundle with ``fhir.resources``).
"""
from __future__ import annotations

import datetime
import html
import json
import uuid
from collections.abc import Mapping
from typing import Any

from pydicom import Dataset
from pydicom.valuerep import DA, TM

from .base import UidPolicy, uid_stem
from .results import ImageResult, ReportedItem
from .sr.enum import CODING_SCHEME_DESIGNATOR, StandardCodes

__all__ = [
    "FHIR_VERSION",
    "CODE_SYSTEMS",
    "PRIVATE_CODE_SYSTEM",
    "DISCLAIMER",
    "build_bundle",
    "bundle_bytes",
    "fhir_filename",
    "coding",
]

FHIR_VERSION = "4.0.1"
#: The FHIR code system of the private DICOM coding scheme ``99CXRLR``.
PRIVATE_CODE_SYSTEM = "urn:cxr-lung-risk:codes:99CXRLR"
#: DICOM Coding Scheme Designator -> FHIR code system URI (PS3.16 Table 8-1 for the standard ones).
CODE_SYSTEMS = {
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
    "RADLEX": "http://radlex.org",
    CODING_SCHEME_DESIGNATOR: PRIVATE_CODE_SYSTEM,
}
UCUM = CODE_SYSTEMS["UCUM"]
DCM = CODE_SYSTEMS["DCM"]
DICOM_UID = "urn:dicom:uid"
DISCLAIMER = ("RESEARCH USE ONLY - NOT FOR CLINICAL USE. Not a medical device; results must not be used for "
              "diagnosis or treatment.")
SYNTHETIC_NOTE = "SYNTHETIC WEIGHTS: these results come from synthetic test weights and are meaningless."
_NS = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr-lung-risk:fhir")
_OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def coding(value: str, scheme_designator: str, meaning: str) -> dict[str, str]:
    """A FHIR Coding of a DICOM coded concept (code value, scheme designator, meaning)."""
    system = CODE_SYSTEMS.get(scheme_designator, f"urn:dicom:coding-scheme:{scheme_designator}")
    return {"system": system, "code": value, "display": meaning}


def _code(value: str, scheme: str, meaning: str) -> dict[str, Any]:
    return {"coding": [coding(value, scheme, meaning)], "text": meaning}


def _uid_identifier(uid: str, type_code: tuple[str, str] | None = None) -> dict[str, Any]:
    ident: dict[str, Any] = {"system": DICOM_UID, "value": f"urn:oid:{uid}"}
    if type_code is not None:
        ident["type"] = {"coding": [{"system": DCM, "code": type_code[0], "display": type_code[1]}]}
    return ident


def _text(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.strip().rstrip("\x00").strip()


def _narrative(lines: list[str]) -> dict[str, str]:
    body = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'}


def _id(*parts: str) -> str:
    return str(uuid.uuid5(_NS, "/".join(parts)))


# ----------------------------------------------------------------------------- what the SR says
def _walk_groups(sr: Dataset) -> dict[str, str]:
    """Tracking Identifier (text) -> Tracking Unique Identifier of every measurement group."""
    out: dict[str, str] = {}

    def code(item: Dataset) -> str:
        seq = item.get("ConceptNameCodeSequence")
        return f"{seq[0].CodeValue}^{seq[0].CodingSchemeDesignator}" if seq else ""

    for container in sr.get("ContentSequence", []):
        if code(container) != f"{StandardCodes.IMAGING_MEASUREMENTS.value}^DCM":
            continue
        for group in container.get("ContentSequence", []):
            if code(group) != f"{StandardCodes.MEASUREMENT_GROUP.value}^DCM":
                continue
            name, uid = "", ""
            for item in group.get("ContentSequence", []):
                if code(item) == "112039^DCM":
                    name = str(item.get("TextValue", ""))
                elif code(item) == "112040^DCM":
                    uid = str(item.get("UID", ""))
            if name and uid:
                out[name] = uid
    return out


def _instant(sr: Dataset, policy: UidPolicy) -> str:
    """The SR's content date and time as a FHIR instant: with the SR's timezone offset when it has
    one, else the machine's (a report dated now) or UTC (``--deterministic``: dated from the source,
    never from the machine)."""
    try:
        d = DA(sr.get("ContentDate"))
        t = TM(sr.get("ContentTime") or "000000")
        when = datetime.datetime.combine(d, datetime.time(t.hour, t.minute, t.second))
    except (TypeError, ValueError):
        when = datetime.datetime(1970, 1, 1)
    offset = _text(sr.get("TimezoneOffsetFromUTC"))
    if len(offset) == 5 and offset[0] in "+-" and offset[1:].isdigit():
        tz = datetime.timezone((1 if offset[0] == "+" else -1) * datetime.timedelta(hours=int(offset[1:3]), minutes=int(offset[3:])))
        when = when.replace(tzinfo=tz)
    elif policy.fixed_dates:
        when = when.replace(tzinfo=datetime.timezone.utc)
    else:
        when = when.astimezone()
    return when.isoformat(timespec="seconds")


def _study_date(source: Dataset) -> str | None:
    try:
        d = DA(source.get("StudyDate")) if source.get("StudyDate") else None
    except (TypeError, ValueError):
        return None
    return d.isoformat() if d is not None else None


# ----------------------------------------------------------------------------- resources
def _device(algorithm: Any, device_id: str, manufacturer: str, device_name: str) -> dict[str, Any]:
    params = dict(algorithm.parameters)
    synthetic = params.get("weights") == "SYNTHETIC"
    lines = [f"{algorithm.name} {algorithm.version} ({device_name})"] + [f"{k}={v}" for k, v in params.items()]
    notes = ([SYNTHETIC_NOTE] if synthetic else []) + [DISCLAIMER]
    return {
        "resourceType": "Device",
        "id": device_id,
        "text": _narrative(notes + lines),
        "status": "active",
        "manufacturer": manufacturer,
        "deviceName": [{"name": algorithm.name, "type": "user-friendly-name"}, {"name": device_name, "type": "model-name"}],
        "type": {"coding": [{"system": DCM, "code": "111001", "display": "Algorithm Name"}], "text": algorithm.name},
        "version": [{"type": {"coding": [{"system": DCM, "code": "111003", "display": "Algorithm Version"}]}, "value": algorithm.version}],
        "property": [
            {"type": {"coding": [{"system": DCM, "code": "111002", "display": "Algorithm Parameters"}], "text": k},
             "valueCode": [{"text": str(v)}]}
            for k, v in params.items()
        ],
        "note": [{"text": n} for n in notes],
    }


def _observation(item: ReportedItem, obs_id: str, common: Mapping[str, Any], device_ref: str, tracking_uid: str | None,
                 derived: list[str], synthetic: bool) -> dict[str, Any]:
    obs: dict[str, Any] = {"resourceType": "Observation", "id": obs_id}
    if item.numeric:
        shown = f"{item.code_meaning}: {item.value!r} {item.unit_meaning}"
        value = {"valueQuantity": {"value": float(item.value), "unit": item.unit_meaning, "system": UCUM, "code": item.unit}}
    else:
        v = item.value
        shown = f"{item.code_meaning}: {v.meaning}"
        value = {"valueCodeableConcept": _code(v.value, v.scheme_designator, v.meaning)}
    notes = ([SYNTHETIC_NOTE] if synthetic else []) + [DISCLAIMER]
    obs["text"] = _narrative([shown] + notes)
    if tracking_uid:
        obs["identifier"] = [_uid_identifier(tracking_uid, ("112040", "Tracking Unique Identifier"))]
    if common.get("basedOn"):
        obs["basedOn"] = common["basedOn"]
    obs["partOf"] = [common["study"]]
    obs["status"] = "preliminary"
    obs["category"] = [{"coding": [{"system": _OBS_CATEGORY, "code": "imaging", "display": "Imaging"}]}]
    obs["code"] = _code(item.code_value, item.scheme_designator, item.code_meaning)
    if common.get("subject"):
        obs["subject"] = common["subject"]
    if common.get("effective"):
        obs["effectiveDateTime"] = common["effective"]
    obs["issued"] = common["issued"]
    obs.update(value)
    obs["note"] = [{"text": n} for n in notes]
    obs["device"] = {"reference": device_ref}
    obs["derivedFrom"] = [common["study"]] + [{"reference": r} for r in derived]
    return obs


def build_bundle(
    source: Dataset,
    result: ImageResult,
    sr: Dataset,
    *,
    deterministic: "UidPolicy | bool" = False,
    manufacturer: str = "cxr-lung-risk open implementation",
    device_name: str = "cxr-lung-risk",
) -> dict[str, Any]:
    """The FHIR R4 transaction Bundle of one scored image (a dict, JSON-ready).

    ``source``: the scored image's dataset; ``result``: what was reported about it; ``sr``: the
    SR built from the same ``result`` (its SOP Instance UID, Tracking Unique Identifiers and content
    date are reused); ``deterministic``: the run's :class:`UidPolicy` (only the timezone of
    ``issued`` depends on it).
    """
    policy = UidPolicy.of(deterministic)
    study_uid = _text(source.get("StudyInstanceUID"))
    if not study_uid:
        raise ValueError("the source has no StudyInstanceUID, so no FHIR result can reference its study")
    sr_uid = str(sr.SOPInstanceUID)
    tracking = _walk_groups(sr)
    study_ref = {"type": "ImagingStudy", "identifier": _uid_identifier(study_uid, ("110180", "Study Instance UID"))}
    common: dict[str, Any] = {"study": study_ref, "issued": _instant(sr, policy), "effective": _study_date(source)}
    patient_id = _text(source.get("PatientID"))
    if patient_id:
        ident: dict[str, Any] = {"type": {"coding": [{"system": _V2_0203, "code": "MR", "display": "Medical record number"}]},
                                 "value": patient_id}
        issuer = _text(source.get("IssuerOfPatientID"))
        if issuer:
            ident["assigner"] = {"display": issuer}
        common["subject"] = {"type": "Patient", "identifier": ident}
    accession = _text(source.get("AccessionNumber"))
    if accession:
        common["basedOn"] = [{"type": "ServiceRequest", "identifier": {
            "type": {"coding": [{"system": _V2_0203, "code": "ACSN", "display": "Accession ID"}]}, "value": accession}}]

    entries: list[dict[str, Any]] = []

    def add(resource: dict[str, Any]) -> str:
        ref = f"urn:uuid:{resource['id']}"
        entries.append({"fullUrl": ref, "resource": resource,
                        "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}})
        return ref

    synthetic = result.synthetic
    device_refs: dict[str, str] = {}
    for name in dict.fromkeys(m.name for m in result.measurements):
        a = result.algorithm(name)
        key = json.dumps([a.name, a.version, sorted(a.parameters.items()), manufacturer, device_name], sort_keys=True)
        did = _id("device", key)
        if did not in {e["resource"]["id"] for e in entries}:
            add(_device(a, did, manufacturer, device_name))
        device_refs[name] = f"urn:uuid:{did}"

    items = list(result.items())
    obs_ids = {}
    for it in items:
        group = f"{it.parent} members" if it.parent else it.name
        base = tracking.get(group, f"{sr_uid}/{group}")
        obs_ids[(it.parent, it.name)] = _id("observation", base, it.name)
    observations: list[str] = []
    for it in items:
        derived = [f"urn:uuid:{obs_ids[(p, n)]}" for p, n in obs_ids if p == it.name] if it.parent is None else []
        ref = add(_observation(it, obs_ids[(it.parent, it.name)], common, device_refs[it.algorithm],
                               None if it.parent else tracking.get(it.name), derived,
                               result.algorithm(it.algorithm).parameters.get("weights") == "SYNTHETIC"))
        observations.append(ref)

    titles = " + ".join(f"{a.name} {a.version}" for a in result.used_algorithms())
    conclusion = (SYNTHETIC_NOTE + " " if synthetic else "") + DISCLAIMER
    shown = [f"{it.code_meaning}: {it.value!r} {it.unit_meaning}" if it.numeric else f"{it.code_meaning}: {it.value.meaning}"
             for it in items if it.parent is None]
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": _id("report", sr_uid),
        "text": _narrative([f"{titles} (research use only)"] + shown + [conclusion]),
        "identifier": [_uid_identifier(sr_uid) | {"type": {"text": "SOP Instance UID of the DICOM SR"}}],
    }
    if common.get("basedOn"):
        report["basedOn"] = common["basedOn"]
    report["status"] = "preliminary"
    report["category"] = [{"coding": [{"system": _V2_0074, "code": "RAD", "display": "Radiology"}]}]
    report["code"] = _code(StandardCodes.IMAGING_MEASUREMENT_REPORT.value, "DCM", StandardCodes.IMAGING_MEASUREMENT_REPORT.meaning)
    if common.get("subject"):
        report["subject"] = common["subject"]
    if common.get("effective"):
        report["effectiveDateTime"] = common["effective"]
    report["issued"] = common["issued"]
    report["result"] = [{"reference": r} for r in observations]
    report["imagingStudy"] = [study_ref]
    report["conclusion"] = conclusion
    add(report)
    return {
        "resourceType": "Bundle",
        "id": _id("bundle", sr_uid),
        "meta": {"tag": [{"system": "urn:cxr-lung-risk:tags", "code": "research-use-only", "display": "Research use only"}]
                 + ([{"system": "urn:cxr-lung-risk:tags", "code": "synthetic-weights", "display": "Synthetic weights"}] if synthetic else [])},
        "identifier": _uid_identifier(sr_uid),
        "type": "transaction",
        "timestamp": common["issued"],
        "entry": entries,
    }


def bundle_bytes(bundle: Mapping[str, Any]) -> bytes:
    """The bundle as UTF-8 JSON (floats as the shortest repr that round-trips)."""
    return (json.dumps(bundle, ensure_ascii=False, indent=1, allow_nan=False) + "\n").encode("utf-8")


def fhir_filename(source_sop_instance_uid: str) -> str:
    """``<source SOP Instance UID>.json`` (``fhir-<hash>.json`` when the UID is malformed)."""
    return f"{uid_stem(source_sop_instance_uid, prefix='fhir')}.json"
