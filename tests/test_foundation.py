"""The core's shape: typed options, the model registry, device/precision recorded as used, one
error family, result records, unique output names, body-part selection, progress, the demo."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "cxr_lung_risk"


def run_cli(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "2")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "cxr_lung_risk.cli", *args], capture_output=True, text=True, env=e, timeout=timeout)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def records(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "records.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]


# ------------------------------------------------------------------------------ layering
def test_no_argparse_below_the_cli_and_no_import_cycle_with_it():
    offenders = []
    for f in sorted(SRC.rglob("*.py")):
        if f.name == "cli.py":
            continue
        text = f.read_text(encoding="utf-8")
        if "import argparse" in text or "argparse." in text or "from .cli" in text or "from ..cli" in text or "getattr(args" in text:
            offenders.append(f.relative_to(SRC).as_posix())
    assert offenders == []


def test_model_names_are_tested_only_in_the_registry():
    """No `"lung-risk"/"age"/"all"` string tests across the code: models are data."""
    offenders = []
    for f in sorted(SRC.rglob("*.py")):
        if f.name in ("registry.py", "cli.py", "fetch.py", "demo.py"):
            continue  # the registry itself; the CLI's choices/fetch's own model argument; the demo's option values
        text = f.read_text(encoding="utf-8")
        for needle in ('== "age"', '== "lung-risk"', 'in ("lung-risk", "all")', 'in ("age", "all")', '== "all"'):
            if needle in text:
                offenders.append(f"{f.name}: {needle}")
    assert offenders == []


def test_registry_comes_from_the_model_files():
    from cxr_lung_risk.registry import model_choices, resolve_models, spec_for
    from cxr_lung_risk.errors import UsageError

    assert model_choices() == ("lung-risk", "age", "all")
    assert resolve_models("all") == ("lung-risk", "age")
    assert resolve_models(["age", "lung-risk", "age"]) == ("lung-risk", "age")
    assert spec_for("age").module == "cxr_lung_risk.age" and spec_for("lung-risk").module == "cxr_lung_risk.engine"
    raw = json.loads((REPO / "models" / "cxr_age.json").read_text())
    assert raw["registry"]["key"] == "age"
    with pytest.raises(UsageError, match="unknown model"):
        resolve_models("lung")


def test_errors_are_one_family():
    from cxr_lung_risk import errors
    from cxr_lung_risk.fetch import FetchError
    from cxr_lung_risk.transforms import RasterError
    from cxr_lung_risk.weights import WeightsError

    for cls in (FetchError, RasterError, WeightsError, errors.UsageError, errors.InputNotFoundError, errors.DeviceError,
                errors.OutputError, errors.OutputLockedError, errors.WeightsNotFoundError):
        assert issubclass(cls, errors.CxrLungRiskError), cls
    assert WeightsError is errors.WeightsError


def test_status_is_typed():
    from cxr_lung_risk.records import InputRecord, Status

    r = InputRecord(input="/x", file="x", status=Status.SKIPPED, reason="skipped: CT")
    d = r.to_json()
    assert d["status"] == "skipped" and InputRecord.from_json(d).status is Status.SKIPPED
    assert str(Status.OK) == "ok" and Status("failed") is Status.FAILED


# ------------------------------------------------------------------------------ usage errors
def test_typo_in_input_is_an_ordinary_sentence_and_fast(tmp_path):
    """A mistyped path: one plain sentence, exit 1, before torch is imported."""
    code = (
        "import sys\nfrom cxr_lung_risk.cli import main\n"
        f"rc = main(['predict', {str(tmp_path / 'no-such-folder')!r}, '--out', {str(tmp_path / 'o')!r}])\n"
        "print('TORCH', 'torch' in sys.modules)\nsys.exit(rc)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip() == f"cxr-lung-risk: error: input not found: {tmp_path / 'no-such-folder'} (INPUT must be existing DICOM/PNG/JPEG files or folders)"
    assert "TORCH False" in p.stdout
    assert "unexpected" not in p.stderr and "--debug" not in p.stderr


def test_bad_options_are_refused_before_loading(tmp_path, sample_pngs):
    for args, needle in (
        (["--format", "csv,xml"], "--format"),
        (["--batch-size", "0"], "--batch-size"),
    ):
        p = run_cli("predict", str(sample_pngs[0]), "--out", str(tmp_path / "o"), *args)
        assert p.returncode == 1 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert "loading" not in p.stderr  # refused before any model was loaded


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def age_file(tmp_path_factory) -> Path:
    from cxr_lung_risk.synthetic import write_synthetic_age_weights

    return write_synthetic_age_weights(tmp_path_factory.mktemp("age") / "PLCO_Fine_Tuned_120419.pth")


@pytest.fixture(scope="module")
def twin_input(tmp_path_factory, dicom_data, sample_pngs) -> Path:
    """Two folders with the same file names (and the same SOP Instance UID), plus an extremity CR."""
    root = tmp_path_factory.mktemp("twins")
    for d in ("siteA", "siteB"):
        (root / d).mkdir()
        shutil.copy(dicom_data / "RG1_UNCR.dcm", root / d / "x.dcm")
        shutil.copy(sample_pngs[0], root / d / "x.png")
    (root / "siteA" / "extremity.dcm").write_bytes((dicom_data / "RG3_UNCR.dcm").read_bytes())
    return root


@pytest.fixture(scope="module")
def twin_run(tmp_path_factory, twin_input, synthetic_weights, age_file):
    out = tmp_path_factory.mktemp("twin_out")
    p = run_cli(
        "predict", str(twin_input / "siteA"), str(twin_input / "siteB"), "--out", str(out), "--model", "all",
        "--weights", str(synthetic_weights), "--age-weights", str(age_file), "--precision", "bf16",
        "--format", "csv,sr,json", "--saliency", "--batch-size", "2",
    )
    return p, out


def test_outputs_never_collide(twin_run):
    p, out = twin_run
    assert p.returncode == 0, p.stderr
    rows = read_csv(out / "cxr_lung_risk.csv")
    files = [r["File"] for r in rows]
    assert len(files) == len(set(files)) == 4
    assert {"siteA/x.dcm", "siteB/x.dcm", "siteA/x.png", "siteB/x.png"} == set(files)
    manifest = [r["File"] for r in read_csv(out / "manifest.csv")]
    assert len(manifest) == len(set(manifest)) == 5
    # the same source SOP Instance UID twice: two SRs and two SCs per model, none overwritten
    assert len(list((out / "sr").glob("*.dcm"))) == 2
    assert len(list((out / "sc").glob("*.dcm"))) == 4
    assert len(list((out / "saliency").rglob("*.png"))) == 8  # 4 scored images x 2 models


def test_records_account_for_every_input_and_file(twin_run, twin_input):
    p, out = twin_run
    recs = records(out)
    assert [r["file"] for r in recs] == [r["File"] for r in read_csv(out / "manifest.csv")]
    assert {r["input"] for r in recs} == {str(f) for f in twin_input.rglob("*") if f.is_file()}
    listed = []
    for r in recs:
        assert set(r) >= {"input", "file", "status", "reason", "study_uid", "series_uid", "sop_uid", "outputs", "values"}
        for kind, paths in r["outputs"].items():
            for rel in paths:
                assert (out / rel).is_file(), rel
                listed.append(rel)
    written = sorted(x.relative_to(out).as_posix() for d in ("sr", "sc", "saliency") for x in (out / d).rglob("*") if x.is_file())
    assert sorted(listed) == written  # every file written is listed under the input that made it
    dcm = [r for r in recs if r["file"].endswith("x.dcm")]
    assert all(r["status"] == "ok" and r["sop_uid"] and len(r["outputs"]["sr"]) == 1 for r in dcm)
    assert all(r["values"]["CXR_Lung_Risk"] is not None and r["values"]["CXR_Age"] is not None for r in dcm)


def test_non_chest_body_part_is_skipped_with_a_reason(twin_run):
    p, out = twin_run
    m = {r["File"]: r for r in read_csv(out / "manifest.csv")}
    ext = m["siteA/extremity.dcm"]
    assert ext["status"] == "skipped" and "EXTREMITY" in ext["reason"] and "--allow-non-chest" in ext["reason"]
    assert "siteA/extremity.dcm" not in {r["File"] for r in read_csv(out / "cxr_lung_risk.csv")}


def test_allow_non_chest_widens_the_rule(tmp_path, dicom_data, synthetic_weights):
    p = run_cli("predict", str(dicom_data / "RG3_UNCR.dcm"), "--out", str(tmp_path / "o"), "--weights", str(synthetic_weights),
                "--allow-non-chest", "--format", "csv")
    assert p.returncode == 0, p.stderr
    (row,) = read_csv(tmp_path / "o" / "manifest.csv")
    assert row["status"] == "ok" and "EXTREMITY" in row["reason"]  # scored, with the warning kept


def _sr_params(path: Path) -> dict[str, dict[str, str]]:
    """{measurement group's algorithm name: {parameter: value}} from the TID 4019 items."""
    ds = pydicom.dcmread(path)
    out: dict[str, dict[str, str]] = {}

    def walk(seq, current):
        for item in seq:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if name == "Algorithm Name":
                current = out.setdefault(str(item.TextValue), {})
            elif name == "Algorithm Parameters" and current is not None:
                k, _, v = str(item.TextValue).partition("=")
                current[k] = v
            if "ContentSequence" in item:
                walk(item.ContentSequence, current)

    walk(ds.ContentSequence, None)
    return out


def test_sr_records_device_precision_and_weights_each_model_used(twin_run):
    p, out = twin_run
    sr = sorted((out / "sr").glob("*.dcm"))[0]
    params = _sr_params(sr)
    assert params["CXR-Lung-Risk"]["precision"] == "bf16" and params["CXR-Lung-Risk"]["device"] == "cpu"
    assert params["CXR-Age"]["precision"] == "fp32" and params["CXR-Age"]["device"] == "cpu"  # CXR-Age runs fp32
    for name in ("CXR-Lung-Risk", "CXR-Age"):
        assert params[name]["weights"] == "SYNTHETIC" and len(params[name]["weights_sha256"]) == 64
    assert "SYNTHETIC" in str(pydicom.dcmread(sr).SeriesDescription)
    run = json.loads((out / "run.json").read_text())
    assert run["models"]["lung-risk"]["precision"] == "bf16" and run["models"]["age"]["precision"] == "fp32"
    assert run["models"]["lung-risk"]["weights"]["synthetic"] is True
    assert {r["Weights"] for r in read_csv(out / "cxr_lung_risk.csv")} == {"lung-risk=SYNTHETIC;age=SYNTHETIC"}
    assert all(o["Weights"] == "lung-risk=SYNTHETIC;age=SYNTHETIC" for o in json.loads((out / "cxr_lung_risk.json").read_text()))
    assert "SYNTHETIC" in p.stderr


def test_sr_and_sc_share_patient_study_and_dates(twin_run):
    p, out = twin_run
    sr = pydicom.dcmread(sorted((out / "sr").glob("*.dcm"))[0])
    sc = pydicom.dcmread(sorted((out / "sc").glob("*.dcm"))[0])
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "AccessionNumber"):
        assert sr.get(kw) == sc.get(kw), kw


def test_first_line_before_loading_and_progress_in_logs(twin_run):
    p, _ = twin_run
    lines = p.stderr.splitlines()
    assert lines[0].startswith("cxr-lung-risk: 5 input file(s) found; loading CXR-Lung-Risk, CXR-Age")
    assert any("inputs done" in l for l in lines)  # plain progress lines: stderr is not a terminal here


def test_preprocess_names_never_collide(tmp_path, twin_input):
    out = tmp_path / "pp"
    p = run_cli("preprocess", str(twin_input / "siteA"), str(twin_input / "siteB"), "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert sorted(x.relative_to(out).as_posix() for x in out.rglob("*.png")) == ["siteA/x.png", "siteB/x.png"]
    assert [r["outputs"].get("png") for r in records(out) if r["status"] == "ok"] == [["siteA/x.png"], ["siteB/x.png"]]


# ------------------------------------------------------------------------------ shared DICOM plumbing
def test_writers_share_one_date_rule_and_honour_the_umask(tmp_path, dicom_data):
    import numpy as np

    from cxr_lung_risk.outputs import base, sc, sr

    src = pydicom.dcmread(dicom_data / "RG1_UNCR.dcm", stop_before_pixels=True)
    del src.StudyDate  # only ContentDate left: both writers must use it
    src.ContentDate, src.ContentTime = "20010203", "040506"
    m = sr.Measurement("CXR_Lung_Risk", "CXRLR001", "CXR-Lung-Risk", 3.0)
    report = sr.build_measurement_report(src, [m], algorithm=sr.AlgorithmInfo("x", "1", {}), deterministic=True)
    cap = sc.build_secondary_capture(src, np.zeros((8, 8, 3), np.uint8), model_title="X", deterministic=True)
    assert str(report.ContentDate) == str(cap.ContentDate) == "20010203"
    assert str(report.ContentTime)[:6] == str(cap.ContentTime)[:6] == "040506"
    old = os.umask(0o027)
    try:
        base._UMASK = None
        target = tmp_path / "a.dcm"
        (tmp_path / "elsewhere").write_text("keep")
        target.symlink_to(tmp_path / "elsewhere")  # a planted link is replaced, not written through
        sr.write_sr(report, target)
        sc.write_sc(cap, tmp_path / "b.dcm")
    finally:
        os.umask(old)
        base._UMASK = None
    assert (tmp_path / "elsewhere").read_text() == "keep" and not target.is_symlink()
    assert oct(target.stat().st_mode & 0o777) == oct(0o640) == oct((tmp_path / "b.dcm").stat().st_mode & 0o777)


def test_unique_names():
    from cxr_lung_risk.outputs.base import UniqueNames, uid_stem

    n = UniqueNames()
    assert [n.claim("sr/1.2.dcm"), n.claim("sr/1.2.dcm"), n.claim("SR/1.2.DCM"), n.claim("sr/1.3.dcm")] == [
        "sr/1.2.dcm", "sr/1.2_2.dcm", "SR/1.2_3.DCM", "sr/1.3.dcm"]
    assert uid_stem("1.2.3") == "1.2.3" and uid_stem("../../etc/passwd", prefix="sr").startswith("sr-")


# ------------------------------------------------------------------------------ progress
def test_progress_lines_per_input_when_not_a_terminal():
    import io

    from cxr_lung_risk.progress import Progress

    buf = io.StringIO()
    pr = Progress(4, enabled=True, stream=buf, interval=0.0, tty=False)
    pr.finish_input("skipped")
    pr.advance(0.5)
    pr.finish_input("ok", 0.5)
    pr.close()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("cxr-lung-risk: 1/4 inputs done (25%)") and "1 skipped" in lines[0]
    assert lines[1].startswith("cxr-lung-risk: 1/4 inputs done (38%)")
    assert lines[-1].startswith("cxr-lung-risk: 2/4 inputs done (50%)") and "1 scored" in lines[-1]


def test_library_warnings_are_attributed_to_their_file(tmp_path, dicom_data, synthetic_weights):
    """What pydicom warns about ends up in that file's manifest row, its record and a stderr line
    naming it, never as a bare library warning."""
    import warnings

    ds = pydicom.dcmread(dicom_data / "RG1_UNCR.dcm")
    ds.SpecificCharacterSet = "ISO_IR 999"  # pydicom: unknown encoding, decoded with the default
    d = tmp_path / "in"
    d.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(d / "odd.dcm")
    shutil.copy(dicom_data / "RG1_UNCR.dcm", d / "plain.dcm")
    p = run_cli("predict", str(d), "--out", str(tmp_path / "o"), "--weights", str(synthetic_weights), "--format", "csv,sr")
    assert p.returncode == 0, p.stderr
    m = {r["File"]: r for r in read_csv(tmp_path / "o" / "manifest.csv")}
    assert m["plain.dcm"]["reason"] == ""
    assert "ISO_IR 999" in m["odd.dcm"]["reason"] and m["odd.dcm"]["status"] == "ok"
    rec = {r["file"]: r for r in records(tmp_path / "o")}
    assert any("ISO_IR 999" in w for w in rec["odd.dcm"]["warnings"]) and rec["plain.dcm"]["warnings"] == []
    mentions = [l for l in p.stderr.splitlines() if "ISO_IR 999" in l]
    assert mentions and all(l.startswith("cxr-lung-risk: warning: odd.dcm: ") for l in mentions), p.stderr
    assert "UserWarning" not in p.stderr and "warn_and_log" not in p.stderr


# ------------------------------------------------------------------------------ demo
def test_demo_runs_end_to_end_and_says_synthetic(tmp_path):
    home = tmp_path / "cache"
    out = tmp_path / "demo"
    t = time.time()
    p = run_cli("demo", "--out", str(out), env={"CXR_LUNG_RISK_HOME": str(home)}, timeout=1800)
    assert p.returncode == 0, p.stderr
    assert "SYNTHETIC" in p.stderr
    rows = read_csv(out / "cxr_lung_risk.csv")
    assert len(rows) == 6 and all(r["Weights"] == "lung-risk=SYNTHETIC;age=SYNTHETIC" for r in rows)
    assert all(r["CXR_Lung_Risk"] and r["CXR_Age"] and r["Lung_Age_081221_0"] for r in rows)
    (sr_path,) = list((out / "sr").glob("*.dcm"))
    assert "SYNTHETIC" in str(pydicom.dcmread(sr_path).SeriesDescription)
    assert (out / "cxr_lung_risk.json").is_file() and len(list((out / "sc").glob("*.dcm"))) == 2
    assert len(list((out / "saliency").rglob("*.png"))) == 12
    assert (home / "synthetic" / "cxr_lung_risk" / "SYNTHETIC_WEIGHTS_README.txt").is_file()
    # a second run reuses the weights it made
    p2 = run_cli("demo", "--out", str(tmp_path / "demo2"), env={"CXR_LUNG_RISK_HOME": str(home)}, timeout=1800)
    assert p2.returncode == 0 and "making SYNTHETIC demo weights" not in p2.stderr, p2.stderr
    assert (tmp_path / "demo2" / "cxr_lung_risk.csv").read_bytes() == (out / "cxr_lung_risk.csv").read_bytes()
    # before `demo`, --demo-weights says what to do (one sentence, exit 1)
    empty = {"CXR_LUNG_RISK_HOME": str(tmp_path / "empty-cache")}
    p3 = run_cli("predict", str(out), "--out", str(tmp_path / "x"), "--demo-weights", env=empty)
    assert p3.returncode == 1 and "run `cxr-lung-risk demo --out DIR` once" in p3.stderr and "Traceback" not in p3.stderr
    # after it, the README's predict and serve commands run on its weights with --demo-weights
    sample = Path(__file__).resolve().parents[1] / "src" / "cxr_lung_risk" / "samples" / "chest_cr_RG1_J2KI.dcm"
    p4 = run_cli("predict", str(sample), "--out", str(tmp_path / "p4"), "--demo-weights", "--quiet", env={"CXR_LUNG_RISK_HOME": str(home)})
    assert p4.returncode == 0, p4.stderr
    assert read_csv(tmp_path / "p4" / "cxr_lung_risk.csv")[0]["Weights"] == "lung-risk=SYNTHETIC"
    _serve_on_demo_weights(home, sample, tmp_path / "serve")


def _serve_on_demo_weights(home: Path, sample: Path, root: Path) -> None:
    """``serve --demo-weights`` (the README's command after ``demo``): it starts, says SYNTHETIC,
    and scores a CR pushed to it (with the pacs extra; skipped without it)."""
    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        pytest.skip("the [pacs] extra is not installed")
    from pacs_node import ServeProcess, events, make_instances, push, sop_of, wait_for

    root.mkdir(parents=True, exist_ok=True)
    node = ServeProcess(root / "spool", None, extra=["--demo-weights", "--quiet-time", "0"], env={"CXR_LUNG_RISK_HOME": str(home)})
    node.start()
    try:
        [cr] = make_instances(root / "in", 1, tag="demo-serve", source=sample)
        assert push(node.port, [cr]) == [0]
        [scored] = wait_for(lambda: [e for e in events(node.spool, "scored") if e["sop_uid"] == sop_of(cr)], 300, "scoring")
        assert scored["values"]
        assert "SYNTHETIC weights" in node.log_tail(200)
    finally:
        assert node.terminate() == 0
