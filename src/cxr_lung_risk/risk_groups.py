"""Risk groups of a score (the paper's CXR-Lung-Risk groups: < 65, 65 to < 75, >= 75 years).

The cut-points, labels and SR codes are data (``risk_groups`` in ``models/cxr_lung_risk.json``).
A score equal to a cut-point belongs to the higher group (``65.0`` is ``65 to < 75``). The
chronological age of ``--linkage-columns`` (PatientAge, else PatientBirthDate and StudyDate) and
the CXR-Age gap (CXR-Age minus chronological age) are derived here too.

Imports nothing heavy (no torch, no pandas).
"""
from __future__ import annotations

import bisect
import datetime
import math
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["RiskGroups", "lung_risk_groups", "chronological_age", "AGE_COLUMN", "AGE_GAP_COLUMN"]

#: ``--linkage-columns`` with CXR-Age... the chronological age (years) and the CXR-Age gap.
AGE_COLUMN = "Chronological_Age"
AGE_GAP_COLUMN = "CXR_Age_Gap"


@dataclass(frozen=True)
class RiskGroups:
    """Cut-points and labels: ``len(labels) == len(cut_points) + 1``, cut-points increasing."""

    cut_points: tuple[float, ...]
    labels: tuple[str, ...]
    column: str = "CXR_Lung_Risk_Group"
    concept: tuple[str, str] | None = None  # SR concept name (code value, meaning)
    codes: tuple[tuple[str, str], ...] = ()  # SR value per label (code value, meaning)

    def __post_init__(self) -> None:
        cuts = list(self.cut_points)
        if not cuts or any(not math.isfinite(c) for c in cuts) or any(b <= a for a, b in zip(cuts, cuts[1:])):
            raise ValueError(f"cut-points must be finite and increasing: {cuts}")
        if len(self.labels) != len(cuts) + 1:
            raise ValueError(f"{len(cuts)} cut-points need {len(cuts) + 1} labels, not {len(self.labels)}")

    @classmethod
    def custom(cls, cut_points: Sequence[float], column: str = "CXR_Lung_Risk_Group") -> "RiskGroups":
        """Groups from user cut-points, labelled like the paper's (``< a``, ``a to < b``, ``>= b``)."""
        cuts = tuple(float(c) for c in cut_points)
        fmt = lambda c: f"{c:g}"  # noqa: E731
        labels = [f"< {fmt(cuts[0])}"] + [f"{fmt(a)} to < {fmt(b)}" for a, b in zip(cuts, cuts[1:])] + [f">= {fmt(cuts[-1])}"]
        return cls(cut_points=cuts, labels=tuple(labels), column=column)

    def index(self, score: float) -> int | None:
        """The group index of ``score`` (None for a missing or non-finite score)."""
        try:
            s = float(score)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(s):
            return None
        return bisect.bisect_right(self.cut_points, s)

    def label(self, score: float) -> str:
        """The group label of ``score`` ('' for a missing score)."""
        i = self.index(score)
        return "" if i is None else self.labels[i]

    def code(self, score: float) -> tuple[str, str] | None:
        """The SR code (value, meaning) of ``score``'s group, when the groups have codes."""
        i = self.index(score)
        return None if i is None or not self.codes else self.codes[i]

    def describe(self) -> str:
        """``< 65 | 65 to < 75 | >= 75 years`` (the result image's line)."""
        return " | ".join(self.labels)


def lung_risk_groups() -> RiskGroups:
    """The paper's groups, from ``models/cxr_lung_risk.json``."""
    from .spec import lung_risk_spec

    raw = lung_risk_spec().raw["risk_groups"]
    return RiskGroups(
        cut_points=tuple(float(c) for c in raw["cut_points"]),
        labels=tuple(raw["labels"]),
        column=raw["column"],
        concept=(raw["concept"]["value"], raw["concept"]["meaning"]),
        codes=tuple((c["value"], c["meaning"]) for c in raw["codes"]),
    )


_AGE_UNITS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}


def _date(value: Any) -> datetime.date | None:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def chronological_age(dataset: Any) -> float | None:
    """Age in years at the study: PatientAge (``065Y``, ``030M``...), else PatientBirthDate and
    StudyDate (else ContentDate); None when neither is usable."""
    if dataset is None:
        return None
    try:
        age = str(dataset.get("PatientAge", "") or "").strip()
    except Exception:  # noqa: BLE001 - an unreadable value counts as absent
        age = ""
    if len(age) == 4 and age[:3].isdigit() and age[3].upper() in _AGE_UNITS:
        return round(int(age[:3]) * _AGE_UNITS[age[3].upper()], 4)
    try:
        birth = _date(dataset.get("PatientBirthDate", ""))
        when = _date(dataset.get("StudyDate", "")) or _date(dataset.get("ContentDate", ""))
    except Exception:  # noqa: BLE001
        return None
    if birth is None or when is None or when < birth:
        return None
    return round((when - birth).days / 365.25, 4)
