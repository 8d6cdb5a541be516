"""The project's set-up promises: spec data equals the published tables, the README's commands are
the ones CI and Docker run, and the CLI documents itself."""
from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_lung_risk.spec import age_spec, lung_risk_spec

REPO = Path(__file__).resolve().parents[1]


def test_spec_members_equal_the_authors_tables(reference_dir):
    ref = reference_dir / "cxr_lung_risk"
    specs = list(csv.DictReader(open(ref / "CXR_Lung_Risk_Specs.csv", newline="")))
    weights = {r["Model_Name"]: float(r["weight"]) for r in csv.DictReader(open(ref / "ensemble_weights.csv", newline=""))}
    spec = lung_risk_spec()
    assert [m.name for m in spec.members] == [r["Model_Name"] for r in specs]
    assert [m.architecture for m in spec.members] == [r["Architecture"].lower() for r in specs]
    assert [m.weight for m in spec.members] == [weights[r["Model_Name"]] for r in specs]
    assert all(m.image_size == int(r["Image_Size"]) for m, r in zip(spec.members, specs))
    assert spec.intercept == 49.8484258
    assert [m.index for m in spec.active_members()] == [0, 2, 3, 4, 5, 9, 10, 12, 14, 15, 16, 17, 18]
    assert spec.weights["archive_size"] == 2_159_460_140 and spec.weights["archive_folder"] == "ensamble-model-weights"


def test_age_spec_has_the_published_file():
    w = age_spec().weights
    assert w["size"] == 257_734_705
    assert w["sha256"] == "0b5a0dbcb91709420c261c749bb9e8f9a8f9287617c2713b86a183c8dbfb7aa7"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme
    assert re.search(r"^exec bash scripts/test\.sh\s*$", ci, re.M)


def test_docker_installs_the_package_into_its_own_venv():
    docker = (REPO / "Dockerfile").read_text()
    # its own venv from a pinned source (mhubio needs pydicom < 3); the MHub rules: tests/test_mhub_rules.py
    assert "-m venv /app/venv" in docker and '"${CXR_LUNG_RISK_PACKAGE}"' in docker
    assert 'ENTRYPOINT ["mhub.run"]' in docker and 'CMD ["--workflow", "default"]' in docker
    assert docker.splitlines()[0] == "FROM mhubai/base:latest"


@pytest.mark.parametrize("cmd", ["predict", "preprocess", "fetch-weights"])
def test_help_explains_each_command(cmd):
    p = subprocess.run([sys.executable, "-m", "cxr_lung_risk.cli", cmd, "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "usage: cxr-lung-risk " + cmd in p.stdout


def test_predict_help_names_the_contract_options():
    p = subprocess.run([sys.executable, "-m", "cxr_lung_risk.cli", "predict", "--help"], capture_output=True, text=True)
    for opt in ("--out", "--weights", "--device", "--batch-size", "--per-model", "--all-members", "--model", "--format", "--tta", "--no-tta", "--saliency"):
        assert opt in p.stdout, opt
