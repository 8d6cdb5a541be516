"""FHIR R4 output (``--format fhir``, ``serve --fhir URL``) and the one source of truth of all outputs.

Models here are small stand-ins with the real models' interface (measurements, algorithm
identification, columns); everything else is the real code: the real chest CR is prepared, scored
rows go through the real :class:`~cxr_lung_risk.outputs.writer.OutputWriter`, the SR is the real
TID 1500 report, every FHIR bundle is validated as FHIR R4 (fhirclient's 4.0.1 models and
fhir.resources' R4B models, see ``fhir_check.py``), and the node's FHIR destination is a loopback server that validates each POST.
"""
from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from fhir_check import FhirServer, validate_bundle
from pydicom.sr.coding import Code

from cxr_lung_risk import __version__, api
from cxr_lung_risk.outputs.sr import CxrCodes, algorithm_info, build_measurement_report, measurement_from_spec
from cxr_lung_risk.records import read_records
from cxr_lung_risk.scoring import Scorer

CHEST_CR = Path(__file__).resolve().parents[1] / "src" / "cxr_lung_risk" / "samples" / "chest_cr_RG1_J2KI.dcm"
UCUM = "http://unitsofmeasure.org"
PRIVATE = "urn:cxr-lung-risk:codes:99CXRLR"


class FakeModel:
    """The interface of engine.LungRiskModel / age.AgeModel with cheap, deterministic scores.
    ``round_to``: the measurement object rounds the row's value (so a test can tell whether an output
    read the row or the measurement)."""

    def __init__(self, key: str, title: str, column: str, code, *, members: int = 0, synthetic: bool = True,
                 round_to: int | None = None, offset: float = 40.0) -> None:
        self.spec = SimpleNamespace(key=key, title=title, column=column, unit="a", unit_meaning="year", name=key)
        self.code = code
        self.member_names = [f"Lung_Age_081221_{i}" for i in range(members)]
        self.columns = [column] + self.member_names
        self.weights_identity = {"synthetic": synthetic, "sha256": "ab" * 32, "source": "test"}
        self.round_to = round_to
        self.offset = offset

    def score(self, batch_u8, on_step=None):
        x = np.asarray(batch_u8, dtype=np.float64).reshape(len(batch_u8), -1)
        base = x.mean(axis=1) / 255.0 * 30.0 + self.offset + 1 / 3
        out = {self.spec.column: base}
        for i, n in enumerate(self.member_names):
            out[n] = base / 100.0 - i * 0.01
        return out

    def measurements(self, row):
        members = {n: float(row[n]) for n in self.member_names if n in row} or None
        value = float(row[self.spec.column])
        if self.round_to is not None:
            value = round(value, self.round_to)
        return [measurement_from_spec(self.spec, self.code, value, members)]

    def algorithm(self, extra=None):
        return algorithm_info(self.spec, {"device": "cpu", "precision": "fp32", **(extra or {})}, self.weights_identity)


def _models(round_age: int | None = None):
    return [FakeModel("lung-risk", "CXR-Lung-Risk", "CXR_Lung_Risk", CxrCodes.CXR_LUNG_RISK, members=3),
            FakeModel("age", "CXR-Age", "CXR_Age", CxrCodes.CXR_AGE, round_to=round_age, offset=55.0, synthetic=False)]


@pytest.fixture(scope="module")
def prepared():
    p = api.prepare_input(CHEST_CR)
    assert p.status is api.Status.OK, p.reason
    return p


def _write(out: Path, models, p, formats=("csv", "json", "sr", "fhir"), **kw):
    scorer = Scorer(models)
    rows = scorer.score([p])
    with api.OutputWriter(out, scorer.models, scorer.columns(), formats=formats, **kw) as w:
        rec = w.write_scored([p], rows)[0]
    assert rec.status is api.Status.OK, rec.reason
    return rec, rows[0]


def _sr_items(path: Path) -> dict[str, dict]:
    """Every NUM of the SR's measurement groups, by code value: scheme, meaning, value, unit, the
    group's tracking identifier and tracking UID (parsed with pydicom)."""
    ds = pydicom.dcmread(path)
    out = {}
    for container in ds.ContentSequence:
        if container.ConceptNameCodeSequence[0].CodeValue != "126010":
            continue
        for group in container.ContentSequence:
            if group.ConceptNameCodeSequence[0].CodeValue != "125007":
                continue
            ctx = {it.ConceptNameCodeSequence[0].CodeValue: it for it in group.ContentSequence}
            for it in group.ContentSequence:
                if it.ValueType != "NUM":
                    continue
                c, mv = it.ConceptNameCodeSequence[0], it.MeasuredValueSequence[0]
                out[c.CodeValue] = {
                    "scheme": c.CodingSchemeDesignator, "meaning": c.CodeMeaning, "value": float(mv.FloatingPointValue),
                    "unit": mv.MeasurementUnitsCodeSequence[0].CodeValue, "tracking": str(ctx["112039"].TextValue),
                    "tuid": str(ctx["112040"].UID),
                }
    return out


def _sr_codes(path: Path) -> dict[str, dict]:
    """Every CODE (qualitative evaluation, e.g. the risk group) of the SR's measurement groups, by
    concept code value: the concept's meaning and the coded value (parsed with pydicom)."""
    out = {}
    for container in pydicom.dcmread(path).ContentSequence:
        if container.ConceptNameCodeSequence[0].CodeValue != "126010":
            continue
        for group in container.ContentSequence:
            for it in group.ContentSequence if group.ConceptNameCodeSequence[0].CodeValue == "125007" else ():
                if it.ValueType == "CODE" and it.ConceptNameCodeSequence[0].CodingSchemeDesignator == "99CXRLR":
                    c, v = it.ConceptNameCodeSequence[0], it.ConceptCodeSequence[0]
                    out[c.CodeValue] = {"meaning": c.CodeMeaning, "code": v.CodeValue, "code_meaning": v.CodeMeaning}
    return out


def _resources(bundle, rt):
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rt]


# ----------------------------------------------------------------------------- one source of truth
def test_sr_fhir_csv_and_result_image_report_the_same_measurements(tmp_path, prepared):
    """The SR, the FHIR bundle, the CSV/JSON rows, records.jsonl and the result image of one image
    agree, and all show the measurement objects' values: CXR-Age's measurement rounds the scored row
    (a stand-in for any transformation), and every output carries the rounded value, none the row's."""
    out = tmp_path / "out"
    rec, row = _write(out, _models(round_age=2), prepared, result_image=True, deterministic=True)
    assert set(rec.outputs) == {"sr", "fhir", "result_image"}
    assert rec.outputs["fhir"] == [f"fhir/{prepared.uids['SOPInstanceUID']}.json"]
    age = round(row["CXR_Age"], 2)
    assert age != row["CXR_Age"]

    sr = _sr_items(out / rec.outputs["sr"][0])
    assert sr["CXRLR-0002"]["value"] == age and sr["CXRLR-0001"]["value"] == row["CXR_Lung_Risk"]
    assert len(sr) == 2 + 3  # two results + three members

    with open(out / "cxr_lung_risk.csv", newline="") as f:
        (csv_row,) = list(csv.DictReader(f))
    (json_row,) = json.loads((out / "cxr_lung_risk.json").read_text())
    (record,) = list(read_records(out))

    bundle = json.loads((out / rec.outputs["fhir"][0]).read_text())
    validate_bundle(bundle)
    observations = {o["code"]["coding"][0]["code"]: o for o in _resources(bundle, "Observation")}
    assert set(observations) == set(sr)
    by_name = {}
    for code, item in sr.items():
        o = observations[code]
        c = o["code"]["coding"][0]
        assert (c["system"], c["display"]) == (PRIVATE, item["meaning"]) and item["scheme"] == "99CXRLR"
        q = o["valueQuantity"]
        assert q["value"] == item["value"] and (q["system"], q["code"]) == (UCUM, item["unit"])
        by_name[item["meaning"]] = item["value"]
        column = item["tracking"] if not item["tracking"].endswith(" members") else item["meaning"].split(" member ")[1]
        assert float(csv_row[column]) == item["value"] == json_row[column] == record.values[column], column
    assert by_name["CXR-Age"] == age

    # the result image shows the same values (its text, to one decimal, in ImageComments)
    comments = str(pydicom.dcmread(out / rec.outputs["result_image"][0]).ImageComments)
    assert f"CXR-Lung-Risk: {row['CXR_Lung_Risk']:.1f} years" in comments and f"CXR-Age: {age:.1f} years" in comments
    assert "CXR-Lung-Risk weights: SYNTHETIC" in comments and "CXR-Age weights: unverified" in comments


def test_bundle_maps_the_sr_identifiers_patient_study_and_algorithm(tmp_path, prepared):
    out = tmp_path / "out"
    rec, row = _write(out, _models(), prepared, deterministic=True)
    src = pydicom.dcmread(CHEST_CR, stop_before_pixels=True)
    sr_ds = pydicom.dcmread(out / rec.outputs["sr"][0])
    sr = _sr_items(out / rec.outputs["sr"][0])
    bundle = json.loads((out / rec.outputs["fhir"][0]).read_text())
    validate_bundle(bundle)
    assert bundle["type"] == "transaction" and all(e["request"]["method"] == "PUT" for e in bundle["entry"])
    study = {"system": "urn:dicom:uid", "value": f"urn:oid:{src.StudyInstanceUID}"}

    (report,) = _resources(bundle, "DiagnosticReport")
    assert report["identifier"][0]["value"] == f"urn:oid:{sr_ds.SOPInstanceUID}"
    assert report["code"]["coding"][0] == {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "126000",
                                           "display": "Imaging Measurement Report"}
    assert "RESEARCH USE ONLY" in report["conclusion"] and "SYNTHETIC" in report["conclusion"]
    assert report["status"] == "preliminary" and sr_ds.PreliminaryFlag == "PRELIMINARY"
    assert {k: report["imagingStudy"][0]["identifier"][k] for k in study} == study
    obs = _resources(bundle, "Observation")
    assert sorted(r["reference"] for r in report["result"]) == sorted(f"urn:uuid:{o['id']}" for o in obs)

    devices = {f"urn:uuid:{d['id']}": d for d in _resources(bundle, "Device")}
    assert len(devices) == 2
    for o in obs:
        assert o["subject"]["identifier"]["value"] == str(src.PatientID)
        assert {k: o["partOf"][0]["identifier"][k] for k in study} == study
        assert {k: o["derivedFrom"][0]["identifier"][k] for k in study} == study
        assert o["issued"].endswith("+00:00")  # deterministic: never the machine's timezone
        assert any("RESEARCH USE ONLY" in n["text"] for n in o["note"])
        is_age = o["code"]["coding"][0]["code"] == "CXRLR-0002"  # CXR-Age's stand-in weights are not synthetic
        assert any("SYNTHETIC" in n["text"] for n in o["note"]) is not is_age
        d = devices[o["device"]["reference"]]
        props = {p["type"]["text"]: p["valueCode"][0]["text"] for p in d["property"]}
        assert d["version"][0]["value"] == __version__ and props["weights_sha256"] == "ab" * 32
        assert props["weights"] in ("SYNTHETIC", "unverified") and props["device"] == "cpu"
        assert d["deviceName"][0]["name"] == ("CXR-Age" if o["code"]["coding"][0]["code"] == "CXRLR-0002" else "CXR-Lung-Risk")
    lung = next(o for o in obs if o["code"]["coding"][0]["code"] == "CXRLR-0001")
    assert lung["identifier"][0]["value"] == f"urn:oid:{sr['CXRLR-0001']['tuid']}"
    members = [o for o in obs if o["code"]["coding"][0]["code"].startswith("CXRLR-M")]
    assert len(members) == 3 and all(o["valueQuantity"]["code"] == "1" for o in members)
    assert sorted(r["reference"] for r in lung["derivedFrom"][1:]) == sorted(f"urn:uuid:{o['id']}" for o in members)
    synthetic_device = next(d for d in devices.values() if d["deviceName"][0]["name"] == "CXR-Lung-Risk")
    assert any("SYNTHETIC" in n["text"] for n in synthetic_device["note"])

    # stable: the same input written again gives the same bundle, byte for byte (PUTs of the same ids)
    rec2, _ = _write(tmp_path / "again", _models(), prepared, deterministic=True)
    assert (tmp_path / "again" / rec2.outputs["fhir"][0]).read_bytes() == (out / rec.outputs["fhir"][0]).read_bytes()


def test_fhir_without_sr_and_a_source_without_patient_id(tmp_path, prepared):
    import dataclasses

    ds = prepared.dataset.copy()
    del ds.PatientID
    ds.AccessionNumber = "ACC-1"
    p = dataclasses.replace(prepared, dataset=ds) if dataclasses.is_dataclass(prepared) else prepared
    if p is prepared:  # pragma: no cover - Prepared is a dataclass
        pytest.skip("Prepared is not a dataclass")
    rec, _ = _write(tmp_path / "o", _models(), p, formats=("csv", "fhir"))
    assert set(rec.outputs) == {"fhir"}
    bundle = json.loads((tmp_path / "o" / rec.outputs["fhir"][0]).read_text())
    validate_bundle(bundle)
    for r in _resources(bundle, "Observation") + _resources(bundle, "DiagnosticReport"):
        assert "subject" not in r and r["basedOn"][0]["identifier"]["value"] == "ACC-1"
    assert [r for r in read_records(tmp_path / "o")][0].outputs == rec.outputs


def test_a_coded_evaluation_maps_to_a_codeable_concept_observation(prepared):
    """A coded result (a qualitative evaluation such as a risk group) in the shared result object
    becomes one Observation with valueCodeableConcept, with no change to the FHIR mapping."""
    from cxr_lung_risk.outputs.fhir import build_bundle
    from cxr_lung_risk.outputs.results import image_result

    models = _models()
    row = Scorer(models).score([prepared])[0]
    algorithms = {m.spec.column: m.algorithm() for m in models}
    evaluation = SimpleNamespace(name="Risk_Group", code_value="CXRLR-0100", code_meaning="CXR-Lung-Risk risk group",
                                 value=Code("CXRLR-0103", "99CXRLR", "High risk"), algorithm="CXR_Lung_Risk")
    result = image_result(models, row, algorithms, evaluations=[evaluation])
    sr = build_measurement_report(prepared.dataset, result.measurements, algorithm=dict(result.algorithms), deterministic=True)
    bundle = build_bundle(prepared.dataset, result, sr, deterministic=True)
    validate_bundle(bundle)
    (coded,) = [o for o in _resources(bundle, "Observation") if "valueCodeableConcept" in o]
    assert coded["code"]["coding"][0] == {"system": PRIVATE, "code": "CXRLR-0100", "display": "CXR-Lung-Risk risk group"}
    assert coded["valueCodeableConcept"]["coding"][0] == {"system": PRIVATE, "code": "CXRLR-0103", "display": "High risk"}
    assert coded["device"] == next(o for o in _resources(bundle, "Observation") if o["code"]["coding"][0]["code"] == "CXRLR-0001")["device"]


def test_validator_refuses_a_broken_bundle(tmp_path, prepared):
    """The validator is not a rubber stamp: wrong types, unknown elements and dangling references fail."""
    rec, _ = _write(tmp_path / "o", _models(), prepared, formats=("fhir",))
    good = json.loads((tmp_path / "o" / rec.outputs["fhir"][0]).read_text())
    validate_bundle(good)
    for breaks in (
        lambda b: b["entry"][-1]["resource"].__setitem__("status", None),
        lambda b: next(e for e in b["entry"] if e["resource"]["resourceType"] == "Observation")["resource"]["valueQuantity"].__setitem__("value", "x"),
        lambda b: b["entry"][0]["resource"].__setitem__("bogus", 1),
        lambda b: b["entry"][-1]["resource"]["result"].append({"reference": "urn:uuid:00000000-0000-0000-0000-000000000000"}),
        lambda b: b["entry"][-1]["resource"].__setitem__("issued", "2026-13-01T00:00:00+00:00"),
    ):
        bad = json.loads(json.dumps(good))
        breaks(bad)
        with pytest.raises(Exception):
            validate_bundle(bad)


def test_predict_format_fhir_with_the_real_ensemble(tmp_path, synthetic_weights):
    """``cxr-lung-risk predict --format fhir`` with the real CXR-Lung-Risk ensemble (synthetic
    weights, --per-model, --result-image): the bundle validates and equals the SR, the CSV and the
    result image; records.jsonl lists it."""
    import os
    import subprocess
    import sys

    inp = tmp_path / "in"
    inp.mkdir()
    (inp / CHEST_CR.name).symlink_to(CHEST_CR)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, "-m", "cxr_lung_risk.cli", "predict", str(inp), "--out", str(out), "--weights",
                           str(synthetic_weights), "--device", "cpu", "--format", "csv,sr,fhir", "--per-model",
                           "--result-image", "--deterministic", "--workers", "0", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = list(read_records(out))
    assert set(rec.outputs) == {"sr", "fhir", "result_image"}
    bundle = json.loads((out / rec.outputs["fhir"][0]).read_text())
    validate_bundle(bundle)
    sr = _sr_items(out / rec.outputs["sr"][0])
    codes = _sr_codes(out / rec.outputs["sr"][0])
    obs = {o["code"]["coding"][0]["code"]: o for o in _resources(bundle, "Observation")}
    assert set(obs) == set(sr) | set(codes) and len(sr) > 1 and set(codes) == {"CXRLR-0010"}
    with open(out / "cxr_lung_risk.csv", newline="") as f:
        (csv_row,) = list(csv.DictReader(f))
    # the risk group: the SR's coded evaluation, the FHIR valueCodeableConcept and the CSV's label agree
    group = codes["CXRLR-0010"]
    assert obs["CXRLR-0010"]["valueCodeableConcept"]["coding"][0]["code"] == group["code"]
    assert group["code_meaning"] == f"CXR-Lung-Risk {csv_row['CXR_Lung_Risk_Group']} years"
    for code, item in sr.items():
        assert obs[code]["valueQuantity"]["value"] == item["value"]
        column = item["tracking"] if not item["tracking"].endswith(" members") else item["meaning"].split(" member ")[1]
        assert float(csv_row[column]) == item["value"] == rec.values[column]
    lung = sr["CXRLR-0001"]["value"]
    assert f"CXR-Lung-Risk: {lung:.1f} years" in str(pydicom.dcmread(out / rec.outputs["result_image"][0]).ImageComments)
    (device,) = _resources(bundle, "Device")
    props = {p["type"]["text"]: p["valueCode"][0]["text"] for p in device["property"]}
    assert props["weights"] == "SYNTHETIC" and device["version"][0]["value"] == __version__


def test_format_fhir_is_a_predict_format():
    from cxr_lung_risk.options import parse_formats

    assert parse_formats("csv,fhir") == frozenset({"csv", "fhir"})


# ----------------------------------------------------------------------------- the node's FHIR destination
def _serve_cfg(tmp_path, argv):
    pytest.importorskip("pynetdicom")
    from cxr_lung_risk import cli

    args = cli.build_parser().parse_args(["serve", "--spool", str(tmp_path / "spool"), *argv])
    return cli.serve_config(args)


def test_serve_fhir_options(tmp_path, monkeypatch):
    from cxr_lung_risk.errors import UsageError

    monkeypatch.setenv("CXR_LUNG_RISK_FHIR_TOKEN", "s3cret")
    cfg = _serve_cfg(tmp_path, ["--fhir", "http://127.0.0.1:8080/fhir", "--send-to", "PACS@127.0.0.1:4242"])
    (fhir,) = [d for d in cfg.destinations if d.kind == "fhir"]
    assert fhir.url == "http://127.0.0.1:8080/fhir" and fhir.token == "s3cret" and fhir.key.startswith("fhir-")
    (tmp_path / "c.yaml").write_text("fhir: [http://127.0.0.1:1/fhir, https://example.test/fhir]\n")
    cfg = _serve_cfg(tmp_path, ["--config", str(tmp_path / "c.yaml")])
    assert [d.url for d in cfg.destinations] == ["http://127.0.0.1:1/fhir", "https://example.test/fhir"]
    with pytest.raises(UsageError, match="--fhir takes"):
        _serve_cfg(tmp_path, ["--fhir", "ftp://x/fhir"])


def test_node_posts_bundles_with_retry_until_the_fhir_server_is_up(tmp_path, prepared):
    """Outbox + retry for a FHIR destination: connection refused, then 503, then delivered; the
    loopback server validates the bundle it stores (fhir_check.validate_bundle) and gets the bearer token."""
    pytest.importorskip("pynetdicom")
    from pacs_node import free_port, read_audit, wait_for

    from cxr_lung_risk.serve.audit import AuditLog
    from cxr_lung_risk.serve.config import ServeConfig
    from cxr_lung_risk.serve.metrics import Metrics
    from cxr_lung_risk.serve.outbox import Sender
    from cxr_lung_risk.serve.spool import Spool

    rec, _ = _write(tmp_path / "res", _models(), prepared, formats=("sr", "fhir"), deterministic="stable")
    bundle_file = tmp_path / "res" / rec.outputs["fhir"][0]
    port = free_port()
    cfg = ServeConfig(spool=tmp_path / "spool", fhir=(f"http://127.0.0.1:{port}/fhir",), fhir_token="tok",
                      retry_initial=0.2, retry_max=0.5, poll=0.05)
    spool = Spool(cfg.spool).open()
    audit = AuditLog(cfg.audit_path)
    (dest,) = cfg.destinations
    assert spool.enqueue(dest.key, "entry-1", [bundle_file], {"source_sop_uid": "1.2", "received": time.time(), "scored": time.time()})
    stop = threading.Event()
    sender = Sender(cfg, dest, spool, audit, Metrics(), stop)
    sender.start()
    server = None
    try:
        wait_for(lambda: any("connection refused" in e.get("error", "") for e in read_audit(cfg.spool) if e["event"] == "send_failed"),
                 30, "a refused connection")
        server = FhirServer(port)
        server.fail = [503]
        server.start()
        wait_for(lambda: any(e["event"] == "sent" for e in read_audit(cfg.spool)), 30, "delivery")
        assert spool.entries(dest.key, "delivered") and server.attempts >= 2 and not server.invalid
        (got,) = server.received
        assert got["bundle"] == json.loads(bundle_file.read_text())
        assert got["headers"]["Authorization"] == "Bearer tok" and got["headers"]["Content-Type"].startswith("application/fhir+json")
        failed = [e for e in read_audit(cfg.spool) if e["event"] == "send_failed"]
        assert any("503" in e["error"] for e in failed)
        sent = [e for e in read_audit(cfg.spool) if e["event"] == "sent"]
        assert len(sent) == 1 and sent[0]["attempts"] >= 3
        assert sum(1 for k in server.store if k.startswith("Observation/")) == 5
    finally:
        stop.set()
        sender.wake.set()
        sender.join(10)
        if server:
            server.stop()
        audit.close()
        spool.close()


def test_a_bundle_the_server_refuses_is_retried_then_failed(tmp_path):
    pytest.importorskip("pynetdicom")
    from cxr_lung_risk.serve.config import Destination, ServeConfig
    from cxr_lung_risk.serve.fhir import send_fhir

    server = FhirServer().start()
    try:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [{"bogus": 1}]}))
        cfg = ServeConfig(spool=tmp_path / "spool")
        errors = send_fhir(cfg, Destination("fhir", url=server.url), [bad])
        assert "refused" in errors[bad] and "400" in errors[bad] and server.invalid
    finally:
        server.stop()


def test_worker_sends_the_bundle_to_fhir_and_dicom_objects_to_dicom(tmp_path):
    """The worker writes the FHIR bundle when a FHIR destination is configured and queues only the
    bundle for it, only the DICOM objects for a C-STORE destination."""
    pytest.importorskip("pynetdicom")
    from cxr_lung_risk.serve.audit import AuditLog
    from cxr_lung_risk.serve.config import ServeConfig, parse_destination
    from cxr_lung_risk.serve.metrics import Metrics
    from cxr_lung_risk.serve.spool import Spool
    from cxr_lung_risk.serve.worker import Worker

    cfg = ServeConfig(spool=tmp_path / "spool", send_to=(parse_destination("PACS@127.0.0.1:1"),), fhir=("http://127.0.0.1:1/fhir",))
    spool = Spool(cfg.spool).open()
    audit = AuditLog(cfg.audit_path)
    try:
        src = pydicom.dcmread(CHEST_CR, stop_before_pixels=True)
        pending = spool.store(CHEST_CR.read_bytes(), str(src.StudyInstanceUID), str(src.SOPInstanceUID))
        w = Worker(cfg, spool, Scorer(_models()), audit, Metrics(), threading.Event())
        w.process([pending])
        dicom, fhir = (spool.entries(d.key) for d in cfg.destinations)
        names = {d.kind: sorted(n.split("-", 1)[1] for n in json.loads((e[0] / "meta.json").read_text())["files"])
                 for d, e in zip(cfg.destinations, (dicom, fhir))}
        sop = str(src.SOPInstanceUID)
        assert names["fhir"] == [f"{sop}.json"]
        assert names["dicom"] == [f"{sop}.dcm", f"{sop}.dcm"]  # the SR and the result image
        (bundle_name,) = json.loads((fhir[0] / "meta.json").read_text())["files"]
        validate_bundle(json.loads((fhir[0] / bundle_name).read_text()))
    finally:
        audit.close()
        spool.close()


def test_serve_node_posts_the_bundle_of_a_pushed_cr_and_sends_the_sr(tmp_path, synthetic_weights):
    """The real node (``cxr-lung-risk serve`` subprocess, synthetic weights) with ``--fhir URL``
    (token from $CXR_LUNG_RISK_FHIR_TOKEN) and a C-STORE destination: a CR pushed to it comes back
    as SR + result image to the DICOM receiver and as a validated FHIR bundle to the FHIR server
    (which first answers 503), with the SR's values."""
    pytest.importorskip("pynetdicom")
    from pacs_node import Receiver, ServeProcess, make_instances, push, sent_by_source, wait_for

    server = FhirServer()
    server.fail = [503]
    server.start()
    rx = Receiver().start()
    node = ServeProcess(tmp_path / "spool", synthetic_weights, env={"CXR_LUNG_RISK_FHIR_TOKEN": "node-token"},
                        extra=["--fhir", server.url, "--send-to", f"RECEIVER@127.0.0.1:{rx.port}", "--quiet-time", "0.5",
                               "--retry-initial", "0.3", "--retry-max", "1"])
    try:
        node.start()
        (src,) = make_instances(tmp_path / "in", 1, tag="fhirnode")
        assert push(node.port, [src]) == [0x0000]
        sop = str(pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID)
        wait_for(lambda: node.proc.poll() is not None or (sent_by_source(node.spool, server.url).get(sop)
                                                          and sent_by_source(node.spool, f"RECEIVER@127.0.0.1:{rx.port}").get(sop)),
                 600, "the results delivered to both destinations")
        assert node.proc.poll() is None, node.log_tail()
        assert server.attempts >= 2 and not server.invalid
        (got,) = server.received
        assert got["headers"]["Authorization"] == "Bearer node-token"
        bundle = got["bundle"]
        srs = [p for p in (tmp_path / "spool" / "results").glob("*/sr/*.dcm")]
        assert len(srs) == 1
        sr, codes = _sr_items(srs[0]), _sr_codes(srs[0])
        obs = {o["code"]["coding"][0]["code"]: o for o in _resources(bundle, "Observation")}
        assert set(obs) == set(sr) | set(codes) and all(
            obs[c]["valueCodeableConcept"]["coding"][0]["code"] == codes[c]["code"] for c in codes) and all(obs[c]["valueQuantity"]["value"] == sr[c]["value"] for c in sr)
        (report,) = _resources(bundle, "DiagnosticReport")
        assert report["identifier"][0]["value"] == f"urn:oid:{pydicom.dcmread(srs[0]).SOPInstanceUID}"
        assert sorted(rx_sop for _, rx_sop in rx.received) == sorted(
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (tmp_path / "spool" / "results").glob("*/*/*.dcm"))
    finally:
        try:
            node.terminate()
        finally:
            node.kill()
            rx.stop()
            server.stop()
