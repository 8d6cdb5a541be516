"""Build the MHub test data zip: for every workflow in config/, ``<workflow>/sample/`` (inputs)
and ``<workflow>/reference/`` (what the workflow makes of them), as MHub's test routine expects.

    # the zip to upload: the image built with the published weights (the Dockerfile's defaults)
    python tools/mhub_testdata.py --image cxr_lung_risk --out cxr_lung_risk_mhub_test.zip
    # without Docker: the same workflows with mhubio 0.0.2 (scripts/mhub_local.sh)
    python tools/mhub_testdata.py --weights DIR --out test.zip [--allow-unpublished]

Samples (openly licensed, shipped with this package, see src/cxr_lung_risk/samples/README.txt):
* ``default``: pydicom-data's chest CR RG1_J2KI (MIT licence), plus pydicom's CT_small.dcm
  (MIT licence), which the workflow must ignore;
* ``png``: the authors' sample radiograph A.png.

The reference folder is one run of the workflow on the sample. A reference made with weights
that are not the published ones (the outputs' Weights column says so) is refused unless
``--allow-unpublished``; such a zip then carries NOT_FOR_UPLOAD.txt at its top level.
Exit status: 0 built, 1 a workflow run failed, 2 unpublished weights without the flag.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "cxr_lung_risk"
FIXED_TIME = (2023, 5, 16, 0, 0, 0)  # zip entry times: the same inputs give the same zip


def workflows() -> list[str]:
    return sorted(p.stem for p in (MODEL / "config").glob("*.yml"))


def samples(workflow: str, dest: Path) -> None:
    """Copy the sample inputs of ``workflow`` into ``dest``."""
    import cxr_lung_risk.samples as pkg_samples

    here = Path(pkg_samples.__file__).parent
    dest.mkdir(parents=True, exist_ok=True)
    if workflow == "default":
        from pydicom.data import get_testdata_file

        shutil.copyfile(here / "chest_cr_RG1_J2KI.dcm", dest / "chest_cr.dcm")
        shutil.copyfile(get_testdata_file("CT_small.dcm"), dest / "ct_small.dcm")
    elif workflow == "png":
        shutil.copyfile(here / "A.png", dest / "A.png")
    else:
        raise SystemExit(f"mhub_testdata: no sample for workflow {workflow!r}: add one or drop the workflow")


def run_workflow(workflow: str, sample: Path, out: Path, image: str | None, weights: str | None) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    if image:
        os.chmod(sample, 0o755)
        # a pinned CPU inference layout (CXR_LUNG_RISK_LAYOUT) holds inside the container too, so the
        # container computes exactly what the reference made outside it did
        pin = os.environ.get("CXR_LUNG_RISK_LAYOUT")
        cmd = ["docker", "run", "--rm", "--network", "none", *(["-e", f"CXR_LUNG_RISK_LAYOUT={pin}"] if pin else []),
               "-v", f"{sample}:/app/data/input_data:ro", "-v", f"{out}:/app/data/output_data", image, "--workflow", workflow]
    else:
        cmd = ["bash", str(REPO / "scripts" / "mhub_local.sh"), "--workflow", workflow, "--input", str(sample),
               "--output", str(out), "--device", "cpu"]
        if weights:
            cmd += ["--weights", weights]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if not image:  # mhub_local.sh adds the CLI's manifest/records, which the container does not write
        for extra in ("manifest.csv", "records.jsonl"):
            (out / extra).unlink(missing_ok=True)
    return proc


def weights_labels(out: Path) -> set[str]:
    labels = set()
    for p in out.rglob("cxr_lung_risk.csv"):
        with open(p, newline="", encoding="utf-8") as f:
            labels |= {row.get("Weights", "") for row in csv.DictReader(f)}
    return labels


def add_tree(zf: zipfile.ZipFile, folder: Path, prefix: str) -> None:
    zf.writestr(zipfile.ZipInfo(prefix + "/", FIXED_TIME), b"")  # MHub checks the folder entries
    for p in sorted(folder.rglob("*")):
        name = f"{prefix}/{p.relative_to(folder).as_posix()}"
        if p.is_dir():
            zf.writestr(zipfile.ZipInfo(name + "/", FIXED_TIME), b"")
        else:
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, p.read_bytes())


def build(out_zip: Path, image: str | None, weights: str | None, allow_unpublished: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="mhub_testdata_") as tmp:
        tmp = Path(tmp)
        unpublished = False
        for wf in workflows():
            sample, ref = tmp / wf / "sample", tmp / wf / "reference"
            samples(wf, sample)
            proc = run_workflow(wf, sample, ref, image, weights)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                print(f"mhub_testdata: the {wf} workflow failed (exit status {proc.returncode})", file=sys.stderr)
                return 1
            labels = weights_labels(ref)
            if not labels or any(not lab.endswith("=published") for lab in labels):
                unpublished = True
        if unpublished and not allow_unpublished:
            print("mhub_testdata: the references were not made with the published weights "
                  "(use the image built with the defaults, or --allow-unpublished for a local test zip)", file=sys.stderr)
            return 2
        out_zip.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out_zip, "w") as zf:
            if unpublished:
                info = zipfile.ZipInfo("NOT_FOR_UPLOAD.txt", FIXED_TIME)
                zf.writestr(info, "References made with weights that are not the published ones: a local test zip only.\n")
            for wf in workflows():
                zf.writestr(zipfile.ZipInfo(wf + "/", FIXED_TIME), b"")
                add_tree(zf, tmp / wf / "sample", f"{wf}/sample")
                add_tree(zf, tmp / wf / "reference", f"{wf}/reference")
    print(f"mhub_testdata: wrote {out_zip}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the MHub test data zip (sample + reference per workflow).")
    ap.add_argument("--out", type=Path, required=True, help="the zip to write")
    ap.add_argument("--image", help="run the workflows in this Docker image (else scripts/mhub_local.sh)")
    ap.add_argument("--weights", help="weights for scripts/mhub_local.sh (default: the CLI's cache)")
    ap.add_argument("--allow-unpublished", action="store_true", help="accept references made with other weights (local tests)")
    a = ap.parse_args(argv)
    return build(a.out, a.image, a.weights, a.allow_unpublished)


if __name__ == "__main__":
    sys.exit(main())
