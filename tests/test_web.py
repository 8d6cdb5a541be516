"""``cxr-lung-risk web`` in a real browser: Debian's headless chromium driven by Selenium.

The server runs as a real subprocess on a free 127.0.0.1 port with the session's SYNTHETIC
weights and its own TMPDIR (so the test sees where its private folder is and that it goes). The
page is used as a person would: tick the PHI notice, drop files (the file input), wait for the
rows, read scores and reasons, toggle the saliency overlay, download the SR, delete. Screenshots
go to ``tests/artifacts/``.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pydicom
import pytest

from browser import chromium_driver, screenshot, wait_file
from conftest import dciodvfy, dsrdump
from pacs_node import SAMPLE_CR, free_port, wait_for

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
SAMPLE_PNG = REPO / "src" / "cxr_lung_risk" / "samples" / "A.png"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _exe() -> str:
    return shutil.which("cxr-lung-risk") or str(Path(sys.executable).with_name("cxr-lung-risk"))


class WebProcess:
    def __init__(self, root: Path, weights: Path, *extra: str) -> None:
        self.root = root
        self.tmp = root / "tmpdir"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = root / "web.log"
        env = dict(os.environ, TMPDIR=str(self.tmp), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen([_exe(), "web", "--port", str(self.port), "--weights", str(weights), "--device", "cpu", *extra],
                                         stdout=fh, stderr=subprocess.STDOUT, env=env)
        wait_for(lambda: self.proc.poll() is not None or self.health() == "ok", 300, "the web page's models to load")
        assert self.proc.poll() is None, self.log.read_text()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def health(self) -> str:
        try:
            with _NO_PROXY.open(self.url + "healthz", timeout=5) as r:
                return json.loads(r.read()).get("status", "")
        except Exception:  # noqa: BLE001 - not up yet
            return ""

    def private_folders(self) -> list[Path]:
        return sorted(self.tmp.glob("cxr-lung-risk-web-*"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return self.proc.returncode


@pytest.fixture(scope="module")
def web(synthetic_weights, tmp_path_factory):
    w = WebProcess(tmp_path_factory.mktemp("web"), synthetic_weights, "--max-upload-mb", "64")
    yield w
    w.stop()


@pytest.fixture
def browser(tmp_path):
    d = chromium_driver(downloads=tmp_path / "downloads")
    d.downloads = tmp_path / "downloads"
    yield d
    d.quit()


def _rows(driver) -> dict[str, dict]:
    return driver.execute_script("""
        const out = {};
        for (const tr of document.querySelectorAll('#rows tr[data-id]')) {
          out[tr.querySelector('td.name').textContent] = {
            id: tr.dataset.id, status: tr.dataset.status,
            reason: Array.from(tr.querySelectorAll('.reason')).map(e => e.textContent).join(' | '),
            scores: Array.from(tr.querySelectorAll('.score')).map(e => [e.dataset.column, parseFloat(e.dataset.value), e.textContent]),
            weights: tr.children[5].textContent, weightsClass: tr.children[5].className,
            links: Array.from(tr.querySelectorAll('a')).map(a => a.className),
          };
        }
        return out;""")


def _open_and_drop(driver, url: str, files) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    driver.find_element(By.ID, "phi-ack").click()
    driver.find_element(By.ID, "file-input").send_keys("\n".join(str(f) for f in files))


def _wait_rows(driver, names, timeout: float = 600) -> dict[str, dict]:
    def finished():
        rows = _rows(driver)
        return all(n in rows and rows[n]["status"] in ("ok", "skipped", "failed") for n in names)

    wait_for(finished, timeout, f"rows of {names} to finish", interval=0.5)
    return _rows(driver)


def _predict(weights: Path, files, out: Path) -> dict[str, float]:
    r = subprocess.run([_exe(), "predict", *map(str, files), "--out", str(out), "--weights", str(weights), "--device", "cpu"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(out / "cxr_lung_risk.csv", newline="") as f:
        return {row["File"]: float(row["CXR_Lung_Risk"]) for row in csv.DictReader(f)}


def test_page_scores_a_cr_and_a_png_like_predict_downloads_a_valid_sr_and_deletes(web, browser, synthetic_weights, tmp_path):
    from selenium.webdriver.common.by import By

    d = browser
    _open_and_drop(d, web.url, [SAMPLE_CR, SAMPLE_PNG])
    # the research-use banner, and SYNTHETIC in red because the weights are synthetic
    assert d.find_element(By.ID, "research-banner").text == "RESEARCH USE ONLY - NOT FOR CLINICAL USE"
    wait_for(lambda: d.find_element(By.ID, "synthetic-banner").is_displayed(), 60, "the SYNTHETIC banner")
    assert d.find_element(By.ID, "synthetic-banner").text == "SYNTHETIC WEIGHTS - THE SCORES ARE MEANINGLESS"
    assert "212, 0, 0" in d.find_element(By.ID, "synthetic-banner").value_of_css_property("background-color")
    rows = _wait_rows(d, [SAMPLE_CR.name, SAMPLE_PNG.name])
    cr, png = rows[SAMPLE_CR.name], rows[SAMPLE_PNG.name]
    assert cr["status"] == png["status"] == "ok", rows
    assert "SYNTHETIC" in cr["weights"] and "synthetic-text" in cr["weightsClass"]
    assert cr["links"] == ["dl-sr", "dl-result", "dl-card"] and png["links"] == ["dl-card"]  # a PNG has no DICOM outputs
    # the result image is the one the node sends (no overlay tile): its pixels are the card's
    import numpy as np
    from PIL import Image

    cookie = "; ".join(f"{c['name']}={c['value']}" for c in d.get_cookies())

    def fetch(path: str) -> bytes:
        with _NO_PROXY.open(urllib.request.Request(web.url + path, headers={"Cookie": cookie}), timeout=30) as r:
            return r.read()

    result = pydicom.dcmread(io.BytesIO(fetch(f"api/items/{cr['id']}/result")))
    card_px = np.asarray(Image.open(io.BytesIO(fetch(f"api/items/{cr['id']}/card"))).convert("RGB"))
    assert np.array_equal(result.pixel_array, card_px)

    # the scores equal predict's for the same files and weights
    expected = _predict(synthetic_weights, [SAMPLE_CR, SAMPLE_PNG], tmp_path / "predict")
    for name, row in ((SAMPLE_CR.name, cr), (SAMPLE_PNG.name, png)):
        (column, value, text), = row["scores"]
        assert column == "CXR_Lung_Risk"
        assert value == pytest.approx(expected[name], abs=1e-3), (name, value, expected[name])
        assert text == f"CXR-Lung-Risk: {expected[name]:.1f} years"

    # the result card: the overlay toggles on and off
    card = d.find_element(By.CSS_SELECTOR, f"#card-{cr['id']} img")
    wait_for(lambda: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", card) > 0, 30, "the card")
    width_plain = d.execute_script("return arguments[0].naturalWidth", card)
    toggle = d.find_element(By.CSS_SELECTOR, f"#card-{cr['id']} .overlay-toggle")
    wait_for(lambda: toggle.is_enabled(), 300, "the saliency overlay (computed after the scores)")
    toggle.click()
    wait_for(lambda: card.get_attribute("src").endswith("/card_overlay")
             and d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", card) > 0, 30, "the overlay card")
    assert d.execute_script("return arguments[0].naturalWidth", card) >= width_plain
    sizes = d.execute_async_script("""
        const done = arguments[arguments.length - 1];
        Promise.all(['card', 'card_overlay'].map(k => fetch('api/items/' + arguments[0] + '/' + k).then(r => r.arrayBuffer())))
          .then(bs => done(bs.map(b => b.byteLength)));""", cr["id"])
    assert sizes[0] > 1000 and sizes[1] > sizes[0]  # the overlay tile is drawn next to the image
    screenshot(d, "web_page")
    d.find_element(By.CSS_SELECTOR, f"#card-{cr['id']} .overlay-toggle").click()
    wait_for(lambda: card.get_attribute("src").endswith("/card"), 10, "the plain card again")

    # download the SR through the browser and validate it
    d.find_element(By.CSS_SELECTOR, f"#rows tr[data-id='{cr['id']}'] a.dl-sr").click()
    sr_path = wait_file(d.downloads, ".sr.dcm")
    errors, _ = dciodvfy(sr_path)
    assert errors == [], errors
    rc, out, _ = dsrdump(sr_path)
    assert rc == 0
    sr = pydicom.dcmread(sr_path)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.Modality == "SR"
    m = re.search(rb'NUM:\(,,"CXR-Lung-Risk"\)="([0-9.]+)" \(a,UCUM,"year"\)', out)
    assert m is not None, out[:2000]
    assert float(m.group(1)) == pytest.approx(expected[SAMPLE_CR.name], abs=1e-3)
    source = pydicom.dcmread(SAMPLE_CR, stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID

    # CSV / JSON / zip of everything
    d.find_element(By.ID, "dl-zip").click()
    z = wait_file(d.downloads, ".zip")
    with zipfile.ZipFile(z) as zf:
        names = zf.namelist()
        rows_csv = list(csv.DictReader(zf.read("cxr_lung_risk.csv").decode().splitlines()))
    assert {"cxr_lung_risk.csv", "cxr_lung_risk.json", "manifest.csv"} <= set(names)
    assert any(n.startswith("sr/") for n in names) and any(n.startswith("result/") for n in names)
    assert {r["File"]: pytest.approx(float(r["CXR_Lung_Risk"]), abs=1e-3) for r in rows_csv} == expected

    # the uploads live in the private folder only; "Delete my results" removes this session's folder
    folder_text = d.find_element(By.ID, "folder").text
    folder = Path(folder_text.split("kept in ", 1)[1].split(" until", 1)[0])
    assert folder.is_dir() and folder.parent in web.private_folders()
    assert oct(folder.parent.stat().st_mode & 0o777) == oct(0o700)
    wait_for(lambda: "computing" not in d.find_element(By.ID, "cards").text, 300, "every overlay to be done")
    d.find_element(By.ID, "delete").click()
    wait_for(lambda: not folder.exists(), 30, "the session folder to be deleted")
    wait_for(lambda: _rows(d) == {}, 10, "the table to empty")
    assert d.find_elements(By.CSS_SELECTOR, "#cards .card") == []


def _bomb(dicom_data, dest: Path) -> Path:
    from pydicom.uid import JPEG2000Lossless

    from hostile_files import patch_j2k, rg1_crop, save

    ds = pydicom.dcmread(dicom_data / "RG1_UNCR.dcm")
    return patch_j2k(save(rg1_crop((ds, ds.pixel_array)), dest, JPEG2000Lossless), 8000, 8000)


def _zip_bomb(dest: Path, mib: int = 100) -> Path:
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("study/IM0001.dcm", "w", force_zip64=True) as f:
            block = b"\0" * (1 << 20)
            for _ in range(mib):
                f.write(block)
    return dest


def test_page_gives_the_reasons_of_a_non_dicom_file_and_bombs_and_stays_up(web, browser, dicom_data, tmp_path):
    from selenium.webdriver.common.by import By

    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image\n")
    bomb = _bomb(dicom_data, tmp_path / "bomb.dcm")
    zbomb = _zip_bomb(tmp_path / "folder.zip")
    assert zbomb.stat().st_size < 1 << 20
    _open_and_drop(browser, web.url, [notes, bomb, zbomb])
    rows = _wait_rows(browser, [notes.name, bomb.name, "folder.zip/study/IM0001.dcm"], timeout=300)
    assert rows[notes.name]["status"] in ("skipped", "failed") and rows[notes.name]["reason"], rows
    assert "DICOM" in rows[notes.name]["reason"] or "image" in rows[notes.name]["reason"], rows[notes.name]
    assert rows[bomb.name]["status"] == "failed"
    assert "8000 x 8000" in rows[bomb.name]["reason"] and "not decoded" in rows[bomb.name]["reason"], rows[bomb.name]
    zrow = rows["folder.zip/study/IM0001.dcm"]
    assert zrow["status"] == "failed" and "zip bomb" in zrow["reason"], zrow
    screenshot(browser, "web_reasons")
    assert web.health() == "ok"
    # the page keeps answering; an upload over the limit is refused with a sentence
    big = tmp_path / "big.dcm"
    with open(big, "wb") as f:
        f.truncate(68 << 20)
    browser.find_element(By.ID, "file-input").send_keys(str(big))
    wait_for(lambda: "larger than 64 MB" in browser.find_element(By.ID, "message").text, 60, "the size message")
    assert web.health() == "ok"
    browser.find_element(By.ID, "delete").click()


def test_stopping_the_server_deletes_its_private_folder(web, tmp_path):
    req = urllib.request.Request(web.url + "api/upload", method="POST")
    boundary = "xyzzy"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"A.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + SAMPLE_PNG.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    with _NO_PROXY.open(req, body, timeout=30) as r:
        assert r.status == 200
    assert len(web.private_folders()) == 1 and any(web.private_folders()[0].rglob("input*"))
    t0 = time.monotonic()
    assert web.stop() == 0
    assert time.monotonic() - t0 < 120
    assert web.private_folders() == []
    assert [p for p in web.tmp.iterdir()] == []  # nothing else was left in its temp folder either
