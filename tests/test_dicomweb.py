"""DICOMweb in and out, and the result image (issue 13, items 3 and 4), against a real Orthanc.

The ``pacs`` tests start Debian's Orthanc + DICOMweb plugin on 127.0.0.1 ports
(tests/orthanc.py), store the package's chest CR and a CT re-labelled into the same study, then
run ``cxr-lung-risk predict dicomweb+http://.../studies/<uid> --stow ... --result-image`` with
synthetic weights, and ``predict`` on the same local file, once each for the module. The other
tests need no server (URL forms, the CLI's refusals, the result image built from a real CR).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import dciodvfy
from orthanc import OrthancError, TlsFront, make_test_pki
from cxr_lung_risk import __version__, api
from cxr_lung_risk.dicomweb import (
    DicomwebSource,
    HttpOptions,
    expand_sources,
    iter_remote_prepared,
    parse_source,
    parse_stow_url,
    stow,
)
from cxr_lung_risk.errors import UsageError
from cxr_lung_risk.outputs.base import write_dataset
from cxr_lung_risk.outputs.result_image import (
    RESEARCH_ONLY,
    ResultValue,
    WeightsLine,
    build_result_image,
    render_result,
)

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "cxr_lung_risk" / "samples" / "chest_cr_RG1_J2KI.dcm"
CR = pydicom.dcmread(SAMPLE, stop_before_pixels=True)
STUDY, SERIES, SOP = str(CR.StudyInstanceUID), str(CR.SeriesInstanceUID), str(CR.SOPInstanceUID)
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
BANNER_RED = np.array([200, 20, 20])


def _csv_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "cxr_lung_risk.csv", newline="") as f:
        return list(csv.DictReader(f))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line.strip()]


def _ct_in_study(dest: Path) -> Path:
    """pydicom's own CT_small.dcm, re-labelled into the CR's patient and study (new series/SOP UIDs)."""
    from pydicom.data import get_testdata_file

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for kw in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "StudyID"):
        if kw in CR:
            setattr(ct, kw, CR.get(kw))
        elif kw in ct:
            delattr(ct, kw)
    ct.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.4242.1"
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.4242.2"
    ct.save_as(dest)
    return dest


def _assert_banner(rgb: np.ndarray, lines: int) -> None:
    """The research-use banner: red rows across the top, with white text in them."""
    band = rgb[: 14 + 42 * lines]
    red = np.all(np.abs(band.astype(int) - BANNER_RED) <= 2, axis=-1)
    assert red.mean() > 0.6, red.mean()
    assert np.all(band >= 240, axis=-1).sum() > 500  # the white letters
    below = rgb[14 + 42 * lines + 4 : 14 + 42 * lines + 40]
    assert not np.all(np.abs(below.astype(int) - BANNER_RED) <= 2, axis=-1).any(axis=1).all()


# ------------------------------------------------------------------------------ no server needed
def test_source_url_forms():
    s = parse_source(f"dicomweb+http://127.0.0.1:8042/dicom-web/studies/{STUDY}")
    assert s == DicomwebSource("http://127.0.0.1:8042/dicom-web", STUDY, None)
    s = parse_source(f"DICOMweb+HTTPS://pacs.example:443/wado/rs/studies/{STUDY}/series/{SERIES}/")
    assert (s.base_url, s.study_uid, s.series_uid) == ("https://pacs.example:443/wado/rs", STUDY, SERIES)
    assert str(s) == f"dicomweb+https://pacs.example:443/wado/rs/studies/{STUDY}/series/{SERIES}"
    for bad in (
        "dicomweb+ftp://h/dicom-web/studies/1.2",
        "dicomweb+http://h/dicom-web",  # no study
        "dicomweb+http://h/dicom-web/studies/1.2/instances/3",
        "dicomweb+http://h/dicom-web/studies/1.2?x=1",
        "dicomweb+http://h:99999/dicom-web/studies/1.2",
        "dicomweb+http:///dicom-web/studies/1.2",
        "dicomweb+http://h/dicom-web/studies/abc",
        "http://h/dicom-web/studies/1.2",
    ):
        with pytest.raises(UsageError):
            parse_source(bad)
    assert parse_stow_url("http://127.0.0.1:8042/dicom-web/studies/") == "http://127.0.0.1:8042/dicom-web"
    with pytest.raises(UsageError):
        parse_stow_url("127.0.0.1:8042/dicom-web")
    with pytest.raises(UsageError, match="client certificate"):
        HttpOptions(client_key=str(SAMPLE)).validate()
    with pytest.raises(UsageError, match="does not exist"):
        HttpOptions(ca_bundle="/nonexistent/ca.pem").validate()


def test_cli_refuses_bad_dicomweb_options_before_loading(tmp_path, capsys):
    from cxr_lung_risk import cli

    rc = cli.main(["predict", "dicomweb+http://127.0.0.1:9/dicom-web/series/1.2", "--out", str(tmp_path / "o")])
    assert rc == 1 and "must name a study" in capsys.readouterr().err
    rc = cli.main(["predict", str(SAMPLE), "--out", str(tmp_path / "o"), "--stow", "ftp://x/dicom-web"])
    assert rc == 1 and "--stow needs" in capsys.readouterr().err
    rc = cli.main(["predict", "dicomweb+http://127.0.0.1:9/dicom-web/studies/1.2", "--out", str(tmp_path / "o"),
                   "--dicomweb-ca-bundle", str(tmp_path / "missing.pem")])
    assert rc == 1 and "CA bundle" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_result_image_of_a_real_cr(tmp_path):
    p = api.prepare_input(SAMPLE)
    assert p.status is api.Status.OK
    values = [ResultValue("CXR-Lung-Risk", 62.34, "a"), ResultValue("CXR-Age", 58.06, "a")]
    weights = [WeightsLine("CXR-Lung-Risk", "SYNTHETIC", "ab" * 32), WeightsLine("CXR-Age", "published", "cd" * 32)]
    overlay = np.ascontiguousarray(p.image.transpose(1, 2, 0)[:, ::-1])
    ds = build_result_image(p.dataset, p.image, values, weights, software_version="1.2.3", overlay=overlay, deterministic=True)
    path = write_dataset(ds, tmp_path / "r.dcm")
    errors, _ = dciodvfy(path)
    assert errors == []
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == SC_STORAGE and back.PhotometricInterpretation == "RGB"
    assert (back.StudyInstanceUID, back.PatientID, back.PatientName) == (CR.StudyInstanceUID, CR.PatientID, CR.PatientName)
    assert back.SeriesInstanceUID != CR.SeriesInstanceUID and back.SeriesNumber == 9201
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == SOP
    text = back.ImageComments
    for needle in (RESEARCH_ONLY, "CXR-Lung-Risk: 62.3 years", "CXR-Age: 58.1 years", "cxr-lung-risk 1.2.3",
                   "CXR-Lung-Risk weights: SYNTHETIC", "CXR-Age weights: published", "abababab"):
        assert needle in text, needle
    assert "research use only" in back.SeriesDescription.lower()
    assert "SYNTHETIC" in back.DerivationDescription and "62.3 years" in back.DerivationDescription
    # deterministic: the same UIDs again; a different source would get others
    again = build_result_image(p.dataset, p.image, values, weights, software_version="1.2.3", deterministic=True)
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (ds.SOPInstanceUID, ds.SeriesInstanceUID)
    # pixels: banner (two lines: research use + synthetic), the image the model saw, the text
    rgb = back.pixel_array
    _assert_banner(rgb, lines=2)
    tile = rgb[14 + 84 + 16 + 24 : 14 + 84 + 16 + 24 + 448, 16 : 16 + 448]
    assert tile.std() > 20
    # the scores are really drawn: another value changes the text rows, not the image rows
    other = render_result(p.image, [ResultValue("CXR-Lung-Risk", 71.0, "a"), values[1]], weights, software_version="1.2.3", overlay=overlay)
    diff = np.any(other != rgb, axis=-1)
    rows = np.nonzero(diff.any(axis=1))[0]
    assert rows.size and rows.min() > 14 + 84 + 16 + 24 + 448
    # published weights only: one banner line, no "SYNTHETIC" anywhere
    pub = render_result(p.image, values[:1], [WeightsLine("CXR-Lung-Risk", "published", "ef" * 32)])
    _assert_banner(pub, lines=1)
    with pytest.raises(ValueError):
        build_result_image(p.dataset, p.image, [], weights)


# ------------------------------------------------------------------------------ real Orthanc
@pytest.fixture(scope="module")
def pulled(orthanc, synthetic_weights, tmp_path_factory):
    """Orthanc holds the CR + a CT of the same study; ``predict`` pulls the study over DICOMweb,
    STOWs the results back, and ``predict`` scores the same CR from the local file (with
    ``--saliency``: its result image shows the overlay)."""
    from cxr_lung_risk import cli

    tmp = tmp_path_factory.mktemp("dicomweb")
    ct = _ct_in_study(tmp / "ct.dcm")
    assert orthanc.upload(SAMPLE)["Status"] == "Success"
    assert orthanc.upload(ct)["Status"] == "Success"
    common = ["--weights", str(synthetic_weights), "--device", "cpu", "--workers", "0", "--deterministic",
              "--result-image", "--format", "csv,sr,json", "--quiet"]
    remote, local = tmp / "remote", tmp / "local"
    source = f"dicomweb+{orthanc.dicomweb_url}/studies/{STUDY}"
    rc_remote = cli.main(["predict", source, "--out", str(remote), "--stow", orthanc.dicomweb_url, *common])
    rc_local = cli.main(["predict", str(SAMPLE), "--out", str(local), "--saliency", *common])
    return {"orthanc": orthanc, "remote": remote, "local": local, "rc": (rc_remote, rc_local), "ct": ct}


@pytest.mark.pacs
def test_pull_accounts_every_instance(pulled):
    assert pulled["rc"] == (0, 0)
    recs = {r["sop_uid"]: r for r in _records(pulled["remote"])}
    ct_sop = pydicom.dcmread(pulled["ct"], stop_before_pixels=True).SOPInstanceUID
    assert set(recs) == {SOP, ct_sop}
    base = pulled["orthanc"].dicomweb_url
    cr = recs[SOP]
    assert cr["status"] == "ok" and cr["input"] == f"{base}/studies/{STUDY}/series/{SERIES}/instances/{SOP}"
    assert (cr["study_uid"], cr["series_uid"]) == (STUDY, SERIES)
    assert set(cr["outputs"]) == {"sr", "result_image"}
    assert recs[ct_sop]["status"] == "skipped" and "CT" in recs[ct_sop]["reason"]
    with open(pulled["remote"] / "manifest.csv", newline="") as f:
        assert sorted(r["status"] for r in csv.DictReader(f)) == ["ok", "skipped"]
    run = json.loads((pulled["remote"] / "run.json").read_text())
    assert run["inputs"] == [f"dicomweb+{base}/studies/{STUDY}"] and run["n_inputs"] == 2


@pytest.mark.pacs
def test_values_equal_predict_on_the_local_file(pulled):
    [remote] = _csv_rows(pulled["remote"])
    [local] = _csv_rows(pulled["local"])
    assert remote["SOPInstanceUID"] == local["SOPInstanceUID"] == SOP
    assert float(remote["CXR_Lung_Risk"]) == float(local["CXR_Lung_Risk"])
    assert remote["Weights"] == local["Weights"] == "lung-risk=SYNTHETIC"
    # deterministic outputs: the same SR and result image as the local run
    for kind in ("sr", "result_image"):
        [r] = [x for x in _records(pulled["remote"]) if x["status"] == "ok"][0]["outputs"][kind]
        [l] = _records(pulled["local"])[0]["outputs"][kind]
        a, b = pydicom.dcmread(pulled["remote"] / r), pydicom.dcmread(pulled["local"] / l)
        assert a.SOPInstanceUID == b.SOPInstanceUID


@pytest.mark.pacs
def test_result_image_shows_the_saliency_overlay(pulled):
    [rec] = _records(pulled["local"])
    assert set(rec["outputs"]) == {"sr", "sc", "saliency", "result_image"}
    [r] = [x for x in _records(pulled["remote"]) if x["status"] == "ok"][0]["outputs"]["result_image"]
    [l] = rec["outputs"]["result_image"]
    top = 14 + 84 + 16 + 24  # banner (2 lines: synthetic weights), gap, caption
    second_tile = (slice(top, top + 448), slice(16 + 448 + 16, 16 + 448 + 16 + 448))
    with_overlay = pydicom.dcmread(pulled["local"] / l).pixel_array[second_tile]
    without = pydicom.dcmread(pulled["remote"] / r).pixel_array[second_tile]
    assert with_overlay.std() > 20 and with_overlay[..., 0].mean() > with_overlay[..., 2].mean() + 10  # 'hot' colours
    assert not without.any()
    assert dciodvfy(pulled["local"] / l)[0] == []


@pytest.mark.pacs
def test_stow_puts_sr_and_result_image_into_the_study(pulled, tmp_path):
    from cxr_lung_risk.outputs.sr import read_measurements

    o = pulled["orthanc"]
    stowed = json.loads((pulled["remote"] / "stow.json").read_text())
    assert stowed["url"] == o.dicomweb_url
    assert [r["ok"] for r in stowed["results"]] == [True, True]
    [row] = _csv_rows(pulled["local"])
    value = float(row["CXR_Lung_Risk"])

    by_class: dict[str, list[str]] = {}
    for inst in o.study_instances(STUDY):
        by_class.setdefault(o.tags(inst["ID"])["SOPClassUID"], []).append(inst["ID"])
    assert len(o.study_instances(STUDY)) == 4  # CR, CT, our SR, our result image
    [sr_id] = by_class["1.2.840.10008.5.1.4.1.1.88.34"]  # Comprehensive 3D SR (the default)
    [sc_id] = by_class[SC_STORAGE]

    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(o.file(sr_id))
    assert read_measurements(sr_path)["CXR-Lung-Risk"] == value

    sc_path = tmp_path / "result.dcm"
    sc_path.write_bytes(o.file(sc_id))
    errors, _ = dciodvfy(sc_path)
    assert errors == []
    ds = pydicom.dcmread(sc_path)
    assert (ds.StudyInstanceUID, ds.PatientID) == (STUDY, CR.PatientID)
    assert ds.SeriesInstanceUID not in (SERIES, pydicom.dcmread(sr_path).SeriesInstanceUID)
    for needle in (RESEARCH_ONLY, f"CXR-Lung-Risk: {value:.1f} years", "CXR-Lung-Risk weights: SYNTHETIC",
                   f"cxr-lung-risk {__version__}"):
        assert needle in ds.ImageComments, needle
    assert ds.SoftwareVersions == __version__
    rgb = ds.pixel_array
    _assert_banner(rgb, lines=2)
    assert rgb[14 + 84 + 16 + 24 : 14 + 84 + 16 + 24 + 448, 16 : 16 + 448].std() > 20  # the radiograph is there

    # QIDO through the DICOMweb plugin sees the result image's series too
    series = o.get(f"/dicom-web/studies/{STUDY}/series", accept="application/dicom+json")
    assert {s["0020000E"]["Value"][0] for s in series} >= {SERIES, ds.SeriesInstanceUID}

    # sending the same results again (a retry) stores nothing new
    again = stow(o.dicomweb_url, [pulled["remote"] / r["path"] for r in stowed["results"]])
    assert all(r.ok for r in again)
    assert len(o.study_instances(STUDY)) == 4


@pytest.mark.pacs
def test_fetch_failures_are_recorded(orthanc_factory, tmp_path):
    o = orthanc_factory(aet="DOWN")
    o.upload(SAMPLE)
    # a series source: only that series; an unknown study: one failed record
    src = parse_source(f"dicomweb+{o.dicomweb_url}/studies/{STUDY}/series/{SERIES}")
    items = expand_sources([src])
    assert [i.sop_uid for i in items] == [SOP]
    from cxr_lung_risk.dicomweb import fetch_instance

    assert fetch_instance(items[0]) == SAMPLE.read_bytes()  # the stored file itself, nothing re-encoded
    with pytest.raises(ValueError, match="larger than"):
        fetch_instance(items[0], max_bytes=100_000)
    unknown = parse_source(f"dicomweb+{o.dicomweb_url}/studies/1.2.3.4")
    [p] = list(iter_remote_prepared([unknown]))
    assert p.status is api.Status.FAILED and "lists no instances" in p.reason and p.file.rel == unknown.url
    # listed, then gone before WADO-RS: that instance fails, with its URL and UIDs
    for inst in o.study_instances(STUDY):
        o.request("DELETE", f"/instances/{inst['ID']}")
    [p] = list(iter_remote_prepared(items))
    assert p.status is api.Status.FAILED and "WADO-RS" in p.reason and "404" in p.reason
    assert p.file.rel == items[0].url and p.uids["SOPInstanceUID"] == SOP
    # the server is down: listing fails (one failed record), STOW fails every file, nothing raises
    o.stop()
    [p] = list(iter_remote_prepared([src], http=HttpOptions(timeout=5)))
    assert p.status is api.Status.FAILED and "QIDO-RS" in p.reason
    not_dicom = tmp_path / "x.txt"
    not_dicom.write_text("not DICOM")
    res = stow(o.dicomweb_url, [SAMPLE, not_dicom], http=HttpOptions(timeout=5))
    assert [r.ok for r in res] == [False, False]
    assert res[0].sop_uid == SOP and "Connection" in res[0].reason
    assert "cannot read" in res[1].reason
    o.start()
    assert stow(o.dicomweb_url, [SAMPLE])[0].ok
    assert [i["ID"] for i in o.study_instances(STUDY)]


@pytest.mark.pacs
def test_dicomweb_over_tls_with_ca_bundle_and_client_certificate(orthanc_factory, tmp_path):
    """https sources and STOW through a TLS front (mutual TLS) to a real Orthanc: the CA bundle and
    the client certificate are what make it work; without either the request fails, recorded."""
    try:
        pki = make_test_pki(tmp_path / "pki")
    except OrthancError as e:
        pytest.skip(str(e))
    o = orthanc_factory(aet="TLS")
    o.upload(SAMPLE)
    front = TlsFront(o.http_port, pki["server_cert"], pki["server_key"], client_ca=pki["ca"])
    try:
        base = front.url + "/dicom-web"
        src = parse_source(f"dicomweb+{base}/studies/{STUDY}")
        client = {"client_cert": str(pki["client_cert"]), "client_key": str(pki["client_key"])}
        good = HttpOptions(ca_bundle=str(pki["ca"]), timeout=10, **client).validate()
        [p] = list(iter_remote_prepared([src], http=good))
        assert p.status is api.Status.OK and p.file.rel.startswith("https://127.0.0.1:")
        assert p.uids["SOPInstanceUID"] == SOP
        [p] = list(iter_remote_prepared([src], http=HttpOptions(timeout=10, **client)))  # server not verifiable
        assert p.status is api.Status.FAILED and "SSL" in p.reason
        failures = front.handshake_failures
        [p] = list(iter_remote_prepared([src], http=HttpOptions(ca_bundle=str(pki["ca"]), timeout=10)))  # no client cert
        assert p.status is api.Status.FAILED and front.handshake_failures > failures

        prepared = api.prepare_input(SAMPLE)
        ds = build_result_image(prepared.dataset, prepared.image, [ResultValue("CXR-Lung-Risk", 50.0, "a")],
                                [WeightsLine("CXR-Lung-Risk", "SYNTHETIC")], deterministic=True)
        path = write_dataset(ds, tmp_path / "result.dcm")
        assert not stow(base, [path], http=HttpOptions(ca_bundle=str(pki["ca"]), timeout=10))[0].ok
        [r] = stow(base, [path], http=good)
        assert r.ok and r.sop_uid == ds.SOPInstanceUID
        assert ds.SOPInstanceUID in {o.tags(i["ID"])["SOPInstanceUID"] for i in o.study_instances(STUDY)}
    finally:
        front.close()
    assert HttpOptions(token="abc").session().headers["Authorization"] == "Bearer abc"


@pytest.mark.pacs
def test_readme_stow_rerun_in_another_batch_adds_nothing_and_orthanc_log_stays_clean(orthanc_factory, synthetic_weights, tmp_path):
    """The README's STOW example, as a user reruns it (no --deterministic): the first run scores
    the CR alone, the second together with three other radiographs in one batch (float32 batch
    noise changes the last bits of the scores). The SR and result image keep their UIDs, so the
    second STOW adds nothing to the study; they are dated when made. Orthanc's log has no error
    from our QIDO-RS (one Accept media type)."""
    import datetime
    import subprocess
    import sys

    from pacs_node import make_instances

    o = orthanc_factory(aet="STOWTWICE")
    assert o.upload(SAMPLE)["Status"] == "Success"
    others = make_instances(tmp_path / "others", 3, tag="stowbatch")
    source = f"dicomweb+{o.dicomweb_url}/studies/{STUDY}"
    exe = str(Path(sys.executable).with_name("cxr-lung-risk"))

    def run(out: Path, *extra: str) -> Path:
        r = subprocess.run([exe, "predict", source, *extra, "--out", str(out), "--result-image", "--stow", o.dicomweb_url,
                            "--weights", str(synthetic_weights), "--device", "cpu", "--quiet"],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        return out

    first = run(tmp_path / "first", "--batch-size", "1")
    after_first = len(o.study_instances(STUDY))
    assert after_first == 3  # CR, SR, result image
    second = run(tmp_path / "second", *map(str, others), "--batch-size", "4")
    assert len(o.study_instances(STUDY)) == after_first  # nothing twice

    def ours(out: Path) -> dict:
        [rec] = [r for r in _records(out) if r["sop_uid"] == SOP]
        return rec

    a, b = ours(first), ours(second)
    print(f"first {a['values']}, second {b['values']}")
    for kind in ("sr", "result_image"):
        [ra], [rb] = a["outputs"][kind], b["outputs"][kind]
        da, db = pydicom.dcmread(first / ra), pydicom.dcmread(second / rb)
        assert (da.SOPInstanceUID, da.SeriesInstanceUID) == (db.SOPInstanceUID, db.SeriesInstanceUID), kind
        assert da.ContentDate == datetime.date.today().strftime("%Y%m%d") and da.StudyDate == CR.StudyDate
    stowed = json.loads((second / "stow.json").read_text())["results"]
    assert stowed and all(r["ok"] for r in stowed)
    log = o.log_tail(100000)
    assert "Unsupported return MIME type" not in log
    errors = [ln for ln in log.splitlines() if ln.startswith("E")]
    assert not errors, errors[:5]
