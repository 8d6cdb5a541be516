"""The web page's server and the node's status page without a browser or models: limits, zips,
tokens, the Host check, deletion, and the status board's HTML (Flask's test client)."""
from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("flask")

from cxr_lung_risk.web.app import create_app  # noqa: E402
from cxr_lung_risk.web.engine import Engine, WebConfig, safe_name  # noqa: E402


def _client(tmp_path, **kw):
    cfg = WebConfig(temp_parent=tmp_path, **kw)
    engine = Engine(cfg)  # not started: uploads are queued, nothing is scored
    app = create_app(engine)
    return engine, app.test_client()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    return buf.getvalue()


def _upload(client, files, **kw):
    return client.post("/api/upload", data={"files": [(io.BytesIO(d), n) for n, d in files]}, content_type="multipart/form-data", **kw)


def test_safe_name_keeps_names_harmless():
    assert safe_name("../../etc/passwd") == "etc/passwd"
    assert safe_name("C:\\x\\..\\y.dcm") == "C:/x/y.dcm"
    assert safe_name("") == "upload"
    assert safe_name("a\x00b\nc.dcm") == "a?b?c.dcm"
    assert len(safe_name("x" * 1000)) == 200


def test_uploads_go_to_the_private_folder_and_delete_removes_them(tmp_path):
    engine, c = _client(tmp_path)
    assert oct(engine.root.stat().st_mode & 0o777) == oct(0o700) and engine.root.parent == tmp_path
    r = _upload(c, [("a.dcm", b"DICM" * 10), ("b.png", b"\x89PNG")])
    assert r.status_code == 200 and [i["status"] for i in r.get_json()["items"]] == ["queued", "queued"]
    state = c.get("/api/state").get_json()
    folder = Path(state["folder"])
    assert folder.parent == engine.root and len(list(folder.rglob("input*"))) == 2
    assert c.post("/api/delete").get_json() == {"deleted": True}
    assert not folder.exists()
    assert c.get("/api/state").get_json()["items"] == []
    engine.close()
    assert not engine.root.exists()


def test_count_and_size_limits_are_refused_with_a_sentence(tmp_path):
    engine, c = _client(tmp_path, max_files=2, max_upload_bytes=1 << 20, max_file_bytes=1000)
    r = _upload(c, [("a.dcm", b"x"), ("b.dcm", b"y"), ("c.dcm", b"z")])
    assert r.status_code == 413 and "at most 2 files per session" in r.get_json()["error"]
    engine2, c2 = _client(tmp_path, max_upload_bytes=1 << 20, max_file_bytes=1000)
    r = _upload(c2, [("big.dcm", b"\0" * 5000)])
    (item,) = r.get_json()["items"]
    assert item["status"] == "failed" and "larger than" in item["reason"]
    r = _upload(c2, [("huge.dcm", b"\0" * (3 << 20))])
    assert r.status_code == 413 and "the upload is larger than 1 MB" in r.get_json()["error"]
    engine.close()
    engine2.close()


def test_zip_members_become_rows_and_a_zip_bomb_is_one_failed_row(tmp_path):
    engine, c = _client(tmp_path, max_file_bytes=1 << 20, max_upload_bytes=4 << 20)
    r = _upload(c, [("study.zip", _zip({"DICOM/IM1": b"a" * 10, "DICOM/../../IM2": b"b" * 10, "dir/": b""}))])
    names = sorted(i["name"] for i in r.get_json()["items"])
    assert names == ["study.zip/DICOM/IM1", "study.zip/DICOM/IM2"]  # ".." parts dropped; stored under ids anyway
    for p in engine.root.rglob("*"):
        assert engine.root in p.parents  # nothing outside the private folder
    r = _upload(c, [("bomb.zip", _zip({"x.dcm": b"\0" * (3 << 20)}))])
    (item,) = r.get_json()["items"]
    assert item["status"] == "failed" and "zip bomb" in item["reason"]
    r = _upload(c, [("broken.zip", b"PK\x03\x04 not really")])
    (item,) = r.get_json()["items"]
    assert item["status"] == "failed" and "zip" in item["reason"]
    engine.close()


def test_too_many_zip_members_are_refused(tmp_path):
    engine, c = _client(tmp_path, max_files=3)
    r = _upload(c, [("many.zip", _zip({f"f{i}": b"x" for i in range(5)}))])
    (item,) = r.get_json()["items"]
    assert item["status"] == "failed" and "holds 5 files" in item["reason"]
    engine.close()


def test_loopback_server_refuses_foreign_host_headers(tmp_path):
    engine, c = _client(tmp_path)
    assert c.get("/api/state", headers={"Host": "127.0.0.1:8080"}).status_code == 200
    assert c.get("/api/state", headers={"Host": "localhost:8080"}).status_code == 200
    r = c.get("/api/state", headers={"Host": "attacker.example:8080"})
    assert r.status_code == 403 and "loopback" in r.get_json()["error"]
    engine.close()


def test_token_is_required_when_set(tmp_path):
    engine, c = _client(tmp_path, host="0.0.0.0", token="s3cret")
    assert c.get("/api/state").status_code == 401
    assert c.get("/api/state", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.get("/api/state", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    r = c.get("/?token=s3cret")
    assert r.status_code == 200 and "cxr_lung_risk_token" in r.headers.get("Set-Cookie", "")
    assert c.get("/api/state").status_code == 200  # the cookie from now on
    engine.close()


def test_page_is_self_contained_and_labelled(tmp_path):
    engine, c = _client(tmp_path)
    html = c.get("/").get_data(as_text=True)
    assert "RESEARCH USE ONLY - NOT FOR CLINICAL USE" in html and "SYNTHETIC WEIGHTS - THE SCORES ARE MEANINGLESS" in html
    assert "http://" not in html and "https://" not in html  # no CDN: everything from this server
    assert c.get("/static/app.js").status_code == 200 and c.get("/static/app.css").status_code == 200
    js = c.get("/static/app.js").get_data(as_text=True)
    assert "http://" not in js and "https://" not in js
    engine.close()


def test_web_off_loopback_needs_a_token():
    p = subprocess.run([sys.executable, "-m", "cxr_lung_risk.cli", "web", "--host", "0.0.0.0"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert p.returncode == 1 and "give --token" in p.stderr


# ------------------------------------------------------------------ the node's status board
def _node(tmp_path):
    from cxr_lung_risk.serve.config import ServeConfig
    from cxr_lung_risk.serve.metrics import Metrics

    cfg = ServeConfig(spool=tmp_path / "spool")
    health = {"status": "ok", "reason": None, "version": "x", "incoming": 0, "outbox": 0, "worker_busy": False, "worker_error": None}
    return SimpleNamespace(cfg=cfg, metrics=Metrics(), senders=[], scp=None, spool=SimpleNamespace(results=tmp_path / "results"),
                           health=lambda: health)


def test_status_board_shows_results_and_escapes_text(tmp_path):
    from cxr_lung_risk.serve.status import StatusBoard

    node = _node(tmp_path)
    board = StatusBoard(node, keep=2)
    node.metrics.received.inc(3)
    node.metrics.sent.labels(destination="A@h:1").inc(2)
    board.on_event("scored", {"sop_uid": "1.2.3.4.5.6.7.8.9.10.11.12.13", "values": {"CXR_Lung_Risk": 61.25}, "outputs": [], "batch": "b"})
    board.on_event("failed", {"sop_uid": "9.9", "reason": "failed: <script>alert(1)</script>"})
    board.on_event("skipped", {"sop_uid": "8.8", "reason": "skipped: lateral"})
    body, ctype, code = board.page("/")
    html = body.decode()
    assert code == 200 and ctype.startswith("text/html")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "skipped: lateral" in html and "61.2" not in html  # keep=2: the oldest result dropped
    assert "id='count-received'>3<" in html and "id='count-sent'>2<" in html
    assert 'href="/metrics"' in html and 'href="/healthz"' in html
    assert board.page("/nothing") is None and board.page("/status/thumb/1.png") is None
    state = board.state()
    assert state["counts"]["received"] == 3 and [r["status"] for r in state["recent"]] == ["skipped", "failed"]


def test_status_board_thumbnail_is_the_result_images_pixels(tmp_path):
    import numpy as np
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from cxr_lung_risk.serve.status import StatusBoard

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName, ds.PatientID = "Secret^Person", "ID-4242"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 40, 60, 3, "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.PlanarConfiguration = 8, 8, 7, 0, 0
    ds.PixelData = np.full((40, 60, 3), 200, np.uint8).tobytes()
    (tmp_path / "results" / "b1" / "result").mkdir(parents=True)
    ds.save_as(tmp_path / "results" / "b1" / "result" / "x.dcm", enforce_file_format=True)
    node = _node(tmp_path)
    board = StatusBoard(node)
    board.on_event("scored", {"sop_uid": "1.2", "values": {}, "outputs": ["sr/x.dcm", "result/x.dcm"], "batch": "b1"})
    body, ctype, code = board.page("/status/thumb/1.png")
    assert code == 200 and ctype == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"Secret" not in body and b"4242" not in body
    html = board.page("/")[0].decode()
    assert "/status/thumb/1.png" in html and "Secret" not in html and "ID-4242" not in html
    _ = pydicom
