"""Outputs stage: everything one run writes for its inputs, one input at a time.

:class:`OutputWriter` owns an output folder's tables (``cxr_lung_risk.csv``/``.json``,
``manifest.csv``, ``records.jsonl``) and the per-image DICOM objects (the SR, and with saliency the
overlay PNG + Secondary Capture, the FHIR bundle). :meth:`OutputWriter.write_scored` writes a scored batch,
:meth:`OutputWriter.account` an input that was not scored; both return the input's
:class:`~cxr_lung_risk.records.InputRecord` with every file written for it. Every input gets exactly
one manifest row and one record; a file that cannot be written fails only its own input.

``deterministic`` is a :class:`~cxr_lung_risk.outputs.base.UidPolicy` (or a bool): with STABLE or
DETERMINISTIC (``True``) the UIDs are derived from the source's SOP Instance UID, the models, the
weights and the software version (never the values), so writing the same input twice (a retried
task, a resent study, a re-score in another batch) gives the same UIDs.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..records import InputRecord, Status, add_warnings
from ..errors import DiskFullError, disk_full
from .base import UidPolicy, UniqueNames, dataset_bytes, output_path, write_bytes
from .tables import ManifestWriter, RecordWriter, ResultWriter

__all__ = ["OutputWriter", "ObjectBuilder", "Built", "record_for"]


def _printable_path(path: Path) -> str:
    text = os.fsdecode(os.fspath(path))
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if any(0xDC80 <= ord(c) <= 0xDCFF for c in text) else text


def record_for(p: Any) -> InputRecord:
    """The record of a prepared input (:class:`~cxr_lung_risk.pipeline.Prepared`), before outputs."""
    return InputRecord(
        input=getattr(p, "input_name", "") or _printable_path(p.file.path),
        file=p.file.rel,
        status=p.status,
        reason=p.reason if p.status is not Status.OK else "",
        warnings=list(p.warnings),
        study_uid=p.uids.get("StudyInstanceUID", ""),
        series_uid=p.uids.get("SeriesInstanceUID", ""),
        sop_uid=p.uids.get("SOPInstanceUID", ""),
        identity=dict(getattr(p, "identity", None) or {}),
    )


@dataclass
class Built:
    """The DICOM objects of one scored input as bytes, made where the models are (this process, or
    a cluster actor) and stored by :class:`OutputWriter`: the SR (Part 10 bytes), the FHIR bundle
    (JSON bytes) or the error that prevented them, and the warnings raised while they were made."""

    sr: bytes | None = None
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    fhir: bytes | None = None


class ObjectBuilder:
    """Builds the per-image objects of scored inputs (one SR and/or FHIR bundle per scored DICOM
    image) without writing files: ``models`` are the loaded models (their measurements and algorithm
    identity). Every output of an input is made from one
    :class:`~cxr_lung_risk.outputs.results.ImageResult` (:meth:`result`)."""

    def __init__(self, models: Sequence[Any], *, formats: Sequence[str] = ("csv", "sr"), deterministic: "UidPolicy | bool" = True,
                 im_version: str = "6.8.9-9", sr_class: str = "3d") -> None:
        self.models = list(models)
        self.deterministic = deterministic
        self.sr_class = sr_class  # "3d": Comprehensive 3D SR (IHE AIR); "comprehensive": ...88.33
        self.sr = None
        formats = set(formats)
        self.write_sr = "sr" in formats
        self.fhir = None
        extra = {"im_version": im_version}
        self.algorithms = {m.spec.column: m.algorithm(extra) for m in self.models}  # by measurement name
        if formats & {"sr", "fhir"}:  # the FHIR bundle reuses the SR's UIDs: the SR is made for it too
            from . import sr

            self.sr = sr
        if "fhir" in formats:
            from . import fhir

            self.fhir = fhir

    def result(self, row: dict[str, Any]):
        """The :class:`~cxr_lung_risk.outputs.results.ImageResult` of a scored row: what the SR, the
        FHIR bundle, the table row and the result image all report."""
        from .results import image_result

        return image_result(self.models, row, self.algorithms)

    def build(self, p: Any, row: dict[str, Any], result: Any = None) -> Built:
        b = Built()
        if self.sr is None or p.dataset is None:
            return b
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if result is None:
                    result = self.result(row)
                ds = self.sr.build_measurement_report(p.dataset, result.measurements, algorithm=dict(result.algorithms),
                                                     deterministic=self.deterministic, sr_class=self.sr_class)
                if self.write_sr:
                    b.sr = dataset_bytes(ds)
                if self.fhir is not None:
                    b.fhir = self.fhir.bundle_bytes(self.fhir.build_bundle(p.dataset, result, ds, deterministic=self.deterministic))
            add_warnings(caught, b.warnings)
        except Exception as e:  # one object that cannot be made fails only its input
            b.error = f"{type(e).__name__}: {str(e)[:160]}"
        return b


class _BuildError(Exception):
    """An object that could not be built (its message is already ``Type: text``)."""


class OutputWriter:
    """Writes a run's outputs into ``out`` (a folder this writer owns while open).

    ``models``: the loaded models (a :class:`~cxr_lung_risk.scoring.Scorer`'s ``models``);
    ``columns``: the result table's columns (``Scorer.columns()``); ``formats``: among ``csv``,
    ``json``, ``sr``, ``parquet``, ``fhir`` (a FHIR R4 Bundle per scored DICOM image, ``fhir/<SOPInstanceUID>.json``,
    record kind ``fhir``; :mod:`cxr_lung_risk.outputs.fhir`); ``saliency``: ``None`` or ``"gradient"``/``"gradcam"``; ``result_image``:
    also a Secondary Capture showing the scores per scored DICOM image (record kind ``result_image``,
    ``result/<SOPInstanceUID>.dcm``; :mod:`cxr_lung_risk.outputs.result_image`).

    A writer without models (``models=[]``, ``value_columns`` given: the cluster runner's driver)
    stores objects built elsewhere (:meth:`write_built`). ``resume``: the records of inputs an
    earlier run into ``out`` finished (:func:`cxr_lung_risk.resume.completed_records`); their
    rows, records and file names are kept, everything else of that run is replaced.
    """

    def __init__(
        self,
        out: str | Path,
        models: Sequence[Any],
        columns: Sequence[str],
        *,
        formats: Sequence[str] = ("csv", "sr"),
        deterministic: "UidPolicy | bool" = True,
        saliency: str | None = None,
        im_version: str = "6.8.9-9",
        sr_class: str = "3d",
        result_image: bool = False,
        value_columns: Sequence[str] | None = None,
        resume: Sequence[InputRecord] | None = None,
    ) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        formats = set(formats)
        self.value_columns = list(value_columns) if value_columns is not None else [c for m in models for c in m.columns]
        self.names = UniqueNames()
        kept = list(resume or [])
        for rec in kept:  # the kept inputs' files keep their names
            for rels in rec.outputs.values():
                for rel in rels:
                    self.names.claim(rel)
        keep = {r.file for r in kept} if resume is not None else None
        self.tables = ResultWriter(self.out, columns, csv_out="csv" in formats, json_out="json" in formats,
                                   parquet_out="parquet" in formats, value_columns=self.value_columns, keep=keep)
        self.manifest = ManifestWriter(self.out, keep=keep)
        self.records = RecordWriter(self.out, keep=kept)
        self.builder = ObjectBuilder(models, formats=formats, deterministic=deterministic, im_version=im_version,
                                     sr_class=sr_class) if models else None
        self.saliency = None
        if saliency:
            from .saliency import SaliencyWriter

            self.saliency = SaliencyWriter(self.out, models, method=saliency, deterministic=deterministic, names=self.names)
        self.result_image = None
        if result_image:
            from .result_image import ResultImageWriter

            self.result_image = ResultImageWriter(self.out, models, deterministic=deterministic, names=self.names)

    # ------------------------------------------------------------------ one input, not scored
    def account(self, p: Any) -> InputRecord:
        """Record an input that was not scored (skipped or failed): manifest row + record."""
        return self._finish(record_for(p))

    # ------------------------------------------------------------------ scored inputs
    def write_scored(self, prepared: Sequence[Any], rows: Sequence[dict[str, Any]]) -> list[InputRecord]:
        """Write the rows and DICOM objects of a scored batch (``rows`` from ``Scorer.score``)."""
        items = list(prepared)
        maps, saliency_error = None, ""
        if self.saliency is not None and items:
            try:
                maps = self.saliency.write_batch(items, rows)
            except Exception as e:  # noqa: BLE001 - recorded per input below
                saliency_error = f"{type(e).__name__}: {str(e)[:160]}"
        return [self._write_one(p, row, None if maps is None else maps[i], saliency_error) for i, (p, row) in enumerate(zip(items, rows))]

    def write_one(self, p: Any, row: dict[str, Any]) -> InputRecord:
        """Write the outputs of one scored input (the saliency overlay, when on, is made for it alone)."""
        return self.write_scored([p], [row])[0]

    def write_built(self, p: Any, row: dict[str, Any], built: Built) -> InputRecord:
        """Store one scored input whose DICOM objects were built elsewhere (:class:`ObjectBuilder`,
        e.g. in a cluster actor): the same files, rows and record as :meth:`write_one`."""
        return self._write_one(p, row, None, "", built)

    def flush(self) -> None:
        """Write buffered table parts (Parquet) now."""
        self.tables.flush()

    def _write_one(self, p: Any, row: dict[str, Any], maps: Any, saliency_error: str, built: Built | None = None) -> InputRecord:
        rec = record_for(p)
        result = None
        if built is None and self.builder is not None and (self.builder.sr is not None or self.result_image is not None):
            try:  # one ImageResult: the table row's values, the SR, the FHIR bundle and the result image
                result = self.builder.result(row)
                row = {**row, **result.values()}
            except Exception as e:  # noqa: BLE001 - fails this input alone (below)
                built = Built(error=f"{type(e).__name__}: {str(e)[:160]}")
        rec.values = {k: row[k] for k in self.value_columns if k in row}
        if built is None:
            built = self.builder.build(p, row, result) if self.builder is not None else Built()
        for w in built.warnings:
            if w not in rec.warnings:
                rec.warnings.append(w)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if built.error:
                    raise _BuildError(built.error)
                if built.sr is not None:
                    from .sr import sr_filename

                    rel = self.names.claim("sr/" + sr_filename(p.uids.get("SOPInstanceUID", "")))
                    write_bytes(built.sr, output_path(self.out, rel), suffix=".dcm")
                    rec.add_output("sr", rel)
                if built.fhir is not None:
                    from .fhir import fhir_filename

                    rel = self.names.claim("fhir/" + fhir_filename(p.uids.get("SOPInstanceUID", "")))
                    write_bytes(built.fhir, output_path(self.out, rel), suffix=".json")
                    rec.add_output("fhir", rel)
                if self.saliency is not None:
                    if maps is None:
                        raise RuntimeError(f"saliency maps could not be made ({saliency_error})")
                    for kind, rel in maps:
                        rec.add_output(kind, rel)
                if self.result_image is not None and p.dataset is not None:
                    overlay = rec.outputs.get("saliency", [None])[0]
                    rec.add_output("result_image", self.result_image.write(p, row, None if overlay is None else self.out / overlay, result=result))
            add_warnings(caught, rec.warnings)
        except Exception as e:  # one object that cannot be written must not lose the others
            full = disk_full(e, self.out)
            if full is not None:  # a full disk: the run stops (no row)
                raise full from None
            rec.status = Status.FAILED
            detail = str(e) if isinstance(e, _BuildError) else f"{type(e).__name__}: {str(e)[:160]}"
            rec.reason = f"failed: scored but writing its DICOM output failed: {detail}"
        mark = self.tables.mark()
        self.tables.write(row)
        try:
            return self._finish(rec)
        except (OSError, DiskFullError):  # a full disk: the input is in no table either
            self.tables.rollback(mark)
            raise

    def _finish(self, rec: InputRecord) -> InputRecord:
        reason = rec.reason if rec.status is not Status.OK else "; ".join(f"warning: {w}" for w in rec.warnings)
        mark = self.manifest.mark()
        self.manifest.write(rec.file, rec.status, reason)
        try:
            self.records.write(rec)
        except (OSError, DiskFullError):  # a full disk: the input is in neither file
            self.manifest.rollback(mark)
            raise
        return rec

    def close(self) -> None:
        self.tables.close()
        self.manifest.close()
        self.records.close()

    def __enter__(self) -> "OutputWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
