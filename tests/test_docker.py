"""The MHub container, built and run for real with Docker (marker ``docker``), as a user does.

* The image is built by ``tools/build_image.sh`` (the README's command): the real Dockerfile,
  unchanged (fed on stdin: no build context), with ``docker build --network host``; the base image
  is the local stand-in for ``mhubai/base:latest`` (tools/mhub_base/build.sh: Debian bookworm by
  debootstrap + ``docker import``; Docker Hub is not reachable here); MHUB_MODELS_REPO names a
  bare clone of this checkout, the package is its wheel, PyTorch a CPU wheel and the weights a
  SYNTHETIC zip of the Zenodo layout, all served on 127.0.0.1 by the script. Here the zip is the
  session's synthetic weights (``--weights-zip``), zipped by the script's own recipe.
* The containers run with ``--network none`` and the README's mounts: a folder mixing a chest CR,
  a DX, a CT, an MR and a broken file (real DICOM from pydicom-data); the png workflow's sample;
  an empty run (no mounts), a mistyped host path, a CT/MR-only and a hand-only folder; a failed
  image; ``--user 1000:1000``.

The weights are synthetic: the values mean nothing; the outputs say "unverified" weights. The test
compares them with the CLI's on the same inputs and weights. The engine is started by the test
when it is not running (root, dockerd installed: scripts/test.sh installs docker.io and
debootstrap); the tests skip with a message only when it cannot be started.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import REPO
from docker_support import BASE_TAG, BUILD_IMAGE, DOCKER_ENV, DOCKERFILE, IMAGE_TAG, docker, engine_running, start_engine

sys.path.insert(0, str(REPO / "tools"))
import build_image  # noqa: E402  (tools/build_image.py: the script's implementation)

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
def weights_zip(tmp_path_factory, synthetic_weights) -> Path:
    """The session's synthetic members as the script zips them (tools/build_image.py): the same
    weights give the same bytes, hence the same SHA-256 build argument and a cached layer."""
    from cxr_lung_risk.spec import lung_risk_spec

    z = tmp_path_factory.mktemp("docker_weights") / lung_risk_spec().weights["archive"]
    return build_image.make_weights_zip(synthetic_weights, z)


@pytest.fixture(scope="session")
def image(docker_engine, weights_zip):
    """The image, built by the README's command: ``bash tools/build_image.sh``."""
    have_base = docker("image", "inspect", BASE_TAG, check=False).returncode == 0
    if not have_base and not shutil.which("debootstrap"):
        pytest.skip("no mhubai/base:latest and no debootstrap to build its stand-in (apt-get install debootstrap)")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(BUILD_IMAGE), "--tag", IMAGE_TAG, "--weights-zip", str(weights_zip)],
                          capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
    TIMINGS["tools/build_image.sh (s)"] = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE_TAG).stdout.strip())
    TIMINGS["model image size (GB)"] = size / 1e9
    return IMAGE_TAG


def run_container(image: str, inp: Path | None, out: Path | None, *args: str, user: str | None = None) -> subprocess.CompletedProcess:
    """``docker run --rm --network none`` with the README's mounts (none when None)."""
    mounts = []
    if inp is not None:
        mounts += ["-v", f"{inp}:/app/data/input_data:ro"]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        mounts += ["-v", f"{out}:/app/data/output_data"]
    # the suite pins the CPU inference layout (conftest; the choice itself: tests/test_layout.py)
    env = ["-e", f"CXR_LUNG_RISK_LAYOUT={os.environ['CXR_LUNG_RISK_LAYOUT']}"] if os.environ.get("CXR_LUNG_RISK_LAYOUT") else []
    t0 = time.monotonic()
    proc = docker("run", "--rm", "--network", "none", *env, *(["--user", user] if user else []), *mounts, image, *args,
                  check=False, timeout=1800)
    TIMINGS[f"run {' '.join(args) or 'default'}{' as ' + user if user else ''} (s)"] = time.monotonic() - t0
    return proc


def console_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """What the user sees of our messages (stderr), without mhubio's progress display."""
    return [line for line in proc.stderr.splitlines() if line.startswith("cxr-lung-risk: ")]


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
    proc = subprocess.run([sys.executable, "-m", "cxr_lung_risk.cli", "predict", str(src), "--out", str(out), "--weights", str(weights),
                           "--format", "csv,json", "--deterministic", "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "cxr_lung_risk.json").read_text())
    return {r["SOPInstanceUID"]: r["CXR_Lung_Risk"] for r in rows}


def test_default_workflow_in_the_container(image, mixed_inputs, synthetic_weights, tmp_path):
    out = tmp_path / "out"
    proc = run_container(image, mixed_inputs["dir"], out)
    logs = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, logs
    # why each other file was left out, named by the user's file (README: how to see why)
    said = console_lines(proc)
    for name, kind in (("ct.dcm", "CT"), ("mr.dcm", "MR")):
        assert f"cxr-lung-risk: {name}: skipped: modality {kind}, not a radiograph (CR or DX)" in said, said
    assert [line for line in said if line.startswith("cxr-lung-risk: broken.dcm: skipped: ")], said
    assert not [line for line in said if "chest_" in line and "skipped" in line], said

    hdr = {k: pydicom.dcmread(mixed_inputs[k], stop_before_pixels=True) for k in ("cr", "dx", "ct", "mr")}
    radiographs = {k: hdr[k] for k in ("cr", "dx")}
    # one folder per radiograph series (+ the cohort-wide global report), nothing for the CT, the MR
    # or the broken file
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [ds.SeriesInstanceUID for ds in radiographs.values()] + ["cxr_lung_risk_cohort.json"]), logs
    cohort = json.loads((out / "cxr_lung_risk_cohort.json").read_text())
    assert sorted(e["series_instance_uid"] for e in cohort) == sorted(ds.SeriesInstanceUID for ds in radiographs.values())
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
        # the module stages the series in the order of the file names: the CLI's batches, the same bits
        assert value == expected[ds.SOPInstanceUID], (k, value, expected)

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


def test_failed_image_is_named_by_the_users_file_and_progress_is_streamed(image, mixed_inputs, tmp_path):
    """A radiograph that reaches the model but cannot be scored: exit status 1, its reason on the
    console and in the error file, named by the user's file (path in the input mount), while the
    other radiograph's results are still written (its File column: the user's file too). The
    console (what ``docker logs`` shows) gets the CLI's lines while it runs, not at its exit."""
    d = tmp_path / "in"
    (d / "ward").mkdir(parents=True)
    shutil.copyfile(mixed_inputs["cr"], d / "chest_cr.dcm")
    ds = pydicom.dcmread(mixed_inputs["dx"])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # pixel data cut short: the header is fine
    ds.save_as(d / "ward" / "cut.dcm")
    for q in (d, d / "ward"):
        os.chmod(q, 0o755)
    out = tmp_path / "out"
    out.mkdir()
    cmd = ["docker", "run", "--rm", "--network", "none", "-v", f"{d}:/app/data/input_data:ro",
           "-v", f"{out}:/app/data/output_data", image]
    t0 = time.monotonic()
    seen: list[tuple[float, str]] = []  # (seconds since start, line) as the docker client passes them on
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=DOCKER_ENV) as proc:
        for line in proc.stderr:
            seen.append((time.monotonic() - t0, line.rstrip("\n")))
    end = time.monotonic() - t0
    TIMINGS["run with a failed image (s)"] = end
    logs = "\n".join(line for _, line in seen)
    assert proc.returncode == 1, logs[-4000:]

    # streamed: the CLI's first line ("N input file(s) found; loading ...") arrives while the
    # networks load, seconds before the run ends, and its progress line before its summary
    found = [t for t, line in seen if "input file(s) found" in line]
    assert found and end - found[0] > 3, (found, end, logs[-3000:])
    progress = [t for t, line in seen if "inputs done" in line]
    summary = [t for t, line in seen if line.startswith("cxr-lung-risk: scored 1, skipped 0, failed 1 of 2 inputs")]
    assert progress and summary and progress[0] <= summary[0], logs[-3000:]

    err = (out / "cxr_lung_risk_errors.txt").read_text().splitlines()
    assert len(err) == 1 and err[0].startswith("ward/cut.dcm: failed: ") and "truncated" in err[0], err
    assert ds.SeriesInstanceUID in err[0]  # the instance, for reference
    assert f"cxr-lung-risk: {err[0]}" in logs.splitlines()
    assert ds.SOPInstanceUID not in logs  # never named by mhubio's sorted copy <SOPInstanceUID>.dcm
    cr = pydicom.dcmread(mixed_inputs["cr"], stop_before_pixels=True)
    assert (out / cr.SeriesInstanceUID / "report.json").is_file()
    with open(out / cr.SeriesInstanceUID / "cxr_lung_risk.csv", newline="") as f:
        assert [r["File"] for r in csv.DictReader(f)] == ["chest_cr.dcm"]
    assert json.loads((out / cr.SeriesInstanceUID / "cxr_lung_risk.json").read_text())[0]["File"] == "chest_cr.dcm"
    assert not (out / ds.SeriesInstanceUID).exists()


def test_default_build_stops_at_its_first_step_with_one_sentence(image):
    """Without build arguments (no release of the package is published yet): the first RUN step
    fails with one sentence naming the build argument, before anything is downloaded."""
    with open(DOCKERFILE, "rb") as f:
        proc = subprocess.run(["docker", "build", "--network", "none", "--no-cache", "--force-rm", "-"], stdin=f, capture_output=True,
                              env=DOCKER_ENV, timeout=600)
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, out[-3000:]
    steps = [line for line in out.splitlines() if line.startswith("Step ")]
    assert "RUN" in steps[-1] and not any(" RUN " in line or ": RUN" in line for line in steps[:-1]), steps  # the first RUN
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    said = [line for line in plain.splitlines() if line.startswith("cxr_lung_risk build:")]
    assert len(said) == 1, out[-3000:]  # one sentence (the echoed command line is not a line of its own)
    for words in ("CXR_LUNG_RISK_PACKAGE", "no release", "git+", "wheel", "tools/build_image.sh"):
        assert words in said[0], said


def test_stand_in_import_leaves_what_mhubs_does(image):
    """MHub's import script ends by writing the model commit's hash and removing /app/.git."""
    proc = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c",
                  "test ! -e /app/.git && cat /app/buildutils/model_commit_hash.txt && cat /app/models/cxr_lung_risk/config/default.yml",
                  check=False)
    assert proc.returncode == 0, proc.stderr
    commit, _, default_yml = proc.stdout.partition("\n")
    assert len(commit) == 40 and all(c in "0123456789abcdef" for c in commit), commit
    # the commit the script built from (this checkout's working tree, committed by `git stash create`)
    shown = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:models/cxr_lung_risk/config/default.yml"],
                           capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout == default_yml


def test_nothing_to_score_is_exit_1_and_one_sentence(image, mixed_inputs, tmp_path):
    """No mounts, a mistyped host path (Docker creates an empty folder), a CT/MR-only folder and a
    hand-only folder: exit status 1 and one sentence saying what was found, not a silent 0."""
    empty = "cxr-lung-risk: nothing scored: the input folder /app/data/input_data is empty (mount the folder of your images there"
    proc = run_container(image, None, None)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(console_lines(proc)) == 1 and console_lines(proc)[0].startswith(empty), proc.stderr[-3000:]

    typo = tmp_path / "inptu"  # does not exist: Docker creates it, empty
    out = tmp_path / "out_typo"
    proc = run_container(image, typo, out)
    assert proc.returncode == 1 and typo.is_dir() and not any(typo.iterdir()), proc.stderr[-3000:]
    assert len(console_lines(proc)) == 1 and console_lines(proc)[0].startswith(empty), proc.stderr[-3000:]
    assert (out / "cxr_lung_risk_errors.txt").read_text().startswith(empty[len("cxr-lung-risk: "):])

    ct = tmp_path / "ct_mr"
    ct.mkdir()
    shutil.copyfile(mixed_inputs["ct"], ct / "ct.dcm")
    shutil.copyfile(mixed_inputs["mr"], ct / "mr.dcm")
    os.chmod(ct, 0o755)
    proc = run_container(image, ct, tmp_path / "out_ct")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert console_lines(proc) == ["cxr-lung-risk: nothing scored: 2 file(s) in /app/data/input_data (1 CT, 1 MR), "
                                   "none of them a DICOM radiograph (modality CR or DX)"], proc.stderr[-3000:]

    hand = tmp_path / "hand"
    hand.mkdir()
    ds = pydicom.dcmread(mixed_inputs["cr"])
    ds.BodyPartExamined = "HAND"
    ds.save_as(hand / "hand.dcm")
    os.chmod(hand, 0o755)
    proc = run_container(image, hand, tmp_path / "out_hand")
    assert proc.returncode == 1, proc.stderr[-3000:]
    said = console_lines(proc)
    assert any(line.startswith("cxr-lung-risk: hand.dcm: skipped: ") and "HAND" in line for line in said), said
    assert said[-1].startswith("cxr-lung-risk: nothing scored: 1 file(s) in /app/data/input_data (1 CR); the 1 "
                               "radiograph(s) among them were all skipped: hand.dcm: "), said


def _owned_by(root: Path) -> set[int]:
    return {p.lstat().st_uid for p in root.rglob("*")}


def _remove_as(uid: int, folder: Path) -> subprocess.CompletedProcess:
    """``rm -r`` of everything in ``folder``, as uid:gid ``uid`` with no other group."""
    names = sorted(p.name for p in folder.iterdir())
    return subprocess.run(["rm", "-r", "--", *names], cwd=folder, user=uid, group=uid, extra_groups=[],
                          capture_output=True, text=True)


def test_outputs_are_removable_by_the_user(image, mixed_inputs):
    """uid 1000's own folders: with ``--user 1000:1000`` the run works and writes as uid 1000; as
    root (no --user) the outputs are given to the output folder's owner. uid 1000 then deletes
    them all."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as uid 1000")
    base = Path(tempfile.mkdtemp(prefix="cxr_owner_", dir="/tmp"))  # traversable by uid 1000
    try:
        os.chmod(base, 0o755)
        inp = base / "in"
        inp.mkdir()
        shutil.copyfile(mixed_inputs["cr"], inp / "chest_cr.dcm")
        for q in (inp, inp / "chest_cr.dcm"):
            os.chown(q, 1000, 1000)
        series = pydicom.dcmread(mixed_inputs["cr"], stop_before_pixels=True).SeriesInstanceUID
        for user in ("1000:1000", None):
            out = base / f"out_{'user' if user else 'root'}"
            out.mkdir()
            os.chown(out, 1000, 1000)
            proc = run_container(image, inp, out, user=user)
            assert proc.returncode == 0, (user, proc.stderr[-3000:])
            assert (out / series / "report.json").is_file() and (out / series / "sr").is_dir(), user
            assert _owned_by(out) == {1000}, (user, _owned_by(out))
            rm = _remove_as(1000, out)
            assert rm.returncode == 0 and list(out.iterdir()) == [], (user, rm.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)


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
