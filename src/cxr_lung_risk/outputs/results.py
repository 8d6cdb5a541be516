"""One scored image's results as typed objects: the single source every output is built from.

:class:`ImageResult` holds what a scored image's outputs report: the models' measurements
(:class:`~cxr_lung_risk.outputs.sr.Measurement`: code, value, UCUM unit, the ensemble members' raw
outputs) and each measurement's algorithm identification
(:class:`~cxr_lung_risk.outputs.sr.AlgorithmInfo`: name, version, parameters, the weights' identity).
The DICOM SR (:func:`~cxr_lung_risk.outputs.sr.build_measurement_report`), the FHIR bundle
(:func:`~cxr_lung_risk.outputs.fhir.build_bundle`), the CSV/JSON/Parquet row's values
(:meth:`ImageResult.values`) and the result image's text
(:meth:`ImageResult.result_values`, :meth:`ImageResult.weights_lines`) are all made from one
:class:`ImageResult`, so they cannot disagree.

:meth:`ImageResult.items` yields every reported item in report order (a measurement, then its
members' raw outputs): each has ``name``, ``code_value``, ``code_meaning`` and a ``value`` that is
either a number (with ``unit``/``unit_meaning``: a measurement) or a coded concept (an object with
``value``, ``scheme_designator`` and ``meaning``, e.g. a :class:`pydicom.sr.coding.Code`: a
qualitative evaluation); the FHIR mapping turns each into one Observation (``valueQuantity`` or
``valueCodeableConcept``). Items given in ``evaluations`` are reported after the measurements.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .sr.content import AlgorithmInfo, Measurement, concept, member_concept
from .sr.enum import StandardCodes

__all__ = ["ImageResult", "ReportedItem", "image_result"]


@dataclass(frozen=True)
class ReportedItem:
    """One value as every output reports it (:meth:`ImageResult.items`).

    ``parent``: the measurement whose ensemble member's raw output this is (None for a result of
    its own); ``algorithm``: the measurement the algorithm identification is found under.
    """

    name: str
    code_value: str
    code_meaning: str
    scheme_designator: str
    value: Any  # a float (with unit), or a coded concept (value, scheme_designator, meaning)
    unit: str = ""
    unit_meaning: str = ""
    parent: str | None = None
    algorithm: str = ""

    @property
    def numeric(self) -> bool:
        return isinstance(self.value, (int, float)) and not isinstance(self.value, bool)


@dataclass(frozen=True)
class ImageResult:
    """Everything reported about one scored image (see the module's docstring).

    ``measurements``: in report order; ``algorithms``: the algorithm identification of each
    measurement, by measurement name; ``evaluations``: coded results (qualitative evaluations) with
    ``name``, ``code_value``, ``code_meaning``, a coded ``value`` and ``algorithm`` (the measurement
    name whose algorithm made it), reported after the measurements.
    """

    measurements: tuple[Measurement, ...]
    algorithms: Mapping[str, AlgorithmInfo]
    evaluations: tuple[Any, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "measurements", tuple(self.measurements))
        object.__setattr__(self, "evaluations", tuple(self.evaluations))
        missing = [m.name for m in self.measurements if m.name not in self.algorithms]
        if missing:
            raise ValueError(f"no algorithm identification for {missing}")

    # ------------------------------------------------------------------ what every output reads
    def values(self) -> dict[str, float]:
        """The numbers of the results table (CSV/JSON/Parquet columns and ``records.jsonl``
        ``values``): each measurement under its name, each member's raw output under the member's."""
        out: dict[str, float] = {}
        for m in self.measurements:
            out[m.name] = float(m.value)
            for member, v in (m.members or {}).items():
                out[member] = float(v)
        return out

    def items(self) -> Iterator[ReportedItem]:
        """Every reported value in report order: a measurement, its members' raw outputs (UCUM
        ``1``, the SR's member concepts), its coded qualitative evaluation (the risk group), ...; then
        the coded ``evaluations``."""
        from .sr.enum import CODING_SCHEME_DESIGNATOR

        for m in self.measurements:
            yield ReportedItem(m.name, m.code_value, m.code_meaning, CODING_SCHEME_DESIGNATOR, float(m.value), m.unit,
                               m.unit_meaning, None, m.name)
            for member, v in (m.members or {}).items():
                c = member_concept(m, member)
                yield ReportedItem(member, c.value, c.meaning, c.scheme_designator, float(v), StandardCodes.NO_UNITS.value,
                                   StandardCodes.NO_UNITS.meaning, m.name, m.name)
            if m.evaluation:  # its coded qualitative evaluation (the risk group), as the SR's group holds it
                name_value, name_meaning, code_value, code_meaning = m.evaluation
                yield ReportedItem(name_meaning, name_value, name_meaning, CODING_SCHEME_DESIGNATOR,
                                   concept(code_value, code_meaning), parent=None, algorithm=m.name)
        for e in self.evaluations:
            yield ReportedItem(e.name, e.code_value, e.code_meaning, getattr(e, "scheme_designator", CODING_SCHEME_DESIGNATOR),
                               e.value, parent=None, algorithm=getattr(e, "algorithm", "") or self.measurements[0].name)

    def algorithm(self, name: str) -> AlgorithmInfo:
        return self.algorithms[name]

    def used_algorithms(self) -> list[AlgorithmInfo]:
        """The distinct algorithm identifications, in measurement order."""
        seen: dict[int, AlgorithmInfo] = {}
        for m in self.measurements:
            a = self.algorithms[m.name]
            seen.setdefault(id(a), a)
        return list(seen.values())

    @property
    def synthetic(self) -> bool:
        """Whether synthetic (test/demo) weights made any of these results."""
        return any(a.parameters.get("weights") == "SYNTHETIC" for a in self.used_algorithms())

    def result_values(self) -> list[Any]:
        """The result image's score lines (:class:`~cxr_lung_risk.outputs.result_image.ResultValue`)."""
        from .result_image import ResultValue

        return [ResultValue(self.algorithms[m.name].name, float(m.value), m.unit) for m in self.measurements]

    def weights_lines(self) -> list[Any]:
        """The result image's weights lines (:class:`~cxr_lung_risk.outputs.result_image.WeightsLine`)."""
        from .result_image import WeightsLine

        return [WeightsLine(a.name, a.parameters.get("weights", "unverified"), a.parameters.get("weights_sha256", ""))
                for a in self.used_algorithms()]


def image_result(models: Sequence[Any], row: Mapping[str, Any], algorithms: Mapping[str, AlgorithmInfo],
                 evaluations: Sequence[Any] = ()) -> ImageResult:
    """The :class:`ImageResult` of one scored ``row`` (``Scorer.score``): each model's
    ``measurements(row)`` with ``algorithms`` (by measurement name, made once per run)."""
    measurements: list[Measurement] = []
    for m in models:
        measurements += m.measurements(row)
    return ImageResult(tuple(measurements), dict(algorithms), tuple(evaluations))
