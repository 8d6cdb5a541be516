"""CXR-Age's home (Raghu et al., JACC Cardiovascular Imaging 2021): biological age from a chest
radiograph. The network, its loading, scoring, SR measurement and saliency target
(:class:`AgeModel`, built by :func:`load_model`; see :mod:`cxr_lung_risk.registry`).

Network
    ResNet34 body (torchvision names, as fastai v1's ``cnn_learner`` cuts it) + the head that the
    authors' ``run_model.py`` rebuilds for ``--modelarch age``: the first four layers of fastai
    v1's ``create_head(1024, 1)`` (AdaptiveConcatPool2d, Flatten, BatchNorm1d(1024), Dropout(0.25))
    then Linear(1024, 512), ReLU, BatchNorm1d(512), Dropout(0.5), Linear(512, 16), ReLU,
    BatchNorm1d(16), Linear(16, 1). State-dict keys ``0.*`` (body) and ``1.{2,4,6,8,10,11}.*``
    (head), read strictly from fastai v1's ``{'model': ..., 'opt': ...}`` file (the optimiser
    state is discarded; see :mod:`cxr_lung_risk.weights` for the allow-listed unpickling).

Input
    The same uint8 224x224 RGB crop as CXR-Lung-Risk (one decode for both models), ``/ 255``
    then ImageNet normalisation (fastai v1 ``normalize(imagenet_stats)``).

Calibration (``models/cxr_age.json``)
    ``a = raw * scale + offset``; ``CXR_Age = q0 + q1 * a + q2 * a**2`` applied to the blended raw
    output, as ``run_model.py`` does.

Test-time augmentation
    The authors call ``_TTA(learn, beta=0.4, scale=1.35, ds_type=DatasetType.Fix)``:
    ``final = 0.4 * plain + 0.6 * mean(8 passes)``. Their pass ``i`` uses fastai v1
    ``zoom(scale=1.35, row_pct=i & 1, col_pct=i & 2 (as 0/1))`` + ``crop_pad`` (a no-op at 224)
    *plus the training set's random rotate (+-10 deg), brightness and contrast* (``DatasetType.Fix``
    is the training set without shuffling, so even their "plain" pass is randomly augmented).
    The 8 passes visit each of the 4 corners twice (the flip is commented out), so their
    expectation over the random parts is the mean over the 4 corners.

    Ours (``--tta``, the default) is deterministic and drops the random rotate/lighting:
    ``final = 0.4 * plain + 0.6 * mean over the 4 corners of zoom(1.35)``, the plain pass being the
    unaugmented image. The zoom reproduces fastai 1.0.61 exactly: output pixel grid
    ``linspace(-1, 1, 224)``, affine ``[[1/s, 0, c], [0, 1/s, r]]`` with
    ``c = (1 - 1/s) * (2 * col_pct - 1)`` (``r`` likewise), sampled bilinearly with reflection
    padding by ``grid_sample`` under torch 1.5.1's default ``align_corners=False`` (the authors'
    ``environment.yml``). ``--no-tta`` is the plain pass alone. Published numbers therefore differ
    from ours by the random-augmentation noise of the original (its ``SD_Prediction`` column).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .archs import AdaptiveConcatPool2d, Flatten, resnet34_body
from .spec import AgeSpec, age_spec
from .transforms import normalize
from .errors import WeightsError, WeightsNotFoundError
from .weights import load_into, load_state_dict_file, state_dict_nbytes

__all__ = [
    "age_head",
    "build_age_model",
    "calibrate",
    "fastai_v1_zoom",
    "tta_views",
    "AgeResult",
    "CXRAge",
    "AgeModel",
    "load_model",
]


def age_head(spec: AgeSpec | None = None) -> nn.Sequential:
    """The rebuilt CXR-Age head (indices 0..11; see the module docstring)."""
    h = (spec or age_spec()).raw.get("head", {})
    nf = int(h.get("pool_features", 1024))
    hid1, hid2 = (int(v) for v in h.get("hidden", (512, 16)))
    p1, p2 = (float(v) for v in h.get("dropout", (0.25, 0.5)))
    return nn.Sequential(
        AdaptiveConcatPool2d(),
        Flatten(),
        nn.BatchNorm1d(nf),
        nn.Dropout(p1),
        nn.Linear(nf, hid1, bias=True),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(hid1),
        nn.Dropout(p2),
        nn.Linear(hid1, hid2, bias=True),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(hid2),
        nn.Linear(hid2, 1, bias=True),
    )


def build_age_model(spec: AgeSpec | None = None) -> nn.Sequential:
    """``Sequential(resnet34_body(), age_head())`` with the published state-dict keys."""
    return nn.Sequential(resnet34_body(), age_head(spec))


def calibrate(raw: Any, calibration: dict[str, Any] | None = None) -> Any:
    """Raw network output -> CXR-Age in years (works on numpy arrays, floats and tensors)."""
    c = calibration if calibration is not None else age_spec().calibration
    a = raw * float(c["scale"]) + float(c["offset"])
    q0, q1, q2 = (float(v) for v in c["quadratic"])
    return q0 + q1 * a + q2 * a * a


def fastai_v1_zoom(
    x: torch.Tensor,
    scale: float,
    row_pct: float,
    col_pct: float,
    *,
    align_corners: bool = False,
    padding_mode: str = "reflection",
    mode: str = "bilinear",
) -> torch.Tensor:
    """fastai 1.0.61 ``zoom(scale, row_pct, col_pct, is_random=False)`` on an NCHW batch.

    Differentiable with respect to ``x``. The grid is fastai's ``_affine_grid`` (``linspace(-1, 1)``
    in x and y) multiplied by the zoom matrix, then ``grid_sample`` as torch 1.5 ran it.
    """
    n, _, h, w = x.shape
    s = 1.0 - 1.0 / scale
    col_c = s * (2.0 * col_pct - 1.0)
    row_c = s * (2.0 * row_pct - 1.0)
    dt = x.dtype if x.is_floating_point() else torch.float32
    xs = torch.linspace(-1.0, 1.0, w, dtype=dt, device=x.device) / scale + col_c
    ys = torch.linspace(-1.0, 1.0, h, dtype=dt, device=x.device) / scale + row_c
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2): (x, y)
    grid = grid.unsqueeze(0).expand(n, h, w, 2)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def tta_views(x: torch.Tensor, tta: dict[str, Any]) -> list[torch.Tensor]:
    """The deterministic zoomed corner views of a normalised batch (one per spec corner)."""
    return [
        fastai_v1_zoom(
            x,
            float(tta["zoom"]),
            float(r),
            float(c),
            align_corners=bool(tta.get("align_corners", False)),
            padding_mode=str(tta.get("padding_mode", "reflection")),
            mode=str(tta.get("mode", "bilinear")),
        )
        for r, c in tta["corners"]
    ]


@dataclass
class AgeResult:
    ages: np.ndarray  # (N,) float64, years
    raw: np.ndarray  # (N,) float64, blended raw network output


class CXRAge:
    """The loaded CXR-Age network. Build with :meth:`load` (or pass any compatible module)."""

    def __init__(self, model: nn.Module, *, spec: AgeSpec | None = None, tta: bool = True, device: torch.device | str = "cpu") -> None:
        self.spec = spec or age_spec()
        self.model = model.eval()
        self.tta = bool(tta)
        self.device = torch.device(device)

    @classmethod
    def load(
        cls, weights: str | Path, *, spec: AgeSpec | None = None, tta: bool = True, device: str | torch.device = "cpu"
    ) -> "CXRAge":
        """Strictly load ``PLCO_Fine_Tuned_120419.pth`` (fastai v1 container or bare state dict)."""
        from .runtime import resolve_device

        spec = spec or age_spec()
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        with torch.device("meta"):
            model = build_age_model(spec)
        state = load_state_dict_file(weights, expected_bytes=state_dict_nbytes(model))
        load_into(model, state, str(weights), assign=True)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if dev.type != "cpu":
            model.to(dev)
        return cls(model, spec=spec, tta=tta, device=dev)

    def raw_output(self, x: torch.Tensor, tta: bool | None = None) -> torch.Tensor:
        """Blended raw output (N,) for a normalised float batch; differentiable when grad is on."""
        use_tta = self.tta if tta is None else tta
        plain = self.model(x)[:, 0]
        if not use_tta:
            return plain
        cfg = self.spec.tta
        views = tta_views(x, cfg)
        zoomed = torch.stack([self.model(v)[:, 0] for v in views], 0).mean(0)
        beta = float(cfg["plain_weight"])
        return beta * plain + (1.0 - beta) * zoomed

    def age_output(self, x: torch.Tensor, tta: bool | None = None) -> torch.Tensor:
        """Calibrated CXR-Age (N,) for a normalised batch (the final score; differentiable)."""
        return calibrate(self.raw_output(x, tta), self.spec.calibration)

    def predict_uint8(self, batch_u8: torch.Tensor) -> AgeResult:
        """Score a uint8 NCHW batch of 224x224 RGB crops."""
        from .runtime import fp32_math

        x = normalize(batch_u8.to(self.device), self.spec.mean, self.spec.std)
        with torch.inference_mode(), fp32_math():
            raw = self.raw_output(x).double().cpu().numpy()
        return AgeResult(np.asarray(calibrate(raw, self.spec.calibration), dtype=np.float64), raw)


class AgeModel:
    """CXR-Age as the pipeline sees it (:class:`cxr_lung_risk.registry.Model`): column ``CXR_Age``."""

    def __init__(self, model: CXRAge, *, weights_identity: dict | None = None) -> None:
        from .runtime import Placement

        self.model = model
        self.spec = model.spec
        self.title = self.spec.title
        self.columns = [self.spec.column]
        self.placement = Placement(model.device, "fp32")  # CXR-Age has no reduced-precision path
        self.weights_identity = dict(weights_identity or {})

    @property
    def device(self) -> torch.device:
        return self.model.device

    def score(self, batch_u8: torch.Tensor, on_step=None) -> dict[str, np.ndarray]:
        out = {self.spec.column: self.model.predict_uint8(batch_u8).ages}
        if on_step is not None:
            on_step(1.0)
        return out

    def measurements(self, row: dict[str, Any]) -> list[Any]:
        from .outputs.sr import CxrCodes, measurement_from_spec

        return [measurement_from_spec(self.spec, CxrCodes.CXR_AGE, float(row[self.spec.column]))]

    def algorithm(self, extra: dict[str, str] | None = None):
        from .outputs.sr import algorithm_info

        params = dict(self.placement.parameters())
        params["tta"] = "true" if self.model.tta else "false"
        params.update(extra or {})
        return algorithm_info(self.spec, params, self.weights_identity)

    def saliency_target(self):
        """The final score (calibrated, blended as scored) of a normalised batch, differentiable."""
        from .differentiable import SaliencyTarget

        m = self.model
        return SaliencyTarget(
            name=self.spec.name,
            title=self.spec.title,
            score=m.age_output,
            plain_parts=[(m.model, 1.0)],
            outer=lambda y: calibrate(y, m.spec.calibration),
            mean=m.spec.mean,
            std=m.spec.std,
            device=m.device,
        )


def load_model(options=None) -> AgeModel:
    """Find and load the CXR-Age weights (``options.weights`` or the fetch-weights cache)."""
    from .fetch import find_age_weights, weights_identity
    from .registry import ModelOptions
    from .runtime import placement

    o = options or ModelOptions()
    spec = age_spec()
    loc = find_age_weights(o.weights)
    if loc is None:
        if o.weights:
            raise WeightsNotFoundError(f"CXR-Age weights not found at {o.weights}")
        size_mb = int(spec.weights.get("size", 0)) / 1e6
        raise WeightsNotFoundError(
            "no CXR-Age weights found: run `cxr-lung-risk fetch-weights --model age` "
            f"(downloads {spec.weights.get('file')}, {size_mb:.0f} MB) or pass --age-weights FILE"
        )
    if Path(loc).is_dir():
        raise WeightsError(f"{loc}: --age-weights must be the file {spec.weights.get('file')}, not a folder")
    place = placement(o.device, o.precision, reduced_precision=False)
    model = CXRAge.load(loc, tta=o.tta, device=place.device)
    return AgeModel(model, weights_identity=weights_identity(Path(loc)))
