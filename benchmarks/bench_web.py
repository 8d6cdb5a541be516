"""Speed of the web page (``cxr-lung-risk web``): does the page answer while a batch is scored,
and how soon does one CR's result appear on an idle server?

Runs the page's own code in this process (the :class:`~cxr_lung_risk.web.engine.Engine` with its
scoring thread, the Flask app, waitress on a free 127.0.0.1 port) with the models loaded once,
and talks to it over HTTP like the browser does:

* model time: ``Scorer.score`` of the sample CR alone (warm), measured before each single-CR run;
* single CR, idle server: the model time, then upload and poll ``/api/state`` every 50 ms until
  the row says ``ok`` (and until its overlay is ready), ``--repeat`` times; goal: at most the
  model time + 2 s;
* page during a batch: ``--batch`` uploads (CR and PNG copies) queued at once, and while they are
  scored ``GET /`` and ``GET /api/state`` every 100 ms: p50 / p95 / max; goal: under 200 ms.

Never run as a test. Writes JSON naming the CPU (default ``benchmarks/results/web_cpu_2core.json``).

    python benchmarks/bench_web.py [--weights DIR] [--batch 16] [--repeat 3]

Without ``--weights`` the SYNTHETIC weights are generated into a scratch folder (about 2.2 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_pacs import _cpu_name, _pct, _synthetic  # noqa: E402

SAMPLES = REPO / "src" / "cxr_lung_risk" / "samples"
CR = SAMPLES / "chest_cr_RG1_J2KI.dcm"
PNG = SAMPLES / "A.png"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor())


def _get(url: str) -> tuple[float, bytes]:
    t = time.perf_counter()
    with _OPENER.open(url, timeout=30) as r:
        body = r.read()
    return time.perf_counter() - t, body


def _upload(url: str, path: Path, name: str | None = None) -> list[dict]:
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name or path.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{b}--\r\n".encode()
    req = urllib.request.Request(url + "api/upload", data=body, method="POST")
    req.add_header("Content-Type", f"multipart/form-data; boundary={b}")
    with _OPENER.open(req, timeout=60) as r:
        return json.loads(r.read())["items"]


def _state(url: str) -> dict:
    return json.loads(_get(url + "api/state")[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, help="CXR-Lung-Risk weights folder (default: synthetic, generated)")
    ap.add_argument("--batch", type=int, default=16, help="uploads queued at once for the responsiveness test")
    ap.add_argument("--repeat", type=int, default=3, help="single-CR repetitions")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "web_cpu_2core.json")
    a = ap.parse_args()

    import torch
    from waitress.server import create_server

    from cxr_lung_risk import api
    from cxr_lung_risk.web.app import create_app
    from cxr_lung_risk.web.engine import Engine, WebConfig

    scratch = Path(tempfile.mkdtemp(prefix="bench-web-"))
    weights = a.weights or _synthetic(scratch)
    t = time.perf_counter()
    scorer = api.load_scorer("lung-risk", weights={"lung-risk": weights}, device="cpu")
    load_s = time.perf_counter() - t

    # model time of one CR (warm: the first calls set up oneDNN), measured again before each run
    p = api.prepare_input(CR)
    for _ in range(2):
        scorer.score([p])

    def model_time() -> float:
        t = time.perf_counter()
        scorer.score([p])
        return time.perf_counter() - t

    cfg = WebConfig(port=0, device="cpu", temp_parent=scratch)
    engine = Engine(cfg, scorer=scorer)
    batches: list[tuple[float, int]] = []
    engine.on_batch = lambda s, n: batches.append((s, n))
    engine.start()
    server = create_server(create_app(engine), host="127.0.0.1", port=0, threads=8)
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{server.effective_port}/"
    try:
        _get(url)
        # warm-up (first saliency pass, first outputs)
        _upload(url, CR, "warmup.dcm")
        while not all(i["status"] in ("ok", "failed", "skipped") and i["overlay"] != "pending" for i in _state(url)["items"]):
            time.sleep(0.05)
        # single CR on the idle server: model time, then upload -> row "ok" (-> overlay ready)
        single, model, overlay = [], [], []
        for k in range(a.repeat):
            model.append(model_time())
            t = time.perf_counter()
            iid = _upload(url, CR, f"single{k}.dcm")[0]["id"]
            seen_ok = None
            while True:
                it = next(i for i in _state(url)["items"] if i["id"] == iid)
                if seen_ok is None and it["status"] in ("ok", "failed", "skipped"):
                    seen_ok = time.perf_counter() - t
                    assert it["status"] == "ok", it
                if seen_ok is not None and it["overlay"] != "pending":
                    break
                time.sleep(0.05)
            single.append(seen_ok)
            overlay.append(time.perf_counter() - t)
        model_s = statistics.median(model)
        work = [s_ for s_, n in batches[1:] if n == 1]
        work_s = statistics.median(work) if work else float("nan")

        # the page while a batch is scored
        ids = []
        for k in range(a.batch):
            ids += [i["id"] for i in _upload(url, CR if k % 2 == 0 else PNG, f"batch{k}{'.dcm' if k % 2 == 0 else '.png'}")]
        page, state = [], []
        t0 = time.perf_counter()
        while True:
            page.append(_get(url)[0])
            dt, body = _get(url + "api/state")
            state.append(dt)
            items = {i["id"]: i for i in json.loads(body)["items"]}
            if all(items[i]["status"] in ("ok", "failed", "skipped") for i in ids):
                break
            time.sleep(0.1)
        batch_s = time.perf_counter() - t0
    finally:
        server.close()
        engine.close()

    cores = os.cpu_count()
    result = {
        "benchmark": "bench_web",
        "machine": {"cpu": _cpu_name(), "cores": cores, "torch_threads": torch.get_num_threads()},
        "weights": "SYNTHETIC (scores meaningless; times only)" if a.weights is None else str(a.weights),
        "load_s": round(load_s, 2),
        "model_s_one_cr": {"median": round(model_s, 3), "runs": [round(x, 3) for x in model]},
        "page_work_s_one_cr": round(work_s, 3),
        "single_cr_result_s": {"median": round(statistics.median(single), 3), "max": round(max(single), 3), "runs": [round(x, 3) for x in single]},
        "single_cr_overlay_s": {"median": round(statistics.median(overlay), 3), "runs": [round(x, 3) for x in overlay]},
        "single_cr_over_model_s": [round(x - m, 3) for x, m in zip(single, model)],
        "single_cr_goal": "result <= model time + 2 s (each run against the model time measured just before it)",
        "single_cr_goal_met": all(x <= m + 2.0 for x, m in zip(single, model)),
        "during_batch": {
            "uploads": a.batch, "scored_in_s": round(batch_s, 1), "requests": len(page) + len(state),
            "page_ms": {"p50": round(1000 * _pct(page, 0.5), 1), "p95": round(1000 * _pct(page, 0.95), 1), "max": round(1000 * max(page), 1)},
            "state_ms": {"p50": round(1000 * _pct(state, 0.5), 1), "p95": round(1000 * _pct(state, 0.95), 1), "max": round(1000 * max(state), 1)},
            "goal_ms": 200,
            "goal_met": max(page + state) < 0.2,
        },
        "batches": [{"s": round(s, 3), "n": n} for s, n in batches],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
