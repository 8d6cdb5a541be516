"""DICOM Secondary Capture (RGB) of a saliency overlay, built with highdicom.

One SC Image (SOP Class 1.2.840.10008.5.1.4.1.1.7) per source image and model:

- ``ImageType`` ``DERIVED\\SECONDARY``, 8-bit RGB, the 224x224 crop the network saw with the
  heat map blended on it;
- ``SeriesDescription`` and ``DerivationDescription`` name the model and the method (input
  gradient saliency, DCM 130404 "Saliency"; or Grad-CAM, DCM 130403), also given as the
  Derivation Code Sequence;
- Source Image Sequence referencing the source (purpose DCM 121322);
- the patient/study/clinical-trial modules copied from the source exactly as the SR writer does
  (:data:`cxr_lung_risk.outputs.sr.sop.COPIED_KEYWORDS`, which includes StudyDescription that
  highdicom's constructor drops), plus BodyPartExamined, Laterality (Type 2C in the SC IOD) and
  PatientOrientation from the source.

A Parametric Map would be the better IOD, but highdicom 0.28.2 cannot build one on a 2D CR.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, DT, TM

from .base import (
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

__all__ = ["SaliencyMethod", "METHODS", "build_secondary_capture", "derived_secondary_capture", "write_sc", "sc_filename", "SECONDARY_CAPTURE_STORAGE"]

SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
_NS = "sc"


@dataclass(frozen=True)
class SaliencyMethod:
    """How a map was computed: the words and the DICOM code that say so."""

    key: str
    title: str
    description: str
    code_value: str
    code_meaning: str
    coding_scheme: str = "DCM"


METHODS: dict[str, SaliencyMethod] = {
    "gradient": SaliencyMethod(
        "gradient",
        "input-gradient saliency",
        "max over RGB of |d score / d input| w.r.t. the normalised 224x224 input, scaled to its 99th percentile, "
        "hot colormap blended at alpha 0.5",
        "130404",
        "Saliency",
    ),
    "gradcam": SaliencyMethod(
        "gradcam",
        "Grad-CAM",
        "ReLU of the gradient-weighted sum of the last convolutional feature maps (summed over ensemble members "
        "by their LASSO weights), bilinear to 224x224, scaled to its maximum, hot colormap blended at alpha 0.5",
        "130403",
        "Gradient-weighted class activation",
    ),
}

# Source attributes that describe the imaged body part (copied when present).
_ANATOMY_KEYWORDS = ("BodyPartExamined", "Laterality", "PatientOrientation")


def _copy_modules(sc: Dataset, source: Dataset) -> None:
    copy_source_modules(sc, source, (*COPIED_KEYWORDS, *_ANATOMY_KEYWORDS))


def build_secondary_capture(
    source: Dataset,
    rgb: np.ndarray,
    *,
    model_title: str,
    method: str = "gradient",
    software_version: str = "",
    weights_key: Sequence[str] = (),
    **options: Any,
) -> Dataset:
    """An SC Image holding ``rgb`` (H x W x 3 uint8) derived from ``source``. ``weights_key``: what
    identifies the weights (kind, SHA-256), part of the stable UIDs. ``options``:
    ``manufacturer``, ``series_number`` (default 9101), ``instance_number``, ``deterministic``
    (see :func:`derived_secondary_capture`).

    Raises:
        ValueError: the source lacks the UIDs a derived image must reference, or ``rgb`` is not
        an H x W x 3 uint8 array, or ``method`` is unknown.
    """
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}; known: {', '.join(METHODS)}")
    m = METHODS[method]
    return derived_secondary_capture(
        source,
        rgb,
        what="a saliency overlay",
        series_description=f"{model_title} {m.title}",
        derivation=f"{model_title} {m.title} ({m.description}); research use only, not for diagnosis",
        derivation_code=(m.code_value, m.coding_scheme, m.code_meaning),
        image_comments="Saliency overlay of a research model; not for diagnostic use",
        uid_key=[model_title, method, software_version, *weights_key],
        namespace=_NS,
        texts=[model_title],
        software_version=software_version,
        **options,
    )


def derived_secondary_capture(
    source: Dataset,
    rgb: np.ndarray,
    *,
    what: str,
    series_description: str,
    derivation: str,
    derivation_code: tuple[str, str, str],
    image_comments: str,
    uid_key: list,
    namespace: str,
    texts: list[str] = (),
    software_version: str = "",
    manufacturer: str = "cxr-lung-risk open implementation",
    series_number: int = 9101,
    instance_number: int = 1,
    deterministic: UidPolicy | bool = False,
) -> Dataset:
    """The one SC Image builder of this package (saliency overlays, result images): ``rgb``
    (H x W x 3 uint8) derived from ``source``: same patient and study (the source's modules
    copied), its own series, ``DERIVED\\SECONDARY``, a Derivation Code Sequence
    (``derivation_code`` = value, scheme, meaning) and a Source Image Sequence.

    ``deterministic`` is a :class:`~cxr_lung_risk.outputs.base.UidPolicy` (or a bool): with stable
    UIDs the series UID is derived from the study + ``uid_key`` and the instance UID from the
    source SOP Instance UID + ``uid_key`` (``namespace`` keeps the kinds of object apart; the key
    names the model, weights and software, never a value); the dates come from the source only
    with ``DETERMINISTIC``, else they are the time the object was made.

    Raises:
        ValueError: the source lacks the UIDs a derived image must reference, or ``rgb`` is not
        an H x W x 3 uint8 array (``what`` names it in the message).
    """
    import highdicom as hd

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{what} must be an H x W x 3 uint8 array, got {rgb.shape} {rgb.dtype}")
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"):
        if not str(source.get(kw, "")).strip():
            raise ValueError(f"the source has no {kw}, so a derived image cannot reference it")

    series_description = series_description[:64]
    derivation = derivation[:1024]
    scs = decide_character_set(source, [series_description, derivation, manufacturer, image_comments, *texts])

    policy = UidPolicy.of(deterministic)
    key = "|".join([str(source.SOPInstanceUID), str(source.get("SeriesInstanceUID", "")), *map(str, uid_key)])
    series_uid = new_uid(["series", str(source.StudyInstanceUID), *uid_key] if policy.stable_uids else None, namespace=namespace)
    sop_uid = new_uid(["instance", key] if policy.stable_uids else None, namespace=namespace)

    orientation = source.get("PatientOrientation")
    use_orientation = ("L", "F")  # placeholder for highdicom; replaced by the source's value below
    sc = hd.sc.SCImage(
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        patient_id=safe_value(source, "PatientID"),
        patient_name=None,
        patient_birth_date=safe_value(source, "PatientBirthDate"),
        patient_sex=safe_value(source, "PatientSex"),
        accession_number=safe_value(source, "AccessionNumber"),
        study_id=safe_value(source, "StudyID"),
        study_date=safe_value(source, "StudyDate"),
        study_time=safe_value(source, "StudyTime"),
        patient_orientation=use_orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    if scs is not None:
        sc.SpecificCharacterSet = scs
    elif "SpecificCharacterSet" in sc:
        del sc.SpecificCharacterSet
    _copy_modules(sc, source)
    if orientation is None:
        sc.PatientOrientation = ""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.SeriesDescription = series_description
    sc.DerivationDescription = derivation
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = derivation_code
    sc.DerivationCodeSequence = [code]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    ref.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [ref]
    sc.BurnedInAnnotation = "NO"
    sc.LossyImageCompression = "00"
    sc.SoftwareVersions = software_version or "unknown"
    sc.ImageComments = image_comments
    when = fixed_datetime(source) if policy.fixed_dates else datetime.datetime.now()
    sc.DateOfSecondaryCapture, sc.TimeOfSecondaryCapture = DA(when.date()), TM(when.time())
    sc.ContentDate, sc.ContentTime = DA(when.date()), TM(when.time())
    sc.SeriesDate, sc.SeriesTime = DA(when.date()), TM(when.time())
    # highdicom dates the instance and its contributing equipment by the clock: the same time here
    sc.InstanceCreationDate, sc.InstanceCreationTime = DA(when.date()), TM(when.time())
    for item in sc.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when)
    return sc


def write_sc(ds: Dataset, path: str | os.PathLike) -> Path:
    """Write atomically as a DICOM Part 10 file; returns the path written."""
    return write_dataset(ds, path)


def sc_filename(source_sop_instance_uid: str, model_name: str) -> str:
    """``<source SOP Instance UID>_<model>.dcm`` (``sc-<hash>`` when the UID is malformed)."""
    model = re.sub(r"[^A-Za-z0-9_-]+", "-", model_name).strip("-") or "model"
    return f"{uid_stem(source_sop_instance_uid, prefix='sc')}_{model}.dcm"
