"""Outputs stage: everything one run writes for its inputs, one input at a time.

:class:`OutputWriter` owns an output folder's tables (``cxr_lung_risk.csv``/``.json``,
``manifest.csv``, ``records.jsonl``) and the per-image DICOM objects (the SR, and with saliency the
overlay PNG + Secondary Capture). :meth:`OutputWriter.write_scored` writes a scored batch,
:meth:`OutputWriter.account` an input that was not scored; both return the input's
:class:`~cxr_lung_risk.records.InputRecord` with every file written for it. Every input gets exactly
one manifest row and one record; a file that cannot be written fails only its own input.

UIDs are derived from the source's SOP Instance UID with ``deterministic=True``, so writing the same
input twice (a retried task, a resent study) rewrites identical objects.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from ..records import InputRecord, Status
from .base import UniqueNames, output_path
from .tables import ManifestWriter, RecordWriter, ResultWriter

__all__ = ["OutputWriter", "record_for"]


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
    )


class _SRWriter:
    """One DICOM SR per scored DICOM image, named after the source SOP Instance UID."""

    def __init__(self, out: Path, models: Sequence[Any], *, deterministic: bool, extra: dict[str, str], names: UniqueNames) -> None:
        from . import sr

        self.sr = sr
        self.out = out
        self.models = list(models)
        self.deterministic = deterministic
        self.names = names
        self.algorithms = {m.spec.column: m.algorithm(extra) for m in self.models}  # by measurement name

    def write(self, p: Any, row: dict[str, Any]) -> str:
        measurements = []
        for m in self.models:
            measurements += m.measurements(row)
        ds = self.sr.build_measurement_report(p.dataset, measurements, algorithm=self.algorithms, deterministic=self.deterministic)
        rel = self.names.claim("sr/" + self.sr.sr_filename(p.uids.get("SOPInstanceUID", "")))
        self.sr.write_sr(ds, output_path(self.out, rel))
        return rel


class OutputWriter:
    """Writes a run's outputs into ``out`` (a folder this writer owns while open).

    ``models``: the loaded models (a :class:`~cxr_lung_risk.scoring.Scorer`'s ``models``);
    ``columns``: the result table's columns (``Scorer.columns()``); ``formats``: among ``csv``,
    ``json``, ``sr``; ``saliency``: ``None`` or ``"gradient"``/``"gradcam"``; ``result_image``: also a
    Secondary Capture showing the scores per scored DICOM image (record kind ``result_image``,
    ``result/<SOPInstanceUID>.dcm``; :mod:`cxr_lung_risk.outputs.result_image`).
    """

    def __init__(
        self,
        out: str | Path,
        models: Sequence[Any],
        columns: Sequence[str],
        *,
        formats: Sequence[str] = ("csv", "sr"),
        deterministic: bool = True,
        saliency: str | None = None,
        im_version: str = "6.8.9-9",
        result_image: bool = False,
    ) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        formats = set(formats)
        self.value_columns = [c for m in models for c in m.columns]
        self.names = UniqueNames()
        self.tables = ResultWriter(self.out, columns, csv_out="csv" in formats, json_out="json" in formats)
        self.manifest = ManifestWriter(self.out)
        self.records = RecordWriter(self.out)
        extra = {"im_version": im_version}
        self.sr = _SRWriter(self.out, models, deterministic=deterministic, extra=extra, names=self.names) if "sr" in formats else None
        self.saliency = None
        if saliency:
            from ..saliency import SaliencyWriter

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

    def _write_one(self, p: Any, row: dict[str, Any], maps: Any, saliency_error: str) -> InputRecord:
        rec = record_for(p)
        rec.values = {k: row[k] for k in self.value_columns if k in row}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if self.sr is not None and p.dataset is not None:
                    rec.add_output("sr", self.sr.write(p, row))
                if self.saliency is not None:
                    if maps is None:
                        raise RuntimeError(f"saliency maps could not be made ({saliency_error})")
                    for kind, rel in maps:
                        rec.add_output(kind, rel)
                if self.result_image is not None and p.dataset is not None:
                    overlay = rec.outputs.get("saliency", [None])[0]
                    rec.add_output("result_image", self.result_image.write(p, row, None if overlay is None else self.out / overlay))
            for w in caught:
                msg = " ".join(str(w.message).split())[:200]
                if msg and msg not in rec.warnings:
                    rec.warnings.append(msg)
        except Exception as e:  # one object that cannot be written must not lose the others
            rec.status = Status.FAILED
            rec.reason = f"failed: scored but writing its DICOM output failed: {type(e).__name__}: {str(e)[:160]}"
        self.tables.write(row)
        return self._finish(rec)

    def _finish(self, rec: InputRecord) -> InputRecord:
        reason = rec.reason if rec.status is not Status.OK else "; ".join(f"warning: {w}" for w in rec.warnings)
        self.manifest.write(rec.file, rec.status, reason)
        self.records.write(rec)
        return rec

    def close(self) -> None:
        self.tables.close()
        self.manifest.close()
        self.records.close()

    def __enter__(self) -> "OutputWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
