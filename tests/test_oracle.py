"""Live oracle: run the ORIGINAL fastai pipeline (tools/oracle/run_oracle.py) and compare.

Needs the oracle venv (tools/oracle/setup_venv.sh; default <repo>/.venvs/oracle, or set
$CXR_ORACLE_VENV). The SYNTHETIC weights are regenerated from the committed recipe, saved by
fastai's own ``learn.save`` inside the oracle, and our engine then loads those fastai-written files.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxr_lung_risk.engine import LungRiskEnsemble

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_engine_fixture import compare, engine_batch, fixture_recipe, read_oracle_csv, resolve, run_engine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUBSET = ["A.png", "B.png", "C.png", "D.png", "E.png",
          "B_237x260.png", "C_16bit_240x250.png", "D_509x509.png", "B_256x256.jpg", "A_rgb_300x280.png"]


def _oracle_python() -> Path:
    venv = Path(os.environ.get("CXR_ORACLE_VENV", REPO / ".venvs" / "oracle"))
    py = venv / "bin" / "python"
    if not py.exists():
        pytest.skip(f"oracle venv not found at {venv} (run tools/oracle/setup_venv.sh or set CXR_ORACLE_VENV)")
    r = subprocess.run([str(py), "-c", "import fastai, pretrainedmodels"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"oracle venv at {venv} cannot import fastai/pretrainedmodels (run tools/oracle/setup_venv.sh)")
    return py


@pytest.mark.oracle
def test_live_oracle_matches_engine(tmp_path, reference_dir, synthetic_weights, request):
    markexpr = request.config.getoption("-m") or ""
    if "oracle" not in markexpr and "CXR_ORACLE_VENV" not in os.environ:
        pytest.skip("live oracle (about 10 min) not selected: run pytest -m oracle, or set CXR_ORACLE_VENV")
    py = _oracle_python()
    rec = fixture_recipe()
    rows = [r for r in rec["images"] if r["name"] in SUBSET]
    assert len(rows) == len(SUBSET)
    weights = synthetic_weights  # the session's files (conftest): same recipe, same BN statistics
    listing = tmp_path / "images.json"
    listing.write_text(json.dumps([{"name": r["name"], "path": str(resolve(r["oracle"], reference_dir))} for r in rows]))
    work, out = tmp_path / "work", tmp_path / "oracle.csv"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(
        [str(py), str(REPO / "tools" / "oracle" / "run_oracle.py"), "--weights", str(weights), "--images", str(listing),
         "--work", str(work), "--out", str(out)],
        capture_output=True, text=True, timeout=1800, env=env,
    )
    assert r.returncode == 0, f"oracle failed: {r.stderr[-2000:]}"
    names, oracle_per, oracle_score = read_oracle_csv(out)
    assert names == [r["name"] for r in rows]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    # our engine reads the files fastai itself saved ({'model','opt'} for cnn learners, bare for Tiny)
    ens = LungRiskEnsemble.load(work / "models", all_members=True, device="cpu")
    scores, per = run_engine(ens, engine_batch(rows, reference_dir))
    diffs = compare(names, oracle_per, oracle_score, ens.member_names, per, scores)
    print("max abs diff vs live oracle:", json.dumps(diffs))
