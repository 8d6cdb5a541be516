"""Saliency maps (``predict --saliency``): where the final score is sensitive to the input.

Method ``gradient`` (default, as the authors' ``run_model.py``): the gradient of each model's
*final* score with respect to the normalised 224x224 input -- for CXR-Lung-Risk the
LASSO-combined score ``sum_i w_i f_i(x) + b``, for CXR-Age the calibrated age including the
deterministic TTA blend when ``--tta`` is on -- then ``max |grad|`` over the three channels.

Method ``gradcam`` (optional): Grad-CAM on the last convolutional feature maps of each network
(``model[0]`` of the fastai ``Sequential(body, head)``), channel weights = spatial mean of the
gradient of the same final score (so ensemble members count by their LASSO weights), signed maps
bilinearly upsampled to 224 and summed over members, then ReLU. Plain pass only (no TTA views,
whose feature maps live in zoomed coordinates).

Display: the map is scaled to [0, 1] (gradient: divided by its 99th percentile and clipped, so
a few extreme pixels do not blank the rest; Grad-CAM: divided by its maximum), turned into 8-bit,
coloured with matplotlib's ``hot`` colormap (reproduced here as a 256-entry table) and blended
onto the 224x224 crop with ``PIL.Image.blend(alpha=0.5)`` as the original. The original applied
``np.uint8(255 * grad)`` to the raw gradients (no scaling, wrapping above 1/255 per unit), which
depends on the gradient's magnitude; the scaling here is the one deliberate difference.

Outputs: ``DIR/saliency/<input path without suffix>.<model>.png`` for every scored input, and for
DICOM inputs ``DIR/sc/<source SOP Instance UID>_<model>.dcm`` (an RGB Secondary Capture, see
:mod:`cxr_lung_risk.outputs.sc`). The method is named in the SC's SeriesDescription and
DerivationDescription.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .transforms import normalize

__all__ = [
    "SaliencyTarget",
    "target_for",
    "input_gradient",
    "gradient_saliency",
    "gradcam",
    "scale_map",
    "hot_lut",
    "blend_heatmap",
    "saliency_png_name",
    "SaliencyWriter",
]

# matplotlib's 'hot' (LinearSegmentedColormap segment data: x, y0, y1 per channel).
_HOT = {
    "red": ((0.0, 0.0416, 0.0416), (0.365079, 1.0, 1.0), (1.0, 1.0, 1.0)),
    "green": ((0.0, 0.0, 0.0), (0.365079, 0.0, 0.0), (0.746032, 1.0, 1.0), (1.0, 1.0, 1.0)),
    "blue": ((0.0, 0.0, 0.0), (0.746032, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
_CMAPS = {"hot": _HOT}


@dataclass
class SaliencyTarget:
    """What to differentiate for one model: its final score and the networks inside it."""

    name: str  # file-name tag, e.g. 'cxr-age'
    title: str  # words, e.g. 'CXR-Age'
    score: Callable[[torch.Tensor], torch.Tensor]  # normalised (N,3,H,W) -> final score (N,)
    plain_parts: Sequence[tuple[nn.Module, float]]  # (network, weight): plain score = g(sum w_i net_i(x))
    outer: Callable[[torch.Tensor], torch.Tensor]  # g above (monotone map, e.g. age calibration)
    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device


def target_for(scorer: Any) -> SaliencyTarget:
    """The differentiable final score of a loaded model (CXR-Age or the CXR-Lung-Risk ensemble).

    A model that provides ``saliency_target()`` (:class:`cxr_lung_risk.registry.Model`) is asked
    for it; otherwise an object holding a :class:`~cxr_lung_risk.age.CXRAge` as ``.model`` or a
    ``LungRiskEnsemble`` as ``.ensemble`` is accepted.
    """
    from .age import CXRAge, calibrate

    make = getattr(scorer, "saliency_target", None)
    if callable(make):
        return make()
    if isinstance(getattr(scorer, "model", None), CXRAge):
        m = scorer.model
        return SaliencyTarget(
            name=scorer.spec.name,
            title=scorer.spec.title,
            score=m.age_output,
            plain_parts=[(m.model, 1.0)],
            outer=lambda y: calibrate(y, m.spec.calibration),
            mean=m.spec.mean,
            std=m.spec.std,
            device=m.device,
        )
    ens = getattr(scorer, "ensemble", None)
    if ens is not None:
        weights = [float(mem.weight) for mem in ens.members]
        intercept = float(ens.spec.intercept)
        models = list(ens.models)

        def combined(x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device) + intercept
            for w, net in zip(weights, models):
                out = out + w * net(x)[:, 0].to(x.dtype)
            return out

        return SaliencyTarget(
            name=ens.spec.name,
            title=ens.spec.title,
            score=combined,
            plain_parts=list(zip(models, weights)),
            outer=lambda y: y + intercept,
            mean=ens.spec.mean,
            std=ens.spec.std,
            device=ens.device,
        )
    raise TypeError(f"no saliency support for {type(scorer).__name__}")


def input_gradient(score: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``d score(x)[n] / d x[n]`` for every item of a normalised batch (items are independent)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = score(x)
        (g,) = torch.autograd.grad(y.sum(), x)
    return g


def gradient_saliency(score: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> np.ndarray:
    """``max |grad|`` over channels: (N, H, W) float64."""
    g = input_gradient(score, x)
    return g.abs().amax(dim=1).double().cpu().numpy()


def gradcam(target: SaliencyTarget, x: torch.Tensor) -> np.ndarray:
    """Grad-CAM (N, H, W) of the plain-pass final score; networks must be ``Sequential(body, head)``."""
    h, w = x.shape[-2:]
    x = x.detach()
    with torch.enable_grad():
        feats, raw = [], None
        for net, weight in target.plain_parts:
            if not (isinstance(net, nn.Sequential) and len(net) == 2):
                raise TypeError("Grad-CAM needs networks built as Sequential(body, head)")
            f = net[0](x)
            f.retain_grad()
            feats.append(f)
            part = weight * net[1](f)[:, 0].to(x.dtype)
            raw = part if raw is None else raw + part
        score = target.outer(raw)
        grads = torch.autograd.grad(score.sum(), feats)
    cam = torch.zeros(x.shape[0], 1, h, w, dtype=torch.float64, device=x.device)
    for f, g in zip(feats, grads):
        alpha = g.mean(dim=(2, 3), keepdim=True)
        m = (alpha * f).sum(dim=1, keepdim=True).double()
        cam = cam + F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    return cam.clamp_min(0)[:, 0].detach().cpu().numpy()


def scale_map(m: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Scale a non-negative (H, W) map to [0, 1] by its ``percentile`` (100 = maximum), clipped."""
    m = np.asarray(m, dtype=np.float64)
    ref = float(np.percentile(m, percentile)) if m.size else 0.0
    if not np.isfinite(ref) or ref <= 0:
        ref = float(m.max()) if m.size and np.isfinite(m.max()) and m.max() > 0 else 1.0
    return np.clip(np.nan_to_num(m / ref, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def hot_lut(name: str = "hot", n: int = 256) -> np.ndarray:
    """(n, 3) uint8 table = ``np.uint8(matplotlib.cm.get_cmap(name)(i)[:3] * 255)`` for i in 0..n-1."""
    data = _CMAPS[name]
    xind = np.arange(n, dtype=np.float64)
    cols = []
    for ch in ("red", "green", "blue"):
        pts = np.asarray(data[ch], dtype=np.float64)
        cols.append(np.clip(np.interp(xind, pts[:, 0] * (n - 1), pts[:, 1]), 0.0, 1.0))
    return (np.stack(cols, 1) * 255).astype(np.uint8)


def blend_heatmap(image_chw: np.ndarray, heat01: np.ndarray, *, alpha: float = 0.5, cmap: str = "hot") -> np.ndarray:
    """The original's ``blendImage``: 8-bit heat -> colormap -> ``PIL.Image.blend(xray, heat, alpha)``.

    ``image_chw`` is the uint8 3 x H x W crop, ``heat01`` an (h, w) map in [0, 1] (bilinearly
    resized to H x W when the sizes differ). Returns H x W x 3 uint8.
    """
    img = np.asarray(image_chw, dtype=np.uint8)
    xray = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), mode="RGB")
    heat8 = Image.fromarray(np.uint8(np.clip(heat01, 0.0, 1.0) * 255), mode="L")
    if heat8.size != xray.size:
        heat8 = heat8.resize(xray.size, Image.BILINEAR)
    colored = Image.fromarray(hot_lut(cmap)[np.asarray(heat8)], mode="RGB")
    return np.asarray(Image.blend(xray, colored, alpha))


def saliency_png_name(rel: str, model_name: str) -> str:
    """``<rel without its image/DICOM suffix>.<model>.png`` (relative, POSIX)."""
    r = Path(rel)
    if r.suffix.lower() in (".dcm", ".dicom", ".ima", ".png", ".jpg", ".jpeg"):
        r = r.with_suffix("")
    return f"{r.as_posix()}.{model_name}.png"


class SaliencyWriter:
    """Writes one PNG (and, for DICOM inputs, one SC) per scored image and model."""

    def __init__(self, out_dir: Path, scorers: Sequence[Any], args: argparse.Namespace) -> None:
        from . import __version__
        from .spec import age_spec

        self.out = Path(out_dir)
        self.method = str(getattr(args, "saliency_method", "gradient") or "gradient")
        if self.method not in ("gradient", "gradcam"):
            from .errors import UsageError

            raise UsageError(f"--saliency-method must be gradient or gradcam (got {self.method!r})")
        self.targets = [target_for(s) for s in scorers]
        if self.method == "gradcam":
            for t in self.targets:
                if not all(isinstance(n, nn.Sequential) and len(n) == 2 for n, _ in t.plain_parts):
                    from .errors import UsageError

                    raise UsageError(
                        f"Grad-CAM needs every network of {t.title} built as body + head (the 'tiny' ensemble "
                        "members are not); use --saliency-method gradient"
                    )
        self.deterministic = bool(getattr(args, "deterministic", False))
        self.version = __version__
        cfg = age_spec().raw.get("saliency", {})
        self.alpha = float(cfg.get("alpha", 0.5))
        self.cmap = str(cfg.get("colormap", "hot"))

    def heatmap(self, target: SaliencyTarget, image_chw: np.ndarray) -> np.ndarray:
        """The [0, 1] map (H, W) of one uint8 crop for one model."""
        from .engine import fp32_math

        x = normalize(torch.from_numpy(np.ascontiguousarray(image_chw))[None].to(target.device), target.mean, target.std)
        with fp32_math():
            if self.method == "gradcam":
                return scale_map(gradcam(target, x)[0], 100.0)
            return scale_map(gradient_saliency(target.score, x)[0], 99.0)

    def write(self, prepared: Any, row: dict[str, Any]) -> list[Path]:
        """Write the overlays of one prepared input; returns the paths written."""
        from .outputs import sc

        written: list[Path] = []
        for i, t in enumerate(self.targets):
            rgb = blend_heatmap(prepared.image, self.heatmap(t, prepared.image), alpha=self.alpha, cmap=self.cmap)
            png = self.out / "saliency" / saliency_png_name(prepared.file.rel, t.name)
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb, mode="RGB").save(png)
            written.append(png)
            if prepared.dataset is not None:
                ds = sc.build_secondary_capture(
                    prepared.dataset,
                    rgb,
                    model_title=t.title,
                    method=self.method,
                    software_version=self.version,
                    series_number=9101 + i,
                    deterministic=self.deterministic,
                )
                uid = prepared.uids.get("SOPInstanceUID", "") if getattr(prepared, "uids", None) else ""
                written.append(sc.write_sc(ds, self.out / "sc" / sc.sc_filename(uid, t.name)))
        return written
