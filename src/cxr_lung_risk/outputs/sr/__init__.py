"""DICOM Structured Report output: a TID 1500 Imaging Measurement Report per image.

Comprehensive 3D SR (SOP Class 1.2.840.10008.5.1.4.1.1.88.34, IHE AI Results) by default, or
Comprehensive SR (...88.33) with ``sr_class="comprehensive"``, built with highdicom:

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
                             deterministic=False, series_number=9001, instance_number=1,
                             sr_class='3d')   # or 'comprehensive' (...88.33)
    write_sr(ds, path) -> Path
    read_measurements(path) -> dict[str, float]   # by concept name (code meaning)
    sr_filename(source_sop_instance_uid) -> str   # '<uid>.dcm', sanitised
    measurement_from_spec(spec, code, value, members=None)   # a model's result, named by its spec
    algorithm_info(spec, parameters, weights_identity)       # TID 4019 of one model
"""
from __future__ import annotations

from .content import AlgorithmInfo, Measurement
from .enum import CODING_SCHEME_DESIGNATOR, CxrCodes, StandardCodes
from .sop import (
    COMPREHENSIVE_3D_SR_STORAGE,
    COMPREHENSIVE_SR_STORAGE,
    SR_CLASSES,
    SR_STORAGE_CLASSES,
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
    "measurement_from_spec",
    "algorithm_info",
    "weights_parameters",
    "CODING_SCHEME_DESIGNATOR",
    "COMPREHENSIVE_SR_STORAGE",
    "COMPREHENSIVE_3D_SR_STORAGE",
    "SR_CLASSES",
    "SR_STORAGE_CLASSES",
    "CxrCodes",
    "StandardCodes",
]


def measurement_from_spec(spec, code: CxrCodes, value: float, members: dict[str, float] | None = None,
                          evaluation: tuple[str, str, str, str] | None = None) -> Measurement:
    """A model's result as a :class:`Measurement`: name and unit from its spec, code from ours;
    ``evaluation``: a coded qualitative evaluation (the risk group) in the same group."""
    return Measurement(
        name=spec.column,
        code_value=code.value,
        code_meaning=code.meaning,
        value=value,
        unit=spec.unit,
        unit_meaning=spec.unit_meaning,
        members=members,
        evaluation=evaluation,
    )


def weights_parameters(identity: dict | None) -> dict[str, str]:
    """What the SR says about the weights that made a result (source, kind, sha256)."""
    ident = identity or {}
    kind = "SYNTHETIC" if ident.get("synthetic") else ("published" if ident.get("published") else "unverified")
    params = {"weights": kind}
    if ident.get("sha256"):
        params["weights_sha256"] = str(ident["sha256"])
    if ident.get("source"):
        params["weights_source"] = str(ident["source"])[:200]
    return params


def algorithm_info(spec, parameters: dict[str, str], weights_identity: dict | None = None) -> AlgorithmInfo:
    """Algorithm identification of one model: its title, the package version, the run's
    parameters (device and precision actually used, ...) and the weights' identity."""
    from ... import __version__

    params = dict(parameters)
    params.update(weights_parameters(weights_identity))
    return AlgorithmInfo(name=spec.title, version=__version__, parameters=params)
