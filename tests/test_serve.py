"""``cxr-lung-risk serve`` against a real Orthanc (marker ``pacs``): the node runs as a real
subprocess on 127.0.0.1 with synthetic weights, started once for the module (loading the
ensemble takes 10-20 s); Orthanc is Debian's, started by ``tests/pacs_fixtures.py``.

Order matters (pytest runs a module's tests in file order): the crash/restart test and the
SIGTERM test come last, because they stop the module's node.
"""
from __future__ import annotations

import csv
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")

from pacs_node import (  # noqa: E402
    SAMPLE_CR, ServeProcess, echo, events, make_instances, malformed_file, push, push_responses, read_audit, sent_by_source,
    sop_of, truncated_cr, wait_for,
)

pytestmark = pytest.mark.pacs

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR (IHE AIR), the default
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
DELIVERY_TIMEOUT = 600  # seconds: scoring on a loaded 2-core CI machine is slow, but bounded


@pytest.fixture(scope="module")
def node(orthanc, synthetic_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    n = ServeProcess(
        root / "spool", synthetic_weights,
        extra=["--send-to", orthanc.dicom_address, "--stow", orthanc.dicomweb_url, "--allow-ae", "ORTHANC,TESTSCU", "--quiet-time", "1",
               "--batch-size", "8", "--retry-initial", "0.5", "--retry-max", "2", "--degraded-after", "2"],
    )
    orthanc.set_modality("node", n.ae_title, "127.0.0.1", n.port)
    n.start()
    yield n
    try:
        n.terminate()
    finally:
        n.kill()


def _orthanc_objects(orthanc, study_uid: str) -> dict[str, list[str]]:
    """SOP Class UID -> Orthanc instance IDs of that class in the study."""
    out: dict[str, list[str]] = {}
    for inst in orthanc.study_instances(study_uid):
        cls = orthanc.get(f"/instances/{inst['ID']}/metadata/SopClassUid", raw=True).decode()
        out.setdefault(cls, []).append(inst["ID"])
    return out


def _numeric_values(ds) -> dict[str, float]:
    """Concept name meaning -> value of every NUM content item of an SR (recursively)."""
    out: dict[str, float] = {}

    def walk(items):
        for it in items:
            if it.get("ValueType") == "NUM" and "MeasuredValueSequence" in it:
                out[str(it.ConceptNameCodeSequence[0].CodeMeaning)] = float(it.MeasuredValueSequence[0].NumericValue)
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    return out


def _destinations(orthanc) -> list[str]:
    """The node's two ways back into the same Orthanc: C-STORE and STOW-RS."""
    return [orthanc.dicom_address, orthanc.dicomweb_url]


def _delivered_once(node, orthanc, sops) -> None:
    """Every result went to each destination exactly once (the audit log's ``sent`` events)."""
    for d in _destinations(orthanc):
        by_source = sent_by_source(node.spool, d)
        assert [by_source.get(s, 0) for s in sops] == [1] * len(sops), d


def _wait_delivered(node, orthanc, sops, timeout=DELIVERY_TIMEOUT):
    def done():
        if node.proc.poll() is not None:
            pytest.fail(f"serve exited:\n{node.log_tail()}")
        return all(all(sent_by_source(node.spool, d).get(s) for s in sops) for d in _destinations(orthanc))

    return wait_for(done, timeout, f"{len(sops)} result(s) delivered to both destinations")


# ------------------------------------------------------------------------------------------ tests
def test_echo_health_and_metrics(node):
    assert echo(node.port) == 0x0000
    h = node.health()
    assert h["status"] == "ok" and h["ae_title"] == "CXR-LUNG-RISK"
    text = node.metrics()
    for name in ("cxr_serve_received_total", "cxr_serve_refused_total", "cxr_serve_scored_total", "cxr_serve_failed_total",
                 "cxr_serve_sent_total", "cxr_serve_retrying", "cxr_serve_queue_depth", "cxr_serve_stage_seconds"):
        assert name in text, name


def test_orthanc_sends_cr_and_receives_sr_and_result_image_equal_to_predict(node, orthanc, synthetic_weights, tmp_path):
    """Orthanc C-STOREs a chest CR to the node; the SR and the result image arrive in Orthanc's
    study, and the SR's value and UID are those of ``predict`` on the same file."""
    src = make_instances(tmp_path / "in", 1, tag="roundtrip")[0]
    study_uid = __import__("pydicom").dcmread(src, stop_before_pixels=True).StudyInstanceUID
    orthanc.upload(src)
    orthanc.send_study(study_uid, "node")
    objs = wait_for(lambda: (o := _orthanc_objects(orthanc, study_uid)) and SR_CLASS in o and SC_CLASS in o and o,
                    DELIVERY_TIMEOUT, "the SR and the result image in Orthanc")
    assert {k: len(v) for k, v in objs.items()} == {"1.2.840.10008.5.1.4.1.1.1": 1, SR_CLASS: 1, SC_CLASS: 1}

    out = tmp_path / "predict"
    r = subprocess.run(["cxr-lung-risk", "predict", str(src), "--out", str(out), "--weights", str(synthetic_weights),
                        "--deterministic", "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    row = next(csv.DictReader((out / "cxr_lung_risk.csv").open()))
    predict_sr = next((out / "sr").glob("*.dcm"))

    import io

    import pydicom

    sr = pydicom.dcmread(io.BytesIO(orthanc.file(objs[SR_CLASS][0])))
    assert sr.SOPInstanceUID == sop_of(predict_sr)  # deterministic UIDs: the same object as predict's
    ours = _numeric_values(sr)
    theirs = _numeric_values(pydicom.dcmread(predict_sr))
    assert ours.keys() == theirs.keys() and ours
    for k in ours:
        assert ours[k] == pytest.approx(theirs[k], rel=1e-6, abs=1e-6), k
    assert any(v == pytest.approx(float(row["CXR_Lung_Risk"]), abs=0.01) for v in ours.values()), (ours, row)
    sc = pydicom.dcmread(io.BytesIO(orthanc.file(objs[SC_CLASS][0])))
    assert sc.StudyInstanceUID == study_uid and sc.SeriesInstanceUID != sr.SeriesInstanceUID
    # dated when they were made (predict --deterministic dates them with the study); StudyDate is the study's
    import datetime

    today = datetime.date.today().strftime("%Y%m%d")
    source = pydicom.dcmread(src, stop_before_pixels=True)
    for obj in (sr, sc):
        assert (obj.ContentDate, obj.SeriesDate) == (today, today) and obj.StudyDate == source.StudyDate != today
    assert pydicom.dcmread(predict_sr).ContentDate == source.StudyDate
    # the audit log saw the association from Orthanc, the instance and the result, no patient names
    audit = read_audit(node.spool)
    assert any(e["event"] == "association" and e.get("calling_ae") == "ORTHANC" and e["result"] == "accepted" for e in audit)
    _wait_delivered(node, orthanc, [src_sop := sop_of(src)])
    _delivered_once(node, orthanc, [src_sop])
    assert any(e["event"] == "received" and e["sop_uid"] == src_sop for e in audit)
    raw = (node.spool / "audit.jsonl").read_text()
    assert str(pydicom.dcmread(src, stop_before_pixels=True).PatientName) not in raw


def test_orthanc_send_to_modality_of_a_mixed_study(node, orthanc, synthetic_weights, tmp_path):
    """The README's first route: Orthanc's "Send to modality" (REST ``POST /modalities/node/store``,
    what Orthanc Explorer's button does, without ``Permissive``) of a study holding a CR, a CT,
    another vendor's SR and an earlier result of this tool (SR + result image). The job succeeds;
    only the CR is kept and scored; everything else is ``ignored`` with its reason (the tool's own
    objects as "own result"); the result is the earlier one's object (same UIDs), so the study
    gains nothing twice."""
    import pydicom
    from pydicom.data import get_testdata_file

    cr = make_instances(tmp_path / "cr", 1, tag="mixed")[0]
    study_uid = str(pydicom.dcmread(cr, stop_before_pixels=True).StudyInstanceUID)
    ct = make_instances(tmp_path / "ct", 1, tag="mixedct", modality="CT", sop_class=CT_CLASS)[0]
    ds = pydicom.dcmread(ct)
    ds.StudyInstanceUID = study_uid
    ds.save_as(ct, enforce_file_format=True)
    foreign = pydicom.dcmread(get_testdata_file("test-SR.dcm"))  # another vendor's SR, moved into the CR's patient and study
    head = pydicom.dcmread(cr, stop_before_pixels=True)
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "StudyID"):
        if kw in head:
            setattr(foreign, kw, head.get(kw))
        elif kw in foreign:
            delattr(foreign, kw)
    foreign.StudyInstanceUID = study_uid
    foreign.SOPInstanceUID = foreign.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    foreign_sr = tmp_path / "foreign_sr.dcm"
    foreign.save_as(foreign_sr, enforce_file_format=True)
    earlier = tmp_path / "earlier"
    r = subprocess.run(["cxr-lung-risk", "predict", str(cr), "--out", str(earlier), "--weights", str(synthetic_weights),
                        "--deterministic", "--result-image", "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    own_sr, own_image = next((earlier / "sr").glob("*.dcm")), next((earlier / "result").glob("*.dcm"))
    for f in (cr, ct, foreign_sr, own_sr, own_image):
        orthanc.upload(f)
    before = {k: len(v) for k, v in _orthanc_objects(orthanc, study_uid).items()}
    # the foreign SR is a Comprehensive SR (...88.33), ours a Comprehensive 3D SR
    assert before == {"1.2.840.10008.5.1.4.1.1.1": 1, CT_CLASS: 1, "1.2.840.10008.5.1.4.1.1.88.33": 1, SR_CLASS: 1, SC_CLASS: 1}

    job = orthanc.send_study(study_uid, "node")  # raises when Orthanc's job fails
    assert job.get("FailedInstancesCount", 0) == 0 and job.get("InstancesCount") == 5, job
    _wait_delivered(node, orthanc, [sop_of(cr)])
    audit = read_audit(node.spool)
    ignored = {e["sop_uid"]: e["reason"] for e in audit if e["event"] == "ignored"}
    assert ignored[sop_of(ct)].startswith("not a chest radiograph SOP class: CT Image Storage")
    assert ignored[sop_of(foreign_sr)].startswith("not a chest radiograph SOP class: Comprehensive SR Storage")
    assert ignored[sop_of(own_sr)].startswith("own result: a structured report made by cxr-lung-risk")
    assert ignored[sop_of(own_image)].startswith("own result: a derived image (SC) made by cxr-lung-risk")
    assert [e["sop_uid"] for e in audit if e["event"] == "received" and e["study_uid"] == study_uid] == [sop_of(cr)]
    log = node.log_tail(2000)
    assert "accepted as a radiograph" not in log and f"ignored {sop_of(own_image)}" in log
    time.sleep(3)
    # the node's SR and result image have the UIDs of the earlier run's: nothing new in the study
    assert {k: len(v) for k, v in _orthanc_objects(orthanc, study_uid).items()} == before
    [sent] = [e for e in events(node.spool, "sent") if e["source_sop_uid"] == sop_of(cr) and e["destination"] == orthanc.dicom_address]
    assert sorted(o["sop_uid"] for o in sent["objects"]) == sorted([sop_of(own_sr), sop_of(own_image)])


def test_bad_input_over_the_wire(node, orthanc, tmp_path):
    """A CT pushed by an SCU is ignored (success, nothing kept, reason logged); with truncated
    pixel data a CR is refused before it is acknowledged (0xC211, the reason in ErrorComment); a
    malformed dataset gets 0xC210 and the node stays up; an unknown calling AE title is rejected."""
    ct = make_instances(tmp_path / "ct", 1, tag="ct", modality="CT", sop_class=CT_CLASS)[0]
    assert push(node.port, [ct]) == [0x0000]
    bad = malformed_file(tmp_path / "malformed.dcm")
    assert push(node.port, [bad]) == [0xC210]
    cut = truncated_cr(tmp_path / "truncated.dcm")
    [resp] = push_responses(node.port, [cut])
    assert int(resp.Status) == 0xC211 and str(resp.ErrorComment).startswith("pixel data is truncated"), resp
    with pytest.raises(RuntimeError, match="rejected=True"):
        push(node.port, make_instances(tmp_path / "intruder", 1, tag="intruder"), calling="INTRUDER")
    assert echo(node.port) == 0x0000 and node.health()["status"] == "ok"  # still up
    audit = read_audit(node.spool)
    refused = [e for e in audit if e["event"] == "refused"]
    ct_sop, bad_sop, cut_sop = sop_of(ct), sop_of(bad), sop_of(cut)
    assert any(e.get("sop_uid") == ct_sop and "CT Image Storage" in e["reason"] for e in audit if e["event"] == "ignored")
    assert any(e.get("sop_uid") == bad_sop and e["status"] == "0xC210" and "malformed" in e["reason"] for e in refused)
    assert any(e.get("sop_uid") == cut_sop and e["status"] == "0xC211" and "truncated" in e["reason"] for e in refused)
    assert any(e["event"] == "association" and e["result"] == "rejected" and e["calling_ae"] == "INTRUDER" for e in audit)
    assert not any(e["event"] == "received" and e["sop_uid"] in (ct_sop, bad_sop, cut_sop) for e in audit)
    log = node.log_tail(400)
    assert f"ignored {ct_sop} from TESTSCU: not a chest radiograph SOP class" in log
    assert f"C-STORE of {cut_sop} from TESTSCU refused (0xC211): pixel data is truncated" in log
    assert node.metric("cxr_serve_refused_total") >= 2 and node.metric("cxr_serve_ignored_total") >= 1
    for sop in (ct_sop, cut_sop):
        assert not list(node.spool.rglob(f"{sop}.dcm"))


def test_destination_down_then_back_delivers_everything_once(node, orthanc, tmp_path):
    files = make_instances(tmp_path / "in", 4, studies=2, tag="down")
    sops = [sop_of(f) for f in files]
    orthanc.stop()
    try:
        assert push(node.port, files) == [0] * 4
        wait_for(lambda: {e["sop_uid"] for e in events(node.spool, "scored")} >= set(sops), DELIVERY_TIMEOUT, "scoring")
        wait_for(lambda: events(node.spool, "send_failed"), 60, "a failed delivery attempt")
        assert not any(sent_by_source(node.spool).get(s) for s in sops)
        # the real cause, not "association aborted"; and /healthz says degraded after 2 failed rounds
        failed = [e for e in events(node.spool, "send_failed") if e["destination"] == orthanc.dicom_address]
        assert failed and "connection refused" in failed[-1]["error"], failed[-1:]
        code, health = wait_for(lambda: (h := node.healthz())[0] == 503 and h, 60, "/healthz to say degraded")
        assert health["status"] == "degraded" and "connection refused" in health["reason"], health
        # (the STOW-RS client retries a refused connection itself for a while: its own
        # send_failed may come later or never, when Orthanc is back in time)
        assert node.metric("cxr_serve_queue_depth", 'stage="outbox"') >= 4
    finally:
        orthanc.start()
    _wait_delivered(node, orthanc, sops)
    time.sleep(3)  # a duplicate delivery, if any, would land now
    _delivered_once(node, orthanc, sops)
    assert node.healthz() == (200, node.health()) and node.health()["status"] == "ok"
    import pydicom

    for f in files[:2]:  # two studies, two instances each: 2 SR + 2 result images per study
        study = pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID
        counts = {k: len(v) for k, v in _orthanc_objects(orthanc, study).items()}
        assert counts == {SR_CLASS: 2, SC_CLASS: 2}
    assert node.metric("cxr_serve_send_errors_total") >= 1


def test_load_four_concurrent_associations_all_accounted_for(node, orthanc, tmp_path):
    n = int(__import__("os").environ.get("CXR_SERVE_LOAD_N", "40"))
    files = make_instances(tmp_path / "in", n, studies=8, tag="load")
    chunks = [files[i::4] for i in range(4)]
    statuses: list[list] = [[] for _ in chunks]

    def run(i):
        statuses[i] = push(node.port, chunks[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(s == [0] * len(c) for s, c in zip(statuses, chunks)), statuses
    sops = {sop_of(f) for f in files}
    received = [e for e in events(node.spool, "received") if e["sop_uid"] in sops]
    assert len(received) == n and {e["sop_uid"] for e in received} == sops  # every acknowledged instance logged once
    assert len({e["assoc"] for e in received}) == 4
    _wait_delivered(node, orthanc, sops)
    _delivered_once(node, orthanc, sorted(sops))
    assert {e["sop_uid"] for e in events(node.spool, "scored")} >= sops
    print(f"load: {n} instances over 4 associations, all delivered in {time.monotonic() - t0:.0f} s")


def test_sigkill_mid_batch_then_restart_scores_and_delivers_exactly_once(node, orthanc, tmp_path):
    files = make_instances(tmp_path / "in", 8, studies=2, tag="crash")
    sops = [sop_of(f) for f in files]
    assert push(node.port, files) == [0] * 8  # acknowledged: the node must not lose any of them
    # the batch (8 = --batch-size) starts at once; kill the node while it is being scored
    wait_for(lambda: any((node.spool / "work").iterdir()), 60, "the batch to start")
    assert not any(e["sop_uid"] in sops for e in events(node.spool, "scored"))
    node.kill()
    assert node.proc.returncode == -9
    assert len(list((node.spool / "incoming").rglob("*.dcm"))) >= 8
    node.start()
    start = [e for e in events(node.spool, "start")][-1]
    assert start["requeued"] >= 8
    _wait_delivered(node, orthanc, sops)
    time.sleep(3)
    scored = [e["sop_uid"] for e in events(node.spool, "scored") if e["sop_uid"] in sops]
    assert sorted(scored) == sorted(sops)  # each scored exactly once
    _delivered_once(node, orthanc, sops)
    import pydicom

    for f in files[:2]:
        study = pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID
        assert {k: len(v) for k, v in _orthanc_objects(orthanc, study).items()} == {SR_CLASS: 4, SC_CLASS: 4}


def test_sigterm_is_a_clean_shutdown(node):
    assert node.terminate() == 0
    stop = events(node.spool, "stop")
    assert stop and stop[-1]["queued"] == 0
    assert "stopped;" in node.log_tail()


def test_one_log_format_and_a_line_per_instance_as_it_moves(node):
    """Every line the node wrote (its own, pynetdicom's, the libraries') has the one format
    ``DATE TIME LEVEL LOGGER: message``; each delivered instance has its received, scored and
    delivered INFO lines."""
    import re

    line_re = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
    text = "\n".join(p.read_text(errors="replace") for p in node.logs)
    odd = [ln for ln in text.splitlines() if ln.strip() and not line_re.match(ln)]
    assert not odd, odd[:10]
    sops = {e["source_sop_uid"] for e in events(node.spool, "sent")}
    assert sops
    for sop in sorted(sops)[:5]:
        assert f"INFO cxr_lung_risk.serve: received {sop} " in text
        assert f"INFO cxr_lung_risk.serve: scored {sop} " in text
        assert f"for {sop} to " in text and "INFO cxr_lung_risk.serve: delivered " in text


# ------------------------------------------------------------------------------------------ the node's decode stage
def _node_prepare(item, opts):
    """The decode step, made hostile for one instance (what a decoder bug or the out-of-memory
    killer does to the process that reads it)."""
    import os
    import signal

    from cxr_lung_risk.pipeline import _prepare

    if item.path.read_bytes().find(b"KILLME") >= 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return _prepare(item, opts)


def test_the_node_decodes_in_fenced_processes_ahead_of_scoring(synthetic_weights, tmp_path, monkeypatch):
    """The node's worker (in this process, with the real models and spool): instances are
    decoded by worker processes while the previous batch is scored; the one whose decoding kills
    its process fails with that reason, and the node and every other instance go on."""
    import pydicom

    from cxr_lung_risk import api, pipeline
    from cxr_lung_risk.serve.audit import AuditLog
    from cxr_lung_risk.serve.config import ServeConfig
    from cxr_lung_risk.serve.metrics import Metrics
    from cxr_lung_risk.serve.spool import Spool
    from cxr_lung_risk.serve.worker import Worker

    monkeypatch.setattr(pipeline, "prepare", _node_prepare)  # the decode processes are forked: they see it
    files = make_instances(tmp_path / "in", 5, tag="fence")
    ds = pydicom.dcmread(files[2])
    ds.StudyDescription = "KILLME"
    ds.save_as(files[2], enforce_file_format=True)
    cfg = ServeConfig(spool=tmp_path / "spool", batch_size=2, quiet_time=0, workers=1)
    spool = Spool(cfg.spool).open()
    audit = AuditLog(cfg.audit_path)
    stop = threading.Event()
    scorer = api.load_scorer(["lung-risk"], weights={"lung-risk": synthetic_weights}, device="cpu")
    worker = Worker(cfg, spool, scorer, audit, Metrics(), stop)
    try:
        for f in files:
            d = pydicom.dcmread(f)
            spool.store(f.read_bytes(), str(d.StudyInstanceUID), str(d.SOPInstanceUID))
        worker.start()
        wait_for(lambda: len([e for e in read_audit(cfg.spool) if e["event"] in ("scored", "failed")]) >= 5, 300,
                 "every instance scored or failed")
        assert worker.is_alive() and not worker.error
        by_sop = {e["sop_uid"]: e for e in read_audit(cfg.spool) if e["event"] in ("scored", "failed")}
        assert by_sop[sop_of(files[2])]["event"] == "failed"
        assert "decode worker died from SIGKILL" in by_sop[sop_of(files[2])]["reason"]
        assert sorted(e["event"] for s, e in by_sop.items() if s != sop_of(files[2])) == ["scored"] * 4
        assert worker.ahead.prepared == 5 and worker.batches == 3  # every instance decoded by the stage, once
        assert spool.pending() == []
    finally:
        stop.set()
        worker.wake.set()
        worker.join(60)
        audit.close()
        spool.close()
    assert not worker.is_alive() and not worker.ahead._thread.is_alive()
