"""The stable Python API (cxr_lung_risk.api): paths, bytes and file objects prepare alike; models
load once and score batches; the writer produces what ``predict`` produces."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest

from cxr_lung_risk import api
from cxr_lung_risk.records import RECORDS_JSONL

CHEST_CR = Path(__file__).resolve().parents[1] / "src" / "cxr_lung_risk" / "samples" / "chest_cr_RG1_J2KI.dcm"


@pytest.fixture(scope="module")
def ct_file():
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


def test_path_bytes_and_stream_prepare_identically():
    by_path = api.prepare_input(CHEST_CR)
    data = CHEST_CR.read_bytes()
    by_bytes = api.prepare_input(data, name="s3://bucket/site/a.dcm")
    by_stream = api.prepare_input(io.BytesIO(data), name="gs://b/a.dcm")
    for p in (by_path, by_bytes, by_stream):
        assert p.status is api.Status.OK, p.reason
        assert p.image.shape == (3, 224, 224) and p.image.dtype == np.uint8
    assert np.array_equal(by_path.image, by_bytes.image) and np.array_equal(by_path.image, by_stream.image)
    assert by_path.uids == by_bytes.uids == by_stream.uids
    assert by_path.uids["SOPInstanceUID"].startswith("1.")
    assert by_path.file.rel == CHEST_CR.name
    assert by_bytes.file.rel == "s3://bucket/site/a.dcm" and by_stream.file.rel == "gs://b/a.dcm"
    # an open file object without a name argument is named after its file
    with open(CHEST_CR, "rb") as f:
        named = api.prepare_input(f)
    assert named.file.rel == CHEST_CR.name and np.array_equal(named.image, by_path.image)


def test_bad_inputs_are_records_not_exceptions(ct_file):
    ct = api.prepare_input(ct_file.read_bytes(), name="ct.dcm")
    assert ct.status is api.Status.SKIPPED and "CT" in ct.reason and ct.image is None
    junk = api.prepare_input(b"DICM" * 100, name="junk.dcm")
    assert junk.status in (api.Status.FAILED, api.Status.SKIPPED) and junk.reason
    big = api.prepare_input(io.BytesIO(b"\0" * 5000), name="big.dcm", max_bytes=4096)
    assert big.status is api.Status.FAILED and "larger than 4096 bytes" in big.reason

    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise OSError(5, "Input/output error")

    broken = api.prepare_input(Broken(), name="net.dcm")
    assert broken.status is api.Status.FAILED and "could not read the input stream" in broken.reason
    with pytest.raises(TypeError):
        api.prepare_input(12345)


def test_score_and_write_equal_predict(tmp_path, synthetic_weights, ct_file):
    """A program using the API gets the rows, SR and records that ``predict`` writes."""
    from cxr_lung_risk.options import PredictOptions
    from cxr_lung_risk.predict import run_predict

    scorer = api.load_scorer(["lung-risk"], weights={"lung-risk": synthetic_weights}, device="cpu")
    items = [api.prepare_input(CHEST_CR), api.prepare_input(ct_file)]
    ok = [p for p in items if p.status is api.Status.OK]
    rows = scorer.score(ok)
    assert len(rows) == 1 and rows[0]["Weights"] == "lung-risk=SYNTHETIC"
    out = tmp_path / "api"
    with api.OutputWriter(out, scorer.models, scorer.columns(), formats=("csv", "sr", "json")) as w:
        recs = w.write_scored(ok, rows)
        recs += [w.account(p) for p in items if p.status is not api.Status.OK]
    assert [r.status for r in recs] == [api.Status.OK, api.Status.SKIPPED]
    assert recs[0].outputs["sr"] and (out / recs[0].outputs["sr"][0]).is_file()
    assert [r.file for r in api.read_records(out)] == [CHEST_CR.name, ct_file.name]
    from cxr_lung_risk.outputs.writer import record_for

    assert record_for(api.prepare_input(b"x", name="s3://bucket/a.dcm")).input == "s3://bucket/a.dcm"

    inp = tmp_path / "in"
    inp.mkdir()
    for p in (CHEST_CR, ct_file):
        (inp / p.name).symlink_to(p)
    ref = run_predict(PredictOptions(inputs=(inp,), out=tmp_path / "cli", weights={"lung-risk": synthetic_weights},
                                     device="cpu", deterministic=True, workers=0, progress=False))
    assert ref.scored == 1 and ref.skipped == 1
    with open(tmp_path / "cli" / "cxr_lung_risk.csv", newline="") as f:
        cli_rows = list(csv.DictReader(f))
    with open(out / "cxr_lung_risk.csv", newline="") as f:
        api_rows = list(csv.DictReader(f))
    assert api_rows == cli_rows
    # deterministic UIDs: the SR written through the API is the SR predict wrote
    import pydicom

    a = pydicom.dcmread(out / recs[0].outputs["sr"][0])
    b = pydicom.dcmread(tmp_path / "cli" / recs[0].outputs["sr"][0])
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert (out / RECORDS_JSONL).is_file()


def test_scorer_refuses_unprepared_input(synthetic_weights, ct_file):
    scorer = api.load_scorer("lung-risk", weights={"lung-risk": synthetic_weights}, device="cpu")
    assert scorer.score([]) == []
    with pytest.raises(ValueError, match="not prepared"):
        scorer.score([api.prepare_input(ct_file)])
