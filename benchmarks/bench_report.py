"""Benchmark of ``cxr-lung-risk report`` on a simulated cohort (issue 21: 100,000 patients in under
60 s on 2 cores, memory under 2 GB).

Usage:
  python benchmarks/bench_report.py [--patients 100000] [--covariates age,sex:cat,smoking:cat]

Simulates the cohort (untimed: results CSV + outcomes CSV, as ``predict --linkage-columns`` and a
registry would write them), then runs ``cxr-lung-risk report`` in a child process limited to
``--cores`` CPUs (taskset + thread variables) and measures its wall time and peak RSS
(``resource.getrusage(RUSAGE_CHILDREN)``). Writes ``benchmarks/results/report_<cpu>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=100_000)
    ap.add_argument("--covariates", default="age,sex:cat,smoking:cat")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--repeats", type=float, default=0.1, help="share of patients with a second radiograph (trajectories)")
    args = ap.parse_args()
    from cxr_lung_risk.report.simulate import write_simulated

    with tempfile.TemporaryDirectory(prefix="bench_report_") as tmp:
        tmp = Path(tmp)
        res, out = write_simulated(tmp / "sim", n=args.patients, seed=11, repeats=args.repeats)
        env = dict(os.environ)
        for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
            env[v] = str(args.cores)
        cmd = [sys.executable, "-m", "cxr_lung_risk.cli", "report", str(res), "--outcomes", str(out), "--out", str(tmp / "rep"),
               "--covariates", args.covariates, "--bootstrap", str(args.bootstrap)]
        n_cpu = os.cpu_count() or 1
        if args.cores < n_cpu and sys.platform.startswith("linux"):
            cmd = ["taskset", "-c", ",".join(str(i) for i in range(args.cores))] + cmd
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rj = json.loads((tmp / "rep" / "report.json").read_text())
        phases = [line for line in proc.stderr.splitlines() if line.startswith("report:")]
    from cxr_lung_risk.layout import cpu_name

    cpu = cpu_name()
    result = {
        "benchmark": "cxr-lung-risk report on a simulated cohort",
        "cpu": cpu, "cores": args.cores, "python": platform.python_version(),
        "patients": args.patients, "radiographs": rj["flow"]["radiographs_joined"], "events": rj["flow"]["events"],
        "covariates": args.covariates, "bootstrap": rj["concordance"]["bootstrap"],
        "wall_s": round(wall, 2), "peak_rss_mib": round(peak_kib / 1024, 1),
        "target": "under 60 s and 2 GB on 2 cores", "met": wall < 60 and peak_kib / 1024 < 2048,
        "software": rj["software"], "phases": phases,
    }
    dest = REPO / "benchmarks" / "results" / f"report_{slug(cpu)}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("cpu", "patients", "wall_s", "peak_rss_mib", "met")}))
    print(f"-> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
