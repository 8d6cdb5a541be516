"""Issue 20 item 1, one job runner: the node's worker is a thin adapter over
:mod:`cxr_lung_risk.jobs` like ``predict``: each spooled batch is one :class:`~cxr_lung_risk.jobs.Job`
moved by the node's engine, and gives the records ``predict``'s job gives on the same files.
CXR-Age on synthetic weights (one ResNet34: seconds on a CPU)."""
from __future__ import annotations

import threading
from pathlib import Path

import pydicom
import pytest

pytest.importorskip("pynetdicom")

from pacs_node import events, make_instances, truncated_cr  # noqa: E402

from cxr_lung_risk import api, jobs  # noqa: E402
from cxr_lung_risk.options import PredictOptions  # noqa: E402
from cxr_lung_risk.predict import run_predict  # noqa: E402
from cxr_lung_risk.records import read_records  # noqa: E402
from cxr_lung_risk.serve.audit import AuditLog  # noqa: E402
from cxr_lung_risk.serve.config import build_config  # noqa: E402
from cxr_lung_risk.serve.metrics import Metrics  # noqa: E402
from cxr_lung_risk.serve.spool import Spool  # noqa: E402
from cxr_lung_risk.serve.worker import Worker  # noqa: E402


@pytest.fixture(scope="module")
def age_weights(tmp_path_factory) -> Path:
    from cxr_lung_risk.synthetic import write_synthetic_age_weights

    return write_synthetic_age_weights(tmp_path_factory.mktemp("age") / "PLCO_Fine_Tuned_120419.pth")


@pytest.fixture()
def spy_jobs(monkeypatch) -> list[tuple[str, list[str]]]:
    """Every :meth:`Job.move` of this test: (the engine's class, the plan's File names)."""
    moved: list[tuple[str, list[str]]] = []
    real = jobs.Job.move

    def move(self, plan, writer):
        moved.append((type(self.engine).__name__, [f.rel for f in plan.todo]))
        return real(self, plan, writer)

    monkeypatch.setattr(jobs.Job, "move", move)
    return moved


def _spooled_worker(tmp_path: Path, files: list[Path], weights: Path, scorer=None):
    cfg = build_config({"spool": tmp_path / "spool", "model": "age", "age_weights": weights, "device": "cpu", "quiet_time": 0})
    spool = Spool(cfg.spool).open()
    for f in files:  # as the listener stores them
        meta = pydicom.dcmread(f, stop_before_pixels=True)
        spool.store(f.read_bytes(), str(meta.StudyInstanceUID), str(meta.SOPInstanceUID))
    scorer = scorer or api.load_scorer("age", weights={"age": weights}, device="cpu")
    audit = AuditLog(cfg.audit_path)
    return Worker(cfg, spool, scorer, audit, Metrics(), threading.Event()), spool, audit


def _by_sop(records) -> dict[str, tuple]:
    return {r.sop_uid or r.file.rsplit("/", 1)[-1]: (str(r.status), r.reason, r.warnings, r.values) for r in records}


def test_a_node_batch_is_one_job_of_the_runner_with_predicts_records(tmp_path, age_weights, spy_jobs):
    inputs = tmp_path / "in"
    files = make_instances(inputs, 2, tag="jobs") + [truncated_cr(inputs / "broken.dcm")]
    worker, spool, audit = _spooled_worker(tmp_path, files, age_weights)
    try:
        pending = spool.pending()
        worker.process(pending)
        (batch,) = spool.results.iterdir()
    finally:
        audit.close()
        spool.close()
    assert spy_jobs == [("NodeEngine", [f"{p.study}/{p.sop}.dcm" for p in pending])]
    node = list(read_records(batch))
    assert [str(r.status) for r in node].count("ok") == 2 and len(node) == 3

    run_predict(PredictOptions(inputs=(inputs,), out=tmp_path / "predict", models=("age",), weights={"age": age_weights},
                               device="cpu", workers=0, formats="csv,json,sr", progress=False))
    assert spy_jobs[1][0] == "LocalEngine"
    predicted = list(read_records(tmp_path / "predict"))
    # the same statuses, reasons, warnings and values per instance (the node names files <study>/<sop>.dcm)
    assert _by_sop(node) == _by_sop(predicted)


def test_a_scoring_error_fails_the_batch_and_the_node_carries_on(tmp_path, age_weights, spy_jobs):
    scorer = api.load_scorer("age", weights={"age": age_weights}, device="cpu")

    def broken(*a, **kw):
        raise RuntimeError("out of device memory")

    scorer.score = broken
    files = make_instances(tmp_path / "in", 2, tag="jobsfail")
    worker, spool, audit = _spooled_worker(tmp_path, files, age_weights, scorer=scorer)
    try:
        worker.process(spool.pending())
        assert spool.pending() == []  # accounted (failed), not left queued
    finally:
        audit.close()
        spool.close()
    assert [e for e, _ in spy_jobs] == ["NodeEngine"]
    failed = events(spool.root, "failed")
    assert len(failed) == 2
    assert all(e["reason"] == "failed: scoring failed: RuntimeError: out of device memory" for e in failed)
