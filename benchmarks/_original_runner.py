"""Timed run of the ORIGINAL fastai inference path (runs in the oracle venv, never in the package).

Usage (the benchmark calls it; see bench_pipeline.py):
  python benchmarks/_original_runner.py --work DIR --images DIR [--dicom] --out preds.csv --timing t.json

``--work`` must hold fastai-saved member files in ``<work>/models`` (written once, untimed, by
``tools/oracle/run_oracle.py``). Per member it does what the authors' script does: build the
DataLoaders (bs=4, Resize(224), Normalize), build the learner, ``learn.load``, ``get_preds``.
With ``--dicom`` every input is first converted with the authors' two external tools
(``dcmj2pnm -O +ot +G`` then ``mogrify -trim +repage -colorspace RGB -auto-level -depth 8
-resize 512x512^ -format png``), one process pair per file. Writes phase timings as JSON.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _oracle_module():
    spec = importlib.util.spec_from_file_location("run_oracle", REPO / "tools" / "oracle" / "run_oracle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def convert_dicoms(src: Path, dst: Path, dcmj2pnm: str, mogrify: str) -> list[str]:
    """The authors' DICOM -> 512 PNG step, one dcmj2pnm + one mogrify process per file."""
    names = []
    for p in sorted(src.iterdir()):
        tif = dst / (p.stem + ".tif")
        subprocess.run([dcmj2pnm, "-O", "+ot", "+G", str(p), str(tif)], check=True, capture_output=True)
        subprocess.run(
            [mogrify, "-trim", "+repage", "-colorspace", "RGB", "-auto-level", "-depth", "8", "-resize", "512x512^", "-format", "png", str(tif)],
            check=True,
            capture_output=True,
        )
        tif.unlink()
        names.append(p.stem + ".png")
    return names


def main() -> None:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--timing", type=Path, required=True)
    ap.add_argument("--dicom", action="store_true")
    ap.add_argument("--dcmj2pnm", default="/usr/bin/dcmj2pnm")
    ap.add_argument("--mogrify", default="/usr/bin/mogrify-im6.q16")
    args = ap.parse_args()
    ro = _oracle_module()  # imports torch + fastai + pretrainedmodels
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_import = time.perf_counter()
    spec = json.loads((REPO / "models" / "cxr_lung_risk.json").read_text())
    members = spec["members"]
    test_dir = args.work / "images"
    if test_dir.exists():
        shutil.rmtree(test_dir)
    test_dir.mkdir(parents=True)
    if args.dicom:
        files = convert_dicoms(args.images, test_dir, args.dcmj2pnm, args.mogrify)
    else:
        files = []
        for p in sorted(args.images.iterdir()):
            shutil.copyfile(p, test_dir / p.name)
            files.append(p.name)
    t_convert = time.perf_counter()
    build_s = 0.0
    predict_s = 0.0
    pred = np.zeros((len(files), len(members)))
    for i, m in enumerate(members):
        a = time.perf_counter()
        dls = ro.make_dls(test_dir, files, int(m.get("image_size", 224)), bool(m.get("normalize", True)))
        learn = ro.make_learner(dls, m["architecture"].lower(), int(m.get("num_outputs", 1)))
        learn.path = args.work
        learn.load(f"{ro.MDL_NAME}_{i}")
        b = time.perf_counter()
        preds, _ = learn.get_preds(ds_idx=1, reorder=False)
        pred[:, i] = np.array(preds[:, 0])
        c = time.perf_counter()
        build_s += b - a
        predict_s += c - b
    w = np.array([float(m["weight"]) for m in members])
    scores = pred @ w + float(spec["intercept"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        f.write("File," + ",".join(m["name"] for m in members) + ",CXR_Lung_Risk\n")
        for j, name in enumerate(files):
            f.write(name + "," + ",".join(repr(float(v)) for v in pred[j]) + f",{float(scores[j])!r}\n")
    t_end = time.perf_counter()
    args.timing.write_text(
        json.dumps(
            {
                "n_images": len(files),
                "import_s": t_import - t_start,
                "convert_s": t_convert - t_import,
                "build_load_s": build_s,
                "predict_s": predict_s,
                "total_in_process_s": t_end - t_start,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
