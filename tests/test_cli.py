"""End-to-end CLI behaviour on real DICOM: outputs, accounting, exit codes, weights errors."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pydicom
import pytest
from conftest import dciodvfy, dsrdump
import torch

from cxr_lung_risk import archs
from cxr_lung_risk.spec import lung_risk_spec

SPEC = lung_risk_spec()


def run_cli(*args: str, env_home: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_home is not None:
        env["CXR_LUNG_RISK_HOME"] = str(env_home)
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run(
        [sys.executable, "-m", "cxr_lung_risk.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    """A non-zero exit with exactly one error sentence (progress lines before it are fine)."""
    assert p.returncode != 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    errors = [l for l in p.stderr.splitlines() if l.startswith("cxr-lung-risk: error:")]
    assert len(errors) == 1, p.stderr
    for n in needles:
        assert n in errors[0], p.stderr


# ---------------------------------------------------------------- weights errors (no scoring needed)


def test_missing_weights_says_how_to_get_them(tmp_path, sample_pngs):
    p = run_cli("predict", str(sample_pngs[0]), "--out", str(tmp_path / "o"), env_home=tmp_path / "emptycache")
    assert p.returncode == 1
    assert_one_line_error(p, "fetch-weights", "--weights")


def _garbage_weights(d: Path, skip: set[int] = frozenset()) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for m in SPEC.members:
        if m.index not in skip:
            (d / m.file).write_bytes(b"not a weights file " * 10)
    return d


def test_missing_member_file_is_named(tmp_path, sample_pngs):
    w = _garbage_weights(tmp_path / "w", skip={5})
    p = run_cli("predict", str(sample_pngs[0]), "--out", str(tmp_path / "o"), "--weights", str(w))
    assert_one_line_error(p, "Lung_Age_081221_5.pth", "missing")


def test_wrong_member_count_is_refused(tmp_path, sample_pngs):
    w = _garbage_weights(tmp_path / "w")
    (w / "Lung_Age_081221_20.pth").write_bytes(b"x")
    p = run_cli("predict", str(sample_pngs[0]), "--out", str(tmp_path / "o"), "--weights", str(w))
    assert_one_line_error(p, "21 member files", "20")


def test_corrupt_member_file_is_named(tmp_path, sample_pngs):
    w = _garbage_weights(tmp_path / "w")
    p = run_cli("predict", str(sample_pngs[0]), "--out", str(tmp_path / "o"), "--weights", str(w))
    assert_one_line_error(p, "Lung_Age_081221_0.pth", "cannot read")


def test_wrong_shape_names_file_and_key(tmp_path, sample_pngs):
    w = _garbage_weights(tmp_path / "w")
    sd = archs.build("inceptionv4").state_dict()
    sd["1.8.weight"] = torch.zeros(2, 512)
    torch.save({"model": sd, "opt": {}}, w / "Lung_Age_081221_0.pth")
    p = run_cli("predict", str(sample_pngs[0]), "--out", str(tmp_path / "o"), "--weights", str(w))
    assert_one_line_error(p, "Lung_Age_081221_0.pth", "'1.8.weight'", "(2, 512)", "(1, 512)")


def test_missing_key_names_file_and_key(tmp_path, sample_pngs):
    w = _garbage_weights(tmp_path / "w")
    sd = archs.build("inceptionv4").state_dict()
    del sd["0.0.5.conv.bn.running_var"]
    torch.save(sd, w / "Lung_Age_081221_0.pth")
    p = run_cli("predict", str(sample_pngs[0]), "--out", str(tmp_path / "o"), "--weights", str(w))
    assert_one_line_error(p, "Lung_Age_081221_0.pth", "missing key", "0.0.5.conv.bn.running_var")


def test_truncated_zip_is_a_clear_error(tmp_path, sample_pngs):
    z = tmp_path / "ensamble-model-weights.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for m in SPEC.members:
            zf.writestr(f"ensamble-model-weights/{m.file}", os.urandom(4096))
    data = z.read_bytes()
    z.write_bytes(data[: len(data) // 2])
    p = run_cli("predict", str(sample_pngs[0]), "--out", str(tmp_path / "o"), "--weights", str(z))
    assert_one_line_error(p, str(z))


def test_nonexistent_input_is_a_clear_error(tmp_path, synthetic_weights):
    p = run_cli("predict", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--weights", str(synthetic_weights))
    assert_one_line_error(p, "nope")


def test_bad_format_option(tmp_path, sample_pngs, synthetic_weights):
    p = run_cli("predict", str(sample_pngs[0]), "--out", str(tmp_path / "o"), "--format", "csv,xml", "--weights", str(synthetic_weights))
    assert_one_line_error(p, "--format")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("precision", ["tf32", "fp16"])
def test_gpu_only_precision_on_the_cpu_is_refused(tmp_path, sample_pngs, synthetic_weights, precision):
    p = run_cli("predict", str(sample_pngs[0]), "--out", str(tmp_path / "o"), "--precision", precision, "--weights", str(synthetic_weights))
    assert p.returncode == 1
    assert_one_line_error(p, f"--precision {precision} needs a CUDA")


# ---------------------------------------------------------------- end to end on real DICOM


@pytest.fixture(scope="module")
def mixed_input(tmp_path_factory, dicom_data, sample_pngs) -> Path:
    """RG1 chest CR (two syntaxes, one in a subfolder), a CT, an MR, a broken file and a PNG."""
    d = tmp_path_factory.mktemp("mixed")
    shutil.copy(dicom_data / "RG1_UNCR.dcm", d / "RG1_UNCR.dcm")
    (d / "sub").mkdir()
    shutil.copy(dicom_data / "RG1_J2KR.dcm", d / "sub" / "chest_no_suffix")
    shutil.copy(dicom_data / "693_UNCR.dcm", d / "ct.dcm")
    shutil.copy(dicom_data / "liver.dcm", d / "seg.dcm")
    shutil.copy(dicom_data / "MR2_UNCR.dcm", d / "mr.dcm")
    raw = (dicom_data / "RG1_UNCR.dcm").read_bytes()
    (d / "truncated.dcm").write_bytes(raw[: len(raw) // 3])
    shutil.copy(sample_pngs[0], d / "A.png")
    return d


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, mixed_input, synthetic_weights):
    out = tmp_path_factory.mktemp("out")
    timings = tmp_path_factory.mktemp("timings") / "t.json"
    p = run_cli(
        "predict", str(mixed_input), "--out", str(out), "--weights", str(synthetic_weights),
        "--per-model", "--format", "csv,sr,json", "--batch-size", "2", "--timings", str(timings),
    )
    p.timings = timings
    return p, out


def test_timings_file_accounts_for_the_run(mixed_run, mixed_input):
    p, _ = mixed_run
    t = json.loads(p.timings.read_text())
    n_inputs = sum(1 for f in mixed_input.rglob("*") if f.is_file())
    assert t["inputs"] == n_inputs and t["scored"] == 3 and t["batch_size"] == 2
    phases = [t[k] for k in ("load_s", "prepare_s", "infer_s", "write_s")]
    assert all(v > 0 for v in phases[:3]) and phases[3] >= 0
    assert sum(phases) <= t["run_s"] + 1e-3
    assert t["run_s"] - sum(phases) < 0.5 * t["run_s"]  # the phases are where the time goes
    assert t["startup_s"] is None or t["startup_s"] > 0
    # and the summary line says the same
    assert f"({t['run_s']:.1f} s: load {t['load_s']:.1f}," in p.stderr


def test_mixed_folder_exit_code_and_manifest(mixed_run, mixed_input):
    p, out = mixed_run
    assert p.returncode == 2, p.stderr  # one input failed (truncated), others scored or skipped
    assert "Traceback" not in p.stderr
    manifest = {r["File"]: r for r in read_csv(out / "manifest.csv")}
    every_input = {f.relative_to(mixed_input).as_posix() for f in mixed_input.rglob("*") if f.is_file()}
    assert set(manifest) == every_input  # every input accounted for, exactly once
    assert manifest["RG1_UNCR.dcm"]["status"] == "ok"
    assert manifest["sub/chest_no_suffix"]["status"] == "ok"
    assert manifest["A.png"]["status"] == "ok"
    assert manifest["ct.dcm"]["status"] == "skipped" and "CT" in manifest["ct.dcm"]["reason"]
    assert manifest["mr.dcm"]["status"] == "skipped" and "MR" in manifest["mr.dcm"]["reason"]
    assert manifest["seg.dcm"]["status"] == "skipped" and "SEG" in manifest["seg.dcm"]["reason"]
    assert manifest["truncated.dcm"]["status"] == "failed" and manifest["truncated.dcm"]["reason"]


def test_mixed_folder_results_table(mixed_run, dicom_data):
    p, out = mixed_run
    rows = {r["File"]: r for r in read_csv(out / "cxr_lung_risk.csv")}
    assert set(rows) == {"RG1_UNCR.dcm", "sub/chest_no_suffix", "A.png"}
    cols = list(next(iter(rows.values())).keys())
    active = [m.name for m in SPEC.active_members()]
    assert cols == ["File", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "CXR_Lung_Risk", *active, "Weights",
                    "CXR_Lung_Risk_Group"]
    assert {r["Weights"] for r in rows.values()} == {"lung-risk=SYNTHETIC"}
    src = pydicom.dcmread(dicom_data / "RG1_UNCR.dcm", stop_before_pixels=True)
    r = rows["RG1_UNCR.dcm"]
    assert r["SOPInstanceUID"] == src.SOPInstanceUID and r["StudyInstanceUID"] == src.StudyInstanceUID
    assert rows["A.png"]["SOPInstanceUID"] == ""
    # the score is the LASSO combination of the member columns written next to it
    for r in rows.values():
        combo = SPEC.intercept + sum(m.weight * float(r[m.name]) for m in SPEC.active_members())
        assert abs(float(r["CXR_Lung_Risk"]) - combo) < 1e-9 * max(1.0, abs(combo))
    # lossless J2K and uncompressed decode to the same pixels -> the same score
    assert r["CXR_Lung_Risk"] == rows["sub/chest_no_suffix"]["CXR_Lung_Risk"] or abs(
        float(r["CXR_Lung_Risk"]) - float(rows["sub/chest_no_suffix"]["CXR_Lung_Risk"])
    ) < 1e-6
    js = json.loads((out / "cxr_lung_risk.json").read_text())
    assert [o["File"] for o in js] == list(rows)
    assert all(o["CXR_Lung_Risk"] == float(rows[o["File"]]["CXR_Lung_Risk"]) for o in js)


def test_mixed_folder_writes_one_sr_per_scored_dicom(mixed_run, dicom_data):
    from cxr_lung_risk.outputs.sr import read_measurements

    p, out = mixed_run
    rows = {r["File"]: r for r in read_csv(out / "cxr_lung_risk.csv")}
    srs = sorted(x.name for x in (out / "sr").glob("*.dcm"))
    expected = {}
    for rel, src_name in (("RG1_UNCR.dcm", "RG1_UNCR.dcm"), ("sub/chest_no_suffix", "RG1_J2KR.dcm")):
        src = pydicom.dcmread(dicom_data / src_name, stop_before_pixels=True)
        expected[f"{src.SOPInstanceUID}.dcm"] = rel
    assert srs == sorted(expected)  # one SR per scored DICOM image, none for PNG/CT/MR/SEG
    for name, rel in expected.items():
        errors, _ = dciodvfy(out / "sr" / name)
        assert errors == [], errors
        rc, _, stderr = dsrdump(out / "sr" / name)
        assert rc == 0 and stderr == [], stderr
        values = read_measurements(out / "sr" / name)
        assert values["CXR-Lung-Risk"] == pytest.approx(float(rows[rel]["CXR_Lung_Risk"]), abs=1e-9)
        assert pydicom.dcmread(out / "sr" / name).SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        # the run's arithmetic is part of the provenance (TID 4019 algorithm parameters)
        texts = _text_values(pydicom.dcmread(out / "sr" / name).ContentSequence)
        assert "precision=fp32" in texts and "device=cpu" in texts  # what was used, not "auto"
        assert "weights=SYNTHETIC" in texts


def test_sr_class_comprehensive(tmp_path, dicom_data, synthetic_weights):
    """``--sr-class comprehensive``: Comprehensive SR (...88.33) for archives without the 3D class."""
    from cxr_lung_risk.outputs.sr import read_measurements

    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(dicom_data / "RG1_UNCR.dcm", d / "cr.dcm")
    p = run_cli("predict", str(d), "--out", str(tmp_path / "o"), "--weights", str(synthetic_weights),
                "--sr-class", "comprehensive", "--deterministic")
    assert p.returncode == 0, p.stderr
    [sr] = (tmp_path / "o" / "sr").glob("*.dcm")
    ds = pydicom.dcmread(sr)
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    [row] = read_csv(tmp_path / "o" / "cxr_lung_risk.csv")
    assert read_measurements(sr)["CXR-Lung-Risk"] == pytest.approx(float(row["CXR_Lung_Risk"]), abs=1e-9)
    assert json.loads((tmp_path / "o" / "run.json").read_text())["options"]["sr_class"] == "comprehensive"
    errors, _ = dciodvfy(sr)
    assert errors == [], errors


def _text_values(seq) -> list[str]:
    out: list[str] = []
    for item in seq:
        if getattr(item, "ValueType", "") == "TEXT":
            out.append(str(item.TextValue))
        if "ContentSequence" in item:
            out += _text_values(item.ContentSequence)
    return out


def test_only_refusals_exit_1(tmp_path, dicom_data, synthetic_weights):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(dicom_data / "693_UNCR.dcm", d / "ct.dcm")
    shutil.copy(dicom_data / "US1_UNCR.dcm", d / "us.dcm")
    p = run_cli("predict", str(d), "--out", str(tmp_path / "o"), "--weights", str(synthetic_weights), "--format", "csv")
    assert p.returncode == 1, p.stderr
    assert [r["status"] for r in read_csv(tmp_path / "o" / "manifest.csv")] == ["skipped", "skipped"]
    assert read_csv(tmp_path / "o" / "cxr_lung_risk.csv") == []


def test_clean_run_exit_0_and_deterministic_on_cpu(tmp_path, sample_pngs, synthetic_weights):
    outs = []
    for k in range(2):
        o = tmp_path / f"o{k}"
        p = run_cli("predict", *map(str, sample_pngs[:3]), "--out", str(o), "--weights", str(synthetic_weights), "--device", "cpu")
        assert p.returncode == 0, p.stderr
        outs.append((o / "cxr_lung_risk.csv").read_bytes())
    assert outs[0] == outs[1]  # same input, same bits
    rows = read_csv(tmp_path / "o0" / "cxr_lung_risk.csv")
    assert [r["File"] for r in rows] == [p.name for p in sample_pngs[:3]]
    assert list(rows[0]) == ["File", "CXR_Lung_Risk", "Weights", "CXR_Lung_Risk_Group"]


def test_preprocess_command_writes_pngs_and_manifest(tmp_path, mixed_input, reference_dir):
    import numpy as np
    from PIL import Image

    out = tmp_path / "pp"
    p = run_cli("preprocess", str(mixed_input), "--out", str(out))
    assert p.returncode == 2, p.stderr  # the truncated file failed
    pngs = sorted(x.relative_to(out).as_posix() for x in out.rglob("*.png"))
    assert pngs == ["RG1_UNCR.png", "sub/chest_no_suffix.png"]
    ref = np.asarray(Image.open(reference_dir / "preprocessing/im_6.8.9-9/RG1_UNCR.png").convert("L"))
    for name in pngs:
        got = np.asarray(Image.open(out / name))
        assert got.shape == ref.shape and int((got != ref).sum()) == 0
    manifest = {r["File"]: r["status"] for r in read_csv(out / "manifest.csv")}
    assert manifest["A.png"] == "skipped" and manifest["ct.dcm"] == "skipped"


def test_worker_processes_give_the_same_results(tmp_path, mixed_run, mixed_input, synthetic_weights):
    """Decoding in worker processes changes nothing: same rows, same manifest, same order."""
    _, out0 = mixed_run
    out = tmp_path / "w2"
    p = run_cli(
        "predict", str(mixed_input), "--out", str(out), "--weights", str(synthetic_weights),
        "--per-model", "--format", "csv,json", "--batch-size", "2", "--workers", "2",
    )
    assert p.returncode == 2, p.stderr
    assert (out / "cxr_lung_risk.csv").read_bytes() == (out0 / "cxr_lung_risk.csv").read_bytes()
    assert (out / "manifest.csv").read_bytes() == (out0 / "manifest.csv").read_bytes()


def test_own_results_in_the_input_are_skipped_as_own_result(tmp_path, synthetic_weights):
    """A folder that also holds an earlier run's outputs (SR, result image, saliency SC): the tool's
    own objects are skipped with the reason "own result", never scored as radiographs (no
    "accepted as a radiograph" warning); the source CR is scored."""
    import shutil

    sample = Path(__file__).resolve().parents[1] / "src" / "cxr_lung_risk" / "samples" / "chest_cr_RG1_J2KI.dcm"
    first = tmp_path / "first"
    p = run_cli("predict", str(sample), "--out", str(first), "--weights", str(synthetic_weights), "--result-image", "--saliency",
                "--quiet")
    assert p.returncode == 0, p.stderr
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(sample, mixed / "cr.dcm")
    for kind in ("sr", "result", "sc"):
        [f] = list((first / kind).glob("*.dcm"))
        shutil.copy(f, mixed / f"{kind}.dcm")
    p = run_cli("predict", str(mixed), "--out", str(tmp_path / "second"), "--weights", str(synthetic_weights), "--quiet")
    assert p.returncode == 0, p.stderr
    m = {r["File"]: r for r in read_csv(tmp_path / "second" / "manifest.csv")}
    assert m["cr.dcm"]["status"] == "ok"
    assert m["sr.dcm"]["status"] == m["result.dcm"]["status"] == m["sc.dcm"]["status"] == "skipped"
    assert m["sr.dcm"]["reason"].startswith("skipped: own result: a structured report made by cxr-lung-risk")
    assert m["result.dcm"]["reason"].startswith("skipped: own result: a derived image (SC) made by cxr-lung-risk")
    assert m["sc.dcm"]["reason"].startswith("skipped: own result: a derived image (SC)")
    assert "accepted as a radiograph" not in p.stderr
