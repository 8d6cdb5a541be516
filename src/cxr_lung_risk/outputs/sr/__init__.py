"""DICOM Structured Report output (issue 4): a TID 1500 Imaging Measurement Report per image.

Comprehensive SR (SOP Class 1.2.840.10008.5.1.4.1.1.88.33) built with highdicom:

- one TID 1501 Measurement Group per result (CXR-Lung-Risk, CXR-Age; UCUM ``a`` = year),
  plus an optional group with the ensemble members' raw outputs (UCUM ``1``), each with
  TID 4019 Algorithm Identification and a reference to the source image;
- concepts in the private coding scheme ``99CXRLR`` (declared in (0008,0110));
- the software as device observer, Procedure Reported 363679005 SCT, a TID 1600 Image Library;
- patient/study/clinical-trial modules copied from the source in its character set.

Public API::

    Measurement(name, code_value, code_meaning, value, unit='a', unit_meaning='year', members=None)
    AlgorithmInfo(name, version, parameters)
    build_measurement_report(source, measurements, *, algorithm, device_name='cxr-lung-risk',
                             manufacturer='cxr-lung-risk open implementation',
                             deterministic=False, series_number=9001, instance_number=1)
    write_sr(ds, path) -> Path
    read_measurements(path) -> dict[str, float]   # by concept name (code meaning)
    sr_filename(source_sop_instance_uid) -> str   # '<uid>.dcm', sanitised
    lung_risk_measurement(value, members=None), age_measurement(value)   # from the model specs
"""
from __future__ import annotations

from .content import AlgorithmInfo, Measurement
from .enum import CODING_SCHEME_DESIGNATOR, CxrCodes, StandardCodes
from .sop import (
    COMPREHENSIVE_SR_STORAGE,
    build_measurement_report,
    read_measurements,
    sr_filename,
    write_sr,
)

__all__ = [
    "Measurement",
    "AlgorithmInfo",
    "build_measurement_report",
    "write_sr",
    "read_measurements",
    "sr_filename",
    "lung_risk_measurement",
    "age_measurement",
    "CODING_SCHEME_DESIGNATOR",
    "COMPREHENSIVE_SR_STORAGE",
    "CxrCodes",
    "StandardCodes",
]


def _from_spec(spec, code: CxrCodes, value: float, members: dict[str, float] | None = None) -> Measurement:
    """A model's result as a :class:`Measurement`: name and unit from its spec, code from ours."""
    return Measurement(
        name=spec.column,
        code_value=code.value,
        code_meaning=code.meaning,
        value=value,
        unit=spec.unit,
        unit_meaning=spec.unit_meaning,
        members=members,
    )


def lung_risk_measurement(value: float, members: dict[str, float] | None = None) -> Measurement:
    """The CXR-Lung-Risk result as a :class:`Measurement` (name/unit from the model spec)."""
    from ...spec import lung_risk_spec

    return _from_spec(lung_risk_spec(), CxrCodes.CXR_LUNG_RISK, value, members)


def age_measurement(value: float) -> Measurement:
    """The CXR-Age result as a :class:`Measurement` (name/unit from the model spec)."""
    from ...spec import age_spec

    return _from_spec(age_spec(), CxrCodes.CXR_AGE, value)
