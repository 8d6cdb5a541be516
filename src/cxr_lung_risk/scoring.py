"""Models stage: score batches of prepared images with models loaded once.

One job: prepared uint8 crops in, one result row per image out (``File``, the source UIDs, every
model's columns, ``Weights``). A :class:`Scorer` holds its loaded models; it neither reads inputs
nor writes files, so the same object serves ``predict``, the PACS node and a cluster actor.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from .registry import Model, ModelOptions, load_model, resolve_models

__all__ = ["UID_COLUMNS", "LINKAGE_COLUMNS", "Scorer", "weights_label", "linkage_values", "derived_columns", "derived_values"]

UID_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
#: ``--linkage-columns``: copied from the source header so results can be joined per patient and
#: study. They are identifying data (PatientID, AccessionNumber): handle the table accordingly.
LINKAGE_COLUMNS = ("PatientID", "StudyDate", "AccessionNumber", "ViewPosition")


def linkage_values(dataset: Any) -> dict[str, str]:
    """The :data:`LINKAGE_COLUMNS` of a source header (empty strings when absent or not DICOM)."""
    out = {}
    for kw in LINKAGE_COLUMNS:
        v = ""
        if dataset is not None:
            try:
                raw = dataset.get(kw, "")
                v = "" if raw is None else str(raw).strip().rstrip("\x00")
            except Exception:  # noqa: BLE001 - an unreadable value stays empty
                v = ""
        out[kw] = v
    return out


def derived_columns(value_columns: Sequence[str], linkage: bool) -> tuple[str, ...]:
    """Columns after ``Weights`` derived from the scores: the CXR-Lung-Risk group (whenever
    CXR-Lung-Risk is scored) and, with ``--linkage-columns``, the chronological age and (with
    CXR-Age) the CXR-Age gap (see :mod:`cxr_lung_risk.risk_groups`)."""
    from .risk_groups import AGE_COLUMN, AGE_GAP_COLUMN, lung_risk_groups
    from .spec import age_spec, lung_risk_spec

    cols: list[str] = []
    if lung_risk_spec().column in value_columns:
        cols.append(lung_risk_groups().column)
    if linkage:
        cols.append(AGE_COLUMN)
        if age_spec().column in value_columns:
            cols.append(AGE_GAP_COLUMN)
    return tuple(cols)


def derived_values(row: dict[str, Any], dataset: Any, linkage: bool) -> dict[str, Any]:
    """The :func:`derived_columns` of one scored row (``dataset``: its source header or None);
    a value that cannot be derived is None (an empty cell)."""
    from .risk_groups import AGE_COLUMN, AGE_GAP_COLUMN, chronological_age, lung_risk_groups
    from .spec import age_spec, lung_risk_spec

    out: dict[str, Any] = {}
    lr, ag = lung_risk_spec().column, age_spec().column
    if lr in row:
        out[lung_risk_groups().column] = lung_risk_groups().label(row[lr])
    if linkage:
        age = chronological_age(dataset)
        out[AGE_COLUMN] = age
        if ag in row:
            out[AGE_GAP_COLUMN] = None if age is None else round(float(row[ag]) - age, 4)
    return out


def weights_label(models: Sequence[Model]) -> str:
    """The ``Weights`` column: ``lung-risk=published;age=SYNTHETIC`` (never passes synthetic
    weights off as the published model)."""
    kinds = []
    for m in models:
        ident = m.weights_identity or {}
        kind = "SYNTHETIC" if ident.get("synthetic") else ("published" if ident.get("published") else "unverified")
        kinds.append(f"{m.spec.key}={kind}")
    return ";".join(kinds)


class Scorer:
    """Loaded models and how their results become rows.

    >>> scorer = Scorer.load(["lung-risk"], options=ModelOptions(device="cpu"))  # doctest: +SKIP
    >>> rows = scorer.score([prepared_a, prepared_b])               # doctest: +SKIP
    >>> rows[0]["CXR_Lung_Risk"]                                     # doctest: +SKIP
    """

    def __init__(self, models: Sequence[Model], *, linkage: bool = False) -> None:
        if not models:
            raise ValueError("a Scorer needs at least one model")
        self.models = list(models)
        self.weights_label = weights_label(self.models)
        self.linkage = linkage  # rows and columns carry LINKAGE_COLUMNS (identifying data)

    @classmethod
    def load(
        cls,
        models: str | Sequence[str] = ("lung-risk",),
        *,
        weights: dict[str, Any] | None = None,
        options: ModelOptions | None = None,
        options_for: Callable[[str], ModelOptions] | None = None,
        linkage: bool = False,
    ) -> "Scorer":
        """Load ``models`` (registry keys or ``"all"``) once. ``weights``: a path per key (default:
        the fetch-weights cache); ``options``: the device/precision/... every model gets;
        ``options_for``: per-key options instead (what :class:`~cxr_lung_risk.options.PredictOptions`
        provides); ``linkage``: rows and columns carry :data:`LINKAGE_COLUMNS`."""
        from dataclasses import replace

        keys = resolve_models(models)
        base = options or ModelOptions()
        out = []
        for k in keys:
            o = options_for(k) if options_for is not None else base
            if weights and weights.get(k) is not None:
                from pathlib import Path

                o = replace(o, weights=Path(weights[k]))
            out.append(load_model(k, o))
        return cls(out, linkage=linkage)

    @property
    def keys(self) -> list[str]:
        return [m.spec.key for m in self.models]

    def columns(self, uid_columns: bool = True) -> list[str]:
        """The result table's columns, in order."""
        cols = ["File"] + (list(UID_COLUMNS) if uid_columns else []) + (list(LINKAGE_COLUMNS) if self.linkage else [])
        for m in self.models:
            cols += m.columns
        cols.append("Weights")
        return cols + list(derived_columns([m.spec.column for m in self.models], self.linkage))

    @property
    def value_columns(self) -> list[str]:
        return [c for m in self.models for c in m.columns]

    def score_array(self, images_u8: np.ndarray | torch.Tensor, on_step: Callable[[float], None] | None = None) -> dict[str, np.ndarray]:
        """A uint8 N x 3 x 224 x 224 array -> {column: (N,) float64}. ``on_step(f)`` reports the
        fraction ``f`` of the work done since the last call (progress)."""
        x = images_u8 if isinstance(images_u8, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images_u8))
        results: dict[str, np.ndarray] = {}
        share = 1.0 / len(self.models)
        for m in self.models:
            results.update(m.score(x, on_step=None if on_step is None else (lambda f: on_step(f * share))))
        return results

    def score(self, prepared: Sequence[Any], on_step: Callable[[float], None] | None = None) -> list[dict[str, Any]]:
        """Score prepared inputs (status ok, ``image`` set; see :func:`cxr_lung_risk.api.prepare_input`)
        as one batch -> one row per input, in order."""
        items = list(prepared)
        if not items:
            return []
        bad = [p.file.rel for p in items if p.image is None]
        if bad:
            raise ValueError(f"not prepared for scoring (status not ok): {', '.join(bad[:5])}")
        results = self.score_array(np.stack([p.image for p in items]), on_step)
        rows = []
        for i, p in enumerate(items):
            row: dict[str, Any] = {"File": p.file.rel, **p.uids}
            if self.linkage:
                row.update(linkage_values(p.dataset))
            for k, v in results.items():
                row[k] = float(v[i])
            row["Weights"] = self.weights_label
            row.update(derived_values(row, p.dataset, self.linkage))
            rows.append(row)
        return rows
