"""CXR-Age: fastai v1 weight layout, calibration, deterministic TTA, end-to-end ``predict --model all``.

Weights are SYNTHETIC (seeded numpy draws) saved the way fastai 1.0.61 + torch 1.5.1 saved
PLCO_Fine_Tuned_120419.pth: legacy (non-zip) torch.save of ``{'model': state_dict, 'opt':
Adam state_dict}`` whose hyper-parameters are numpy 1.x float64 scalars.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from conftest import dciodvfy
import torch
from torch import nn

from cxr_lung_risk.age import AgeModel, CXRAge, build_age_model, calibrate, fastai_v1_zoom
from cxr_lung_risk.registry import ModelOptions, load_model
from cxr_lung_risk.weights import WeightsError

# The published constants, typed from run_model.py / the shared notes (not read from the spec).
SCALE, OFFSET = 8.03342449139388, 63.8723890235948
Q0, Q1, Q2 = -213.77257, 6.75523, -0.03771


def synthetic_age_state(seed: int = 1234) -> "OrderedDict[str, torch.Tensor]":
    """Deterministic, well-conditioned weights with the published keys and shapes."""
    rng = np.random.Generator(np.random.PCG64(seed))
    model = build_age_model()
    sd = OrderedDict()
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(1000, dtype=torch.long)
        elif k.endswith("running_var"):
            sd[k] = torch.from_numpy(rng.uniform(0.5, 1.5, v.shape)).float()
        elif k.endswith("running_mean"):
            sd[k] = torch.from_numpy(rng.uniform(-0.1, 0.1, v.shape)).float()
        elif v.dim() == 1:  # BN gamma/beta, linear biases
            lo, hi = (0.5, 1.0) if k.endswith("weight") else (-0.05, 0.05)
            sd[k] = torch.from_numpy(rng.uniform(lo, hi, v.shape)).float()
        else:
            fan_in = int(np.prod(v.shape[1:]))
            b = np.sqrt(3.0 / fan_in)
            sd[k] = torch.from_numpy(rng.uniform(-b, b, v.shape)).float()
    return sd


def fastai_v1_opt(model: nn.Module) -> dict:
    """torch 1.5 Adam.state_dict() as fastai v1's OptimWrapper leaves it after fit_one_cycle:
    3 layer groups split into (no-BN, BN) param groups, lr/betas numpy.float64, wd 0 (true_wd)."""
    body, head = model[0], model[1]
    groups = [list(body[:6].modules()), list(body[6:].modules()), list(head.modules())]
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    param_groups, state = [], {}
    for gi, mods in enumerate(groups):
        for want_bn in (False, True):
            ps = [p for m in mods if isinstance(m, bn_types) == want_bn for p in m.parameters(recurse=False)]
            ids = [index[id(p)] for p in ps]
            lr = np.float64(1e-3) / np.float64(10.0) ** (2 - gi) * (np.cos(np.pi * 0.999) + 1) / 2
            param_groups.append(
                {"lr": lr, "betas": (np.float64(0.95) - np.float64(0.0), 0.99), "eps": 1e-08, "weight_decay": 0,
                 "amsgrad": False, "params": ids}
            )
            for i, p in zip(ids, ps):
                state[i] = {"step": 4410, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    return {"state": state, "param_groups": param_groups}


def save_fastai_v1(path: Path, sd: "OrderedDict[str, torch.Tensor]", with_opt: bool = True) -> Path:
    model = build_age_model()
    model.load_state_dict(sd)
    obj = {"model": sd, "opt": fastai_v1_opt(model) if with_opt else {}}
    torch.save(obj, path, _use_new_zipfile_serialization=False)  # torch 1.5.1's default format
    data = path.read_bytes()
    head = data[: 4 << 20]
    # numpy 1.18 pickled its scalars as numpy.core.multiarray.scalar (numpy 2: numpy._core)
    if b"numpy._core.multiarray" in head:
        data = head.replace(b"numpy._core.multiarray", b"numpy.core.multiarray") + data[4 << 20 :]
        path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def age_state() -> "OrderedDict[str, torch.Tensor]":
    return synthetic_age_state()


@pytest.fixture(scope="module")
def age_weights(tmp_path_factory, age_state) -> Path:
    return save_fastai_v1(tmp_path_factory.mktemp("age") / "PLCO_Fine_Tuned_120419.pth", age_state)


# ------------------------------------------------------------------------------------ loading
def test_fastai_v1_file_is_legacy_with_numpy_scalars(age_weights):
    data = age_weights.read_bytes()
    assert not data.startswith(b"PK")  # legacy pickle format, not zip
    assert b"numpy.core.multiarray" in data[: 4 << 20]
    # plain weights_only=True without our allow-list refuses it: the allow-list is what loads it
    with pytest.raises(Exception):
        torch.load(age_weights, map_location="cpu", weights_only=True)


def test_loads_strictly_with_published_keys(age_weights, age_state):
    m = CXRAge.load(age_weights, device="cpu")
    got = m.model.state_dict()
    assert list(got) == list(age_state)
    for k, v in age_state.items():
        assert torch.equal(got[k], v), k
    # head layout of run_model.py: indices 2, 4, 6, 8, 10, 11 hold parameters
    heads = sorted({k.split(".")[1] for k in got if k.startswith("1.")}, key=int)
    assert heads == ["2", "4", "6", "8", "10", "11"]
    assert tuple(got["1.4.weight"].shape) == (512, 1024) and tuple(got["1.8.weight"].shape) == (16, 512)
    assert tuple(got["1.11.weight"].shape) == (1, 16) and "1.11.bias" in got


def test_missing_and_unexpected_keys_are_named(tmp_path, age_state):
    sd = OrderedDict(age_state)
    del sd["1.11.bias"]
    torch.save({"model": sd, "opt": {}}, tmp_path / "a.pth")
    with pytest.raises(WeightsError, match=r"1\.11\.bias"):
        CXRAge.load(tmp_path / "a.pth")
    sd = OrderedDict(age_state)
    sd["1.12.weight"] = torch.zeros(1)
    torch.save({"model": sd, "opt": {}}, tmp_path / "b.pth")
    with pytest.raises(WeightsError, match=r"1\.12\.weight"):
        CXRAge.load(tmp_path / "b.pth")
    # a fastai 2 resnet34 head (no biases) is refused
    from cxr_lung_risk import archs

    torch.save({"model": archs.build("resnet34").state_dict(), "opt": {}}, tmp_path / "c.pth")
    with pytest.raises(WeightsError):
        CXRAge.load(tmp_path / "c.pth")


# ------------------------------------------------------------------------------ calibration
def test_calibration_matches_hand_computation():
    for raw in (0.0, 1.0, -0.5, 0.123):
        a = raw * SCALE + OFFSET
        assert calibrate(raw) == pytest.approx(Q1 * a + Q2 * a * a + Q0, rel=1e-12, abs=1e-9)
    # by hand, raw 0: a = 63.87238902, a^2 = 4079.68207912, 6.75523 a = 431.47267848,
    # 0.03771 a^2 = 153.84481120, age = 431.47267848 - 153.84481120 - 213.77257 = 63.85529728
    assert calibrate(0.0) == pytest.approx(63.85529728, abs=1e-6)
    arr = np.array([0.0, 1.0])
    assert np.allclose(calibrate(arr), [calibrate(0.0), calibrate(1.0)])
    assert float(calibrate(torch.tensor([0.0], dtype=torch.float64))[0]) == pytest.approx(calibrate(0.0))


# -------------------------------------------------------------------------------------- TTA
def _bilinear_numpy(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Separable linear interpolation at (clipped) fractional pixel positions, per channel."""
    h, w = img.shape[-2:]
    rows, cols = np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)
    out = np.empty(img.shape[:-2] + (len(rows), len(cols)))
    for c in range(img.shape[0]):
        tmp = np.stack([np.interp(cols, np.arange(w), img[c, r]) for r in range(h)])  # (h, len(cols))
        out[c] = np.stack([np.interp(rows, np.arange(h), tmp[:, j]) for j in range(len(cols))], 1)
    return out


def _zoom_positions(n: int, s: float, pct: int) -> np.ndarray:
    """Where fastai 1.0.61 + torch 1.5 (align_corners=False) sample for output pixels 0..n-1:
    pct 0: k*n/((n-1)s) - 0.5; pct 1: the mirror image from the far edge."""
    k = np.arange(n, dtype=np.float64)
    u0 = k * n / ((n - 1) * s) - 0.5
    return u0 if pct == 0 else (n - 1) - u0[::-1]


def test_zoom_matches_hand_computed_bilinear():
    rng = np.random.default_rng(7)
    img = rng.random((3, 16, 16))
    x = torch.from_numpy(img)[None]
    for r in (0, 1):
        for c in (0, 1):
            got = fastai_v1_zoom(x, 1.35, r, c)[0].numpy()
            want = _bilinear_numpy(img, _zoom_positions(16, 1.35, r), _zoom_positions(16, 1.35, c))
            assert np.allclose(got, want, atol=1e-12), (r, c)
    # top-left corner at zoom 1.35 shows the top-left ~74% of the image
    assert fastai_v1_zoom(x, 1.35, 0, 0)[0, :, 0, 0].numpy() == pytest.approx(img[:, 0, 0])


class _Linear(nn.Module):
    """out = <w, x>: a network whose output is a known linear function of its input."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).sum(dim=(1, 2, 3))[:, None] * 1e-3


def test_tta_blend_matches_hand_computation():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 224, 224))
    img = rng.random((3, 224, 224))
    net = _Linear(torch.from_numpy(w))
    plain = (img * w).sum() * 1e-3
    corners = []
    for r, c in ((0, 0), (1, 0), (0, 1), (1, 1)):
        z = _bilinear_numpy(img, _zoom_positions(224, 1.35, r), _zoom_positions(224, 1.35, c))
        corners.append((z * w).sum() * 1e-3)
    want_raw = 0.4 * plain + 0.6 * np.mean(corners)
    x = torch.from_numpy(img)[None]
    m = CXRAge(net, tta=True)
    assert float(m.raw_output(x)[0]) == pytest.approx(want_raw, rel=1e-9, abs=1e-12)
    a = want_raw * SCALE + OFFSET
    assert float(m.age_output(x)[0]) == pytest.approx(Q0 + Q1 * a + Q2 * a * a, rel=1e-9)
    assert float(CXRAge(net, tta=False).raw_output(x)[0]) == pytest.approx(plain, rel=1e-12)


# --------------------------------------------------------------------------- scorer adapter
def _prepared_dicom(dicom_data: Path, name: str = "RG1_UNCR.dcm"):
    from cxr_lung_risk.dicom_io import discover
    from cxr_lung_risk.pipeline import PrepareOptions, prepare

    (item,) = list(discover([str(dicom_data / name)]))
    p = prepare(item, PrepareOptions())
    assert p.status == "ok", p.reason
    return p


def test_scorer_on_real_dicom(age_weights, dicom_data):
    s = load_model("age", ModelOptions(weights=age_weights, tta=True, device="cpu", precision="bf16"))
    assert isinstance(s, AgeModel) and s.columns == ["CXR_Age"]
    # CXR-Age has no reduced-precision path: it runs, and reports, IEEE float32 and the device used
    assert s.placement.precision == "fp32" and s.algorithm().parameters["device"] == "cpu"
    assert s.algorithm().parameters["precision"] == "fp32"
    p = _prepared_dicom(dicom_data)
    batch = torch.from_numpy(np.stack([p.image, p.image[:, ::-1].copy()]))
    out = s.score(batch)["CXR_Age"]
    assert out.shape == (2,) and np.all(np.isfinite(out)) and out[0] != out[1]
    no_tta = AgeModel(CXRAge(s.model.model, tta=False))
    assert no_tta.score(batch[:1])["CXR_Age"][0] != pytest.approx(out[0], abs=1e-9)
    # the adapter is deterministic and batch-independent
    assert s.score(batch[:1])["CXR_Age"][0] == pytest.approx(out[0], abs=1e-4)
    (m,) = s.measurements({"CXR_Age": float(out[0])})
    assert m.name == "CXR_Age" and m.unit == "a" and m.value == pytest.approx(out[0])


def test_missing_age_weights_is_a_weights_error(tmp_path, monkeypatch):
    from cxr_lung_risk.errors import WeightsError, WeightsNotFoundError

    monkeypatch.setenv("CXR_LUNG_RISK_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError, match="nope.pth"):
        load_model("age", ModelOptions(weights=tmp_path / "nope.pth", device="cpu"))
    with pytest.raises(WeightsNotFoundError, match="fetch-weights --model age"):
        load_model("age", ModelOptions(device="cpu"))


# ------------------------------------------------------------------- end to end (CLI, slow-ish)
def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run([sys.executable, "-m", "cxr_lung_risk.cli", *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_predict_model_all_writes_both_values(tmp_path, dicom_data, synthetic_weights, age_weights):
    import shutil

    from cxr_lung_risk.outputs.sr import read_measurements

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(dicom_data / "RG1_UNCR.dcm", src / "RG1_UNCR.dcm")
    shutil.copy(dicom_data / "RG1_UNCR.dcm", src / "copy_of_RG1_UNCR.dcm")  # same image, same values
    out = tmp_path / "out"
    p = _run_cli(
        "predict", str(src), "--out", str(out), "--model", "all", "--weights", str(synthetic_weights),
        "--age-weights", str(age_weights), "--device", "cpu", "--format", "csv,sr", "--workers", "0",
    )
    assert p.returncode == 0, p.stderr
    from cxr_lung_risk.outputs.tables import RESULTS_CSV

    with open(out / RESULTS_CSV, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for col in ("CXR_Age", "CXR_Lung_Risk"):
        assert float(rows[0][col]) == pytest.approx(float(rows[1][col]), rel=1e-5)
    for r in rows:
        assert np.isfinite(float(r["CXR_Lung_Risk"])) and np.isfinite(float(r["CXR_Age"]))
        sr_path = out / "sr" / f"{r['SOPInstanceUID']}.dcm"
        vals = read_measurements(sr_path)
        lr = [v for k, v in vals.items() if "Lung" in k]
        age = [v for k, v in vals.items() if "Age" in k and "Lung" not in k]
        assert lr and lr[0] == pytest.approx(float(r["CXR_Lung_Risk"]), rel=1e-5)
        assert age and age[0] == pytest.approx(float(r["CXR_Age"]), rel=1e-5)
        errors, _ = dciodvfy(sr_path)
        assert errors == [], errors
