"""The CXR-Lung-Risk ensemble: load members once, score batches of normalised 224x224 images.

``score = sum_i w_i * pred_i + intercept`` with the LASSO weights and intercept from the spec.
Members with weight 0 are neither loaded nor run unless ``all_members=True``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from . import archs
from .spec import EnsembleSpec, Member, lung_risk_spec
from .transforms import normalize
from .weights import WeightsError, WeightSource, load_into

__all__ = ["resolve_device", "LungRiskEnsemble", "EnsembleResult", "build_member"]

_MEMBER_FILE = re.compile(r"^(?P<stem>.+)_(?P<idx>\d+)\.pth$")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WeightsError("--device cuda was requested but no CUDA device is available; use --device cpu")
    return torch.device(device)


def build_member(member: Member, source: WeightSource, *, device: torch.device | None = None) -> nn.Module:
    """Build a member's network on the meta device and assign its (memory-mapped) weights."""
    with torch.device("meta"):
        model = archs.build(member.architecture, member.num_outputs)
    state = source.load(member.file)
    load_into(model, state, f"{source.location}/{member.file}" if source.kind == "dir" else f"{source.location}!{member.file}", assign=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if device is not None and device.type != "cpu":
        model.to(device)
    return model


@dataclass
class EnsembleResult:
    scores: np.ndarray  # (N,) float64, years
    per_member: np.ndarray  # (N, M) float64 raw member outputs, columns = members


class LungRiskEnsemble:
    """The loaded ensemble. Build with :meth:`load`."""

    def __init__(self, spec: EnsembleSpec, members: Sequence[Member], models: Sequence[nn.Module], device: torch.device) -> None:
        self.spec = spec
        self.members = tuple(members)
        self.models = list(models)
        self.device = device
        self._w = np.array([m.weight for m in self.members], dtype=np.float64)

    @classmethod
    def load(
        cls,
        weights: str | Path,
        *,
        spec: EnsembleSpec | None = None,
        all_members: bool = False,
        device: str | torch.device = "cpu",
    ) -> "LungRiskEnsemble":
        spec = spec or lung_risk_spec()
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        source = WeightSource(weights)
        check_member_files(spec, source)
        members = spec.active_members(all_members)
        missing = [m.file for m in members if not source.has(m.file)]
        if missing:
            raise WeightsError(
                f"{source.location}: missing {len(missing)} member file(s): {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else "")
            )
        models = [build_member(m, source, device=dev) for m in members]
        return cls(spec, members, models, dev)

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    @torch.inference_mode()
    def member_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Raw outputs (N, M) for a normalised float32 batch (N, 3, 224, 224)."""
        x = x.to(self.device, non_blocking=True)
        outs = [model(x)[:, 0].float() for model in self.models]
        return torch.stack(outs, 1)

    def combine(self, per_member: np.ndarray) -> np.ndarray:
        """LASSO combination in float64: ``per_member @ w + intercept``."""
        return per_member.astype(np.float64) @ self._w + self.spec.intercept

    def predict_uint8(self, batch_u8: torch.Tensor) -> EnsembleResult:
        """Score a uint8 NCHW batch of 224x224 RGB crops."""
        x = normalize(batch_u8.to(self.device), self.spec.mean, self.spec.std)
        per = self.member_outputs(x).cpu().double().numpy()
        return EnsembleResult(self.combine(per), per)


def check_member_files(spec: EnsembleSpec, source: WeightSource) -> None:
    """Refuse a weights folder/zip whose member files do not match the spec's count."""
    stems = {_MEMBER_FILE.match(m.file).group("stem") for m in spec.members if _MEMBER_FILE.match(m.file)}
    known = {m.file for m in spec.members}
    if source.kind == "dir":
        names = {p.name for p in source.location.glob("*.pth")} | {p.name for p in source.location.glob("*/*.pth")}
    else:
        names = set(source._names)
    found = {n for n in names if (mm := _MEMBER_FILE.match(n)) and mm.group("stem") in stems}
    extra = sorted(found - known)
    if extra:
        raise WeightsError(
            f"{source.location}: holds {len(found)} member files but the spec lists {len(spec.members)} "
            f"(unexpected: {', '.join(extra[:3])}); is this the right weights folder?"
        )
