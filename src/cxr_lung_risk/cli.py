"""Command-line interface: ``cxr-lung-risk predict | preprocess | fetch-weights``.

A thin adapter over the core stages; every user error is one sentence on stderr and a
non-zero exit code, never a traceback (``--debug`` shows one).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from . import __version__

from .errors import EXIT_NONE

DESCRIPTION = """\
CXR-Lung-Risk (Weiss et al., Nat Commun 2023) and CXR-Age (Raghu et al., JACC Imaging 2021)
from chest radiographs, DICOM or PNG/JPEG. Research use only: not a medical device.

Results need the published weights (see `cxr-lung-risk fetch-weights --help`)."""

PREDICT_EPILOG = """\
inputs:
  Files or folders (searched recursively). DICOM files go through the authors' exact
  dcmj2pnm + ImageMagick recipe in memory; PNG/JPEG files are taken as already preprocessed
  (like the authors' sample images) and only centre-cropped to 224x224.

outputs (in --out DIR):
  cxr_lung_risk.csv   File, [StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID,]
                      CXR_Lung_Risk (years) [, CXR_Age] [, Lung_Age_081221_<i> with --per-model]
  cxr_lung_risk.json  the same rows as JSON (with --format json)
  sr/<SOPInstanceUID>.dcm  one DICOM Structured Report (TID 1500) per scored DICOM image
  manifest.csv        every input: File,status,reason (status ok, skipped or failed)

exit status: 0 all inputs scored or deliberately skipped; 2 some inputs failed;
             1 nothing could be scored (or a usage/weights error).
"""


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DICOM selection (what is accepted as a frontal chest radiograph)")
    g.add_argument("--allow-lateral", action="store_true", help="score lateral views too (refused by default)")
    g.add_argument("--allow-for-processing", action="store_true", help="score DX 'FOR PROCESSING' images too")
    g.add_argument("--allow-multiframe", action="store_true", help="score the first frame of multi-frame images")
    g.add_argument(
        "--modalities",
        default=None,
        metavar="LIST",
        help="comma-separated modalities to accept (default: CR,DX plus DX-like SC)",
    )
    g.add_argument(
        "--im-version",
        choices=["6.8.9-9", "6.9.11"],
        default="6.8.9-9",
        help="ImageMagick arithmetic to reproduce: the authors' 6.8.9-9 (default) or Debian 12's 6.9.11",
    )


def _selection_from_args(args: argparse.Namespace):
    from .dicom_io import SelectionOptions

    kw = {}
    if args.allow_lateral:
        kw["allow_lateral"] = True
    if args.allow_for_processing:
        kw["allow_for_processing"] = True
    if args.allow_multiframe:
        kw["allow_multiframe"] = True
    if args.modalities:
        kw["allowed_modalities"] = tuple(m.strip().upper() for m in args.modalities.split(",") if m.strip())
    return SelectionOptions(**kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-lung-risk", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "predict",
        help="score DICOM or PNG/JPEG chest radiographs",
        description="Score chest radiographs with CXR-Lung-Risk (and optionally CXR-Age).",
        epilog=PREDICT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM/PNG/JPEG files or folders (recursive)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created if needed)")
    p.add_argument("--model", choices=["lung-risk", "age", "all"], default="lung-risk", help="which model(s) to run (default lung-risk)")
    p.add_argument("--weights", metavar="PATH", help="CXR-Lung-Risk weights: a folder of Lung_Age_081221_*.pth or the Zenodo zip (default: the fetch-weights cache)")
    p.add_argument("--age-weights", metavar="PATH", help="CXR-Age weights file PLCO_Fine_Tuned_120419.pth (default: the fetch-weights cache)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="compute device (default auto: CUDA when available)")
    p.add_argument(
        "--precision",
        choices=["fp32", "tf32", "bf16", "fp16"],
        default="fp32",
        help="arithmetic of the CXR-Lung-Risk members' convolutional bodies (default fp32: IEEE float32, also on a GPU, "
        "faithful; tf32/bf16/fp16 are faster but change scores, see benchmarks/README.md; tf32 and fp16 need CUDA)",
    )
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per batch (default 16)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="decode/preprocess processes (default: cores-1 when >2 cores, else in-process)")
    p.add_argument("--per-model", action="store_true", help="also write each member's raw output (columns Lung_Age_081221_<i>)")
    p.add_argument("--all-members", action="store_true", help="also load and run the 7 members whose LASSO weight is 0")
    p.add_argument("--format", default="csv,sr", metavar="LIST", help="comma-separated outputs among csv, sr, json (default csv,sr)")
    p.add_argument(
        "--timings",
        type=Path,
        metavar="FILE",
        help="write the run's wall time per phase (start-up, load, prepare, models, write; seconds) as JSON to FILE",
    )
    p.add_argument("--deterministic", action="store_true", help="DICOM SRs with UIDs and times derived from the input (byte-identical reruns)")
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_true", default=True, help="CXR-Age: deterministic test-time augmentation (default)")
    tta.add_argument("--no-tta", dest="tta", action="store_false", help="CXR-Age: plain single pass")
    p.add_argument("--saliency", action="store_true", help="write saliency maps (PNG under saliency/, DICOM SC under sc/)")
    p.add_argument(
        "--saliency-method",
        choices=["gradient", "gradcam"],
        default="gradient",
        help="saliency: gradient of the final score w.r.t. the input (default, as the original), or Grad-CAM "
        "(only for networks with a body/head split, i.e. not the ensemble's Tiny members)",
    )
    _add_selection_args(p)

    q = sub.add_parser(
        "preprocess",
        help="write the authors' 8-bit PNGs for DICOM inputs",
        description="Apply the published dcmj2pnm + ImageMagick recipe in process and write DIR/<relative path>.png "
        "(8-bit grayscale, gAMA 1.0) for each accepted DICOM image, plus DIR/manifest.csv.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM files or folders (recursive)")
    q.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    q.add_argument("--workers", type=int, default=None, metavar="N", help="worker processes")
    _add_selection_args(q)

    f = sub.add_parser(
        "fetch-weights",
        help="download and verify the published weights into the cache",
        description="Download the published weights (CXR-Lung-Risk: Zenodo record 7941660, 2.16 GB; "
        "CXR-Age: 258 MB), resume interrupted downloads, verify size/sha256 and extract into the cache "
        "($CXR_LUNG_RISK_HOME, default: the user cache folder).",
    )
    try:
        from .fetch import add_fetch_arguments

        add_fetch_arguments(f)
    except ImportError:  # pragma: no cover - during development
        pass
    return parser


def _err(msg: str) -> None:
    print(f"cxr-lung-risk: error: {msg}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_NONE
    try:
        if args.command == "predict":
            from .predict import run_predict

            return run_predict(args)
        if args.command == "preprocess":
            from .predict import run_preprocess

            return run_preprocess(args)
        if args.command == "fetch-weights":
            from .fetch import run_fetch

            return run_fetch(args)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except Exception as e:
        from .errors import user_message

        msg = user_message(e)
        if msg is None or args.debug:
            if args.debug:
                raise
            _err(f"unexpected {type(e).__name__}: {e} (rerun with --debug for details)")
        else:
            _err(msg)
        return EXIT_NONE
    parser.error(f"unknown command {args.command}")
    return EXIT_NONE


if __name__ == "__main__":
    sys.exit(main())
