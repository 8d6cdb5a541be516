"""The MHub test data package (tools/mhub_testdata.py) and the comparison of a run with its
reference (tools/mhub_compare.py, MHub's rules: same file tree, numbers within a tolerance,
DICOM by content, not bytes).

The comparison is first shown to catch each kind of difference on real outputs. The zip is then
built with scripts/mhub_local.sh (mhubio 0.0.2) and SYNTHETIC weights, so it is marked
NOT_FOR_UPLOAD; a second run on each workflow's sample must match its reference. The Docker
test (tests/test_docker.py) compares the container's run with a reference made outside it.
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import mhub_compare  # noqa: E402
import mhub_testdata  # noqa: E402

pytestmark = pytest.mark.mhub


@pytest.fixture(scope="module")
def mhub_venv():
    proc = subprocess.run(["bash", str(REPO / "scripts" / "mhub_local.sh"), "--setup-only"], capture_output=True, text=True)
    if proc.returncode == 69:
        pytest.skip("the mhubio venv (.venvs/mhub) cannot be installed: " + proc.stderr[-300:])
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def test_zip(mhub_venv, tmp_path_factory, synthetic_weights) -> Path:
    z = tmp_path_factory.mktemp("mhub_zip") / "test.zip"
    args = ["--out", str(z), "--weights", str(synthetic_weights)]
    assert mhub_testdata.main(args) == 2  # synthetic weights: refused for upload...
    assert not z.exists()
    assert mhub_testdata.main([*args, "--allow-unpublished"]) == 0  # ...accepted for a local test zip
    return z


def test_zip_layout_is_what_mhub_checks(test_zip):
    names = zipfile.ZipFile(test_zip).namelist()
    assert "NOT_FOR_UPLOAD.txt" in names
    for wf in mhub_testdata.workflows():
        for entry in (f"{wf}/", f"{wf}/sample/", f"{wf}/reference/"):
            assert entry in names, entry
        assert [n for n in names if n.startswith(f"{wf}/sample/") and not n.endswith("/")]
        assert [n for n in names if n.startswith(f"{wf}/reference/") and not n.endswith("/")]
    refs = {n for n in names if n.startswith("default/reference/") and not n.endswith("/")}
    cr = pydicom.dcmread(REPO / "src" / "cxr_lung_risk" / "samples" / "chest_cr_RG1_J2KI.dcm", stop_before_pixels=True)
    # the chest CR is scored; the CT in the sample is ignored
    assert sorted(refs) == sorted([f"default/reference/{cr.SeriesInstanceUID}/{f}" for f in
                                   ("cxr_lung_risk.csv", "cxr_lung_risk.json", "report.json", f"sr/{cr.SOPInstanceUID}.dcm")]
                                  + ["default/reference/cxr_lung_risk_cohort.json"])  # + the cohort-wide report (issue 21)


@pytest.mark.parametrize("workflow", mhub_testdata.workflows())
def test_run_on_sample_matches_reference(test_zip, synthetic_weights, tmp_path, workflow):
    with zipfile.ZipFile(test_zip) as zf:
        zf.extractall(tmp_path / "zip")
    sample, ref = tmp_path / "zip" / workflow / "sample", tmp_path / "zip" / workflow / "reference"
    out = tmp_path / "out"
    proc = mhub_testdata.run_workflow(workflow, sample, out, None, str(synthetic_weights))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert mhub_compare.compare_dirs(out, ref) == []
    assert subprocess.run([sys.executable, str(REPO / "tools" / "mhub_compare.py"), str(out), str(ref)],
                          capture_output=True, text=True).returncode == 0


# --------------------------------------------------------------------------- the comparison


@pytest.fixture
def pair(test_zip, tmp_path) -> tuple[Path, Path]:
    """Two copies of the default workflow's real reference outputs."""
    with zipfile.ZipFile(test_zip) as zf:
        zf.extractall(tmp_path / "zip")
    ref = tmp_path / "zip" / "default" / "reference"
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    assert mhub_compare.compare_dirs(out, ref) == []
    return out, ref


def _one(out: Path, pattern: str) -> Path:
    (p,) = list(out.rglob(pattern))
    return p


def test_compare_catches_a_missing_and_an_extra_file(pair):
    out, ref = pair
    _one(out, "report.json").unlink()
    (out / "extra.txt").write_text("x")
    diffs = mhub_compare.compare_dirs(out, ref)
    assert any(d.startswith("missing:") and d.endswith("report.json") for d in diffs)
    assert "unexpected: extra.txt" in diffs


def test_compare_numbers_within_tolerance_only(pair):
    out, ref = pair
    p = _one(out, "report.json")
    report = json.loads(p.read_text())
    report["cxr_lung_risk"] += 1e-9
    p.write_text(json.dumps(report, indent=1))  # other formatting, a tiny change: same content
    assert mhub_compare.compare_dirs(out, ref) == []
    report["cxr_lung_risk"] += 0.01
    p.write_text(json.dumps(report))
    assert [d for d in mhub_compare.compare_dirs(out, ref) if "cxr_lung_risk" in d]

    c = _one(out, "cxr_lung_risk.csv")
    rows = list(csv.reader(c.open(newline="")))
    col = rows[0].index("CXR_Lung_Risk")
    rows[1][col] = str(float(rows[1][col]) + 0.5)
    with c.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert [d for d in mhub_compare.compare_dirs(out, ref) if d.startswith(c.relative_to(out).as_posix())]


def test_compare_dicom_by_content_not_bytes(pair):
    out, ref = pair
    p = _one(out, "*.dcm")
    ds = pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # other bytes, same content
    ds.InstanceCreationTime = "235959"
    ds.save_as(p, enforce_file_format=True)
    assert p.read_bytes() != _one(ref, "*.dcm").read_bytes()
    assert mhub_compare.compare_dirs(out, ref) == []
    ds.SeriesDescription = "changed"
    ds.save_as(p, enforce_file_format=True)
    assert [d for d in mhub_compare.compare_dirs(out, ref) if "SeriesDescription" in d]
