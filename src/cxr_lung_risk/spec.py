"""Model specifications, read from the JSON files in the repository's ``models/`` folder.

The JSON files are the single source of truth for ensemble members, architectures, LASSO
weights, the intercept, input size/normalisation and where the weights come from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

__all__ = ["Member", "ModelSpec", "EnsembleSpec", "AgeSpec", "load_spec", "lung_risk_spec", "age_spec", "SPEC_FILES"]

#: The model definitions shipped in ``models/`` (one JSON file per model), in output order.
SPEC_FILES = ("cxr_lung_risk", "cxr_age")


@dataclass(frozen=True)
class Member:
    """One ensemble member: a network whose raw output enters the LASSO combination."""

    index: int
    name: str
    architecture: str
    weight: float
    file: str
    image_size: int = 224
    num_outputs: int = 1
    normalize: bool = True


@dataclass(frozen=True)
class ModelSpec:
    """What every model spec declares: its name, output column/unit and input transform."""

    name: str
    title: str
    column: str
    unit: str
    unit_meaning: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    key: str  # the --model name ('lung-risk', 'age')
    module: str  # the model's home module (loading, scoring, SR measurements, saliency target)
    weights_option: str  # the CLI option that names its weights


@dataclass(frozen=True)
class EnsembleSpec(ModelSpec):
    """The CXR-Lung-Risk ensemble: ``score = sum(w_i * pred_i) + intercept`` (years)."""

    intercept: float = 0.0
    members: tuple[Member, ...] = ()
    weights: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def active_members(self, all_members: bool = False) -> tuple[Member, ...]:
        """Members to load and run: those with a non-zero LASSO weight unless ``all_members``."""
        if all_members:
            return self.members
        return tuple(m for m in self.members if m.weight != 0.0)


@dataclass(frozen=True)
class AgeSpec(ModelSpec):
    """CXR-Age: one ResNet34 with a calibrated regression output (years)."""

    architecture: str = ""
    file: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)
    tta: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def _common(raw: dict[str, Any]) -> dict[str, Any]:
    return dict(
        name=raw["name"],
        title=raw["title"],
        column=raw["output"]["column"],
        unit=raw["output"]["unit"],
        unit_meaning=raw["output"]["unit_meaning"],
        input_size=int(raw["input"]["size"]),
        mean=tuple(raw["input"]["mean"]),
        std=tuple(raw["input"]["std"]),
        key=raw["registry"]["key"],
        module=raw["registry"]["module"],
        weights_option=raw["registry"]["weights_option"],
    )


def load_spec(name: str) -> dict[str, Any]:
    """Return the raw JSON of ``models/<name>.json`` (installed as ``cxr_lung_risk.specs``)."""
    text = resources.files("cxr_lung_risk.specs").joinpath(f"{name}.json").read_text("utf-8")
    return json.loads(text)


@lru_cache(maxsize=None)
def lung_risk_spec() -> EnsembleSpec:
    raw = load_spec("cxr_lung_risk")
    members = tuple(
        Member(
            index=i,
            name=m["name"],
            architecture=m["architecture"].lower(),
            weight=float(m["weight"]),
            file=m["file"],
            image_size=int(m.get("image_size", 224)),
            num_outputs=int(m.get("num_outputs", 1)),
            normalize=bool(m.get("normalize", True)),
        )
        for i, m in enumerate(raw["members"])
    )
    return EnsembleSpec(
        **_common(raw),
        intercept=float(raw["intercept"]),
        members=members,
        weights=raw["weights"],
        raw=raw,
    )


@lru_cache(maxsize=None)
def age_spec() -> AgeSpec:
    raw = load_spec("cxr_age")
    return AgeSpec(
        **_common(raw),
        architecture=raw["architecture"],
        file=raw["file"],
        calibration=raw["calibration"],
        tta=raw["tta"],
        weights=raw["weights"],
        raw=raw,
    )


def spec_by_file(name: str) -> ModelSpec:
    """The parsed spec of ``models/<name>.json``."""
    return {"cxr_lung_risk": lung_risk_spec, "cxr_age": age_spec}[name]()
