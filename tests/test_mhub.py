"""The MHub workflow run by the real mhubio 0.0.2 runner (its own venv, pydicom < 3) on real DICOM.

``scripts/mhub_local.sh`` creates/reuses ``.venvs/mhub`` and runs ``config/default.yml``:
DicomImporter (dicomsort) -> FileFilter (CR/DX) -> CxrLungRiskRunner (our CLI, once) ->
DataOrganizer -> CxrLungRiskStatus. Weights are SYNTHETIC (same layout as the published ones);
the values mean nothing, the test checks the plumbing, the refusals and the error surfacing.
Where the mhubio venv cannot be installed (exit status 69: no PyPI), these tests skip.
The script's own mechanics (cleanup, signals, CLI lookup, manifest) are tested with stand-ins
in test_scripts.py.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from conftest import REPO, link_files

pytestmark = pytest.mark.mhub

SCRIPT = REPO / "scripts" / "mhub_local.sh"
VENV = REPO / ".venvs" / "mhub"


def _cli() -> str:
    repo_venv = REPO / ".venv" / "bin" / "cxr-lung-risk"
    cli = os.environ.get("CXR_LUNG_RISK_CLI") or shutil.which("cxr-lung-risk") or (str(repo_venv) if repo_venv.is_file() else None)
    if not cli:
        pytest.fail("the cxr-lung-risk CLI is not installed (bash scripts/install.sh, or pip install -e .)")
    return cli


def _run(*args: str, timeout: int = 600, tmpdir: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, CXR_LUNG_RISK_CLI=_cli())
    if tmpdir is not None:  # where the script makes its throw-away MHub tree
        env["TMPDIR"] = str(tmpdir)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def mhub_venv() -> Path:
    proc = _run("--setup-only")
    if proc.returncode == 69:  # mhubio 0.0.2 or its requirements cannot be installed here
        pytest.skip("the mhubio venv (.venvs/mhub) cannot be installed: " + proc.stderr.strip()[-500:])
    assert proc.returncode == 0, proc.stderr
    # the runner's own venv really has mhubio 0.0.2 and a pydicom 2.x
    out = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", "import importlib.metadata as m, pydicom; "
         "print(m.version('mhubio'), pydicom.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out[0] == "0.0.2" and int(out[1].split(".")[0]) < 3, out
    return VENV


@pytest.fixture(scope="module")
def weights(tmp_path_factory, synthetic_weights) -> Path:
    """A folder holding only the 13 members with a non-zero LASSO weight: links to the session's
    synthetic member files (conftest), not copies."""
    from cxr_lung_risk.spec import lung_risk_spec

    spec = lung_risk_spec()
    active = [m.file for m in spec.members if m.weight != 0.0]
    return link_files(synthetic_weights, tmp_path_factory.mktemp("synthetic_weights_active"), active)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, dicom_data) -> dict[str, Path]:
    """A chest CR plus CT, MR and US files in one flat input folder, as a user would drop them."""
    d = tmp_path_factory.mktemp("mhub_in")
    files = {
        "cr": dicom_data / "RG1_UNCR.dcm",
        "ct": Path(get_testdata_file("CT_small.dcm")),
        "mr": Path(get_testdata_file("MR_small.dcm")),
        "us": dicom_data / "US1_UNCR.dcm",
    }
    for src in files.values():
        shutil.copyfile(src, d / src.name)
    return {"dir": d, **files}


def _sr_numeric_values(ds: pydicom.Dataset) -> list[float]:
    vals = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "NUM" and "MeasuredValueSequence" in item:
            vals.append(float(item.MeasuredValueSequence[0].NumericValue))
        vals.extend(_sr_numeric_values(item))
    return vals


def _referenced_sops(ds: pydicom.Dataset) -> set[str]:
    refs = set()
    for elem in ds.iterall():
        if elem.keyword == "ReferencedSOPInstanceUID":
            refs.add(str(elem.value))
    return refs


def test_default_workflow_scores_the_chest_cr_and_refuses_ct_mr_us(mhub_venv, weights, inputs, tmp_path):
    out = tmp_path / "out"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = _run("--input", str(inputs["dir"]), "--output", str(out), "--weights", str(weights), "--device", "cpu", tmpdir=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (out / "cxr_lung_risk_errors.txt").exists(), proc.stderr
    assert list(tmp.iterdir()) == []  # the throw-away tree (with dicomsort's copy of the input) is gone

    uid = {k: pydicom.dcmread(inputs[k], stop_before_pixels=True) for k in ("cr", "ct", "mr", "us")}
    cr = uid["cr"]
    # one output folder, named after the chest CR's series (dicomsort instance id); none for CT/MR/US;
    # plus the CLI's manifest (and its per-input records, when the CLI writes them)
    assert sorted(p.name for p in out.iterdir() if p.name != "records.jsonl") == [cr.SeriesInstanceUID, "cxr_lung_risk_cohort.json", "manifest.csv"]
    sorted_name = f"sorted_data/{cr.SeriesInstanceUID}/dicom/{cr.SOPInstanceUID}.dcm"  # under mhubio's data folder
    with open(out / "manifest.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{"File": sorted_name, "status": "ok", "reason": ""}]
    if (out / "records.jsonl").exists():
        recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line.strip()]
        assert len(recs) == 1 and recs[0].get("status") == "ok", recs
        assert all(recs[0][k] == sorted_name for k in ("file", "File", "input") if k in recs[0]), recs
    inst = out / cr.SeriesInstanceUID
    assert sorted(p.relative_to(inst).as_posix() for p in inst.rglob("*") if p.is_file()) == sorted(
        ["cxr_lung_risk.csv", "cxr_lung_risk.json", "report.json", f"sr/{cr.SOPInstanceUID}.dcm"]
    )
    for k in ("ct", "mr", "us"):
        assert not list(out.rglob(f"*{uid[k].SOPInstanceUID}*")), k
        # why it was left out, on the console, named by the user's file
        assert f"cxr-lung-risk: {inputs[k].name}: skipped: modality {uid[k].Modality}, not a radiograph (CR or DX)" in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert f"cxr-lung-risk: {inputs['cr'].name}: skipped" not in proc.stderr

    with open(inst / "cxr_lung_risk.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    row = rows[0]
    assert (row["StudyInstanceUID"], row["SeriesInstanceUID"], row["SOPInstanceUID"]) == (
        cr.StudyInstanceUID, cr.SeriesInstanceUID, cr.SOPInstanceUID)
    assert row["File"] == inputs["cr"].name  # the user's file, relative to the input folder (not the sorted copy)
    value = float(row["CXR_Lung_Risk"])
    assert math.isfinite(value)

    js = json.loads((inst / "cxr_lung_risk.json").read_text())
    assert len(js) == 1 and js[0]["SOPInstanceUID"] == cr.SOPInstanceUID
    assert js[0]["CXR_Lung_Risk"] == value  # CSV text and JSON number are the same double
    # mhubio's ReportExporter: the ValueOutput and its metadata
    report = json.loads((inst / "report.json").read_text())
    assert report["cxr_lung_risk"] == value and report["unit"] == "a"
    assert report["description"].startswith("CXR-Lung-Risk: lung-disease mortality risk") and "in years" in report["description"]
    assert report["series_instance_uid"] == cr.SeriesInstanceUID
    # the risk-group class output beside the value, and the patient (issue 21)
    assert report["cxr_lung_risk_group"] == row["CXR_Lung_Risk_Group"] in ("< 65", "65 to < 75", ">= 75")
    assert report["patient_id"] == cr.PatientID
    # the cohort-wide global report: one entry per scored instance
    cohort = json.loads((out / "cxr_lung_risk_cohort.json").read_text())
    assert cohort == [{"patient_id": cr.PatientID, "series_instance_uid": cr.SeriesInstanceUID, "cxr_lung_risk": value, "unit": "a",
                       "cxr_lung_risk_group": row["CXR_Lung_Risk_Group"]}]

    sr = pydicom.dcmread(inst / "sr" / f"{cr.SOPInstanceUID}.dcm")
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == cr.StudyInstanceUID
    assert cr.SOPInstanceUID in _referenced_sops(sr)
    nums = _sr_numeric_values(sr)
    assert nums and any(math.isclose(v, value, rel_tol=1e-9, abs_tol=1e-9) for v in nums), (nums, value)


def test_no_radiograph_is_not_a_silent_success(mhub_venv, weights, inputs, tmp_path):
    """CT, MR and US only: nothing to score is exit status 1 and one sentence (console and error
    file) saying what was found, as the CLI does; no result files."""
    src = tmp_path / "in"
    src.mkdir()
    for k in ("ct", "mr", "us"):
        shutil.copyfile(inputs[k], src / inputs[k].name)
    out = tmp_path / "out"
    proc = _run("--input", str(src), "--output", str(out), "--weights", str(weights), "--device", "cpu")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == ["cxr_lung_risk_errors.txt"]
    err = (out / "cxr_lung_risk_errors.txt").read_text().splitlines()
    assert len(err) == 1 and err[0].startswith("nothing scored: 3 file(s)"), err
    for kind in ("1 CT", "1 MR", "1 US", "none of them a DICOM radiograph"):
        assert kind in err[0], err
    assert f"cxr-lung-risk: {err[0]}" in proc.stderr.splitlines()


def test_empty_input_folder_is_not_a_silent_success(mhub_venv, weights, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    out = tmp_path / "out"
    proc = _run("--input", str(src), "--output", str(out), "--weights", str(weights), "--device", "cpu")
    assert proc.returncode == 1, proc.stderr[-3000:]
    sentence = f"nothing scored: the input folder {src} is empty"
    assert (out / "cxr_lung_risk_errors.txt").read_text() == sentence + "\n"
    assert f"cxr-lung-risk: {sentence}" in proc.stderr.splitlines()


def test_non_chest_only_is_not_a_silent_success(mhub_venv, weights, inputs, tmp_path):
    """A radiograph of the hand: skipped on purpose, so nothing scored: exit status 1, its reason
    on the console and in the sentence, named by the user's file."""
    src = tmp_path / "in" / "site"
    src.mkdir(parents=True)
    ds = pydicom.dcmread(inputs["cr"])
    ds.BodyPartExamined = "HAND"
    ds.save_as(src / "hand.dcm")
    out = tmp_path / "out"
    proc = _run("--input", str(tmp_path / "in"), "--output", str(out), "--weights", str(weights), "--device", "cpu")
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = (out / "cxr_lung_risk_errors.txt").read_text().splitlines()
    assert len(err) == 1 and err[0].startswith("nothing scored: 1 file(s)") and "1 CR" in err[0], err
    assert "site/hand.dcm: " in err[0] and "HAND" in err[0], err
    assert any(line.startswith("cxr-lung-risk: site/hand.dcm: skipped: ") and "HAND" in line for line in proc.stderr.splitlines()), proc.stderr
    assert ds.SOPInstanceUID not in proc.stderr  # named by the user's file, not the sorted copy
    assert not list(out.rglob("*.csv")) or [p.name for p in out.rglob("*.csv")] == ["manifest.csv"]


def test_broken_run_is_visibly_a_failure(mhub_venv, inputs, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "no_weights_here"
    proc = _run("--input", str(inputs["dir"]), "--output", str(out), "--weights", str(missing), "--device", "cpu")
    # mhubio itself would exit 0: CxrLungRiskStatus turns the runner's errors into exit status 1
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = (out / "cxr_lung_risk_errors.txt").read_text()
    cr = pydicom.dcmread(inputs["cr"], stop_before_pixels=True)
    assert cr.SeriesInstanceUID in err and str(missing) in err
    # named by the user's file, reason printed on the console as well; no traceback
    assert [line.split(":", 1)[0] for line in err.splitlines()] == [inputs["cr"].name], err
    assert any(line.startswith(f"cxr-lung-risk: {inputs['cr'].name}: failed: ") and str(missing) in line
               for line in proc.stderr.splitlines()), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not [p for p in out.rglob("*.csv") if p.name != "manifest.csv"] and not list(out.rglob("*.dcm"))
    assert not list(out.rglob("report.json"))  # no report for an instance that was not scored


def test_png_workflow(mhub_venv, weights, sample_pngs, tmp_path):
    src = tmp_path / "in" / "site1"
    src.mkdir(parents=True)
    shutil.copyfile(sample_pngs[0], src / sample_pngs[0].name)
    out = tmp_path / "out"
    proc = _run("--workflow", "png", "--input", str(tmp_path / "in"), "--output", str(out),
                "--weights", str(weights), "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sid = f"site1__{sample_pngs[0].stem}"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "records.jsonl") == [
        "manifest.csv", f"{sid}/cxr_lung_risk.csv", f"{sid}/cxr_lung_risk.json", f"{sid}/report.json"]
    with open(out / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    assert manifest == [{"File": f"imported_instances/{sid}/{sample_pngs[0].name}", "status": "ok", "reason": ""}]
    with open(out / sid / "cxr_lung_risk.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    js = json.loads((out / sid / "cxr_lung_risk.json").read_text())
    assert [r["File"] for r in rows] == [f"site1/{sample_pngs[0].name}"] == [r["File"] for r in js]  # as in the input folder
    assert math.isfinite(float(rows[0]["CXR_Lung_Risk"])) and float(rows[0]["CXR_Lung_Risk"]) == js[0]["CXR_Lung_Risk"]


def test_repeated_and_malformed_sop_uids_are_mapped_from_the_records(mhub_venv, weights, inputs, tmp_path):
    """Two series holding the same SOPInstanceUID, and one with a malformed SOPInstanceUID: the
    runner takes the SR paths the CLI recorded (records.jsonl), so every radiograph gets its own
    SR and no instance is reported as failed ("no SR written")."""
    src = tmp_path / "in"
    src.mkdir()
    base = pydicom.dcmread(inputs["cr"])
    made = []
    for k, sop in enumerate([base.SOPInstanceUID, base.SOPInstanceUID, "1.2.826.0.1.3680043.8.498.0123.abc"]):
        ds = pydicom.dcmread(inputs["cr"])
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.77{k}"
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.save_as(src / f"cr{k}.dcm")
        made.append(ds)
    out = tmp_path / "out"
    proc = _run("--input", str(src), "--output", str(out), "--weights", str(weights), "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (out / "cxr_lung_risk_errors.txt").exists()
    srs = []
    for ds in made:
        inst = out / ds.SeriesInstanceUID
        found = sorted((inst / "sr").glob("*.dcm"))
        assert len(found) == 1, (ds.SeriesInstanceUID, sorted(p.name for p in out.rglob("*")))
        sr = pydicom.dcmread(found[0])
        assert sr.Modality == "SR" and sr.StudyInstanceUID == ds.StudyInstanceUID
        srs.append(sr)
        assert json.loads((inst / "report.json").read_text())["cxr_lung_risk"] == json.loads((inst / "cxr_lung_risk.json").read_text())[0]["CXR_Lung_Risk"]
    assert len({sr.SOPInstanceUID for sr in srs}) == 3  # three distinct SR documents


def test_scores_equal_the_clis_on_the_same_folder_whatever_order_mhubio_lists_the_series(mhub_venv, weights, dicom_data, tmp_path):
    """A score's last float32 bits depend on an image's place in its batch (README, Outputs). The
    runner stages the series in the order of the user's file names, so the module batches as
    ``cxr-lung-risk predict`` does on the same folder and gives the same doubles, bit for bit. The
    files are named against the order of their series UIDs (the order mhubio's sorted tree lists
    them in); before the fix the container's CR differed from the CLI's by 1.2e-6 years."""
    src = tmp_path / "in"
    src.mkdir()
    made = {}
    for k, (name, source) in enumerate([("a_chest.dcm", "RG1_UNCR.dcm"), ("b_chest.dcm", "RG1_UNCI.dcm"), ("c_chest.dcm", "RG1_UNCR.dcm")]):
        ds = pydicom.dcmread(dicom_data / source)
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.88{3 - k}"  # descending where the names ascend
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.88{3 - k}.1"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(src / name)
        made[name] = ds.SOPInstanceUID
    out = tmp_path / "out"
    proc = _run("--input", str(src), "--output", str(out), "--weights", str(weights), "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    module = {}
    for d in out.iterdir():
        if d.is_dir():
            for r in json.loads((d / "cxr_lung_risk.json").read_text()):
                module[r["SOPInstanceUID"]] = r["CXR_Lung_Risk"]
    cli_out = tmp_path / "cli_out"
    cli = subprocess.run([_cli(), "predict", str(src), "--out", str(cli_out), "--weights", str(weights), "--format", "csv,json",
                          "--deterministic", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    rows = json.loads((cli_out / "cxr_lung_risk.json").read_text())
    assert [r["File"] for r in rows] == sorted(made)
    assert module == {r["SOPInstanceUID"]: r["CXR_Lung_Risk"] for r in rows}
