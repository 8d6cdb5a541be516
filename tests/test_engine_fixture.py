"""Our pure-PyTorch engine against the ORIGINAL fastai pipeline (the oracle), on SYNTHETIC weights.

The expected numbers in tests/data/oracle/oracle_outputs.csv were produced by
tools/oracle/run_oracle.py -- the authors' fastai 2.8 + pretrainedmodels code path, in its own
venv -- on synthetic, well-conditioned weights (cxr_lung_risk.synthetic; recipe, seeds and
calibrated BatchNorm statistics committed next to it). Here the weights are regenerated from the
recipe, written as member files, loaded through ``LungRiskEnsemble.load`` and run on the same
images through our transforms. No fastai needed. The weights are NOT the published model.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_lung_risk import archs
from cxr_lung_risk.engine import LungRiskEnsemble
from cxr_lung_risk.spec import lung_risk_spec
from cxr_lung_risk.transforms import raster_batch
from cxr_lung_risk.weights import load_into, load_state_dict_file
from conftest import fixture_bn_stats, fixture_recipe  # noqa: F401 (re-exported for test_oracle)

FIX = Path(__file__).resolve().parent / "data" / "oracle"
MEMBER_TOL = 1e-4  # raw member output
SCORE_TOL = 1e-3  # years
BATCH = 8


def resolve(rel: str, reference: Path) -> Path:
    """A recipe.json image path: 'reference:<rel>' is under tests/data/reference, else under FIX."""
    return reference / rel[len("reference:") :] if rel.startswith("reference:") else FIX / rel


def engine_batch(rows: list[dict], reference: Path) -> torch.Tensor:
    """Our preprocessing: open_raster -> center_crop_resize -> to_uint8_chw."""
    return raster_batch([resolve(r["engine"], reference) for r in rows])


def run_engine(ens: LungRiskEnsemble, batch_u8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    scores, per = [], []
    for i in range(0, batch_u8.shape[0], BATCH):
        r = ens.predict_uint8(batch_u8[i : i + BATCH])
        scores.append(r.scores)
        per.append(r.per_member)
    return np.concatenate(scores), np.concatenate(per)


def read_oracle_csv(path: Path) -> tuple[list[str], dict[str, np.ndarray], np.ndarray | None]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = [r["File"] for r in rows]
    cols = [c for c in rows[0] if c not in ("File", "CXR_Lung_Risk")]
    per = {c: np.array([float(r[c]) for r in rows]) for c in cols}
    score = np.array([float(r["CXR_Lung_Risk"]) for r in rows]) if "CXR_Lung_Risk" in rows[0] else None
    return names, per, score


def compare(names, oracle_per, oracle_score, ens_names, per, scores) -> dict[str, float]:
    """Assert the tolerances; return the max abs diff per member (and 'score')."""
    diffs: dict[str, float] = {}
    for j, n in enumerate(ens_names):
        diffs[n] = float(np.max(np.abs(per[:, j] - oracle_per[n])))
    bad = {n: d for n, d in diffs.items() if not d <= MEMBER_TOL}
    assert not bad, f"members differ from the oracle by more than {MEMBER_TOL}: {bad}"
    if oracle_score is not None:
        diffs["score"] = float(np.max(np.abs(scores - oracle_score)))
        assert diffs["score"] <= SCORE_TOL, f"score differs from the oracle by {diffs['score']} years"
    return diffs


@pytest.fixture(scope="module")
def synthetic_dir(synthetic_weights_and_hashes):
    """The 20 SYNTHETIC member files, regenerated from the committed recipe (+ their hashes);
    made once per session in conftest.py."""
    return synthetic_weights_and_hashes


@pytest.fixture(scope="module")
def fixture_rows(reference_dir):
    rows = fixture_recipe()["images"]
    assert len(rows) >= 25
    return rows


def test_synthetic_weights_regenerate_bit_identically(synthetic_dir):
    d, hashes = synthetic_dir
    expected = fixture_recipe()["state_dict_sha256"]
    assert hashes == expected
    assert "NOT THE PUBLISHED" in (d / "SYNTHETIC_WEIGHTS_README.txt").read_text()


def test_default_ensemble_matches_oracle(synthetic_dir, fixture_rows, reference_dir):
    """The default load (non-zero LASSO weights): every member and the score, on every fixture image."""
    d, _ = synthetic_dir
    spec = lung_risk_spec()
    names, oracle_per, oracle_score = read_oracle_csv(FIX / "oracle_outputs.csv")
    assert names == [r["name"] for r in fixture_rows]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ens = LungRiskEnsemble.load(d, device="cpu")
    assert ens.member_names == [m.name for m in spec.members if m.weight != 0.0]
    scores, per = run_engine(ens, engine_batch(fixture_rows, reference_dir))
    diffs = compare(names, oracle_per, oracle_score, ens.member_names, per, scores)
    # the synthetic members are not degenerate: outputs vary between images
    assert all(np.std(oracle_per[n]) > 0.02 for n in oracle_per)
    print("max abs diff vs oracle:", json.dumps(diffs))


def test_all_members_match_oracle(synthetic_dir, fixture_rows, reference_dir):
    """``all_members=True``: all 20 members (zero-weight ones too) on a subset of the images."""
    d, _ = synthetic_dir
    names, oracle_per, oracle_score = read_oracle_csv(FIX / "oracle_outputs.csv")
    ens = LungRiskEnsemble.load(d, all_members=True, device="cpu")
    assert len(ens.member_names) == 20
    subset = ["A.png", "C_16bit_240x250.png", "B_256x256.jpg", "A_97x131.png", "D_509x509.png", "im689_RG3_UNCR.png"]
    sel = [names.index(n) for n in subset]
    scores, per = run_engine(ens, engine_batch([fixture_rows[i] for i in sel], reference_dir))
    diffs = compare([names[i] for i in sel], {k: v[sel] for k, v in oracle_per.items()}, oracle_score[sel], ens.member_names, per, scores)
    print("max abs diff vs oracle (all members):", json.dumps(diffs))


def test_real_fastai_saved_container_loads_strictly():
    """A file written by fastai's own learn.save (with Adam state, fastcore L, numpy scalars)."""
    sd = load_state_dict_file(FIX / "fastai_toy_learner.pth")
    with np.load(FIX / "fastai_toy_learner_expected.npz") as z:
        expected = {k: z[k] for k in z.files}
    assert list(sd) == list(expected)
    for k, v in expected.items():
        assert sd[k].dtype == torch.from_numpy(v).dtype and np.array_equal(sd[k].numpy(), v), k
    # the same network in plain torch, loaded strictly
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), archs.AdaptiveConcatPool2d(), archs.Flatten(),
        torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 1),
    )
    load_into(model, sd, "fastai_toy_learner.pth")
    # the file really is fastai's {'model', 'opt'} container with fastcore objects in 'opt'
    import zipfile

    with zipfile.ZipFile(FIX / "fastai_toy_learner.pth") as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"fastcore.foundation" in pkl and b"opt" in pkl
