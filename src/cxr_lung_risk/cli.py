"""Command-line interface: ``cxr-lung-risk predict | preprocess | demo | fetch-weights | merge | serve | web``.

The only place that knows argparse, messages and exit codes. It turns arguments into typed
options (:mod:`cxr_lung_risk.options`), validates them before torch is imported (a typo costs no
start-up time), calls the job and maps its summary to an exit status:

* 0: at least one input scored and none failed (skipped inputs are fine);
* 1: nothing could be scored, or a usage/weights/output error (one sentence on stderr);
* 2: some inputs failed (their reasons are in ``manifest.csv`` and ``records.jsonl``);
* 130 / 143: interrupted (Ctrl-C / SIGTERM); what was finished is kept.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import CxrLungRiskError
from .options import IM_VERSIONS, SR_CLASS_CHOICES

EXIT_OK, EXIT_NONE, EXIT_SOME_FAILED = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 130, 143

DESCRIPTION = """\
CXR-Lung-Risk (Weiss et al., Nat Commun 2023) and CXR-Age (Raghu et al., JACC Imaging 2021)
from chest radiographs, DICOM or PNG/JPEG. Research use only: not a medical device.

Results need the published weights (see `cxr-lung-risk fetch-weights --help`); to see the
tool work without them, run `cxr-lung-risk demo --out DIR` (synthetic weights, meaningless scores)."""

PREDICT_EPILOG = """\
inputs:
  Files or folders (searched recursively). DICOM files go through the authors' exact
  dcmj2pnm + ImageMagick recipe in memory; PNG/JPEG files are taken as already preprocessed
  (like the authors' sample images) and only centre-cropped to 224x224.
  A DICOMweb study or series (extra [pacs]) is an INPUT too, the server's DICOMweb base URL
  prefixed with "dicomweb+":
    dicomweb+http://HOST:PORT/dicom-web/studies/<StudyInstanceUID>[/series/<SeriesInstanceUID>]
  Its instances are listed with QIDO-RS and fetched with WADO-RS (no local copy); each is one
  input named <base>/studies/<uid>/series/<uid>/instances/<uid>. https:// works the same way
  (--dicomweb-ca-bundle, --dicomweb-client-cert); a bearer token comes from --dicomweb-token or
  $CXR_LUNG_RISK_DICOMWEB_TOKEN. --stow URL sends the SRs and result images back (STOW-RS).

outputs (in --out DIR):
  cxr_lung_risk.csv   File, [StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID,]
                      CXR_Lung_Risk (years) [, CXR_Age] [, Lung_Age_081221_<i> with --per-model],
                      Weights (published / unverified / SYNTHETIC, per model)
  cxr_lung_risk.json  the same rows as JSON (with --format json)
  sr/<SOPInstanceUID>.dcm  one DICOM Structured Report (TID 1500) per scored DICOM image
  fhir/<SOPInstanceUID>.json  with --format fhir: a FHIR R4 Bundle per scored DICOM image (Observations
                      with the SR's codes and values, the algorithm's Device, a DiagnosticReport)
  result/<SOPInstanceUID>.dcm  with --result-image: a Secondary Capture any viewer shows (scores,
                      model, weights, "research use only"; the saliency overlay with --saliency)
  stow.json           with --stow: per DICOM object sent, whether the server stored it
  manifest.csv        every input: File,status,reason (status ok, skipped or failed)
  records.jsonl       every input: status, reason, UIDs, values and every file written for it
  run.json            the run: versions, device and precision per model, the weights' identity
  parquet/part-*.parquet  the result rows as Parquet (with --format parquet; always with --engine ray)

resume and shards:
  Rerunning with the same --out keeps every input the earlier run finished (same path, size and
  modification time, all its files present) and does the rest: an interrupted run is resumed, a
  partly written input is done again (--no-resume starts afresh). --shard K/N scores only the
  inputs whose File name hashes to K of N (0 <= K < N): give each array job (SLURM) its own --out
  and join them with `cxr-lung-risk merge`.

cluster (--engine ray, needs pip install 'cxr-lung-risk[ray]'):
  INPUTs may also be object-store URLs (s3://bucket/prefix, gs://..., file://...) read through
  pyarrow/fsspec; local paths must be visible at the same path on every node.

exit status: 0 inputs scored, none failed (skipped ones are fine); 2 some inputs failed
             (or --stow could not deliver every object); 1 nothing could be scored, or a
             usage/weights error; 130/143 interrupted.
"""


# ------------------------------------------------------------------------------ arguments
_WORKERS_HELP = ("decode worker processes, each a fence against a hostile file (memory and time limits) "
                 "(default: cores-1, at least 1 and at most 8, so 1 on 2 cores; 0 decodes in the main process)")
_FOLLOW_HELP = ("follow symbolic links to folders outside an input folder (default: such a link is skipped with "
                "its reason; links within the folder are followed, loops never)")


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DICOM selection (what is accepted as a frontal chest radiograph)")
    g.add_argument("--allow-lateral", action="store_true", help="score lateral views too (refused by default)")
    g.add_argument("--allow-for-processing", action="store_true", help="score DX 'FOR PROCESSING' images too")
    g.add_argument("--allow-multiframe", action="store_true", help="score the first frame of multi-frame images")
    g.add_argument(
        "--allow-non-chest",
        action="store_true",
        help="score images whose BodyPartExamined names another body part (HAND, SKULL, ...; skipped by default; "
        "a missing or chest-like value is always accepted)",
    )
    g.add_argument("--modalities", default=None, metavar="LIST", help="comma-separated modalities to accept (default: CR,DX plus DX-like SC)")
    _add_im_version_arg(g.add_argument)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress lines (errors and the summary are still printed)")


_SR_CLASS_HELP = ("SR SOP class: 3d = Comprehensive 3D SR (IHE AI Results, default); comprehensive = Comprehensive SR "
                  "(1.2.840.10008.5.1.4.1.1.88.33) for archives without the 3D class")


def _add_im_version_arg(add, *, serve: bool = False) -> None:
    """``--im-version`` of predict/preprocess (in the DICOM selection group) and serve, defined once.
    ``serve``: no argparse default (see :func:`_add_model_args`) and the node's shorter help."""
    if serve:
        add("--im-version", choices=list(IM_VERSIONS), help="ImageMagick arithmetic to reproduce (default 6.8.9-9)")
        return
    add("--im-version", choices=list(IM_VERSIONS), default="6.8.9-9",
        help="ImageMagick arithmetic to reproduce: the authors' 6.8.9-9 (default) or Debian 12's 6.9.11")


def _add_sr_class_arg(add, *, serve: bool = False) -> None:
    """``--sr-class`` of predict and serve, defined once (``serve``: no argparse default)."""
    add("--sr-class", choices=SR_CLASS_CHOICES, default=None if serve else "3d", help=_SR_CLASS_HELP)


def _add_model_args(add, models: Sequence[str], *, serve: bool = False) -> None:
    """The model options ``predict`` and ``serve`` share, defined once. ``add``: a parser's (or
    group's) ``add_argument``; ``serve``: no argparse defaults (None: not given, so a ``--config``
    YAML file's value counts; :class:`~cxr_lung_risk.serve.config.ServeConfig` holds the defaults)."""

    def default(value):
        return None if serve else value

    add("--model", choices=list(models), default=default("lung-risk"), help="which model(s) to run (default lung-risk)")
    add("--weights", metavar="PATH", help="CXR-Lung-Risk weights: a folder of Lung_Age_081221_*.pth or the Zenodo zip (default: the fetch-weights cache)")
    add("--age-weights", metavar="PATH", help="CXR-Age weights file PLCO_Fine_Tuned_120419.pth (with --model age or all; default: the fetch-weights cache)")
    add("--demo-weights", action="store_const", const=True, default=default(False),
        help="use the SYNTHETIC weights `cxr-lung-risk demo` made in the cache (meaningless scores, labelled SYNTHETIC in every result)")
    add("--device", choices=["auto", "cpu", "cuda"], default=default("auto"), help="compute device (default auto: CUDA when available)")
    add(
        "--precision",
        choices=["fp32", "tf32", "bf16", "fp16"],
        default=default("fp32"),
        help="arithmetic of the CXR-Lung-Risk members' convolutional bodies (default fp32: IEEE float32, also on a GPU, "
        "faithful; tf32/bf16/fp16 are faster but change scores, see benchmarks/README.md; tf32 and fp16 need CUDA). "
        "CXR-Age always runs fp32; the SR records what each model used",
    )


def build_parser() -> argparse.ArgumentParser:
    from .registry import model_choices

    parser = argparse.ArgumentParser(prog="cxr-lung-risk", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM/PNG/JPEG files or folders (recursive), or DICOMweb "
                   "studies/series: dicomweb+http://HOST:PORT/dicom-web/studies/<StudyUID>[/series/<SeriesUID>]")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created if needed)")
    _add_predict_args(p, model_choices())

    q = sub.add_parser(
        "preprocess",
        help="write the authors' 8-bit PNGs for DICOM inputs",
        description="Apply the published dcmj2pnm + ImageMagick recipe in process and write DIR/<relative path>.png "
        "(8-bit grayscale, gAMA 1.0) for each accepted DICOM image, plus DIR/manifest.csv and DIR/records.jsonl.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM files or folders (recursive)")
    q.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    q.add_argument("--workers", type=int, default=None, metavar="N", help=_WORKERS_HELP)
    q.add_argument("--follow-links", action="store_true", help=_FOLLOW_HELP)
    _add_selection_args(q)
    _add_run_args(q)

    d = sub.add_parser(
        "demo",
        help="see the whole tool work without the published weights (synthetic weights, meaningless scores)",
        description="Make clearly labelled SYNTHETIC weights in the cache (once, ~1.3 GB), then run `predict` with "
        "every output (both models, CSV, JSON, SR, per-member values, saliency maps) on the package's own "
        "sample inputs: a real chest CR (DICOM) and the authors' sample PNGs. The scores are meaningless; "
        "every output says so.",
    )
    d.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    d.add_argument("--cache", type=Path, default=None, metavar="DIR", help="where the synthetic weights go (default: the weights cache)")
    _add_run_args(d)

    m = sub.add_parser(
        "merge",
        help="join the output folders of --shard runs into one",
        description="Join the --out folders of `predict --shard K/N` runs (same options) into DIR: the tables "
        "(CSV, JSON, Parquet, manifest, records) are concatenated shard by shard and the SR/result files copied. "
        "The union equals one full run (rows in shard order).",
    )
    m.add_argument("shards", nargs="+", metavar="SHARD_DIR", help="output folders of the shard runs")
    m.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder of the merged run (new or empty)")
    _add_run_args(m)

    f = sub.add_parser(
        "fetch-weights",
        help="download and verify the published weights into the cache",
        description="Download the published weights (CXR-Lung-Risk: Zenodo record 7941660, 2.16 GB; "
        "CXR-Age: 258 MB), resume interrupted downloads, verify size/sha256 and extract into the cache "
        "($CXR_LUNG_RISK_HOME, default: the user cache folder).",
    )
    f.add_argument("--model", choices=["lung-risk", "age", "all"], default="lung-risk",
                   help="which weights to fetch (default: lung-risk, the 2.2 GB CXR-Lung-Risk ensemble)")
    f.add_argument("--cache", metavar="DIR", type=Path, default=None,
                   help="cache folder (default: $CXR_LUNG_RISK_HOME or the user cache folder)")
    f.add_argument("--force", action="store_true", help="download again even if the weights are installed")
    f.add_argument("--url", default=None, help="download from this mirror URL (or local file) instead of the published source")
    f.add_argument("--expected-size", type=int, default=None, metavar="BYTES",
                   help="size the mirror's file must have (default: the published file's size)")
    f.add_argument("--sha256", default=None, metavar="HEX",
                   help="SHA-256 the mirror's file must have (default: the published checksum, if known)")
    f.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (it is shown only when stderr is a terminal anyway)")
    _add_serve_parser(sub, model_choices())
    _add_web_parser(sub, model_choices())
    _add_report_parser(sub)
    return parser


def _add_report_parser(sub) -> None:
    r = sub.add_parser(
        "report",
        help="the paper's survival analysis (risk groups, Kaplan-Meier, log-rank, Cox, C-index) on your cohort",
        description="Join predict results (run with --linkage-columns) to an outcomes table and write DIR/report.html "
        "(self-contained), DIR/report.json (every number), DIR/tables/*.csv and DIR/figures/*.png|svg. "
        "Needs the [report] extra: pip install 'cxr-lung-risk[report]'.",
    )
    r.add_argument("results", nargs="+", metavar="RESULTS", type=Path, help="predict/merge output folders or their CSV/JSON/Parquet tables")
    r.add_argument("--outcomes", required=True, type=Path, metavar="FILE", help="outcomes table (CSV or Parquet): key, time, event, covariates")
    r.add_argument("--out", required=True, type=Path, metavar="DIR", help="report folder (new, empty, or an earlier report's)")
    r.add_argument("--key", default="PatientID", choices=["PatientID", "AccessionNumber", "StudyInstanceUID"], help="join column (default PatientID)")
    r.add_argument("--time", default="time", metavar="COL", help="follow-up in years (default column: time)")
    r.add_argument("--event", default="event", metavar="COL", help="0/1, or an event type with 0/empty for censored (default column: event)")
    r.add_argument("--event-of-interest", default=None, metavar="TYPE", help="with event types: the outcome (others compete)")
    r.add_argument("--also-event", default="", metavar="COL,...", help="second outcomes (e.g. lung-cancer death, 0/1): "
                   "Kaplan-Meier, log-rank, Cox and C for each too")
    r.add_argument("--covariates", default="", metavar="A,B:cat,...", help="covariates for the multivariable models; NAME:cat declares a categorical one")
    r.add_argument("--score", default="CXR_Lung_Risk", metavar="COL", help="the score column (default CXR_Lung_Risk)")
    r.add_argument("--cut-points", default=None, metavar="A,B", help="risk-group cut-points (default: the paper's 65,75)")
    r.add_argument("--p-adjust", default="BH", choices=["BH", "holm"], help="pairwise log-rank adjustment (default BH, survminer's; the paper's legends say Holm)")
    r.add_argument("--horizons", default="1,3,5,10", metavar="Y,...", help="years for time-dependent AUC and survival (default 1,3,5,10)")
    r.add_argument("--bootstrap", type=int, default=200, metavar="N", help="bootstrap replicates for the C-index CIs (default 200; 0: none)")
    r.add_argument("--bootstrap-size", type=int, default=4000, metavar="M", help="patients per replicate; larger cohorts use an m-out-of-n bootstrap (default 4000)")
    r.add_argument("--baseline", default="earliest", choices=["earliest", "latest", "first"], help="which radiograph per patient (by StudyDate; first: file order)")
    r.add_argument("--seed", type=int, default=20230530, help="bootstrap seed")
    r.add_argument("--title", default="CXR-Lung-Risk cohort report", help="report title")
    _add_run_args(r)


def _numbers(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        from .errors import UsageError

        raise UsageError(f"{option} takes numbers separated by commas, not {text!r}") from None


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import ReportOptions, run_report

    opts = ReportOptions(
        results=args.results, outcomes=args.outcomes, out=args.out, key=args.key, time=args.time, event=args.event,
        event_of_interest=args.event_of_interest, covariates=args.covariates, score=args.score,
        also_events=[c.strip() for c in args.also_event.split(",") if c.strip()],
        cut_points=_numbers(args.cut_points, "--cut-points"), p_adjust=args.p_adjust, horizons=_numbers(args.horizons, "--horizons") or (),
        bootstrap=max(0, args.bootstrap), bootstrap_size=max(1, args.bootstrap_size), baseline=args.baseline, seed=args.seed,
        title=args.title, quiet=args.quiet,
    )
    numbers = run_report(opts)
    f = numbers["flow"]
    print(f"report: {f['patients_analysed']} patients, {f['events']} events -> {args.out / 'report.html'}", file=sys.stderr)
    return 0


SERVE_EPILOG = """\
The node answers C-ECHO, accepts CR and DX instances (C-STORE) from the AE titles of --allow-ae,
writes each durably into --spool before answering success, scores them in batches (a study when
no new instance arrived for --quiet-time seconds, or when a batch fills) exactly like `predict`,
and sends the SR and the result image to every --send-to (C-STORE) and --stow (STOW-RS), and a
FHIR R4 bundle of the same results to every --fhir server (POST of a transaction), retrying
with backoff until delivered (the outbox is in the spool and survives restarts).
--config FILE: YAML with the long option names as keys (send-to and allow-ae take lists);
the command line overrides the file. SIGTERM: finishes the batch in progress and exits 0.
"""


def _add_serve_parser(sub, models: Sequence[str]) -> None:
    s = sub.add_parser(
        "serve",
        help="run a DICOM node: receive over C-STORE, score, send the results back (needs the [pacs] extra)",
        description="A DICOM node (PACS companion): receive chest radiographs, score them, send SR + result image back.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = s.add_argument
    a("--config", type=Path, metavar="FILE", help="YAML file with the options below (long names as keys)")
    a("--port", type=int, metavar="N", help="DICOM port to listen on (default 11112)")
    a("--ae-title", metavar="AET", help="this node's AE title (default CXR-LUNG-RISK)")
    a("--bind", metavar="ADDR", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    a("--spool", type=Path, metavar="DIR", help="spool folder: received instances, results, outbox, audit.jsonl (required)")
    _add_model_args(a, models, serve=True)
    a("--send-to", action="append", metavar="AET@HOST:PORT", help="send results by C-STORE to this node (repeatable)")
    a("--stow", action="append", metavar="URL", help="send results by DICOMweb STOW-RS to this base URL (repeatable)")
    a("--stow-token", metavar="TOKEN", help="bearer token for --stow (or CXR_LUNG_RISK_STOW_TOKEN)")
    a("--stow-ca", type=Path, metavar="FILE", help="CA bundle to verify an https --stow server (default: the system's)")
    a("--fhir", action="append", metavar="URL",
      help="POST each result's FHIR R4 bundle (transaction) to this FHIR server base URL, with the outbox's retry (repeatable)")
    a("--fhir-token", metavar="TOKEN", help="bearer token for --fhir (or CXR_LUNG_RISK_FHIR_TOKEN)")
    a("--fhir-ca", type=Path, metavar="FILE", help="CA bundle to verify an https --fhir server (default: the system's)")
    a("--allow-ae", metavar="AET,...", help="accept associations only from these calling AE titles (default: any)")
    a("--metrics-port", type=int, metavar="N", help="serve /healthz and Prometheus /metrics on this local HTTP port")
    a("--quiet-time", type=float, metavar="S", help="score a study S seconds after its last instance arrived (default 5)")
    a("--batch-size", type=int, metavar="N", help="images per batch; a full batch is scored at once (default 16)")
    a("--workers", type=int, metavar="N", help="decode worker processes that prepare instances as they arrive, pausing while "
      "the models run, each a fence against a hostile file (memory and time limits) (default: one per core, at most 8, "
      "so 2 on 2 cores; 0 decodes in the node's process)")
    a("--retry-initial", type=float, metavar="S", help="first retry after a failed delivery, doubling (default 2)")
    a("--retry-max", type=float, metavar="S", help="longest wait between delivery retries (default 300)")
    a("--strict-sop-class", action="store_const", const=True,
      help="refuse instances that are not CR/DX with C-STORE status 0x0122; default: answer success, store nothing, "
      "audit them as 'ignored' (Orthanc's 'Send to modality' of a mixed study then goes through)")
    a("--degraded-after", type=int, metavar="N",
      help="/healthz answers 503 'degraded' once a destination failed N delivery rounds in a row (default 5; 0: never)")
    a("--max-attempts", type=int, metavar="N", help="move a result the destination keeps refusing to outbox/failed after N attempts (default 0: never)")
    a("--no-result-image", dest="result_image", action="store_const", const=False, help="send only the SR (no result image)")
    a("--tls-cert", type=Path, metavar="FILE", help="DICOM TLS: this node's certificate (PEM)")
    a("--tls-key", type=Path, metavar="FILE", help="DICOM TLS: its private key (PEM)")
    a("--tls-ca", type=Path, metavar="FILE", help="DICOM TLS: CA bundle; given, peers must present a certificate it signed")
    a("--send-tls", action="store_const", const=True, help="C-STORE to --send-to over TLS (verified with --tls-ca)")
    a("--audit-log", type=Path, metavar="FILE", help="JSON-lines audit log (default SPOOL/audit.jsonl)")
    _add_im_version_arg(a, serve=True)
    _add_sr_class_arg(a, serve=True)


def _add_predict_args(p: argparse.ArgumentParser, models: Sequence[str]) -> None:
    _add_model_args(p.add_argument, models)
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per batch (default 16)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help=_WORKERS_HELP)
    p.add_argument("--follow-links", action="store_true", help=_FOLLOW_HELP)
    p.add_argument("--per-model", action="store_true", help="also write each member's raw output (columns Lung_Age_081221_<i>)")
    p.add_argument("--all-members", action="store_true", help="also load and run the 7 members whose LASSO weight is 0")
    p.add_argument("--format", default="csv,sr", metavar="LIST", help="comma-separated outputs among csv, sr, json, parquet, fhir (default csv,sr)")
    p.add_argument("--timings", type=Path, metavar="FILE", help="write the run's wall time per phase (start-up, load, prepare, models, write; seconds) as JSON to FILE")
    p.add_argument("--deterministic", action="store_true", help="DICOM SRs with UIDs and times derived from the input (byte-identical reruns)")
    _add_sr_class_arg(p.add_argument)
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_true", default=True, help="CXR-Age: deterministic test-time augmentation (default)")
    tta.add_argument("--no-tta", dest="tta", action="store_false", help="CXR-Age: plain single pass")
    p.add_argument("--saliency", action="store_true", help="write saliency maps (PNG under saliency/, DICOM SC under sc/)")
    p.add_argument(
        "--linkage-columns",
        action="store_true",
        help="add PatientID, StudyDate, AccessionNumber and ViewPosition from each DICOM header to the result table "
        "(to link scores per patient and study). These are IDENTIFYING data: the table then needs the protection "
        "of the source images",
    )
    c = p.add_argument_group("scale: engines, resume, shards")
    c.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: a Ray cluster (pip install 'cxr-lung-risk[ray]'); "
                   "reading/preprocessing run as Ray tasks, scoring in actors that load the models once (a GPU each where there are GPUs)")
    c.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to join (e.g. auto, or HEAD:6379 of `ray start --head`); default: a local Ray started for the run")
    c.add_argument("--ray-actors", type=int, default=None, metavar="N", help="scoring actors (default: one per GPU, else one)")
    c.add_argument("--shard", default=None, metavar="K/N",
                   help="score only shard K of N (0 <= K < N; by a stable hash of each input's File name), e.g. "
                   "--shard $SLURM_ARRAY_TASK_ID/$N; join the shards' --out folders with `cxr-lung-risk merge`")
    c.add_argument("--no-resume", dest="resume", action="store_false",
                   help="redo every input even when --out holds a finished or interrupted run of the same options")
    p.add_argument(
        "--saliency-method",
        choices=["gradient", "gradcam"],
        default="gradient",
        help="saliency: gradient of the final score w.r.t. the input (default, as the original), or Grad-CAM "
        "(only for networks with a body/head split, i.e. not the ensemble's Tiny members)",
    )
    p.add_argument("--result-image", action="store_true",
                   help="also write result/<SOPInstanceUID>.dcm per scored DICOM image: a Secondary Capture showing the "
                   "score(s), model, weights and 'research use only' that any viewer displays (with the saliency overlay "
                   "when --saliency is on)")
    w = p.add_argument_group("DICOMweb (extra [pacs]; sources are INPUTs dicomweb+http(s)://...)")
    w.add_argument("--stow", metavar="URL", help="after the run, send the SRs, result images and saliency SCs to this DICOMweb "
                   "base URL with STOW-RS (e.g. http://127.0.0.1:8042/dicom-web); per-object results in stow.json")
    w.add_argument("--stow-token", metavar="TOKEN", help="bearer token for --stow (default: $CXR_LUNG_RISK_STOW_TOKEN)")
    w.add_argument("--dicomweb-token", metavar="TOKEN", help="bearer token for DICOMweb sources (default: $CXR_LUNG_RISK_DICOMWEB_TOKEN)")
    w.add_argument("--dicomweb-ca-bundle", metavar="FILE", help="https: CA certificates (PEM) to verify the servers with (sources and --stow)")
    w.add_argument("--dicomweb-client-cert", metavar="FILE", help="https: client certificate (PEM) to present (sources and --stow)")
    w.add_argument("--dicomweb-client-key", metavar="FILE", help="https: the client certificate's private key (PEM), when not in the certificate file")
    w.add_argument("--dicomweb-timeout", type=float, default=60.0, metavar="S", help="seconds one DICOMweb request may take (default 60)")
    _add_selection_args(p)
    _add_run_args(p)


# ------------------------------------------------------------------------------ namespace -> options
def _selection(args: argparse.Namespace):
    from .dicom_io import SelectionOptions

    kw = {}
    for flag in ("allow_lateral", "allow_for_processing", "allow_multiframe", "allow_non_chest"):
        if getattr(args, flag, False):
            kw[flag] = True
    if args.modalities:
        kw["allowed_modalities"] = tuple(m.strip().upper() for m in args.modalities.split(",") if m.strip())
    return SelectionOptions(**kw)


def predict_options(args: argparse.Namespace):
    """The :class:`~cxr_lung_risk.options.PredictOptions` a ``predict`` command line asks for."""
    from .options import PredictOptions, parse_formats
    from .registry import resolve_models

    from .demo import weights_map

    weights = weights_map(args.weights, args.age_weights, getattr(args, "demo_weights", False))
    from .dicomweb import is_dicomweb_input
    from .options import is_url
    from .resume import parse_shard

    remote = tuple(p for p in args.inputs if is_dicomweb_input(p))
    return PredictOptions(
        inputs=tuple(p if is_url(p) else Path(p) for p in args.inputs if not is_dicomweb_input(p)),
        dicomweb=remote,
        stow=args.stow,
        dicomweb_http=_http_options(args, args.dicomweb_token, "CXR_LUNG_RISK_DICOMWEB_TOKEN") if remote else None,
        stow_http=_http_options(args, args.stow_token, "CXR_LUNG_RISK_STOW_TOKEN") if args.stow else None,
        result_image=args.result_image,
        out=args.out,
        models=resolve_models(args.model),
        weights=weights,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        workers=args.workers,
        follow_links=args.follow_links,
        per_model=args.per_model,
        all_members=args.all_members,
        formats=parse_formats(args.format),
        deterministic=args.deterministic,
        tta=args.tta,
        saliency=args.saliency,
        saliency_method=args.saliency_method,
        selection=_selection(args),
        im_version=args.im_version,
        sr_class=args.sr_class,
        timings=args.timings,
        progress=not args.quiet,
        engine=args.engine,
        ray_address=args.ray_address,
        ray_actors=args.ray_actors,
        shard=parse_shard(args.shard) if args.shard else None,
        resume=args.resume,
        linkage=args.linkage_columns,
    )


def _http_options(args: argparse.Namespace, token: str | None, token_env: str):
    """DICOMweb request settings (bearer token from the option or the environment, TLS files)."""
    import os

    from .dicomweb import HttpOptions

    return HttpOptions(
        token=token or os.environ.get(token_env) or None,
        ca_bundle=args.dicomweb_ca_bundle,
        client_cert=args.dicomweb_client_cert,
        client_key=args.dicomweb_client_key,
        timeout=args.dicomweb_timeout,
    )


def preprocess_options(args: argparse.Namespace):
    from .options import PreprocessOptions

    return PreprocessOptions(
        inputs=tuple(Path(p) for p in args.inputs),
        out=args.out,
        workers=args.workers,
        follow_links=args.follow_links,
        selection=_selection(args),
        im_version=args.im_version,
        progress=not args.quiet,
    )


# ------------------------------------------------------------------------------ commands
def _err(msg: str) -> None:
    print(f"cxr-lung-risk: error: {msg}", file=sys.stderr, flush=True)


def _summary_line(summary, what: str = "scored") -> str:
    t = summary.timings or {}
    times = ""
    if t.get("run_s") is not None and "load_s" in t:
        times = (
            f" ({t['run_s']:.1f} s: load {t['load_s']:.1f}, prepare {t['prepare_s']:.1f}, models {t['infer_s']:.1f}, "
            f"write {t['write_s']:.1f})"
        )
    resumed = getattr(summary, "resumed", 0)
    kept = f" ({resumed} of them done by an earlier run)" if resumed else ""
    return (
        f"cxr-lung-risk: {what} {summary.scored}, skipped {summary.skipped}, failed {summary.failed} of "
        f"{summary.inputs} inputs{kept} -> {summary.out}{times}"
    )


def _exit_code(summary) -> int:
    if summary.scored == 0:
        return EXIT_NONE
    return EXIT_SOME_FAILED if summary.failed or getattr(summary, "stow_failed", 0) else EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    opts = predict_options(args).validate()
    from .predict import run_predict  # torch is imported only now

    summary = run_predict(opts)
    print(_summary_line(summary), file=sys.stderr)
    if opts.stow:
        n, bad = len(summary.stow), summary.stow_failed
        print(f"cxr-lung-risk: STOW-RS to {opts.stow}: stored {n - bad} of {n} DICOM objects" + (" (see stow.json)" if bad else ""), file=sys.stderr)
    if summary.synthetic:
        print("cxr-lung-risk: these scores come from SYNTHETIC weights and mean nothing", file=sys.stderr)
    return _exit_code(summary)


def _cmd_preprocess(args: argparse.Namespace) -> int:
    opts = preprocess_options(args).validate()
    from .predict import run_preprocess

    summary = run_preprocess(opts)
    print(_summary_line(summary, "wrote PNGs for"), file=sys.stderr)
    return _exit_code(summary)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(args.out, cache=args.cache, progress=not args.quiet)
    print(_summary_line(summary), file=sys.stderr)
    print(
        "cxr-lung-risk: demo done: these scores come from SYNTHETIC weights and mean nothing; "
        "for real results run `cxr-lung-risk fetch-weights` and `cxr-lung-risk predict`",
        file=sys.stderr,
    )
    return _exit_code(summary)


def _cmd_fetch(args: argparse.Namespace) -> int:
    from .fetch import fetch_weights

    paths = fetch_weights(
        args.model,
        url=args.url,
        root=args.cache.expanduser() if args.cache else None,
        progress=args.progress,
        force=args.force,
        expected_size=args.expected_size,
        expected_sha256=args.sha256,
    )
    for model, path in paths.items():
        print(f"{model}: {path}")
    return EXIT_OK


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_outputs

    summary = merge_outputs([Path(p) for p in args.shards], args.out)
    print(_summary_line(summary, "merged: scored"), file=sys.stderr)
    return _exit_code(summary)


_SERVE_KEYS = (
    "port", "ae_title", "bind", "spool", "weights", "age_weights", "model", "device", "precision", "send_to", "stow",
    "stow_token", "stow_ca", "allow_ae", "metrics_port", "quiet_time", "batch_size", "workers", "retry_initial", "retry_max", "max_attempts",
    "result_image", "tls_cert", "tls_key", "tls_ca", "send_tls", "audit_log", "im_version", "sr_class", "strict_sop_class",
    "degraded_after", "demo_weights", "fhir", "fhir_token", "fhir_ca",
)


def serve_config(args: argparse.Namespace):
    """The :class:`~cxr_lung_risk.serve.config.ServeConfig` of a ``serve`` command line (+ --config)."""
    import os

    from .serve.config import build_config, load_config_file, merge

    file_values = load_config_file(args.config) if args.config else {}
    cli_values = {k: getattr(args, k) for k in _SERVE_KEYS}
    if cli_values["stow_token"] is None and os.environ.get("CXR_LUNG_RISK_STOW_TOKEN"):
        cli_values["stow_token"] = os.environ["CXR_LUNG_RISK_STOW_TOKEN"]
    if cli_values["fhir_token"] is None and os.environ.get("CXR_LUNG_RISK_FHIR_TOKEN"):
        cli_values["fhir_token"] = os.environ["CXR_LUNG_RISK_FHIR_TOKEN"]
    return build_config(merge(file_values, cli_values))


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import pynetdicom  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        _err(f"serve needs the [pacs] extra ({e.name} is missing): pip install 'cxr-lung-risk[pacs]'")
        return EXIT_NONE
    cfg = serve_config(args)
    from .serve import run_serve  # torch is imported only now

    return run_serve(cfg)


def _add_web_parser(sub, models: Sequence[str]) -> None:
    from .web import EPILOG

    w = sub.add_parser(
        "web",
        help="a local web page: drop radiographs, see the scores, download the results (needs the [web] extra)",
        description="A local web page for people who do not use a terminal: drop DICOM/PNG/JPEG files or a zip, "
                    "get the scores, result cards and downloads.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = w.add_argument
    a("--port", type=int, default=8080, metavar="N", help="HTTP port (default 8080; 0: any free port)")
    a("--host", default="127.0.0.1", metavar="ADDR", help="address to listen on (default 127.0.0.1; another needs a token)")
    a("--token", metavar="TOKEN", help="access token (default $CXR_LUNG_RISK_WEB_TOKEN); required unless the host is loopback")
    a("--model", choices=list(models), default="lung-risk", help="which model(s) to run (default lung-risk)")
    a("--weights", metavar="PATH", help="CXR-Lung-Risk weights (default: the fetch-weights cache)")
    a("--age-weights", metavar="PATH", help="CXR-Age weights (with --model age or all)")
    a("--demo-weights", action="store_true", help="the SYNTHETIC weights `cxr-lung-risk demo` made (meaningless scores, labelled SYNTHETIC)")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="compute device (default auto)")
    a("--max-files", type=int, default=None, metavar="N", help="files kept per browser session (default 100)")
    a("--max-upload-mb", type=int, default=None, metavar="MB", help="largest upload request, e.g. one zip (default 1024)")
    a("--no-saliency", dest="saliency", action="store_false", help="no saliency overlay (faster)")


def _cmd_web(args: argparse.Namespace) -> int:
    from .web import missing_extra, run_web, web_config

    missing = missing_extra()
    if missing:
        _err(missing)
        return 1
    return run_web(web_config(models=args.model, weights=args.weights, age_weights=args.age_weights,
                              demo_weights=args.demo_weights, device=args.device, host=args.host, port=args.port,
                              token=args.token, saliency=args.saliency, max_files=args.max_files,
                              max_upload_mb=args.max_upload_mb))


_COMMANDS = {"web": _cmd_web, "merge": _cmd_merge, "predict": _cmd_predict, "preprocess": _cmd_preprocess, "demo": _cmd_demo, "fetch-weights": _cmd_fetch, "serve": _cmd_serve, "report": _cmd_report}


class _Terminated(BaseException):
    """SIGTERM (docker stop, Kubernetes, timeout), handled like Ctrl-C."""


def _on_sigterm(signum, frame) -> None:  # pragma: no cover - exercised through a subprocess test
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_NONE
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        previous = None
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        _err("interrupted; run it again to resume the download" if args.command == "fetch-weights" else "interrupted; the outputs hold what was finished")
        return EXIT_SIGINT
    except _Terminated:
        _err("terminated (SIGTERM); the outputs hold what was finished")
        return EXIT_SIGTERM
    except CxrLungRiskError as e:
        if args.debug:
            raise
        _err(str(e))
        return EXIT_NONE
    except OSError as e:  # a file that cannot be read or written: an ordinary sentence
        if args.debug:
            raise
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        _err(f"{e.strerror or e}{where}")
        return EXIT_NONE
    except Exception as e:  # a bug: say so plainly
        if args.debug:
            raise
        _err(f"unexpected {type(e).__name__}: {e} (this is a bug; rerun with --debug for details and report it)")
        return EXIT_NONE
    finally:
        if previous is not None:
            try:
                signal.signal(signal.SIGTERM, previous)
            except ValueError:  # pragma: no cover
                pass


if __name__ == "__main__":
    sys.exit(main())
