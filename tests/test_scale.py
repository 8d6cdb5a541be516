"""Resume, shards, merge and linkage columns with the local engine (issue 14, items 3-4).

A small real cohort (chest CR copies with their own UIDs, the authors' PNGs, a CT, a truncated
DICOM) is scored once in full; the other runs are compared with it."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cohort import assert_same_rows, cr_copy, predict_opts, scored_run  # noqa: E402

from cxr_lung_risk.options import PredictOptions  # noqa: E402
from cxr_lung_risk.predict import STOP_AFTER_ENV, run_predict  # noqa: E402
from cxr_lung_risk.records import read_records  # noqa: E402


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def sr_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "sr").glob("*.dcm"))}


def records_view(out: Path) -> list[dict]:
    """records.jsonl as comparable dicts: values rounded below float32 batch noise."""
    recs = []
    for r in read_records(out):
        d = r.to_json()
        d["values"] = {k: round(v, 3) for k, v in d["values"].items()}
        assert d.pop("identity")["sha256"] and d.pop("input")  # where the inputs lie differs between runs
        recs.append(json.dumps(d, sort_keys=True))
    return sorted(recs)


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory, sample_pngs) -> Path:
    from pydicom.data import get_testdata_file

    d = tmp_path_factory.mktemp("cohort")
    for i in range(3):
        cr_copy(d / "cr" / f"cr_{i}.dcm", i)
    (d / "png").mkdir()
    for p in sample_pngs[:2]:
        shutil.copyfile(p, d / "png" / p.name)
    shutil.copyfile(get_testdata_file("CT_small.dcm"), d / "ct.dcm")
    (d / "broken.dcm").write_bytes((d / "cr" / "cr_0.dcm").read_bytes()[:3000])
    return d


def _opts(inputs, out, weights, **kw):
    return predict_opts(inputs, out, weights, **{"workers": 0, **kw})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, small_cohort, synthetic_weights) -> Path:
    return scored_run(tmp_path_factory.mktemp("full") / "out", small_cohort, synthetic_weights, (5, 1, 1), workers=0)


def test_linkage_columns_come_from_the_headers(full_run, small_cohort):
    import pydicom

    rows = {r["File"]: r for r in read_csv(full_run / "cxr_lung_risk.csv")}
    assert list(next(iter(rows.values())))[:8] == ["File", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                                    "PatientID", "StudyDate", "AccessionNumber", "ViewPosition"]
    for i in range(3):
        ds = pydicom.dcmread(small_cohort / "cr" / f"cr_{i}.dcm", stop_before_pixels=True)
        r = rows[f"cr/cr_{i}.dcm"]
        assert (r["PatientID"], r["StudyDate"], r["AccessionNumber"], r["ViewPosition"]) == (
            ds.PatientID, ds.StudyDate, ds.AccessionNumber, ds.ViewPosition)
    assert rows["png/A.png"]["PatientID"] == "" and rows["png/A.png"]["AccessionNumber"] == ""
    js = json.loads((full_run / "cxr_lung_risk.json").read_text())
    assert {r["File"]: r["AccessionNumber"] for r in js} == {k: v["AccessionNumber"] for k, v in rows.items()}


def test_linkage_columns_are_off_by_default_and_documented(tmp_path):
    from cxr_lung_risk.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["predict"].format_help()
    assert "--linkage-columns" in help_text and "IDENTIFYING" in help_text
    assert PredictOptions(inputs=(tmp_path,), out=tmp_path / "o").linkage is False


def test_records_carry_the_input_identity(full_run, small_cohort):
    for r in read_records(full_run):
        path = Path(r.identity["input"])
        assert path.is_absolute() and path.is_file()
        st = path.stat()
        assert (r.identity["size"], r.identity["mtime"]) == (st.st_size, st.st_mtime_ns)
        assert r.identity["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_redoes_only_the_missing_part(tmp_path, monkeypatch, small_cohort, full_run, synthetic_weights):
    inp = tmp_path / "in"
    shutil.copytree(small_cohort, inp)  # own copy: this test changes a file's time
    out = tmp_path / "out"
    monkeypatch.setenv(STOP_AFTER_ENV, "6")  # input order: broken, cr_0, cr_1, cr_2, ct, png/A, png/B
    with pytest.raises(KeyboardInterrupt):
        run_predict(_opts(inp, out, synthetic_weights))
    monkeypatch.delenv(STOP_AFTER_ENV)
    first = list(read_records(out))
    assert len(first) == 6
    # a partly written input: its SR is gone; a changed input: new modification time
    ok = [r for r in first if r.status.value == "ok"]
    dicom_ok = [r for r in ok if r.outputs.get("sr")]
    raster_ok = [r for r in ok if not r.outputs.get("sr")]
    assert dicom_ok and raster_ok, [r.file for r in first]
    (out / dicom_ok[0].outputs["sr"][0]).unlink()
    os.utime(inp / raster_ok[0].file, ns=(1, 1))
    expected_redo = {dicom_ok[0].file, raster_ok[0].file} | {r.file for r in first if r.status.value == "failed"}
    expected_redo |= {"cr/cr_0.dcm", "cr/cr_1.dcm", "cr/cr_2.dcm", "png/A.png", "png/B.png", "ct.dcm", "broken.dcm"} - {r.file for r in first}
    kept = {r.file for r in first} - expected_redo
    tm = tmp_path / "t.json"
    s = run_predict(_opts(inp, out, synthetic_weights, timings=tm))
    t = json.loads(tm.read_text())
    assert t["done_now"] == len(expected_redo) and t["resumed"] == len(kept) == s.resumed
    after = list(read_records(out))
    assert sorted(r.file for r in after) == sorted(r.file for r in read_records(full_run))  # each input once
    assert [r.file for r in after[: len(kept)]] == [r.file for r in first if r.file in kept]  # kept records stay as they were
    # the union equals one full run: the same rows, records and SRs (scores to float32 batch noise)
    assert_same_rows(read_csv(out / "cxr_lung_risk.csv"), read_csv(full_run / "cxr_lung_risk.csv"))
    assert sorted(read_csv(out / "manifest.csv"), key=lambda r: r["File"]) == sorted(read_csv(full_run / "manifest.csv"), key=lambda r: r["File"])
    js = lambda o: [{k: str(v) for k, v in r.items()} for r in json.loads((o / "cxr_lung_risk.json").read_text())]  # noqa: E731
    assert_same_rows(js(out), js(full_run))
    assert records_view(out) == records_view(full_run)
    assert sorted(sr_files(out)) == sorted(sr_files(full_run))
    # a third run finds everything done but the failed input, and scores nothing
    s3 = run_predict(_opts(inp, out, synthetic_weights, timings=tm))
    assert json.loads(tm.read_text())["done_now"] == 1 and s3.failed == 1 and s3.scored == 5
    assert len(list(read_records(out))) == 7


def test_other_options_start_afresh(tmp_path, small_cohort, synthetic_weights):
    """A folder written with other options is not resumed (its tables are replaced, not mixed)."""
    one = tmp_path / "one"
    one.mkdir()
    shutil.copyfile(small_cohort / "ct.dcm", one / "ct.dcm")
    out = tmp_path / "out"
    run_predict(_opts(one, out, synthetic_weights))
    tm = tmp_path / "t.json"
    run_predict(_opts(one, out, synthetic_weights, linkage=False, timings=tm))
    assert json.loads(tm.read_text())["done_now"] == 1
    run_predict(_opts(one, out, synthetic_weights, linkage=False, timings=tm))
    assert json.loads(tm.read_text())["done_now"] == 0
    assert len(list(read_records(out))) == 1


def test_shard_is_a_stable_hash_of_the_name():
    from cxr_lung_risk.api import shard_of

    names = [f"site{i % 3}/img_{i}.dcm" for i in range(200)]
    for n in (1, 3, 8):
        got = [shard_of(x, n) for x in names]
        assert got == [int(hashlib.sha256(x.encode()).hexdigest()[:16], 16) % n for x in names]
        assert got == [shard_of(x, n) for x in reversed(names)][::-1]  # not the position
    assert len({shard_of(x, 8) for x in names}) == 8


def test_shards_union_equals_full_run(tmp_path, small_cohort, full_run, synthetic_weights):
    from cxr_lung_risk.cli import main
    from cxr_lung_risk.resume import parse_shard

    outs, files = [], []
    for k in range(3):
        o = tmp_path / f"shard{k}"
        s = run_predict(_opts(small_cohort, o, synthetic_weights, shard=parse_shard(f"{k}/3")))
        outs.append(o)
        files.append({r.file for r in read_records(o)})
        assert s.inputs == len(files[-1])
    full_files = {r.file for r in read_records(full_run)}
    assert sum(len(f) for f in files) == len(full_files) and set().union(*files) == full_files
    merged = tmp_path / "merged"
    assert main(["merge", *map(str, outs), "--out", str(merged)]) == 2  # the broken file failed
    by_file = lambda rows: sorted(rows, key=lambda r: r["File"])  # noqa: E731
    assert_same_rows(read_csv(merged / "cxr_lung_risk.csv"), read_csv(full_run / "cxr_lung_risk.csv"))
    assert by_file(read_csv(merged / "manifest.csv")) == by_file(read_csv(full_run / "manifest.csv"))
    assert records_view(merged) == records_view(full_run)
    assert sorted(sr_files(merged)) == sorted(sr_files(full_run))
    for o in outs:  # merge copied each shard's files as they were
        assert {k: v for k, v in sr_files(merged).items() if k in sr_files(o)} == sr_files(o)
    assert main(["predict", str(small_cohort), "--out", str(tmp_path / "x"), "--shard", "3/3"]) == 1
