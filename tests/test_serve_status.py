"""The node's status page (``serve --metrics-port``: ``/``) in a real browser.

A real ``cxr-lung-risk serve`` subprocess with the session's SYNTHETIC weights, two destinations
(a pynetdicom receiver that works, and a port where nothing listens), fed with dcmtk's
``storescu``; Debian's headless chromium opens the page. No patient name or ID may appear.
"""
from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pydicom
import pytest

from browser import chromium_driver, screenshot
from pacs_node import SAMPLE_CR, Receiver, ServeProcess, events, free_port, push, uid, wait_for

pytestmark = pytest.mark.browser

PATIENT_NAME = "Statuspage^Jane"
PATIENT_ID = "PID-99887766"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _instance(dest):
    ds = pydicom.dcmread(SAMPLE_CR)
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("status", "study"), uid("status", "series")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("status", "sop")
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _store(port: int, path) -> None:
    exe = "/usr/bin/storescu"  # dcmtk's (the venv's bin holds pynetdicom's storescu of the same name)
    if not shutil.which(exe):  # dcmtk missing: pynetdicom's SCU does the same C-STORE
        assert push(port, [path]) == [0]
        return
    # -xw: propose JPEG 2000 (the sample CR is JPEG 2000 irreversible)
    r = subprocess.run([exe, "-xw", "-aet", "TESTSCU", "-aec", "CXR-LUNG-RISK", "127.0.0.1", str(port), str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_status_page_shows_the_node_its_destinations_and_a_result_after_storescu(synthetic_weights, tmp_path):
    from selenium.webdriver.common.by import By

    recv = Receiver(port=free_port()).start()
    dead = free_port()
    node = ServeProcess(tmp_path / "spool", synthetic_weights, extra=[
        "--send-to", f"RECEIVER@127.0.0.1:{recv.port}", "--send-to", f"DOWN@127.0.0.1:{dead}",
        "--quiet-time", "0.5", "--retry-initial", "0.5", "--retry-max", "2", "--degraded-after", "2"])
    driver = None
    try:
        node.start()
        _store(node.port, _instance(tmp_path / "cr.dcm"))
        wait_for(lambda: events(node.spool, "scored"), 300, "the instance to be scored")
        wait_for(lambda: len(recv.received) >= 2, 120, "the SR and result image at the receiver")
        url = f"http://127.0.0.1:{node.metrics_port}/"
        with _NO_PROXY.open(url, timeout=10) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
            page = r.read().decode()
        assert PATIENT_NAME not in page and PATIENT_NAME.split("^")[0] not in page and PATIENT_ID not in page

        driver = chromium_driver()
        driver.get(url)
        assert driver.find_element(By.ID, "ae-title").text == "CXR-LUNG-RISK"
        assert driver.find_element(By.ID, "listening").text == f"127.0.0.1:{node.port}"
        assert driver.find_element(By.ID, "count-received").text == "1"
        assert driver.find_element(By.ID, "count-scored").text == "1"
        assert int(driver.find_element(By.ID, "count-sent").text) >= 2
        dest = {r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")
                for r in driver.find_elements(By.CSS_SELECTOR, "#destinations tr") if r.find_elements(By.TAG_NAME, "td")}
        assert dest[f"RECEIVER@127.0.0.1:{recv.port}"][1].text == "ok"
        assert f"DOWN@127.0.0.1:{dead}" in dest
        wait_for(lambda: (driver.refresh() or True) and _dest_state(driver, f"DOWN@127.0.0.1:{dead}") == "failing", 60,
                 "the dead destination to be shown failing")
        down = _dest_row(driver, f"DOWN@127.0.0.1:{dead}")
        assert down[3].text, "the last error is shown"
        assert driver.find_element(By.ID, "queue-incoming").text == "0"
        img = driver.find_element(By.CSS_SELECTOR, "#recent .result img")
        wait_for(lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0, 30,
                 "the thumbnail")
        links = {a.get_attribute("href") for a in driver.find_elements(By.TAG_NAME, "a")}
        assert url + "metrics" in links and url + "healthz" in links
        html = driver.page_source
        assert PATIENT_NAME not in html and PATIENT_ID not in html
        assert "CXR_Lung_Risk" in driver.find_element(By.ID, "recent").text
        screenshot(driver, "node_status")
    finally:
        if driver is not None:
            driver.quit()
        node.terminate()
        recv.stop()


def _dest_row(driver, name):
    from selenium.webdriver.common.by import By

    for r in driver.find_elements(By.CSS_SELECTOR, "#destinations tr"):
        tds = r.find_elements(By.TAG_NAME, "td")
        if tds and tds[0].text == name:
            return tds
    return None


def _dest_state(driver, name) -> str:
    tds = _dest_row(driver, name)
    return tds[1].text if tds else ""
