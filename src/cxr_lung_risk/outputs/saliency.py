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

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..differentiable import PlainScore, SaliencyTarget, ensemble_target, input_format
from ..runtime import fp32_math
from ..transforms import normalize

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


def target_for(scorer: Any) -> SaliencyTarget:
    """The differentiable final score of a loaded model (CXR-Age or the CXR-Lung-Risk ensemble).

    A model that provides ``saliency_target()`` (:class:`cxr_lung_risk.registry.Model`) is asked
    for it; otherwise an object holding a ``LungRiskEnsemble`` as ``.ensemble`` is accepted. The ensemble's final score is exactly its
    plain LASSO combination ``sum_i w_i f_i(x) + b`` (it has no test-time augmentation), so its
    ``score`` is that function written over ``plain_parts`` (:class:`PlainScore`), whose gradient
    :func:`input_gradient` takes one member at a time.
    """
    make = getattr(scorer, "saliency_target", None)
    ens = getattr(scorer, "ensemble", None)
    if callable(make):
        target = make()
    elif ens is not None:
        target = ensemble_target(ens)
    else:
        raise TypeError(f"no saliency support for {type(scorer).__name__}")
    return target


#: Items per forward/backward pass: bounds the activations kept for one backward pass (measured
#: 30-55 MB per image for one InceptionV4 or Tiny member; all 13 members in one graph would keep
#: about 450 MB per image) while keeping the batch large enough for oneDNN.
MAX_ITEMS_PER_PASS = 16


def _plain_gradient(score: PlainScore, x: torch.Tensor) -> torch.Tensor:
    """Input gradient of a :class:`PlainScore`, one network at a time (grad mode on)."""
    grad, raw = None, None
    for net, w in score.parts:
        xg = x.to(memory_format=input_format(net), copy=True).requires_grad_(True)
        out = net(xg)[:, 0].to(x.dtype)
        # seeding the backward with w_i is what autograd does for the sum sum_i w_i f_i(x)
        (g,) = torch.autograd.grad(out, xg, grad_outputs=torch.full_like(out, w))
        grad = g if grad is None else grad + g
        raw = (w * out.detach()) if raw is None else raw + w * out.detach()
    if grad is None:
        return torch.zeros_like(x)
    r = raw.requires_grad_(True)
    (d,) = torch.autograd.grad(score.outer(r).sum(), r, allow_unused=True)
    if d is None:
        return torch.zeros_like(x)
    return grad * d.to(grad.dtype).view(-1, 1, 1, 1)


def input_gradient(
    score: Callable[[torch.Tensor], torch.Tensor] | SaliencyTarget, x: torch.Tensor, *, max_items: int = MAX_ITEMS_PER_PASS
) -> torch.Tensor:
    """``d score(x)[n] / d x[n]`` for every item of a normalised batch (N, C, H, W).

    ``score`` is a final-score function or a :class:`SaliencyTarget` (its ``score``). The networks
    are in eval mode, so items are independent and the gradient of ``score(x).sum()`` holds each
    item's own gradient: the whole batch goes through in one pass (at most ``max_items`` items
    at a time; 0 = no limit), as fast per image as inference. A :class:`PlainScore` (the
    ensemble) is differentiated one network at a time. Works inside ``torch.inference_mode``.
    """
    x = x.detach()
    if max_items and x.shape[0] > max_items:
        return torch.cat([input_gradient(score, c, max_items=0) for c in x.split(max_items)])
    fmt = torch.preserve_format
    if isinstance(score, SaliencyTarget):
        nets = [n for n, _ in score.plain_parts]
        if nets and all(input_format(n) == torch.channels_last for n in nets):
            fmt = torch.channels_last
        score = score.score
    with torch.inference_mode(False), torch.enable_grad():
        if isinstance(score, PlainScore):
            return _plain_gradient(score, x)
        xg = x.clone(memory_format=fmt).requires_grad_(True)
        (g,) = torch.autograd.grad(score(xg).sum(), xg)
    return g


def gradient_saliency(score: Callable[[torch.Tensor], torch.Tensor] | SaliencyTarget, x: torch.Tensor) -> np.ndarray:
    """``max |grad|`` over channels: (N, H, W) float64 (``score``: as :func:`input_gradient`)."""
    g = input_gradient(score, x)
    return g.abs().amax(dim=1).double().cpu().numpy()


def gradcam(target: SaliencyTarget, x: torch.Tensor) -> np.ndarray:
    """Grad-CAM (N, H, W) of the plain-pass final score; networks must be ``Sequential(body, head)``."""
    h, w = x.shape[-2:]
    x = x.detach()
    with torch.inference_mode(False), torch.enable_grad():
        feats, raw = [], None
        for net, weight in target.plain_parts:
            if not (isinstance(net, nn.Sequential) and len(net) == 2):
                raise TypeError("Grad-CAM needs networks built as Sequential(body, head)")
            with torch.no_grad():  # only d score / d features is needed: no graph through the body
                f = net[0](x.contiguous(memory_format=input_format(net)))
            f.requires_grad_(True)
            feats.append(f)
            part = weight * net[1](f)[:, 0].to(x.dtype)
            raw = part if raw is None else raw + part
        score = target.outer(raw)
        grads = torch.autograd.grad(score.sum(), feats)
        cam = torch.zeros(x.shape[0], 1, h, w, dtype=torch.float64, device=x.device)
        for f, g in zip(feats, grads):
            alpha = g.mean(dim=(2, 3), keepdim=True)
            m = (alpha * f.detach()).sum(dim=1, keepdim=True).double()
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

    def __init__(
        self,
        out_dir: Path,
        models: Sequence[Any],
        *,
        method: str = "gradient",
        deterministic: Any = False,
        names: Any = None,
    ) -> None:
        """``models``: loaded models (each provides ``saliency_target()``); ``names``: the run's
        :class:`~cxr_lung_risk.outputs.base.UniqueNames` (output names never collide)."""
        from .. import __version__
        from ..errors import UsageError
        from ..spec import age_spec

        self.out = Path(out_dir)
        self.method = str(method or "gradient")
        if self.method not in ("gradient", "gradcam"):
            raise UsageError(f"--saliency-method must be gradient or gradcam (got {self.method!r})")
        self.targets = [target_for(s) for s in models]
        if self.method == "gradcam":
            for t in self.targets:
                if not all(isinstance(n, nn.Sequential) and len(n) == 2 for n, _ in t.plain_parts):
                    raise UsageError(
                        f"Grad-CAM needs every network of {t.title} built as body + head (the 'tiny' ensemble "
                        "members are not); use --saliency-method gradient"
                    )
        from .base import UidPolicy
        from .sr import weights_parameters

        self.deterministic = UidPolicy.of(deterministic)
        self.weights_keys = []
        for m in models:
            w = weights_parameters(getattr(m, "weights_identity", None))
            self.weights_keys.append((w["weights"], w.get("weights_sha256", "")))
        self.names = names
        self.version = __version__
        cfg = age_spec().raw.get("saliency", {})
        self.alpha = float(cfg.get("alpha", 0.5))
        self.cmap = str(cfg.get("colormap", "hot"))

    def heatmap(self, target: SaliencyTarget, image_chw: np.ndarray) -> np.ndarray:
        """The [0, 1] map (H, W) of one uint8 crop for one model."""
        return self.heatmaps(target, [image_chw])[0]

    def heatmaps(self, target: SaliencyTarget, images_chw: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """The [0, 1] maps (H, W) of a batch of uint8 3 x H x W crops for one model.

        The batch goes through each network once forward and once backward (items are
        independent; at most :data:`MAX_ITEMS_PER_PASS` per pass), not one image at a time.
        """
        imgs = np.asarray(images_chw, dtype=np.uint8) if isinstance(images_chw, np.ndarray) else None
        if imgs is None or imgs.ndim != 4:
            imgs = np.stack([np.asarray(im, dtype=np.uint8) for im in images_chw]) if len(images_chw) else None
        if imgs is None or len(imgs) == 0:
            return []
        x = normalize(torch.from_numpy(np.ascontiguousarray(imgs)).to(target.device), target.mean, target.std)
        with fp32_math():
            if self.method == "gradcam":
                raw = np.concatenate([gradcam(target, c) for c in x.split(MAX_ITEMS_PER_PASS)])
                return [scale_map(m, 100.0) for m in raw]
            raw = gradient_saliency(target, x)
        return [scale_map(m, 99.0) for m in raw]

    def write_batch(self, prepared: Sequence[Any], rows: Sequence[dict[str, Any]] | None = None) -> list[Sequence[tuple[str, str]]]:
        """Write the overlays of a batch of prepared inputs (maps computed for the whole batch).

        Returns, per input and in order, the ``(kind, path)`` pairs written (kind ``saliency`` for
        the PNG, ``sc`` for the DICOM Secondary Capture; paths relative to the output folder,
        POSIX). Making the maps is one step for the batch: an exception there propagates. An
        input whose own files cannot be written does not stop the others: its entry holds the
        error and raises it when iterated, so a per-input loop records only that input as failed.
        ``rows`` (the scored rows) is accepted for symmetry with the other writers and unused.
        """
        items = list(prepared)
        if not items:
            return []
        maps = [self.heatmaps(t, [p.image for p in items]) for t in self.targets]
        out: list[Sequence[tuple[str, str]]] = []
        for j, p in enumerate(items):
            try:
                out.append(self._write_item(p, [m[j] for m in maps]))
            except Exception as e:  # noqa: BLE001 - handed back per input, see the docstring
                out.append(_FailedItem(e))
        return out

    def _write_item(self, prepared: Any, maps: Sequence[np.ndarray]) -> list[tuple[str, str]]:
        from . import sc
        from .base import open_output, output_path

        names = getattr(self, "names", None)  # a run's UniqueNames, when the writer has one

        def claim(rel: str) -> str:
            return names.claim(rel) if names is not None else rel

        written: list[tuple[str, str]] = []
        for i, (t, heat) in enumerate(zip(self.targets, maps)):
            rgb = blend_heatmap(prepared.image, heat, alpha=self.alpha, cmap=self.cmap)
            rel = claim("saliency/" + saliency_png_name(prepared.file.rel, t.name))
            with open_output(self.out, rel, "wb") as f:
                Image.fromarray(rgb, mode="RGB").save(f, format="PNG")
            written.append(("saliency", rel))
            if prepared.dataset is not None:
                ds = sc.build_secondary_capture(
                    prepared.dataset,
                    rgb,
                    model_title=t.title,
                    method=self.method,
                    software_version=self.version,
                    series_number=9101 + i,
                    weights_key=self.weights_keys[i],
                    deterministic=self.deterministic,
                )
                uid = prepared.uids.get("SOPInstanceUID", "") if getattr(prepared, "uids", None) else ""
                rel = claim("sc/" + sc.sc_filename(uid, t.name))
                sc.write_sc(ds, output_path(self.out, rel))
                written.append(("sc", rel))
        return written

    def write(self, prepared: Any, row: dict[str, Any]) -> list[Path]:
        """Write the overlays of one prepared input; returns the paths written."""
        return [self.out / rel for _, rel in self.write_batch([prepared], [row])[0]]


class _FailedItem(Sequence):
    """:meth:`SaliencyWriter.write_batch`'s entry for an input whose files could not be written:
    iterating (or indexing) raises the error."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __getitem__(self, i):  # type: ignore[override]
        raise self.error

    def __iter__(self):
        raise self.error

    def __len__(self) -> int:
        return 0
