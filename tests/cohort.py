"""A small mixed cohort built from the repository's real files, for the scale tests and the Ray
benchmark: copies of the chest CR sample with rewritten UIDs (distinct patients, studies,
accession numbers), the authors' sample PNGs, a CT and an MR from pydicom-data (skipped), a
truncated DICOM (failed) and a text file (skipped)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHEST_CR = REPO / "src" / "cxr_lung_risk" / "samples" / "chest_cr_RG1_J2KI.dcm"


def cr_copy(dst: Path, i: int) -> Path:
    """The chest CR sample as another image: its own UIDs and linkage attributes."""
    import pydicom

    ds = pydicom.dcmread(CHEST_CR)
    root = f"2.25.{314159265358979 + i}"
    ds.StudyInstanceUID = f"{root}.1"
    ds.SeriesInstanceUID = f"{root}.1.1"
    ds.SOPInstanceUID = f"{root}.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = f"P{i % 7:03d}"
    ds.AccessionNumber = f"A{i:04d}"
    ds.StudyDate = f"2020{i % 12 + 1:02d}{i % 28 + 1:02d}"
    ds.ViewPosition = "PA" if i % 2 else "AP"
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def make_cohort(dst: Path, sample_pngs, n_cr: int = 20, png_copies: int = 3) -> Path:
    """``dst`` with n_cr CR copies, png_copies x the 5 sample PNGs, CT, MR, a broken file, a text file."""
    from pydicom.data import get_testdata_file

    for i in range(n_cr):
        cr_copy(dst / "cr" / f"cr_{i:03d}.dcm", i)
    for k in range(png_copies):
        for p in sample_pngs:
            (dst / f"png{k}").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst / f"png{k}" / p.name)
    (dst / "other").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(get_testdata_file("CT_small.dcm"), dst / "other" / "ct.dcm")
    shutil.copyfile(get_testdata_file("MR_small.dcm"), dst / "other" / "mr.dcm")
    (dst / "other" / "broken.dcm").write_bytes(CHEST_CR.read_bytes()[:3000])
    (dst / "other" / "notes.txt").write_text("not an image\n")
    return dst


def predict_opts(inputs, out, weights, **kw):
    """The options the scale tests run with: CPU, deterministic SRs, linkage columns, CSV+SR+JSON."""
    from cxr_lung_risk.options import PredictOptions

    base = dict(weights={"lung-risk": weights}, device="cpu", deterministic=True, batch_size=2, progress=False,
                formats="csv,sr,json", linkage=True)
    base.update(kw)
    return PredictOptions(inputs=tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,), out=out, **base)


def scored_run(out, inputs, weights, counts, **kw):
    """Run predict into ``out`` and check (scored, skipped, failed) == ``counts``; returns ``out``."""
    from cxr_lung_risk.predict import run_predict

    s = run_predict(predict_opts(inputs, out, weights, **kw))
    assert (s.scored, s.skipped, s.failed) == counts, (s.scored, s.skipped, s.failed)
    return out


VALUE_COLUMNS = ("CXR_Lung_Risk",)


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    """The same inputs and columns, every text cell equal; scores equal to float32 batch noise.

    A resumed run or a shard batches images differently from a full run, and the CPU kernels'
    last bits depend on the batch size and an image's place in it (README, "Outputs")."""
    key = lambda r: r["File"]  # noqa: E731
    got, want = sorted(got, key=key), sorted(want, key=key)
    assert [list(r) for r in got] == [list(r) for r in want]
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k not in VALUE_COLUMNS} == {k: v for k, v in w.items() if k not in VALUE_COLUMNS}
        for k in VALUE_COLUMNS:
            if w.get(k) not in (None, ""):
                assert float(g[k]) == pytest.approx(float(w[k]), rel=1e-6, abs=0), (g["File"], k)
