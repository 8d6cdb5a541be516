"""The MHub container, built and run for real with Docker (marker ``docker``).

* The base image is the local stand-in for ``mhubai/base:latest`` (tools/mhub_base/build.sh:
  Debian bookworm by debootstrap + ``docker import``; Docker Hub is not reachable here).
* The model image is built from the real Dockerfile, unchanged (fed on stdin: no build context),
  with ``docker build --network host``: MHUB_MODELS_REPO names a bare clone of this repository,
  the package is this working tree's wheel, PyTorch is a CPU wheel and the weights are a
  SYNTHETIC zip of the Zenodo layout, all served on 127.0.0.1 by this test.
* The container runs with ``--network none`` on a folder mixing a chest CR, a DX, a CT, an MR and
  a broken file (real DICOM from pydicom-data), and on the png workflow's sample.

The weights are synthetic: the values mean nothing; the outputs say "unverified" weights. The test
compares them with the CLI's on the same inputs and weights. The engine is started by the test
when it is not running (root, dockerd installed: scripts/test.sh installs docker.io and
debootstrap); the tests skip with a message only when it cannot be started.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import REPO
from docker_support import (BASE_BUILD, BASE_TAG, DOCKERFILE, IMAGE_TAG, LocalFiles, build_wheel, docker,
                            engine_running, find_cpu_torch_wheel, serve_repository, sha256, start_engine)

pytestmark = pytest.mark.docker

TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory):
    if engine_running():
        yield
        return
    proc = start_engine(tmp_path_factory.mktemp("dockerd") / "dockerd.log")
    if proc is None:
        pytest.skip("the Docker engine is not running and cannot be started here (needs root, docker.io)")
    yield
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def base_image(docker_engine):
    have = docker("image", "inspect", BASE_TAG, check=False).returncode == 0
    if not have and not shutil.which("debootstrap"):
        pytest.skip("no mhubai/base:latest and no debootstrap to build its stand-in (apt-get install debootstrap)")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(BASE_BUILD)], capture_output=True, text=True, timeout=1800)
    TIMINGS["base image build (s)"] = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    return BASE_TAG


@pytest.fixture(scope="session")
def weights_zip(tmp_path_factory, synthetic_weights) -> Path:
    """The synthetic members as a zip of the Zenodo layout (STORED), with fixed entry times: the
    same weights give the same bytes, hence the same SHA-256 build argument and a cached layer."""
    from cxr_lung_risk.spec import lung_risk_spec

    spec = lung_risk_spec()
    z = tmp_path_factory.mktemp("docker_weights") / spec.weights["archive"]
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for m in spec.members:
            info = zipfile.ZipInfo(f"{spec.weights['archive_folder']}/{m.file}", (2023, 5, 16, 0, 0, 0))
            with open(synthetic_weights / m.file, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return z


@pytest.fixture(scope="session")
def served(tmp_path_factory, weights_zip):
    """The 127.0.0.1 server: package wheel, CPU torch wheel, synthetic weights zip, models repo."""
    root = tmp_path_factory.mktemp("served")
    wheel = build_wheel(root)
    synthetic_weights_zip = weights_zip
    os.link(synthetic_weights_zip, root / synthetic_weights_zip.name)
    torch_wheel = find_cpu_torch_wheel()
    if torch_wheel is not None:
        os.symlink(torch_wheel, root / torch_wheel.name)
    repo_dir, branch = serve_repository(root)
    server = LocalFiles(root)
    args = {
        "MHUB_MODELS_REPO": f"{server.url}/{repo_dir}::{branch}",
        "CXR_LUNG_RISK_PACKAGE": f"cxr-lung-risk @ {server.url}/{wheel.name}#sha256={sha256(wheel)}",
        "CXR_LUNG_RISK_WEIGHTS_URL": f"{server.url}/{synthetic_weights_zip.name}",
        "CXR_LUNG_RISK_WEIGHTS_SIZE": str(synthetic_weights_zip.stat().st_size),
        "CXR_LUNG_RISK_WEIGHTS_SHA256": sha256(synthetic_weights_zip),
    }
    if torch_wheel is not None:  # else: PyPI's torch (the Dockerfile's default; large)
        args["TORCH_SPEC"] = f"torch @ {server.url}/{torch_wheel.name}#sha256={sha256(torch_wheel)}"
    yield args
    server.close()


@pytest.fixture(scope="session")
def image(base_image, served):
    build_args = [a for k, v in served.items() for a in ("--build-arg", f"{k}={v}")]
    t0 = time.monotonic()
    with open(DOCKERFILE, "rb") as f:  # the Dockerfile, unchanged, on stdin: no build context
        proc = subprocess.run(["docker", "build", "--network", "host", "-t", IMAGE_TAG, *build_args, "-"],
                              stdin=f, capture_output=True, text=True, timeout=3600, env=dict(os.environ, DOCKER_BUILDKIT="0"))
    TIMINGS["model image build (s)"] = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE_TAG).stdout.strip())
    TIMINGS["model image size (GB)"] = size / 1e9
    return IMAGE_TAG


def run_container(image: str, inp: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc = docker("run", "--rm", "--network", "none", "-v", f"{inp}:/app/data/input_data:ro",
                  "-v", f"{out}:/app/data/output_data", image, *args, check=False, timeout=1800)
    TIMINGS[f"run {' '.join(args) or 'default'} (s)"] = time.monotonic() - t0
    return proc


def _dx_from_cr(src: Path, dst: Path) -> Path:
    """A DX (digital radiography, FOR PRESENTATION) made from pydicom-data's chest CR: real
    pixels, header changed to DX, new series/instance UIDs."""
    ds = pydicom.dcmread(src)
    ds.Modality = "DX"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory, dicom_data) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("docker_in")
    files = {
        "cr": shutil.copyfile(dicom_data / "RG1_UNCR.dcm", d / "chest_cr.dcm"),
        "ct": shutil.copyfile(get_testdata_file("CT_small.dcm"), d / "ct.dcm"),
        "mr": shutil.copyfile(get_testdata_file("MR_small.dcm"), d / "mr.dcm"),
    }
    files["dx"] = _dx_from_cr(dicom_data / "RG1_UNCI.dcm", d / "chest_dx.dcm")
    broken = d / "broken.dcm"  # a DICOM file cut inside its header: not readable as DICOM
    broken.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:400])
    files["broken"] = broken
    os.chmod(d, 0o755)
    return {"dir": d, **files}


def _cli_values(inputs: list[Path], weights: Path, tmp: Path) -> dict[str, float]:
    """CXR_Lung_Risk by SOPInstanceUID from the CLI (this checkout) on the same files and weights."""
    src = tmp / "cli_in"
    src.mkdir()
    for p in inputs:
        shutil.copyfile(p, src / p.name)
    out = tmp / "cli_out"
    proc = subprocess.run(["cxr-lung-risk", "predict", str(src), "--out", str(out), "--weights", str(weights),
                           "--format", "csv,json", "--deterministic", "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "cxr_lung_risk.json").read_text())
    return {r["SOPInstanceUID"]: r["CXR_Lung_Risk"] for r in rows}


def test_default_workflow_in_the_container(image, mixed_inputs, synthetic_weights, tmp_path):
    out = tmp_path / "out"
    proc = run_container(image, mixed_inputs["dir"], out)
    logs = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, logs

    hdr = {k: pydicom.dcmread(mixed_inputs[k], stop_before_pixels=True) for k in ("cr", "dx", "ct", "mr")}
    radiographs = {k: hdr[k] for k in ("cr", "dx")}
    # one folder per radiograph series, nothing for the CT, the MR or the broken file
    assert sorted(p.name for p in out.iterdir()) == sorted(ds.SeriesInstanceUID for ds in radiographs.values()), logs
    for k in ("ct", "mr"):
        assert not list(out.rglob(f"*{hdr[k].SOPInstanceUID}*")) and not (out / hdr[k].SeriesInstanceUID).exists()

    expected = _cli_values([mixed_inputs["cr"], mixed_inputs["dx"]], synthetic_weights, tmp_path)
    for k, ds in radiographs.items():
        inst = out / ds.SeriesInstanceUID
        files = sorted(p.relative_to(inst).as_posix() for p in inst.rglob("*") if p.is_file())
        assert files == sorted(["cxr_lung_risk.csv", "cxr_lung_risk.json", "report.json", f"sr/{ds.SOPInstanceUID}.dcm"]), files
        with open(inst / "cxr_lung_risk.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["SOPInstanceUID"] for r in rows] == [ds.SOPInstanceUID]
        value = float(rows[0]["CXR_Lung_Risk"])
        assert math.isclose(value, expected[ds.SOPInstanceUID], rel_tol=0, abs_tol=1e-6), (k, value, expected)

        # mhubio's ReportExporter: the ValueOutput with its real metadata
        report = json.loads((inst / "report.json").read_text())
        assert report["cxr_lung_risk"] == value
        assert report["unit"] == "a"
        assert "lung-disease mortality risk" in report["description"] and "years" in report["description"]
        assert report["series_instance_uid"] == ds.SeriesInstanceUID

        sr = pydicom.dcmread(inst / "sr" / f"{ds.SOPInstanceUID}.dcm")
        assert sr.Modality == "SR" and sr.StudyInstanceUID == ds.StudyInstanceUID
        # synthetic weights never pass as the published ones
        assert rows[0]["Weights"] == "lung-risk=unverified"


def test_failed_image_ends_non_zero(image, mixed_inputs, tmp_path):
    """A radiograph that reaches the model but cannot be scored: exit status 1 and the error
    file, while the other radiograph's results are still written."""
    d = tmp_path / "in"
    d.mkdir()
    shutil.copyfile(mixed_inputs["cr"], d / "chest_cr.dcm")
    ds = pydicom.dcmread(mixed_inputs["dx"])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # pixel data cut short: the header is fine
    ds.save_as(d / "cut.dcm")
    os.chmod(d, 0o755)
    out = tmp_path / "out"
    proc = run_container(image, d, out)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    err = (out / "cxr_lung_risk_errors.txt").read_text()
    assert ds.SeriesInstanceUID in err
    cr = pydicom.dcmread(mixed_inputs["cr"], stop_before_pixels=True)
    assert (out / cr.SeriesInstanceUID / "report.json").is_file()
    assert not (out / ds.SeriesInstanceUID).exists()


def test_png_workflow_in_the_container(image, tmp_path):
    from cxr_lung_risk.samples import __file__ as samples_init

    png = Path(samples_init).parent / "A.png"
    d = tmp_path / "in"
    d.mkdir()
    shutil.copyfile(png, d / "A.png")
    os.chmod(d, 0o755)
    out = tmp_path / "out"
    proc = run_container(image, d, out, "--workflow", "png")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "A/cxr_lung_risk.csv", "A/cxr_lung_risk.json", "A/report.json"]
    report = json.loads((out / "A" / "report.json").read_text())
    js = json.loads((out / "A" / "cxr_lung_risk.json").read_text())
    assert report["cxr_lung_risk"] == js[0]["CXR_Lung_Risk"] and report["unit"] == "a"


def test_container_matches_a_reference_made_outside_it(image, tmp_path, monkeypatch):
    """MHub's test routine: the image's run on each workflow's sample equals the reference, here
    made outside the container (mhubio 0.0.2 via scripts/mhub_local.sh, this checkout's CLI) with
    the weights as installed in the image (copied out of it: same files, same recorded source,
    which the SR names)."""
    sys.path.insert(0, str(REPO / "tools"))
    import mhub_compare
    import mhub_testdata

    setup = subprocess.run(["bash", str(REPO / "scripts" / "mhub_local.sh"), "--setup-only"], capture_output=True, text=True)
    if setup.returncode == 69:
        pytest.skip("the mhubio venv cannot be installed here")
    cid = docker("create", image).stdout.strip()
    try:
        docker("cp", f"{cid}:/app/weights", str(tmp_path / "weights"))
    finally:
        docker("rm", cid, check=False)
    monkeypatch.setenv("CXR_LUNG_RISK_HOME", str(tmp_path / "weights"))
    for wf in mhub_testdata.workflows():
        sample = tmp_path / wf / "sample"
        mhub_testdata.samples(wf, sample)
        ref = mhub_testdata.run_workflow(wf, sample, tmp_path / wf / "reference", None, None)
        assert ref.returncode == 0, ref.stderr[-3000:]
        out = mhub_testdata.run_workflow(wf, sample, tmp_path / wf / "out", image, None)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert mhub_compare.compare_dirs(tmp_path / wf / "out", tmp_path / wf / "reference") == [], wf


def test_zz_timings(image):
    """Not a check: the measured times and size, printed with -rP / in the log."""
    print(json.dumps({k: round(v, 2) for k, v in TIMINGS.items()}, indent=1))
