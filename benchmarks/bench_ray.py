"""images/s of ``predict --engine ray`` against the single-process engine on this machine, with the
per-stage costs the cluster scaling model rests on (benchmarks/README.md, "Cluster"). Not a test.

    python benchmarks/bench_ray.py --weights SYNTH_WEIGHTS_DIR [--n-cr 12] [--png-copies 1]
        [--batch-size 4] [--rounds 1] [--out benchmarks/results/ray_cpu_2core.json]

Inputs: chest CR copies with their own UIDs (JPEG 2000, as archives hold them) and the authors'
PNGs (tests/cohort.py). Both engines run in this process, on CPU, with the same batch size and
--deterministic; Ray is started once (loopback, 2 CPUs, a 400 MB object store) and its start is
reported apart. The outputs of the two engines are compared (they must be equal).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, type=Path)
    ap.add_argument("--n-cr", type=int, default=12)
    ap.add_argument("--png-copies", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ray_cpu_2core.json")
    a = ap.parse_args()

    import ray
    import torch

    from cohort import make_cohort

    from cxr_lung_risk import api
    from cxr_lung_risk.options import PredictOptions
    from cxr_lung_risk.predict import run_predict

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    pngs = sorted((REPO / "tests" / "data" / "reference" / "sample_png").glob("*.png"))
    cohort = make_cohort(work / "in", pngs, n_cr=a.n_cr, png_copies=a.png_copies)
    n_inputs = sum(1 for p in cohort.rglob("*") if p.is_file())
    n_images = a.n_cr + 5 * a.png_copies

    # bytes that cross the object store per image: a prepared input (crop + header), its SR back
    p = api.prepare_input(cohort / "cr" / "cr_000.dcm")
    prepared_bytes = len(pickle.dumps(p, protocol=5))
    dicom_bytes = (cohort / "cr" / "cr_000.dcm").stat().st_size

    result: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "ray": ray.__version__, "loadavg_start": _loadavg()},
        "inputs": {"n_inputs": n_inputs, "n_images": n_images, "n_cr_j2k": a.n_cr, "n_png": 5 * a.png_copies,
                   "batch_size": a.batch_size, "dicom_bytes": dicom_bytes, "prepared_pickle_bytes": prepared_bytes},
        "runs": {"local": [], "ray": [], "ray_url": []},
    }
    t = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="cxr-ray-", dir="/tmp")
    from cxr_lung_risk.cluster import LOCAL_NODE_IP

    ray.init(num_cpus=2, num_gpus=0, object_store_memory=400 << 20, include_dashboard=False, _node_ip_address=LOCAL_NODE_IP,
             _temp_dir=tmp, logging_level="WARNING", log_to_driver=False)
    result["ray_start_s"] = time.perf_counter() - t
    try:
        for r in range(a.rounds):
            for engine in ("local", "ray", "ray_url"):  # interleaved: all see the same machine load
                out = work / f"{engine}{r}"
                tm = work / f"{engine}{r}.json"
                # ray_url: the same files as a file:// URL, read as bytes through fsspec (as from an object store)
                inputs = (f"file://{cohort}",) if engine == "ray_url" else (cohort,)
                opts = PredictOptions(inputs=inputs, out=out, weights={"lung-risk": a.weights}, device="cpu",
                                      deterministic=True, batch_size=a.batch_size, progress=False, engine=engine.split("_")[0],
                                      timings=tm, resume=False)
                t0 = time.perf_counter()
                s = run_predict(opts)
                wall = time.perf_counter() - t0
                timings = json.loads(tm.read_text())
                entry = {"wall_s": wall, "scored": s.scored, "images_per_s": s.scored / wall,
                         "images_per_s_after_load": s.scored / max(1e-9, wall - timings.get("load_s", 0.0)), "timings": timings}
                result["runs"][engine].append(entry)
                print(f"{engine} round {r}: {wall:.1f} s, {entry['images_per_s']:.3f} images/s", file=sys.stderr)
            same = all((work / f"local{r}" / f).read_bytes() == (work / f"ray{r}" / f).read_bytes()
                       for f in ("cxr_lung_risk.csv", "manifest.csv", "records.jsonl"))
            same = same and (work / f"local{r}" / "cxr_lung_risk.csv").read_bytes() == (work / f"ray_url{r}" / "cxr_lung_risk.csv").read_bytes()
            result.setdefault("outputs_equal", []).append(same)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    def med(engine, key, sub=None):
        vals = [(x["timings"][key] if sub else x[key]) for x in result["runs"][engine] if (key in x["timings"] if sub else True)]
        return statistics.median(vals) if vals else None

    summary = {
        "local_images_per_s": med("local", "images_per_s"),
        "ray_images_per_s": med("ray", "images_per_s"),
        "ray_url_images_per_s": med("ray_url", "images_per_s"),
        "overhead_ratio_wall": med("ray", "wall_s") / med("local", "wall_s"),
        "overhead_ratio_after_load": med("local", "images_per_s_after_load") / med("ray", "images_per_s_after_load"),
        "per_image_s": {
            "local": {k: med("local", k + "_s", True) / n_images for k in ("prepare", "infer", "write")},
            "ray": {k: (med("ray", k + "_s", True) or 0.0) / n_images for k in ("read", "prepare", "infer", "build", "write")},
            "ray_url": {k: (med("ray_url", k + "_s", True) or 0.0) / n_images for k in ("read", "prepare", "infer", "build", "write")},
        },
        "load_s": {"local": med("local", "load_s", True), "ray_actor_ready": med("ray", "load_s", True)},
    }
    result["summary"] = summary
    result["machine"]["loadavg_end"] = _loadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(result.get("outputs_equal", [False])) else 1


if __name__ == "__main__":
    sys.exit(main())
