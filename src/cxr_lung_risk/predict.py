"""The ``predict`` and ``preprocess`` jobs (adapters over :mod:`cxr_lung_risk.jobs`).

``predict``: :class:`cxr_lung_risk.jobs.Run` with the local engine, or with
:class:`cxr_lung_risk.cluster.RayEngine` for ``--engine ray``; every input gets exactly one
manifest row and one record (:mod:`cxr_lung_risk.records`). ``preprocess``: the authors' 8-bit
PNG of every accepted DICOM input. Both jobs take typed options (:mod:`cxr_lung_risk.options`)
and return a :class:`RunSummary`; they never exit the process or choose exit codes (that is the
CLI's job).
"""
from __future__ import annotations

from pathlib import Path

from .errors import UsageError, disk_full
from .jobs import (  # noqa: F401  (the run's names, importable from here as before)
    RUN_JSON,
    STOP_AFTER_ENV,
    OutputLock,
    Plan,
    Run,
    RunSummary,
    discover_inputs,
    load_models,
    plan_run,
    prepare_out,
    stop_when_full,
)
from .options import PredictOptions, PreprocessOptions
from .outputs.base import UniqueNames, output_path
from .outputs.tables import ManifestWriter, RecordWriter
from .outputs.writer import record_for
from .pipeline import PrepareOptions, Prepared, default_workers, iter_prepared
from .progress import Progress
from .records import Status
from .scoring import UID_COLUMNS

__all__ = ["RunSummary", "run_predict", "run_preprocess", "load_models", "UID_COLUMNS", "RUN_JSON"]


# --------------------------------------------------------------------------------- predict
def run_predict(opts: PredictOptions) -> RunSummary:
    """Score every input of ``opts``; write the tables, SRs, saliency maps, manifest and records.

    A rerun into the same ``out`` keeps what the earlier run finished (``opts.resume``, see
    :mod:`cxr_lung_risk.resume`); ``opts.shard`` restricts the run to one shard of the inputs;
    ``opts.engine == "ray"`` runs it on a Ray cluster (:mod:`cxr_lung_risk.cluster`).
    """
    engine = None
    if opts.engine == "ray":
        from .cluster import RayEngine

        engine = RayEngine(opts)
    return Run(opts, engine).execute()


def _reason(p: Prepared) -> str:
    if p.status is Status.OK:
        return "; ".join(f"warning: {w}" for w in p.warnings)
    return p.reason


# --------------------------------------------------------------------------------- preprocess
def _png_name(rel: str) -> str:
    r = Path(rel)
    if r.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return r.with_suffix(".png").as_posix()
    return r.as_posix() + ".png"


def run_preprocess(opts: PreprocessOptions) -> RunSummary:
    """Write the authors' 8-bit PNG of every accepted DICOM input (``DIR/<File>.png``)."""
    from .preprocess import write_png

    opts.validate()
    files = discover_inputs(opts.inputs, opts.out, opts.follow_links)
    if not files:
        raise UsageError("no input files found in " + ", ".join(map(str, opts.inputs)))
    prep = PrepareOptions(selection=opts.selection, im_version=opts.im_version, keep_512=True, accept_raster=False)
    workers = default_workers() if opts.workers is None else opts.workers
    out = opts.out
    prepare_out(out)
    summary = RunSummary(out=out, inputs=len(files))
    names = UniqueNames()
    with OutputLock(out), stop_when_full(out, summary, len(files)), ManifestWriter(out) as manifest, \
            RecordWriter(out) as records:
        progress = Progress(len(files), desc="preprocessing", enabled=opts.progress)
        try:
            for p in iter_prepared(files, prep, workers=workers):
                rec = record_for(p)
                if p.status is Status.OK:
                    rel = names.claim(_png_name(p.file.rel))
                    try:
                        write_png(output_path(out, rel), p.gray)
                        rec.add_output("png", rel)
                    except OSError as e:
                        full = disk_full(e, out)
                        if full is not None:  # a full disk stops the run (see jobs.stop_when_full)
                            raise full from None
                        rec.status = Status.FAILED
                        rec.reason = f"failed: cannot write {out / rel}: {e.strerror or e}"
                manifest.write(rec.file, rec.status, rec.reason if rec.status is not Status.OK else _reason(p))
                records.write(rec)
                summary.counts[str(rec.status)] = summary.counts.get(str(rec.status), 0) + 1
                progress.finish_input(rec.status)
        finally:
            progress.close()
    return summary
