"""Throughput and latency of the PACS node (``cxr-lung-risk serve``), end to end over DICOM.

Starts ``cxr-lung-risk serve`` as a real subprocess on 127.0.0.1 with a pynetdicom storage SCP as
its ``--send-to`` destination, pushes ``--n`` distinct chest CRs (copies of the package's sample
with new UIDs) over ``--associations`` concurrent associations, waits until every result was
delivered, and reports from the node's own audit log:

* push rate: instances acknowledged per second (C-STORE, durable in the spool);
* throughput: instances per second from the first receipt to the last result delivered;
* latency from receipt to result delivered (audit ``received`` -> ``sent``): p50, p95, max;
* the node's per-stage histograms (``/metrics``) at the end.

It is never run as a test (the ``pacs`` tests use a real Orthanc). It reuses the tests' node
helpers (``tests/pacs_node.py``). Writes JSON (default ``benchmarks/results/pacs_cpu_2core.json``).

    python benchmarks/bench_pacs.py --weights SYNTH_DIR [--n 300] [--associations 4] [--batch-size 16]

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
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pacs_cpu_2core.json")
    a = ap.parse_args(argv)
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
    ])
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
        "quiet_time_s": a.quiet_time, "device": a.device})
    result.update({"node_ready_s": round(load_s, 2), "push_s": round(push_s, 2), "push_instances_per_s": round(ok / push_s, 2),
                   "serve_exit_code": rc, "complete": complete})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
