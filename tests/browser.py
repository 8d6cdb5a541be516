"""Helpers of the browser tests: Debian's chromium (headless) driven by Selenium through Debian's
chromedriver, never a downloaded browser or driver; screenshots into ``tests/artifacts/``."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"  # ignored by git: the screenshots of the last run
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def chromium_driver(downloads: Path | None = None, width: int = 1400, height: int = 1600):
    """A headless chromium WebDriver (skips when chromium, chromedriver or selenium is absent)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install 'cxr-lung-risk[test]')")
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not os.access(exe, os.X_OK):
            pytest.skip(f"{exe} is missing (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={width},{height}",
              "--no-proxy-server", "--disable-extensions", "--disable-background-networking", "--no-first-run"):
        opts.add_argument(a)
    if downloads is not None:
        downloads.mkdir(parents=True, exist_ok=True)
        opts.add_experimental_option("prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False,
                                               "download.directory_upgrade": True, "safebrowsing.enabled": False})
    # an explicit driver path and browser binary, and Selenium Manager told to stay offline:
    # nothing is downloaded
    os.environ.setdefault("SE_OFFLINE", "true")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    if downloads is not None:
        try:
            driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        except Exception:  # noqa: BLE001 - older drivers: the prefs above do it
            pass
    driver.set_page_load_timeout(60)
    return driver


def screenshot(driver, name: str, full_page: bool = True) -> Path:
    """Save a PNG of the page as ``tests/artifacts/<name>.png`` (the whole page's height)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    if full_page:
        h = driver.execute_script("return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
        w = driver.execute_script("return document.documentElement.scrollWidth")
        driver.set_window_size(max(1200, int(w)), min(6000, int(h) + 140))
    driver.save_screenshot(str(path))
    return path


def wait_file(folder: Path, suffix: str, timeout: float = 60) -> Path:
    """The first complete file ending in ``suffix`` that appears in ``folder``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done = [p for p in folder.glob(f"*{suffix}") if not p.name.endswith(".crdownload")]
        if done and not list(folder.glob("*.crdownload")):
            return done[0]
        time.sleep(0.2)
    raise AssertionError(f"no {suffix} file was downloaded into {folder} within {timeout:.0f} s: {os.listdir(folder)}")


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None
