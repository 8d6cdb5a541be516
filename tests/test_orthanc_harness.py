"""The Orthanc harness itself (tests/orthanc.py): a real Orthanc starts on loopback ports, stores,
lists and sends DICOM, and survives a stop/start with its data (what the PACS tests rely on)."""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

pytestmark = pytest.mark.pacs

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "cxr_lung_risk" / "samples" / "chest_cr_RG1_J2KI.dcm"


def test_orthanc_stores_lists_sends_and_restarts(orthanc_factory):
    a = orthanc_factory(aet="ORTHANC_A")
    b = orthanc_factory(aet="ORTHANC_B", auth=True)
    a.set_modality("b", b.aet, "127.0.0.1", b.dicom_port)
    assert a.get("/system")["DicomAet"] == "ORTHANC_A"
    assert a.url.startswith("http://127.0.0.1:") and a.dicomweb_url.endswith("/dicom-web")
    ds = pydicom.dcmread(SAMPLE, stop_before_pixels=True)

    ans = a.upload(SAMPLE)
    assert ans["Status"] == "Success"
    assert a.upload(SAMPLE)["Status"] == "AlreadyStored"
    [inst] = a.study_instances(ds.StudyInstanceUID)
    assert a.tags(inst["ID"])["SOPInstanceUID"] == ds.SOPInstanceUID
    assert a.file(inst["ID"])[128:132] == b"DICM"
    # DICOMweb plugin answers QIDO-RS
    qido = a.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/instances", accept="application/dicom+json")
    assert [i["00080018"]["Value"][0] for i in qido] == [ds.SOPInstanceUID]

    # a real C-STORE from A to B (B requires HTTP authentication: the harness sends it)
    assert a.echo("b")
    a.send_study(ds.StudyInstanceUID, "b")
    assert [b.tags(i["ID"])["SOPInstanceUID"] for i in b.study_instances(ds.StudyInstanceUID)] == [ds.SOPInstanceUID]

    # destination down: B stopped refuses, back up with the same ports and data
    b.stop()
    assert not a.echo("b")
    b.start()
    assert a.echo("b")
    assert len(b.study_instances(ds.StudyInstanceUID)) == 1
