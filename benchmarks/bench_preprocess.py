"""Time the numpy DICOM -> PNG recipe against the real tools on one core; prints JSON.

Usage: python benchmarks/bench_preprocess.py [--runs 7] [--dicom PATH]
Default input: pydicom-data's RG1_UNCR.dcm (1841x1955 CR, MONOCHROME1, 15 bits).
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
           "MAGICK_THREAD_LIMIT"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402

from cxr_lung_risk.preprocess import (  # noqa: E402
    IM_AUTHORS,
    IM_DEBIAN,
    PixelMeta,
    dcmj2pnm_8bit,
    imagemagick_recipe,
    preprocess_pixels,
)


def _default_dicom() -> Path:
    import data_store

    return Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"


def _median(fn, runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def _tools(dcm: Path, work: Path) -> None:
    tif = work / "x.tif"
    subprocess.run(["dcmj2pnm", "-O", "+ot", "+G", str(dcm), str(tif)], check=True, capture_output=True)
    subprocess.run(["/usr/bin/mogrify-im6.q16", "-limit", "thread", "1", "-trim", "+repage", "-colorspace",
                    "RGB", "-auto-level", "-depth", "8", "-resize", "512x512^", "-format", "png", str(tif)],
                   check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--dicom", type=Path, default=None)
    args = ap.parse_args()
    dcm = args.dicom or _default_dicom()
    ds = pydicom.dcmread(dcm)
    px = ds.pixel_array
    meta = PixelMeta.from_dataset(ds)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    img8 = dcmj2pnm_8bit(px, meta)
    preprocess_pixels(px, meta, IM_AUTHORS)  # warm the filter-table cache, as a batch run would
    preprocess_pixels(px, meta, IM_DEBIAN)
    res: dict = {"input": dcm.name, "shape": list(px.shape), "runs": args.runs}
    for label, fn in [
        ("dcmj2pnm_8bit_s", lambda: dcmj2pnm_8bit(px, meta)),
        ("imagemagick_recipe_authors_s", lambda: imagemagick_recipe(img8, IM_AUTHORS)),
        ("imagemagick_recipe_debian_s", lambda: imagemagick_recipe(img8, IM_DEBIAN)),
        ("preprocess_pixels_authors_s", lambda: preprocess_pixels(px, meta, IM_AUTHORS)),
        ("preprocess_pixels_debian_s", lambda: preprocess_pixels(px, meta, IM_DEBIAN)),
    ]:
        med, _ = _median(fn, args.runs)
        res[label] = round(med, 4)
    if shutil.which("dcmj2pnm") and Path("/usr/bin/mogrify-im6.q16").exists():
        with tempfile.TemporaryDirectory() as tmp:
            med, _ = _median(lambda: _tools(dcm, Path(tmp)), max(3, args.runs // 2))
            res["real_tools_dcmj2pnm_plus_mogrify_s"] = round(med, 4)
    res["numpy"] = np.__version__
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
