"""The model registry: which models exist, what each is called, where its home is.

Models are data: every ``models/*.json`` declares its ``--model`` key, its home module and the
option that names its weights (``registry`` block). A home module provides ``load_model(options)``
returning an object that follows :class:`Model`. Nothing else in the package tests model names.

Importing this module does not import torch: the CLI uses it to build ``--model`` choices.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from .errors import UsageError
from .spec import SPEC_FILES, ModelSpec, spec_by_file

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from .outputs.sr import AlgorithmInfo, Measurement
    from .runtime import Placement
    from .differentiable import SaliencyTarget

__all__ = ["ALL", "Model", "ModelOptions", "model_keys", "model_choices", "resolve_models", "spec_for", "load_model"]

ALL = "all"


@dataclass(frozen=True)
class ModelOptions:
    """What any model's loader takes (typed; never an argparse namespace)."""

    weights: Path | None = None  # None: the fetch-weights cache
    device: str = "auto"  # auto | cpu | cuda[:N]
    precision: str = "fp32"  # fp32 | tf32 | bf16 | fp16 (models without a reduced path run fp32)
    all_members: bool = False  # CXR-Lung-Risk: also the 7 members with LASSO weight 0
    per_model: bool = False  # CXR-Lung-Risk: raw member outputs as extra columns
    tta: bool = True  # CXR-Age: deterministic test-time augmentation


class Model(Protocol):
    """A loaded model, as every stage after loading sees it."""

    spec: ModelSpec
    placement: "Placement"  # the device and arithmetic actually used
    weights_identity: dict[str, Any]  # which weights made the results (see fetch.weights_identity)
    columns: list[str]  # output columns it fills

    def score(self, batch_u8: "torch.Tensor") -> dict[str, "np.ndarray"]:
        """A uint8 N x 3 x 224 x 224 batch -> {column: (N,) float64}."""

    def measurements(self, row: dict[str, Any]) -> list["Measurement"]:
        """Its SR measurements for one scored row."""

    def algorithm(self, extra: dict[str, str] | None = None) -> "AlgorithmInfo":
        """Its SR algorithm identification (name, version, the run's parameters)."""

    def saliency_target(self) -> "SaliencyTarget":
        """The differentiable final score and the networks inside it."""


def _specs() -> list[ModelSpec]:
    return [spec_by_file(n) for n in SPEC_FILES]


def model_keys() -> tuple[str, ...]:
    """``('lung-risk', 'age')``: every model's key, in output order."""
    return tuple(s.key for s in _specs())


def model_choices() -> tuple[str, ...]:
    """What ``--model`` accepts: every key, and ``all``."""
    return model_keys() + (ALL,)


def resolve_models(names: str | Sequence[str]) -> tuple[str, ...]:
    """``'all'``, one key, a comma list or a sequence -> the keys, in output order, deduplicated."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    wanted = {n.strip().lower() for n in names if n and n.strip()}
    keys = model_keys()
    if ALL in wanted:
        return keys
    unknown = sorted(wanted - set(keys))
    if unknown or not wanted:
        raise UsageError(f"unknown model {', '.join(unknown) or '(none)'}; choose among {', '.join(model_choices())}")
    return tuple(k for k in keys if k in wanted)


def spec_for(key: str) -> ModelSpec:
    for s in _specs():
        if s.key == key:
            return s
    raise UsageError(f"unknown model {key!r}; choose among {', '.join(model_choices())}")


def load_model(key: str, options: ModelOptions | None = None) -> Model:
    """Load model ``key`` from its home module (``load_model(options)`` there)."""
    spec = spec_for(key)
    home = importlib.import_module(spec.module)
    return home.load_model(options or ModelOptions())
