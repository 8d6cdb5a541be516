"""The PACS node's parts without the models (fast; real DICOM, real pynetdicom peers on 127.0.0.1,
real TLS): configuration from YAML + command line, batch selection, the spool's state machine,
the listener (refusals, TLS) and the outbox (retry until a destination comes up)."""
from __future__ import annotations

import json
import ssl
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pynetdicom")

from pacs_node import (Receiver, SAMPLE_CR, free_port, make_instances, malformed_file, push, push_responses, read_audit,  # noqa: E402
                       sop_of, truncated_cr, wait_for, with_attributes)

from cxr_lung_risk import cli  # noqa: E402
from cxr_lung_risk.errors import UsageError  # noqa: E402
from cxr_lung_risk.serve.audit import AuditLog  # noqa: E402
from cxr_lung_risk.serve.config import ServeConfig, parse_destination  # noqa: E402
from cxr_lung_risk.serve.metrics import Metrics  # noqa: E402
from cxr_lung_risk.serve.spool import Pending, Spool  # noqa: E402
from cxr_lung_risk.serve.worker import next_batch  # noqa: E402


def _cfg(argv):
    return cli.serve_config(cli.build_parser().parse_args(["serve", *argv]))


# ------------------------------------------------------------------------------ configuration
def test_yaml_config_and_command_line_override(tmp_path):
    y = tmp_path / "serve.yaml"
    y.write_text(
        "port: 11113\nae-title: CXRNODE\nspool: %s\nsend-to:\n  - ORTHANC@127.0.0.1:4242\n  - PACS2@[::1]:104\n"
        "allow-ae: [ORTHANC, MODALITY1]\nmetrics-port: 9109\nquiet_time: 2.5\nstow: http://127.0.0.1:8042/dicom-web\n" % (tmp_path / "spool")
    )
    c = _cfg(["--config", str(y), "--port", "4000", "--allow-ae", "A,B", "--no-result-image"])
    assert c.port == 4000 and c.ae_title == "CXRNODE" and c.metrics_port == 9109 and c.quiet_time == 2.5
    assert c.allow_ae == ("A", "B") and c.result_image is False
    assert [str(d) for d in c.destinations] == ["ORTHANC@127.0.0.1:4242", "PACS2@::1:104", "http://127.0.0.1:8042/dicom-web"]
    assert c.spool == tmp_path / "spool"
    c2 = _cfg(["--spool", str(tmp_path / "s"), "--send-to", "A@h:1", "--send-to", "B@h:2"])
    assert [d.aet for d in c2.send_to] == ["A", "B"] and c2.result_image is True and c2.metrics_port is None


def test_sr_class_option(tmp_path):
    """--sr-class (serve and predict): Comprehensive 3D SR by default, ``comprehensive`` keeps ...88.33."""
    assert _cfg(["--spool", str(tmp_path / "s")]).sr_class == "3d"
    assert _cfg(["--spool", str(tmp_path / "s"), "--sr-class", "comprehensive"]).sr_class == "comprehensive"
    y = tmp_path / "serve.yaml"
    y.write_text("spool: %s\nsr-class: comprehensive\n" % (tmp_path / "spool"))
    assert _cfg(["--config", str(y)]).sr_class == "comprehensive"
    y.write_text("spool: %s\nsr-class: enhanced\n" % (tmp_path / "spool"))
    with pytest.raises(UsageError, match="--sr-class"):
        _cfg(["--config", str(y)])
    predict = lambda *a: cli.predict_options(cli.build_parser().parse_args(["predict", str(tmp_path), "--out", str(tmp_path / "o"), *a]))
    assert predict().sr_class == "3d"
    assert predict("--sr-class", "comprehensive").sr_class == "comprehensive"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--sr-class", "enhanced"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "1"], "needs --spool"),
        (["--spool", "S", "--send-to", "nohost"], "AET@HOST:PORT"),
        (["--spool", "S", "--send-to", "WAYTOOLONGAETITLE17@h:1"], "not a valid AE title"),
        (["--spool", "S", "--batch-size", "0"], "--batch-size"),
        (["--spool", "S", "--tls-cert", "x.pem"], "go together"),
        (["--spool", "S", "--stow", "ftp://x"], "http(s) URL"),
    ],
)
def test_bad_options_are_refused_before_anything_starts(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["serve", *argv]) == cli.EXIT_NONE
    assert message in capsys.readouterr().err


def test_unknown_yaml_key_is_refused(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("spool: s\nsend_too: X@h:1\n")
    with pytest.raises(UsageError, match="unknown key 'send_too'"):
        _cfg(["--config", str(y)])


# ------------------------------------------------------------------------------ batches and spool
def _p(study, t):
    return Pending(Path(f"{study}/{t}.dcm"), study, f"{study}.{t}", float(t), int(t * 1e9))


def test_next_batch_quiet_time_and_full_batches():
    pend = [_p("a", 1), _p("a", 2), _p("b", 9)]
    assert next_batch(pend, now=10, quiet_time=5, batch_size=8) == pend[:2]  # b is not quiet yet
    assert next_batch(pend, now=20, quiet_time=5, batch_size=8) == pend
    assert next_batch(pend, now=9.5, quiet_time=5, batch_size=3) == pend  # a full batch goes at once
    assert next_batch(pend, now=9.5, quiet_time=5, batch_size=2) == pend[:2]
    assert next_batch([], now=0, quiet_time=0, batch_size=4) == []
    # the association that delivered b was released after b's last instance: b is complete now
    assert next_batch(pend, now=9.5, quiet_time=5, batch_size=8, released={"b": 9.2}) == pend  # (a is quiet)
    # ... but not when more of b arrived after that release (another association still sending)
    assert next_batch(pend, now=9.5, quiet_time=5, batch_size=8, released={"b": 8.0}) == pend[:2]


def test_released_association_scores_without_waiting_the_quiet_time(tmp_path):
    """The listener tells when the association that delivered a study ends; with it the worker's
    rule picks the study at once, far inside a long --quiet-time."""
    cfg, spool, audit, scp = _listener(tmp_path, quiet_time=3600)
    ended = []
    scp.on_released = ended.append
    try:
        files = make_instances(tmp_path / "in", 2, tag="released")
        import time as _t

        t0 = _t.time()
        assert push(cfg.port, files) == [0, 0]
        wait_for(lambda: ended, 10, "the release to be seen")
        pend = spool.pending()
        assert next_batch(pend, _t.time(), cfg.quiet_time, cfg.batch_size) == []  # the quiet time alone: wait an hour
        assert sorted(p.sop for p in next_batch(pend, _t.time(), cfg.quiet_time, cfg.batch_size, scp.released_times())) == sorted(
            sop_of(f) for f in files)
        assert ended == [{pend[0].study}] and _t.time() - t0 < 10
    finally:
        scp.stop()
        audit.close()
        spool.close()


def test_spool_transitions_and_crash_recovery(tmp_path):
    s = Spool(tmp_path / "spool").open()
    data = SAMPLE_CR.read_bytes()
    p = s.store(data, "1.2.3", "1.2.3.4")
    assert p.path == tmp_path / "spool/incoming/1.2.3/1.2.3.4.dcm" and p.path.read_bytes() == data
    odd = s.store(data, "../../etc", "x/../y")  # UIDs never become paths unchecked
    assert odd.path.parent.parent == s.incoming and odd.study.startswith("study-") and odd.sop.startswith("sop-")
    assert [x.sop for x in s.pending()] == ["1.2.3.4", odd.sop]
    with pytest.raises(UsageError, match="another cxr-lung-risk serve"):
        Spool(tmp_path / "spool").open()  # one node per spool
    assert s.enqueue("dest", p.entry_id, [p.path], {"k": 1}) is True
    assert s.enqueue("dest", p.entry_id, [p.path], {"k": 1}) is False  # a rescored instance is not queued twice
    [entry] = s.entries("dest")
    assert json.loads((entry / "meta.json").read_text())["files"] == ["00-1.2.3.4.dcm"]
    s.mark_scored(p)
    assert not p.path.exists() and (s.scored / "1.2.3" / "1.2.3.4.dcm").exists()
    s.move_entry(entry, "delivered")
    assert s.enqueue("dest", p.entry_id, [s.scored / "1.2.3" / "1.2.3.4.dcm"], {}) is False  # delivered: never again
    # a crash leaves partial receives, batches and entries behind: the next start removes them
    (s.tmp / "rx-partial.dcm").write_bytes(b"x")
    (s.work / "batch").mkdir()
    (s.outbox_tmp / "stage").mkdir()
    s.close()
    s2 = Spool(tmp_path / "spool").open()
    assert not any(s2.tmp.iterdir()) and not any(s2.work.iterdir()) and not any(s2.outbox_tmp.iterdir())
    assert [x.sop for x in s2.pending()] == [odd.sop]
    s2.close()


# ------------------------------------------------------------------------------ listener
def _listener(tmp_path, **kw):
    from cxr_lung_risk.serve.scp import StoreSCP

    cfg = ServeConfig(spool=tmp_path / "spool", port=free_port(), **kw)
    spool = Spool(cfg.spool).open()
    audit = AuditLog(cfg.audit_path)
    scp = StoreSCP(cfg, spool, audit, Metrics()).start()
    return cfg, spool, audit, scp


def test_listener_stores_before_success_and_refuses_cleanly(tmp_path):
    cfg, spool, audit, scp = _listener(tmp_path, allow_ae=("TESTSCU",), strict_sop_class=True)
    try:
        cr = make_instances(tmp_path / "in", 2, tag="unit")
        ct = make_instances(tmp_path / "ct", 1, tag="unitct", modality="CT", sop_class="1.2.840.10008.5.1.4.1.1.2")
        bad = malformed_file(tmp_path / "bad.dcm")
        assert push(cfg.port, [cr[0], ct[0], bad, cr[1]]) == [0, 0x0122, 0xC210, 0]  # --strict-sop-class
        assert sorted(p.sop for p in spool.pending()) == sorted(sop_of(f) for f in cr)
        import pydicom

        src = pydicom.dcmread(SAMPLE_CR)
        for p in spool.pending():  # the bytes the sender had, as sent (no transcoding)
            got = pydicom.dcmread(p.path)
            assert got.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID and got.PixelData == src.PixelData
        with pytest.raises(RuntimeError, match="rejected"):
            push(cfg.port, cr[:1], calling="OTHER")
    finally:
        scp.stop()
        audit.close()
        spool.close()
    kinds = [(e["event"], e.get("result") or e.get("status")) for e in read_audit(cfg.spool)]
    assert ("refused", "0x0122") in kinds and ("refused", "0xC210") in kinds and ("association", "rejected") in kinds
    assert sum(1 for k in kinds if k[0] == "received") == 2


def test_listener_ignores_what_is_not_for_it_and_refuses_what_will_fail(tmp_path):
    """Default (no --strict-sop-class): a mixed study goes through. Other SOP classes, the node's
    own results and radiographs the selection rules skip are answered with success, kept nowhere
    and audited as ``ignored`` with their reason; a CR that would certainly fail (truncated pixel
    data) gets a failure status with the reason in ErrorComment, before anything is kept."""
    import pydicom

    cfg, spool, audit, scp = _listener(tmp_path)
    try:
        cr = make_instances(tmp_path / "in", 1, tag="mix")[0]
        ct = make_instances(tmp_path / "ct", 1, tag="mixct", modality="CT", sop_class="1.2.840.10008.5.1.4.1.1.2")[0]
        lateral = with_attributes(tmp_path / "lat.dcm", ViewPosition="LL")
        cut = truncated_cr(tmp_path / "cut.dcm")
        # the node's own result: an SC the tool wrote for a source (Manufacturer, DERIVED\SECONDARY)
        from cxr_lung_risk.outputs.result_image import ResultValue, WeightsLine, build_result_image

        src = pydicom.dcmread(cr)
        image = np.zeros((3, 224, 224), np.uint8)
        own = build_result_image(src, image, [ResultValue("CXR-Lung-Risk", 61.5, "years")], [WeightsLine("CXR-Lung-Risk", "SYNTHETIC")],
                                 software_version="test")
        own_path = tmp_path / "own.dcm"
        own.save_as(own_path, enforce_file_format=True)
        rs = push_responses(cfg.port, [ct, cr, lateral, own_path, cut], called="SOMEONE-ELSE")
        codes = [int(r.Status) for r in rs]
        assert codes[:4] == [0, 0, 0, 0]
        assert codes[4] == 0xC211 and "truncated" in str(rs[4].ErrorComment), rs[4]
        assert [p.sop for p in spool.pending()] == [sop_of(cr)]  # only the eligible CR is kept
        assert not any(spool.tmp.iterdir())  # the refused one left nothing behind
    finally:
        scp.stop()
        audit.close()
        spool.close()
    log = read_audit(cfg.spool)
    ignored = {e["sop_uid"]: e["reason"] for e in log if e["event"] == "ignored"}
    assert ignored[sop_of(ct)].startswith("not a chest radiograph SOP class: CT Image Storage")
    assert "lateral" in ignored[sop_of(lateral)].lower()
    assert ignored[str(own.SOPInstanceUID)].startswith("own result: a derived image (SC) made by cxr-lung-risk")
    [refused] = [e for e in log if e["event"] == "refused"]
    assert refused["status"] == "0xC211" and refused["sop_uid"] == sop_of(cut) and "truncated" in refused["reason"]
    [assoc] = [e for e in log if e["event"] == "association" and e["result"] == "accepted"]
    assert assoc["called_ae"] == "SOMEONE-ELSE"  # what the peer called, not our own title


def test_dicom_tls_listener_requires_a_certificate_signed_by_the_ca(tmp_path):
    from orthanc import make_test_pki
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    pki = make_test_pki(tmp_path / "pki")
    cfg, spool, audit, scp = _listener(tmp_path, tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_ca=pki["ca"])
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
        ae = AE(ae_title="TLSSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", cfg.port, ae_title=cfg.ae_title, tls_args=(ctx, "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        plain = AE(ae_title="PLAIN")
        plain.add_requested_context(Verification)
        plain.acse_timeout = plain.network_timeout = 5
        assert not plain.associate("127.0.0.1", cfg.port, ae_title=cfg.ae_title).is_established
        anon = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        anon.check_hostname = False  # TLS, but no client certificate: refused
        assert not plain.associate("127.0.0.1", cfg.port, ae_title=cfg.ae_title, tls_args=(anon, "127.0.0.1")).is_established
    finally:
        scp.stop()
        audit.close()
        spool.close()


# ------------------------------------------------------------------------------ outbox
def test_outbox_retries_with_backoff_until_the_destination_is_up(tmp_path):
    from cxr_lung_risk.serve.outbox import Sender

    port = free_port()
    cfg = ServeConfig(spool=tmp_path / "spool", send_to=(parse_destination(f"RECEIVER@127.0.0.1:{port}"),),
                      retry_initial=0.2, retry_max=0.5, poll=0.05)
    spool = Spool(cfg.spool).open()
    audit = AuditLog(cfg.audit_path)
    metrics = Metrics()
    files = make_instances(tmp_path / "res", 2, tag="outbox")
    dest = cfg.destinations[0]
    assert spool.enqueue(dest.key, "entry-1", files, {"source_sop_uid": "1.2", "received": time.time(), "scored": time.time()})
    stop = threading.Event()
    sender = Sender(cfg, dest, spool, audit, metrics, stop)
    sender.start()
    rx = None
    try:
        wait_for(lambda: sum(1 for e in read_audit(cfg.spool) if e["event"] == "send_failed") >= 2, 30, "two failed attempts")
        assert json.loads((spool.entries(dest.key)[0] / "meta.json").read_text())["attempts"] >= 2
        assert metrics.retrying.labels(destination=str(dest))._value.get() == 1
        rx = Receiver(port=port).start()
        wait_for(lambda: spool.entries(dest.key, "delivered"), 30, "delivery")
        assert sorted(s for _, s in rx.received) == sorted(sop_of(f) for f in files)
        assert not spool.entries(dest.key, "pending") and metrics.retrying.labels(destination=str(dest))._value.get() == 0
        sent = [e for e in read_audit(cfg.spool) if e["event"] == "sent"]
        assert len(sent) == 1 and sent[0]["attempts"] >= 3 and len(sent[0]["objects"]) == 2
    finally:
        stop.set()
        sender.wake.set()
        sender.join(10)
        if rx:
            rx.stop()
        audit.close()
        spool.close()


def test_an_instance_in_flight_at_three_crashes_is_quarantined(tmp_path):
    """A poison pill (an input that kills the node while it is scored) must not crash it for ever."""
    data = SAMPLE_CR.read_bytes()
    for start in range(1, 5):
        s = Spool(tmp_path / "spool").open()
        quarantined = s.recover_inflight(max_crashes=3)
        if start == 1:
            p = s.store(data, "1.2.3", "1.2.3.4")
            other = s.store(data, "1.2.3", "1.2.3.5")
        assert quarantined == ([("1.2.3/1.2.3.4.dcm", 3)] if start == 4 else [])
        if start < 4:
            s.begin_batch([p])  # ... and the node dies here (no end_batch): crash number `start`
            s.close()
    assert [x.sop for x in s.pending()] == [other.sop]
    assert (s.root / "quarantine" / "1.2.3" / "1.2.3.4.dcm").read_bytes() == data
    s.begin_batch(s.pending())
    s.end_batch()  # a batch that finished is no crash
    assert s.recover_inflight(max_crashes=1) == []
    s.close()


def test_serve_help_names_the_contract_options():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "cxr_lung_risk.cli", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "usage: cxr-lung-risk serve" in p.stdout
    for opt in ("--port", "--ae-title", "--spool", "--weights", "--send-to", "--stow", "--allow-ae", "--metrics-port", "--config",
                "--quiet-time", "--batch-size", "--tls-cert", "--no-result-image"):
        assert opt in p.stdout, opt


def test_a_bad_serve_option_is_refused_before_torch_is_imported(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from cxr_lung_risk import cli; rc = cli.main(['serve', '--spool', 's', '--send-to', 'bad']); "
            "print(rc, 'torch' in sys.modules, 'pynetdicom' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.stdout.split() == ["1", "False", "True"] and "AET@HOST:PORT" in p.stderr


def test_send_tls_delivers_to_a_tls_destination_and_verifies_it(tmp_path):
    from orthanc import make_test_pki

    from cxr_lung_risk.serve.outbox import DeliveryError, send_dicom

    pki = make_test_pki(tmp_path / "pki")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(pki["server_cert"]), str(pki["server_key"]))
    server.load_verify_locations(str(pki["ca"]))
    server.verify_mode = ssl.CERT_REQUIRED  # the destination wants our client certificate
    rx = Receiver(ssl_context=server).start()
    try:
        files = make_instances(tmp_path / "res", 1, tag="tls")
        dest = parse_destination(f"RECEIVER@127.0.0.1:{rx.port}")
        cfg = ServeConfig(spool=tmp_path / "spool", send_to=(dest,), send_tls=True, tls_ca=pki["ca"],
                          tls_cert=pki["client_cert"], tls_key=pki["client_key"]).validate()
        assert send_dicom(cfg, dest, files) == {}
        assert [s for _, s in rx.received] == [sop_of(files[0])]
        other = make_test_pki(tmp_path / "other")  # a destination our CA did not sign is refused
        wrong = cfg.with_(tls_ca=other["ca"])
        with pytest.raises(DeliveryError):
            send_dicom(wrong, dest, files)
        with pytest.raises(DeliveryError):  # and plain DICOM to a TLS port gets nowhere
            send_dicom(cfg.with_(send_tls=False), dest, files)
    finally:
        rx.stop()
