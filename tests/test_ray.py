"""``predict --engine ray`` on a real local Ray cluster (loopback only), issue 14 item 2.

One Ray per module (2 CPUs, a small object store); the scoring actor loads the synthetic models
once per run. A 40-input mixed cohort (chest CR copies with their own UIDs, the authors' PNGs,
CT/MR copies, a truncated DICOM, a text file) is scored by the local engine and by Ray."""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cohort import assert_same_rows, make_cohort, predict_opts, scored_run  # noqa: E402

pytestmark = pytest.mark.ray

try:
    import ray
except ImportError:  # pragma: no cover - scripts/test.sh installs the [ray] extra where it can
    pytest.skip("Ray is not installed (pip install 'cxr-lung-risk[ray]'); the ray suite cannot run", allow_module_level=True)

from cxr_lung_risk.predict import run_predict  # noqa: E402
from cxr_lung_risk.records import read_records  # noqa: E402

BATCH = 4
TABLES = ("cxr_lung_risk.csv", "cxr_lung_risk.json", "manifest.csv", "records.jsonl")


@pytest.fixture(scope="module")
def ray_cluster():
    import tempfile

    tmp = tempfile.mkdtemp(prefix="cxr-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    old_path = os.environ.get("PYTHONPATH")  # the workers import tests/s3_standin.py by name
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent)] + ([old_path] if old_path else []))
    from cxr_lung_risk.cluster import LOCAL_NODE_IP  # loopback (Ray would replace 127.0.0.1 by the machine's address)

    ray.init(num_cpus=2, num_gpus=0, object_store_memory=400 << 20, include_dashboard=False, _node_ip_address=LOCAL_NODE_IP,
             _temp_dir=tmp, logging_level="WARNING", log_to_driver=False)
    try:
        nodes = ray.nodes()
        assert all(n["NodeManagerAddress"].startswith("127.") for n in nodes), nodes  # loopback only
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, sample_pngs) -> Path:
    from pydicom.data import get_testdata_file

    d = make_cohort(tmp_path_factory.mktemp("cohort"), sample_pngs, n_cr=6, png_copies=1)
    for i in range(14):  # an archive holds more than chest radiographs
        name = "CT_small.dcm" if i % 2 else "MR_small.dcm"
        shutil.copyfile(get_testdata_file(name), d / "other" / f"series_{i:02d}.dcm")
    assert len([p for p in d.rglob("*") if p.is_file()]) == 29
    for i in range(11):
        (d / "other" / f"report_{i:02d}.txt").write_text(f"report {i}\n")
    assert len([p for p in d.rglob("*") if p.is_file()]) == 40
    return d


def _opts(inputs, out, weights, **kw):
    return predict_opts(inputs, out, weights, **{"batch_size": BATCH, **kw})


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, cohort, synthetic_weights) -> Path:
    return scored_run(tmp_path_factory.mktemp("local") / "out", cohort, synthetic_weights, (11, 28, 1), batch_size=BATCH)


def _files(out: Path, sub: str) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / sub).rglob("*")) if p.is_file()}


def _parquet_rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for part in sorted((out / "parquet").glob("part-*.parquet")):
        rows += pq.read_table(part).to_pylist()
    return rows


def test_ray_equals_the_single_process_run(ray_cluster, tmp_path, cohort, local_run, synthetic_weights):
    out = tmp_path / "ray"
    s = run_predict(_opts(cohort, out, synthetic_weights, engine="ray"))
    assert (s.scored, s.failed, s.inputs) == (11, 1, 40)
    for name in TABLES:  # same rows, records, reasons, UIDs, order: byte for byte
        assert (out / name).read_bytes() == (local_run / name).read_bytes(), name
    assert _files(out, "sr") == _files(local_run, "sr") and len(_files(out, "sr")) == 6
    with open(local_run / "cxr_lung_risk.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    pq_rows = _parquet_rows(out)
    assert [r["File"] for r in pq_rows] == [r["File"] for r in csv_rows]
    assert [r["CXR_Lung_Risk"] for r in pq_rows] == [float(r["CXR_Lung_Risk"]) for r in csv_rows]
    assert [r["AccessionNumber"] for r in pq_rows] == [r["AccessionNumber"] for r in csv_rows]
    assert json.loads((out / "run.json").read_text())["engine"] == "ray"


def test_a_worker_killed_mid_run_loses_nothing(ray_cluster, tmp_path, monkeypatch, cohort, local_run, synthetic_weights):
    from cxr_lung_risk.cluster import FAULT_ENV

    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"5:{marker}")  # the worker preparing input 5 (cr_005, of 40) exits abruptly, once
    out = tmp_path / "ray"
    s = run_predict(_opts(cohort, out, synthetic_weights, engine="ray"))
    assert marker.is_file(), "the fault was not injected"
    assert int(marker.read_text()) != os.getpid()  # a Ray worker died, not this process
    recs = list(read_records(out))
    assert len(recs) == 40 and len({r.file for r in recs}) == 40  # every input once
    assert (s.scored, s.failed) == (11, 1)
    assert _files(out, "sr") == _files(local_run, "sr")  # no SR missing, none twice
    assert sum(len(r.outputs.get("sr", [])) for r in recs) == 6
    for name in TABLES:
        assert (out / name).read_bytes() == (local_run / name).read_bytes(), name


def test_object_store_url_through_a_local_standin(ray_cluster, tmp_path, cohort, local_run, synthetic_weights):
    import fsspec
    from s3_standin import ROOT_ENV, LocalBucketFS

    store = tmp_path / "store"
    arch = store / "bucket" / "archive"
    for rel in ("cr/cr_000.dcm", "cr/cr_003.dcm", "png0/B.png", "other/ct.dcm"):
        (arch / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cohort / rel, arch / rel)
    from fsspec.registry import _registry

    old = _registry.get("s3")
    os.environ[ROOT_ENV] = str(store)
    fsspec.register_implementation("s3", LocalBucketFS, clobber=True)
    try:
        out = tmp_path / "out"
        s = run_predict(_opts(["s3://bucket/archive"], out, synthetic_weights, engine="ray"))
        assert (s.scored, s.skipped, s.failed) == (3, 1, 0)
        recs = {r.file: r for r in read_records(out)}
        assert sorted(recs) == ["cr/cr_000.dcm", "cr/cr_003.dcm", "other/ct.dcm", "png0/B.png"]
        assert recs["cr/cr_003.dcm"].input == "s3://bucket/archive/cr/cr_003.dcm"
        assert recs["cr/cr_003.dcm"].identity["size"] == (cohort / "cr/cr_003.dcm").stat().st_size
        with open(local_run / "cxr_lung_risk.csv", newline="") as f:
            want = {r["File"]: r for r in csv.DictReader(f)}
        with open(out / "cxr_lung_risk.csv", newline="") as f:
            got = list(csv.DictReader(f))
        # the same UIDs, linkage and scores as the local files (other batches: scores to float32 noise)
        assert_same_rows(got, [want[r["File"]] for r in got])
        assert sorted(_files(out, "sr")) == ["sr/2.25.314159265358979.1.1.1.dcm", "sr/2.25.314159265358982.1.1.1.dcm"]
        # rerun: everything is done, judged by the listed identity; nothing is read or scored again
        tm = tmp_path / "t.json"
        s2 = run_predict(_opts(["s3://bucket/archive"], out, synthetic_weights, engine="ray", timings=tm))
        assert json.loads(tm.read_text())["done_now"] == 0 and s2.resumed == 4
    finally:
        if old is not None:
            _registry["s3"] = old
        else:
            _registry.pop("s3", None)
        os.environ.pop(ROOT_ENV, None)
