"""The stored run (issue 20): ``predict``, ``predict --engine ray`` and ``serve``'s worker on the
same small set of real inputs, their outputs digested file by file, so a refactoring can show that
it changed no byte.

    python tools/stored_run.py record [--parts local,ray,serve]   # writes tests/data/stored_run/stored_run.json
    python tools/stored_run.py check  [--parts local,ray,serve]   # reruns and compares

``tests/test_stored_run.py`` runs ``check`` part by part (the Ray part under the ``ray`` marker).

What is run, on what
--------------------
* Inputs (made afresh each time, byte-identical): two copies of the package's chest CR sample
  with their own UIDs (``tests/cohort.py``'s ``cr_copy``), the authors' sample PNG ``A.png``,
  pydicom-data's ``CT_small.dcm`` (skipped: not a radiograph) and the CR cut after 3,000 bytes
  (failed). Every input's mtime is set to 2020-01-01 (records carry it in their identity).
* Model: CXR-Age on SYNTHETIC weights (``write_synthetic_age_weights``, seed 1234): one ResNet34,
  seconds on a CPU; the same code paths (plan, prepare, score, write, account) as the ensemble.
* ``local``: ``predict`` with CSV + JSON + SR, ``--deterministic``, ``--per-model``,
  ``--saliency`` (gradient) and ``--result-image``, batch size 2, one decode worker.
* ``ray``: ``predict --engine ray`` with CSV + JSON + SR (+ Parquet, always), ``--deterministic``,
  batch size 2, on a Ray started for the run (loopback; 2 CPUs: one scoring actor, one prepare task).
* ``serve``: the node's scoring worker (:class:`cxr_lung_risk.serve.worker.Worker`) in this
  process on a spool holding the four DICOM inputs (stored as the listener stores them), one batch.

What is normalised, and why (nothing else is)
---------------------------------------------
1. Text outputs (``.csv``, ``.json``, ``.jsonl``): the absolute path of the run's temporary folder
   is replaced by ``<ROOT>`` (records and run.json name the inputs by the path given).
2. DICOM files whose writer dates attributes *now* are digested as the data set re-encoded after
   those attributes (at any depth) were replaced by 19700101 / 000000 / 19700101000000; every
   other attribute, the pixel data included, is digested as written:
   * ``serve`` writes under the STABLE UID policy: UIDs derived from the source, dated now by
     design (a PACS shows when the result was made): :data:`NOW_KEYWORDS`;
   * ``predict --deterministic`` dates its objects from the source. When this stored run was made
     (before the refactor), the Secondary Captures (saliency SC, result image) still carried
     highdicom's InstanceCreationDate/Time and Contributing Equipment ContributionDateTime of the
     time of writing (:data:`CREATION_KEYWORDS`); that was fixed after the refactor (the SC builder
     dates them from the source too; ``tests/test_saliency.py`` checks the raw bytes across time),
     and the normalisation stays so the digests recorded before the fix still compare. The SRs
     are digested raw.
3. The name of ``serve``'s batch folder (``results/<time>-<ns>``) is left out of the relative paths.
4. ``run.json``'s ``software.torch`` is the installed torch version; the stored file records the
   versions it was made with and ``check`` refuses to compare under other versions of torch,
   numpy, pydicom or highdicom (scores may legitimately differ in the last bit there).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
STORED = REPO / "tests" / "data" / "stored_run" / "stored_run.json"
PARTS = ("local", "ray", "serve")
MTIME = 1577836800  # 2020-01-01T00:00:00Z
BATCH = 2
#: The attributes the SR and SC writers date "now" under the STABLE policy.
NOW_KEYWORDS = frozenset({
    "ContentDate", "ContentTime", "SeriesDate", "SeriesTime", "InstanceCreationDate", "InstanceCreationTime",
    "DateOfSecondaryCapture", "TimeOfSecondaryCapture", "ContributionDateTime", "AcquisitionDateTime",
})
#: What highdicom dates at writing even under the DETERMINISTIC policy (Secondary Captures).
CREATION_KEYWORDS = frozenset({"InstanceCreationDate", "InstanceCreationTime", "ContributionDateTime"})
TEXT_SUFFIXES = (".csv", ".json", ".jsonl")


def versions() -> dict[str, str]:
    import highdicom
    import numpy
    import pydicom
    import torch

    return {"torch": torch.__version__, "numpy": numpy.__version__, "pydicom": pydicom.__version__, "highdicom": highdicom.__version__}


# ------------------------------------------------------------------------------ inputs
def make_inputs(root: Path) -> tuple[Path, Path]:
    """(input folder, CXR-Age weights file) under ``root``."""
    sys.path.insert(0, str(REPO / "tests"))
    from cohort import CHEST_CR, cr_copy
    from pydicom.data import get_testdata_file

    from cxr_lung_risk.synthetic import write_synthetic_age_weights

    d = root / "in"
    cr_copy(d / "cr" / "cr_000.dcm", 0)
    cr_copy(d / "cr" / "cr_001.dcm", 1)
    (d / "png").mkdir(parents=True)
    shutil.copyfile(REPO / "tests" / "data" / "reference" / "sample_png" / "A.png", d / "png" / "A.png")
    (d / "other").mkdir(parents=True)
    shutil.copyfile(get_testdata_file("CT_small.dcm"), d / "other" / "ct.dcm")
    (d / "other" / "broken.dcm").write_bytes(CHEST_CR.read_bytes()[:3000])
    for p in d.rglob("*"):
        os.utime(p, (MTIME, MTIME))
    w = write_synthetic_age_weights(root / "weights" / "PLCO_Fine_Tuned_120419.pth")
    for p in w.parent.iterdir():
        os.utime(p, (MTIME, MTIME))
    return d, w


# ------------------------------------------------------------------------------ the three ways in
def _predict_opts(inputs: Path, out: Path, weights: Path, **kw: Any):
    from cxr_lung_risk.options import PredictOptions

    base = dict(models=("age",), weights={"age": weights}, device="cpu", deterministic=True, batch_size=BATCH, progress=False,
                formats="csv,sr,json", workers=1)
    base.update(kw)
    return PredictOptions(inputs=(inputs,), out=out, **base)


def run_local(root: Path, inputs: Path, weights: Path) -> Path:
    from cxr_lung_risk.predict import run_predict

    out = root / "local"
    s = run_predict(_predict_opts(inputs, out, weights, per_model=True, saliency=True, result_image=True))
    assert (s.scored, s.skipped, s.failed) == (3, 1, 1), s.counts
    return out


def run_ray(root: Path, inputs: Path, weights: Path) -> Path:
    import ray

    from cxr_lung_risk.cluster import LOCAL_NODE_IP
    from cxr_lung_risk.predict import run_predict

    out = root / "ray"
    tmp = tempfile.mkdtemp(prefix="cxr-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=0, object_store_memory=200 << 20, include_dashboard=False, _node_ip_address=LOCAL_NODE_IP,
                 _temp_dir=tmp, logging_level="WARNING", log_to_driver=False)
    try:
        s = run_predict(_predict_opts(inputs, out, weights, engine="ray"))
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    assert (s.scored, s.skipped, s.failed) == (3, 1, 1), s.counts
    return out


def run_serve(root: Path, inputs: Path, weights: Path) -> Path:
    import threading

    import pydicom

    from cxr_lung_risk import api
    from cxr_lung_risk.serve.audit import AuditLog
    from cxr_lung_risk.serve.config import build_config
    from cxr_lung_risk.serve.metrics import Metrics
    from cxr_lung_risk.serve.spool import Spool
    from cxr_lung_risk.serve.worker import Worker

    cfg = build_config({"spool": root / "spool", "model": "age", "age_weights": weights, "device": "cpu", "quiet_time": 0,
                        "batch_size": 16})
    spool = Spool(cfg.spool).open()
    try:
        for i, f in enumerate(sorted(p for p in inputs.rglob("*.dcm"))):
            meta = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            study = str(meta.get("StudyInstanceUID", f"study{i}"))
            sop = str(meta.get("SOPInstanceUID", f"sop{i}"))
            spool.store(f.read_bytes(), study, sop)
        scorer = api.load_scorer("age", weights={"age": weights}, device="cpu")
        worker = Worker(cfg, spool, scorer, AuditLog(cfg.audit_path), Metrics(), threading.Event())
        pending = spool.pending()
        assert len(pending) == 4, pending
        worker.process(pending)
        (batch,) = list(spool.results.iterdir())
        return batch
    finally:
        spool.close()


RUNNERS: dict[str, Callable[[Path, Path, Path], Path]] = {"local": run_local, "ray": run_ray, "serve": run_serve}


# ------------------------------------------------------------------------------ digests
def _normalised_dicom(data: bytes, keywords: frozenset[str]) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))

    def walk(d) -> None:
        for el in d:
            if el.VR == "SQ":
                for item in el.value:
                    walk(item)
            elif el.keyword in keywords and el.value not in (None, ""):
                el.value = {"DA": "19700101", "TM": "000000", "DT": "19700101000000"}.get(el.VR, el.value)

    walk(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def digest(folder: Path, root: Path, *, now_dated: bool = False) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (normalised as the docstring says)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        data = p.read_bytes()
        if p.suffix.lower() in TEXT_SUFFIXES:
            data = data.replace(str(root).encode(), b"<ROOT>")
        elif now_dated and p.suffix.lower() == ".dcm":
            data = _normalised_dicom(data, NOW_KEYWORDS)
        elif p.suffix.lower() == ".dcm" and rel.startswith(("sc/", "result/")):
            data = _normalised_dicom(data, CREATION_KEYWORDS)
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def run_part(part: str, root: Path) -> dict[str, str]:
    inputs, weights = make_inputs(root / "work")
    folder = RUNNERS[part](root / "work", inputs, weights)
    return digest(folder, root / "work", now_dated=part == "serve")


def compare(part: str, got: dict[str, str], stored: dict[str, Any]) -> list[str]:
    """Differences between this run's digests and the stored ones (empty: byte-identical)."""
    want = stored["parts"][part]
    problems = [f"{part}: missing {r}" for r in sorted(set(want) - set(got))]
    problems += [f"{part}: new file {r}" for r in sorted(set(got) - set(want))]
    problems += [f"{part}: {r} differs" for r in sorted(set(want) & set(got)) if want[r] != got[r]]
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("record", "check"))
    ap.add_argument("--parts", default=",".join(PARTS))
    a = ap.parse_args(argv)
    parts = [p for p in a.parts.split(",") if p]
    stored = json.loads(STORED.read_text()) if STORED.is_file() else {"versions": versions(), "parts": {}}
    problems: list[str] = []
    for part in parts:
        root = Path(tempfile.mkdtemp(prefix=f"stored-run-{part}-"))
        try:
            got = run_part(part, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if a.action == "record":
            stored["parts"][part] = got
            print(f"{part}: {len(got)} files recorded")
        else:
            p = compare(part, got, stored)
            problems += p
            print(f"{part}: {len(got)} files, " + ("byte-identical" if not p else f"{len(p)} difference(s)"))
    if a.action == "record":
        stored["versions"] = versions()
        STORED.parent.mkdir(parents=True, exist_ok=True)
        STORED.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    raise SystemExit(main())
