"""Saliency: it is the input gradient of the final score; overlays; the Secondary Capture validates."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import dciodvfy
import torch
from PIL import Image
from torch import nn

from cxr_lung_risk.age import AgeScorer, CXRAge
from cxr_lung_risk.engine import LungRiskEnsemble
from cxr_lung_risk.outputs.sc import build_secondary_capture, sc_filename, write_sc
from cxr_lung_risk.saliency import (
    SaliencyWriter,
    blend_heatmap,
    gradcam,
    gradient_saliency,
    hot_lut,
    input_gradient,
    saliency_png_name,
    target_for,
)
from cxr_lung_risk.spec import lung_risk_spec


def _small_net(seed: int) -> nn.Sequential:
    """A small fastai-shaped Sequential(body, head) in float64 (smooth: tanh, avg pooling)."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(3, 4, 5, stride=4, padding=2), nn.Tanh(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Tanh())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 1))
    return nn.Sequential(body, head).double().eval()


def _fd_check(score, x: torch.Tensor, grad: torch.Tensor, n: int = 12, eps: float = 1e-3) -> None:
    rng = np.random.default_rng(0)
    for _ in range(n):
        c, i, j = int(rng.integers(3)), int(rng.integers(x.shape[2])), int(rng.integers(x.shape[3]))
        xp, xm = x.clone(), x.clone()
        xp[0, c, i, j] += eps
        xm[0, c, i, j] -= eps
        with torch.no_grad():
            fd = (score(xp)[0] - score(xm)[0]).item() / (2 * eps)
        assert grad[0, c, i, j].item() == pytest.approx(fd, rel=1e-4, abs=1e-10), (c, i, j)


def test_age_saliency_is_gradient_of_calibrated_tta_score():
    m = CXRAge(_small_net(1), tta=True)
    target = target_for(AgeScorer(m))
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 224, 224)))
    g = input_gradient(target.score, x)
    _fd_check(target.score, x, g, n=5)
    sal = gradient_saliency(target.score, x)
    assert sal.shape == (1, 224, 224)
    assert np.allclose(sal[0], g[0].abs().amax(0).numpy())


def test_ensemble_saliency_is_gradient_of_lasso_combination():
    spec = lung_risk_spec()
    members = spec.active_members()[:3]
    nets = [_small_net(10 + i) for i in range(3)]
    ens = LungRiskEnsemble(spec, members, nets, torch.device("cpu"))

    class _S:  # what predict's LungRiskScorer exposes
        ensemble = ens

    target = target_for(_S())
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((1, 3, 224, 224)))
    with torch.no_grad():
        want = sum(m.weight * n(x)[0, 0].item() for m, n in zip(members, nets)) + spec.intercept
        assert target.score(x)[0].item() == pytest.approx(want, rel=1e-12)
    g = input_gradient(target.score, x)
    _fd_check(target.score, x, g)


def test_gradcam_is_relu_of_weighted_feature_maps():
    net = _small_net(3)
    m = CXRAge(net, tta=False)
    target = target_for(AgeScorer(m))
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((1, 3, 224, 224)))
    cam = gradcam(target, x)
    # by hand: features A (1,6,28,28); d age / d A = calibrate'(raw) * d raw / d A
    A = net[0](x).detach().requires_grad_(True)
    age = target.outer(net[1](A)[:, 0])
    (gA,) = torch.autograd.grad(age.sum(), A)
    small = (gA.mean((2, 3), keepdim=True) * A).sum(1, keepdim=True)
    want = torch.nn.functional.interpolate(small, size=(224, 224), mode="bilinear", align_corners=False).clamp_min(0)
    assert np.allclose(cam[0], want[0, 0].detach().numpy())


def test_hot_colormap_matches_matplotlib_definition():
    lut = hot_lut()
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    # matplotlib 'hot': red ramps 0.0416 -> 1 on [0, 0.365079], green 0 -> 1 on [0.365079, 0.746032],
    # blue 0 -> 1 on [0.746032, 1]; entries are np.uint8(value * 255) (truncation).
    assert tuple(lut[0]) == (10, 0, 0)  # 0.0416 * 255 = 10.6
    assert tuple(lut[255]) == (255, 255, 255)
    # index 50: red = 0.0416 + 0.9584 * 50 / (0.365079 * 255) = 0.5563 -> 141
    assert tuple(lut[50]) == (141, 0, 0)
    # index 150: green = (150 - 93.095) / (190.238 - 93.095) = 0.5858 -> 149
    assert tuple(lut[150]) == (255, 149, 0)
    # index 220: blue = (220 - 190.238) / (255 - 190.238) = 0.4596 -> 117
    assert tuple(lut[220]) == (255, 255, 117)


def test_blend_is_pil_blend_at_half():
    img = np.zeros((3, 4, 4), np.uint8)
    img[:] = 100
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    out = blend_heatmap(img, heat, alpha=0.5)
    # PIL.Image.blend: 100 + 0.5 * (lut - 100), truncated
    assert tuple(out[0, 0]) == (177, 177, 177)  # white: 100 + 77.5
    assert tuple(out[1, 1]) == (55, 50, 50)  # lut[0] = (10, 0, 0): 100 - 45, 100 - 50


def test_png_names():
    assert saliency_png_name("a/b/IMG1.dcm", "cxr-age") == "a/b/IMG1.cxr-age.png"
    assert saliency_png_name("A.png", "cxr-lung-risk") == "A.cxr-lung-risk.png"
    assert saliency_png_name("a/1.2.3", "cxr-age") == "a/1.2.3.cxr-age.png"
    assert sc_filename("1.2.3", "cxr-age") == "1.2.3_cxr-age.dcm"
    assert sc_filename("../evil", "x").endswith("_x.dcm") and "/" not in sc_filename("../evil", "x")


# ------------------------------------------------------------------------ Secondary Capture
@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCI.dcm"])
def test_secondary_capture_validates_and_copies_source(tmp_path, dicom_data, name):
    src = pydicom.dcmread(dicom_data / name, stop_before_pixels=True)
    rgb = np.random.default_rng(5).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    ds = build_secondary_capture(src, rgb, model_title="CXR-Age", method="gradient", software_version="9.9")
    path = write_sc(ds, tmp_path / "sc.dcm")
    errors, _ = dciodvfy(path)
    assert errors == [], errors
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert list(back.ImageType) == ["DERIVED", "SECONDARY"]
    assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
    assert np.array_equal(back.pixel_array, rgb)
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDescription", "AccessionNumber", "BodyPartExamined", "Laterality"):
        if kw in src:
            assert back.get(kw) == src.get(kw), kw
    assert back.SeriesInstanceUID != src.SeriesInstanceUID and back.SOPInstanceUID != src.SOPInstanceUID
    ref = back.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID and ref.ReferencedSOPClassUID == src.SOPClassUID
    assert "saliency" in back.SeriesDescription.lower() and "CXR-Age" in back.SeriesDescription
    assert "gradient" in back.DerivationDescription
    assert back.DerivationCodeSequence[0].CodeValue == "130404"


def test_secondary_capture_gradcam_and_deterministic(tmp_path, dicom_data):
    src = pydicom.dcmread(dicom_data / "RG1_UNCR.dcm", stop_before_pixels=True)
    rgb = np.zeros((224, 224, 3), np.uint8)
    a = build_secondary_capture(src, rgb, model_title="CXR-Lung-Risk", method="gradcam", deterministic=True)
    b = build_secondary_capture(src, rgb, model_title="CXR-Lung-Risk", method="gradcam", deterministic=True)
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert "Grad-CAM" in a.SeriesDescription and a.DerivationCodeSequence[0].CodeValue == "130403"
    assert dciodvfy(write_sc(a, tmp_path / "a.dcm"))[0] == []
    with pytest.raises(ValueError):
        build_secondary_capture(src, rgb[..., 0], model_title="x")


# ------------------------------------------------------------------------- writer on real input
def test_saliency_writer_on_real_dicom(tmp_path, dicom_data):
    from cxr_lung_risk.dicom_io import discover
    from cxr_lung_risk.pipeline import PrepareOptions, prepare

    (item,) = list(discover([str(dicom_data / "RG1_UNCR.dcm")]))
    p = prepare(item, PrepareOptions())
    assert p.status == "ok"
    scorer = AgeScorer(CXRAge(_small_net(7).float(), tta=True))
    w = SaliencyWriter(tmp_path, [scorer], argparse.Namespace(deterministic=False))
    paths = w.write(p, {"CXR_Age": 50.0})
    png, dcm = paths
    assert png == tmp_path / "saliency" / saliency_png_name(p.file.rel, "cxr-age")
    im = np.asarray(Image.open(png))
    assert im.shape == (224, 224, 3)
    # the overlay is half the gray crop plus half a colour: never darker than half the crop
    assert np.all(im.astype(int) >= (p.image.transpose(1, 2, 0).astype(int) // 2) - 1)
    assert dcm.parent == tmp_path / "sc" and dciodvfy(dcm)[0] == []
    assert np.array_equal(pydicom.dcmread(dcm).pixel_array, im)


def test_gradcam_refused_for_tiny_members():
    from cxr_lung_risk import archs
    from cxr_lung_risk.errors import UsageError

    spec = lung_risk_spec()
    tiny = [m for m in spec.active_members() if m.architecture == "tiny"][:1]
    ens = LungRiskEnsemble(spec, tiny, [archs.build("tiny").eval()], torch.device("cpu"))

    class _S:
        ensemble = ens

    with pytest.raises(UsageError, match="gradient"):
        SaliencyWriter(Path("."), [_S()], argparse.Namespace(saliency_method="gradcam"))
    SaliencyWriter(Path("."), [_S()], argparse.Namespace(saliency_method="gradient"))
