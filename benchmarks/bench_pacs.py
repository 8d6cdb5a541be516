"""Throughput and latency of the PACS node (``cxr-lung-risk serve``), end to end over DICOM.

Starts ``cxr-lung-risk serve`` as a real subprocess on 127.0.0.1 with a pynetdicom storage SCP as
its ``--send-to`` destination, pushes ``--n`` distinct chest CRs (copies of the package's sample
with new UIDs) over ``--associations`` concurrent associations, waits until every result was
delivered, and reports from the node's own audit log:

* push rate: instances acknowledged per second (C-STORE, durable in the spool);
* throughput: instances per second from the first receipt to the last result delivered;
* latency from receipt to result delivered (audit ``received`` -> ``sent``): p50, p95, max;
* the node's per-stage histograms (``/metrics``) at the end;
* next to it, in the same run, ``cxr-lung-risk predict`` on the same files with the node's
  outputs (csv, json, SR, result image; same batch size and device): its images per second after
  loading, and the node's throughput over it (``node_over_predict``; the goal is 1.0).

It is never run as a test (the ``pacs`` tests use a real Orthanc). It reuses the tests' node
helpers (``tests/pacs_node.py``). Writes JSON (default ``benchmarks/results/pacs_cpu_2core.json``).

    python benchmarks/bench_pacs.py --weights SYNTH_DIR [--n 300] [--associations 4] [--batch-size 16]

``--idle N`` measures instead what one user sees at an idle node, with a real Orthanc (Debian's,
started on 127.0.0.1 ports by ``tests/orthanc.py``) as the destination: N times, one CR sent
with dcmtk's ``storescu`` to the idle node, and the time from ``storescu``'s return to the SR
being in Orthanc; next to it the model time of one image (the same models in this process,
median of 3) and the goal ``p95 <= model time + 2 s``. Writes ``pacs_idle_cpu_2core.json`` by
default.

Without ``--weights`` the SYNTHETIC weights are generated into the scratch folder from the
oracle fixture's recipe (about 2.2 GB, ~30 s). The scores are meaningless; only the times count.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from pacs_node import Receiver, ServeProcess, make_instances, push, read_audit, wait_for  # noqa: E402


def _cpu_name() -> str:
    """The CPU model and its widest vector instruction set, e.g. ``AMD EPYC (AVX-512)``."""
    from cxr_lung_risk.layout import cpu_flags, cpu_name

    flags = cpu_flags()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{cpu_name()} ({isa})"


def _parse_time(s: str) -> float:
    return _dt.datetime.fromisoformat(s).timestamp()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, int(round(q * (len(xs) - 1)))))
    return xs[k]


def _synthetic(scratch: Path) -> Path:
    from conftest import fixture_bn_stats, fixture_recipe
    from cxr_lung_risk.synthetic import SyntheticRecipe, write_synthetic_weights

    d = scratch / "synthetic_weights"
    d.mkdir(parents=True, exist_ok=True)
    write_synthetic_weights(d, SyntheticRecipe.from_json(fixture_recipe()["recipe"]), fixture_bn_stats())
    return d


def report(audit: list[dict], metrics: str = "", params: dict | None = None) -> dict:
    """The numbers, from the node's audit log (and its final ``/metrics`` text when given)."""
    recv = {e["sop_uid"]: _parse_time(e["time"]) for e in audit if e["event"] == "received"}
    sent = {e["source_sop_uid"]: _parse_time(e["time"]) for e in audit if e["event"] == "sent"}
    lat = [sent[s] - recv[s] for s in sent if s in recv]
    span = max(sent.values()) - min(recv.values()) if sent and recv else float("nan")
    stages: dict[str, dict[str, float]] = {}
    for line in metrics.splitlines():
        if line.startswith("cxr_serve_stage_seconds_sum") or line.startswith("cxr_serve_stage_seconds_count"):
            name, value = line.rsplit(" ", 1)
            stage = name.split('stage="', 1)[1].split('"', 1)[0]
            stages.setdefault(stage, {})["sum" if "_sum" in name else "count"] = float(value)
    return {
        "benchmark": "bench_pacs",
        "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "weights": "SYNTHETIC (timing only)",
        "params": params or {},
        "acknowledged": len(recv),
        "delivered": len(sent),
        "first_receipt_to_last_delivery_s": round(span, 2),
        "throughput_instances_per_s": round(len(sent) / span, 3) if sent else 0.0,
        "latency_receipt_to_delivered_s": {"p50": round(_pct(lat, 0.5), 2), "p95": round(_pct(lat, 0.95), 2),
                                           "max": round(max(lat), 2), "min": round(min(lat), 2)} if lat else {},
        "stage_mean_s": {k: round(v["sum"] / v["count"], 3) for k, v in stages.items() if v.get("count")},
    }


def _model_time(weights: Path, device: str, sample: Path) -> float:
    """Seconds the models take for one prepared image (median of 3, after a warm-up)."""
    import statistics

    from cxr_lung_risk import api

    scorer = api.load_scorer(["lung-risk"], weights={"lung-risk": weights}, device=device)
    p = api.prepare_input(sample)
    scorer.score([p])
    times = []
    for _ in range(3):
        t = time.perf_counter()
        scorer.score([p])
        times.append(time.perf_counter() - t)
    del scorer
    return statistics.median(times)


def predict_throughput(files_dir: Path, weights: Path, a: argparse.Namespace, scratch: Path) -> dict:
    """``cxr-lung-risk predict`` over the burst's files with the node's outputs, as a subprocess:
    images per second from the end of loading to the last output written (``--timings``)."""
    import subprocess

    out, timings = scratch / "predict-out", scratch / "predict-timings.json"
    cmd = [sys.executable, "-m", "cxr_lung_risk.cli", "predict", str(files_dir), "--out", str(out), "--weights", str(weights),
           "--batch-size", str(a.batch_size), "--device", a.device, "--format", "csv,json,sr", "--result-image",
           "--timings", str(timings)]
    t = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t
    if r.returncode != 0:
        raise SystemExit(f"predict failed ({r.returncode}):\n{r.stderr[-2000:]}")
    tm = json.loads(timings.read_text())
    after_load = tm["run_s"] - tm["load_s"]
    return {"command": "cxr-lung-risk predict IN --format csv,json,sr --result-image --batch-size "
                       f"{a.batch_size} --device {a.device}", "wall_s": round(wall, 2), "scored": tm["scored"],
            "workers": tm.get("workers"), "phases_s": {k: round(tm[f"{k}_s"], 2) for k in ("load", "prepare", "infer", "write")},
            "after_load_s": round(after_load, 2), "throughput_instances_per_s": round(tm["scored"] / after_load, 3)}


def idle(a: argparse.Namespace, weights: Path, scratch: Path) -> dict:
    """``--idle N``: one CR at a time to an idle node (``storescu``), until its SR is in Orthanc."""
    import shutil
    import subprocess

    from orthanc import Orthanc
    from pacs_node import SAMPLE_CR

    storescu = shutil.which("storescu")
    if storescu is None:
        raise SystemExit("--idle needs dcmtk's storescu (apt-get install dcmtk)")
    model_s = _model_time(weights, a.device, SAMPLE_CR)
    print(f"model time for one image: {model_s:.2f} s", flush=True)
    orthanc = Orthanc(scratch / "orthanc").start()
    extra = ["--send-to", orthanc.dicom_address, "--quiet-time", str(a.quiet_time), "--batch-size", str(a.batch_size),
             "--device", a.device]
    if a.no_result_image:
        extra.append("--no-result-image")
    node = ServeProcess(scratch / "spool-idle", weights, extra=extra)
    lat: list[float] = []
    try:
        node.start()
        for i in range(a.idle):
            [f] = make_instances(scratch / f"idle{i}", 1, tag=f"idle{time.time_ns()}")
            import pydicom

            ds = pydicom.dcmread(f)  # uncompressed, as a modality sends it (storescu proposes that by default)
            ds.decompress()
            ds.save_as(f, enforce_file_format=True)
            study = str(ds.StudyInstanceUID)
            r = subprocess.run([storescu, "-aet", "STORESCU", "-aec", node.ae_title, "127.0.0.1", str(node.port), str(f)],
                               capture_output=True, text=True, timeout=120)
            t_return = time.monotonic()
            assert r.returncode == 0 and "E:" not in r.stderr, r.stderr

            def sr_in_orthanc() -> bool:
                for inst in orthanc.study_instances(study):
                    if orthanc.get(f"/instances/{inst['ID']}/metadata/SopClassUid", raw=True).decode().startswith("1.2.840.10008.5.1.4.1.1.88"):
                        return True
                return False

            wait_for(sr_in_orthanc, 600, "the SR in Orthanc", interval=0.05)
            lat.append(time.monotonic() - t_return)
            print(f"  image {i + 1}/{a.idle}: storescu returned -> SR in Orthanc {lat[-1]:.2f} s", flush=True)
            time.sleep(1.0)  # idle again
        metrics = node.metrics()
    finally:
        node.terminate()
        orthanc.stop()
    result = report(read_audit(node.spool), metrics, params={
        "mode": "idle", "n": a.idle, "quiet_time_s": a.quiet_time, "device": a.device, "result_image": not a.no_result_image,
        "destination": "Orthanc (Debian) over C-STORE", "sender": "dcmtk storescu, one association per image"})
    goal = model_s + 2.0
    result.update({
        "model_time_one_image_s": round(model_s, 3),
        "storescu_return_to_sr_in_orthanc_s": {"p50": round(_pct(lat, 0.5), 2), "p95": round(_pct(lat, 0.95), 2),
                                               "max": round(max(lat), 2), "min": round(min(lat), 2), "all": [round(x, 2) for x in lat]},
        "goal_p95_s": round(goal, 2),
        "goal_met": _pct(lat, 0.95) <= goal,
    })
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, help="CXR-Lung-Risk weights folder (default: synthetic, generated)")
    ap.add_argument("--n", type=int, default=300, help="instances to push (default 300)")
    ap.add_argument("--associations", type=int, default=4, help="concurrent associations (default 4)")
    ap.add_argument("--studies", type=int, default=50, help="studies the instances are spread over (default 50)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quiet-time", type=float, default=2.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=7200,
                    help="seconds to wait for every result (default 7200); then the node is stopped and what was delivered is reported (complete: false)")
    ap.add_argument("--analyze", type=Path, metavar="SPOOL", help="only report from an existing node spool's audit log (e.g. a run cut short)")
    ap.add_argument("--scratch", type=Path, default=None)
    ap.add_argument("--idle", type=int, metavar="N", help="idle latency: N single CRs, one at a time, storescu -> SR in a real Orthanc")
    ap.add_argument("--no-result-image", action="store_true", help="--idle: the node sends only the SR")
    ap.add_argument("--workers", type=int, default=None, help="the node's --workers (default: its own default)")
    ap.add_argument("--no-predict", action="store_true", help="burst: do not run predict on the same files for comparison")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/pacs[_idle]_cpu_2core.json)")
    a = ap.parse_args(argv)
    if a.out is None:
        a.out = REPO / "benchmarks" / "results" / ("pacs_idle_cpu_2core.json" if a.idle else "pacs_cpu_2core.json")
    if a.idle:
        scratch = a.scratch or Path(tempfile.mkdtemp(prefix="bench-pacs-idle-"))
        result = idle(a, a.weights or _synthetic(scratch), scratch)
        result["machine"]["cpu"] = _cpu_name()
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 0
    if a.analyze:
        result = report(read_audit(a.analyze), params={"analyzed_spool": str(a.analyze)})
        result["complete"] = result["delivered"] >= result["acknowledged"]
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 0

    scratch = a.scratch or Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    weights = a.weights or _synthetic(scratch)
    files = make_instances(scratch / "in", a.n, studies=a.studies, tag=f"bench{time.time_ns()}")
    rx = Receiver().start()
    node = ServeProcess(scratch / "spool", weights, extra=[
        "--send-to", f"RECEIVER@127.0.0.1:{rx.port}", "--quiet-time", str(a.quiet_time), "--batch-size", str(a.batch_size),
        "--device", a.device, "--retry-initial", "0.5", "--retry-max", "5",
    ] + (["--workers", str(a.workers)] if a.workers is not None else []))
    t_start = time.monotonic()
    node.start()
    load_s = time.monotonic() - t_start
    print(f"node ready in {load_s:.1f} s; pushing {a.n} instances over {a.associations} associations", flush=True)
    chunks = [files[i::a.associations] for i in range(a.associations)]
    statuses: list[list] = [[] for _ in chunks]

    def run(i: int) -> None:
        statuses[i] = push(node.port, chunks[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(a.associations)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    push_s = time.monotonic() - t0
    ok = sum(1 for s in statuses for x in s if x == 0)
    print(f"pushed: {ok}/{a.n} acknowledged in {push_s:.1f} s ({ok / push_s:.1f} instances/s)", flush=True)

    def delivered() -> int:
        return sum(1 for e in read_audit(node.spool) if e["event"] == "sent")

    last = [0, time.monotonic()]

    def progress() -> bool:
        d = delivered()
        if d != last[0] and time.monotonic() - last[1] > 30:
            print(f"  {d}/{ok} delivered", flush=True)
            last[1] = time.monotonic()
        last[0] = d
        return d >= ok

    try:
        wait_for(progress, a.timeout, "every result delivered", interval=1.0)
        complete = True
    except AssertionError:
        complete = False
    metrics = node.metrics()
    rc = node.terminate()
    rx.stop()

    result = report(read_audit(node.spool), metrics, params={
        "n": a.n, "associations": a.associations, "studies": a.studies, "batch_size": a.batch_size,
        "quiet_time_s": a.quiet_time, "device": a.device, "workers": a.workers, "source": "chest_cr_RG1_J2KI.dcm copies (JPEG 2000)"})
    result["machine"]["cpu"] = _cpu_name()
    result.update({"node_ready_s": round(load_s, 2), "push_s": round(push_s, 2), "push_instances_per_s": round(ok / push_s, 2),
                   "serve_exit_code": rc, "complete": complete})
    batches = [ln for p in node.logs for ln in p.read_text(errors="replace").splitlines() if ": batch of " in ln]
    result["node_batches"] = len(batches)
    result["node_batch_log_tail"] = [ln.split("cxr_lung_risk.serve: ", 1)[-1] for ln in batches[-3:]]
    if not a.no_predict:
        print("predict on the same files ...", flush=True)
        result["predict"] = predict_throughput(scratch / "in", weights, a, scratch)
        result["node_over_predict"] = round(result["throughput_instances_per_s"] / result["predict"]["throughput_instances_per_s"], 3)
        print(f"node {result['throughput_instances_per_s']} vs predict {result['predict']['throughput_instances_per_s']} "
              f"instances/s: {result['node_over_predict']}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
