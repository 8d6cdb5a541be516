"""Issue 20 item 5: ``predict``, ``predict --engine ray`` and ``serve``'s worker give, on the same
inputs, byte for byte the outputs of the stored run (``tests/data/stored_run/stored_run.json``,
recorded with ``tools/stored_run.py record`` before the job runner was introduced). What is
normalised and why: ``tools/stored_run.py``'s docstring."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("stored_run", REPO / "tools" / "stored_run.py")
stored_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stored_run)


@pytest.fixture(scope="module")
def stored() -> dict:
    data = json.loads(stored_run.STORED.read_text())
    if data["versions"] != stored_run.versions():
        pytest.skip(f"the stored run was made with {data['versions']}, this environment has {stored_run.versions()}: "
                    "rerecord it at a known-good commit (python tools/stored_run.py record)")
    return data


def _check(part: str, tmp_path: Path, stored: dict) -> None:
    got = stored_run.run_part(part, tmp_path)
    assert stored_run.compare(part, got, stored) == []


def test_predict_is_byte_identical_to_the_stored_run(tmp_path, stored):
    _check("local", tmp_path, stored)


def test_serve_worker_is_byte_identical_to_the_stored_run(tmp_path, stored):
    pytest.importorskip("pynetdicom")
    _check("serve", tmp_path, stored)


@pytest.mark.ray
def test_ray_engine_is_byte_identical_to_the_stored_run(tmp_path, stored):
    pytest.importorskip("ray")
    _check("ray", tmp_path, stored)
