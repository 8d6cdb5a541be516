"""The ``predict`` and ``preprocess`` jobs: discovery -> preparation -> models -> outputs.

Streaming: inputs are prepared in order (optionally in worker processes), scored in batches,
and every result is written as soon as it exists. Every input gets exactly one manifest row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from . import __version__
from .errors import EXIT_NONE, EXIT_OK, EXIT_SOME_FAILED, UsageError
from .outputs.tables import ManifestWriter, ResultWriter
from .pipeline import PrepareOptions, Prepared, default_workers, iter_prepared

UID_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
FORMATS = ("csv", "sr", "json")


class Scorer(Protocol):
    """A loaded model: turns a uint8 NCHW batch into named output columns."""

    title: str
    columns: list[str]

    def score(self, batch_u8: torch.Tensor) -> dict[str, np.ndarray]: ...

    def measurements(self, row: dict[str, Any]) -> list[Any]: ...


class LungRiskScorer:
    """Adapter of :class:`~cxr_lung_risk.engine.LungRiskEnsemble` to the output columns."""

    def __init__(self, ensemble, per_model: bool) -> None:
        self.ensemble = ensemble
        self.spec = ensemble.spec
        self.title = self.spec.title
        self.per_model = per_model
        self.columns = [self.spec.column] + (ensemble.member_names if per_model else [])

    def score(self, batch_u8: torch.Tensor) -> dict[str, np.ndarray]:
        res = self.ensemble.predict_uint8(batch_u8)
        out = {self.spec.column: res.scores}
        for j, name in enumerate(self.ensemble.member_names):
            out[name] = res.per_member[:, j]
        return out

    def measurements(self, row: dict[str, Any]) -> list[Any]:
        from .outputs.sr import lung_risk_measurement

        members = {n: float(row[n]) for n in self.ensemble.member_names if n in row} if self.per_model else None
        return [lung_risk_measurement(float(row[self.spec.column]), members=members)]


def _parse_formats(text: str) -> set[str]:
    fmts = {t.strip().lower() for t in text.split(",") if t.strip()}
    bad = fmts - set(FORMATS)
    if bad or not fmts:
        raise UsageError(f"--format takes a comma-separated list among {', '.join(FORMATS)} (got {text!r})")
    return fmts


def _discover(inputs: Sequence[str]):
    from .dicom_io import discover

    try:
        files = list(discover(inputs))
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    return files


def _load_lung_risk(args: argparse.Namespace) -> LungRiskScorer:
    from .engine import LungRiskEnsemble
    from .fetch import find_lung_risk_weights

    loc = find_lung_risk_weights(args.weights)
    if loc is None:
        if args.weights:
            raise UsageError(f"weights not found at {args.weights}")
        raise UsageError(
            "no CXR-Lung-Risk weights found: run `cxr-lung-risk fetch-weights` "
            "(downloads Zenodo record 7941660, 2.16 GB) or pass --weights FOLDER_OR_ZIP"
        )
    ens = LungRiskEnsemble.load(loc, all_members=args.all_members, device=args.device, precision=args.precision)
    return LungRiskScorer(ens, per_model=args.per_model)


def _load_scorers(args: argparse.Namespace) -> list[Scorer]:
    scorers: list[Scorer] = []
    if args.model in ("lung-risk", "all"):
        scorers.append(_load_lung_risk(args))
    if args.model in ("age", "all"):
        from .age import load_age_scorer

        scorers.append(load_age_scorer(args))
    return scorers


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=None, file=sys.stderr, leave=False)


def _manifest_reason(p: Prepared) -> str:
    if p.status == "ok":
        return "; ".join(f"warning: {w}" for w in p.warnings)
    return p.reason


def _batches(stream: Iterator[Prepared], size: int, manifest: ManifestWriter, bar) -> Iterator[list[Prepared]]:
    batch: list[Prepared] = []
    for p in stream:
        if p.status != "ok":
            manifest.write(p.file.rel, p.status, _manifest_reason(p))
            bar.update(1)
            continue
        batch.append(p)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``), else None: the start-up phase
    (interpreter, imports) that precedes :func:`run_predict`."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class PhaseTimer:
    """Wall seconds per phase of a run (``load``, ``prepare``, ``infer``, ``write``), summed."""

    def __init__(self) -> None:
        self.startup_s = _process_age_s()
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {"load": 0.0, "prepare": 0.0, "infer": 0.0, "write": 0.0}

    def add(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.phases[phase] += now - since
        return now

    def timed(self, phase: str, it: Iterator):
        """Iterate ``it``, charging the time spent waiting for each item to ``phase``."""
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.add(phase, t)
                return
            self.add(phase, t)
            yield item

    def as_dict(self, **extra: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"startup_s": self.startup_s}
        d.update({f"{k}_s": v for k, v in self.phases.items()})
        d["run_s"] = time.perf_counter() - self.t0
        d.update(extra)
        return d


def run_predict(args: argparse.Namespace) -> int:
    from .cli import _selection_from_args

    timer = PhaseTimer()
    formats = _parse_formats(args.format)
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    files = _discover(args.inputs)
    if not files:
        raise UsageError("no input files found in " + ", ".join(map(str, args.inputs)))
    t = time.perf_counter()
    scorers = _load_scorers(args)
    timer.add("load", t)
    opts = PrepareOptions(selection=_selection_from_args(args), im_version=args.im_version)
    workers = default_workers() if args.workers is None else args.workers
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    from .dicom_io import is_dicom_file

    any_dicom = any(is_dicom_file(f.path) for f in files)
    columns = ["File"] + (list(UID_COLUMNS) if any_dicom else [])
    for s in scorers:
        columns += s.columns
    writer = ResultWriter(out, columns, csv_out="csv" in formats, json_out="json" in formats)
    manifest = ManifestWriter(out)
    sr_writer = _SRWriter(out, scorers, args) if "sr" in formats else None
    saliency = None
    if args.saliency:
        from .saliency import SaliencyWriter

        saliency = SaliencyWriter(out, scorers, args)
    scored = 0
    bar = _progress(len(files), "scoring")
    try:
        stream = timer.timed("prepare", iter_prepared(files, opts, workers=workers))
        for batch in _batches(stream, args.batch_size, manifest, bar):
            t = time.perf_counter()
            x = torch.from_numpy(np.stack([p.image for p in batch]))
            results: dict[str, np.ndarray] = {}
            for s in scorers:
                results.update(s.score(x))
            t = timer.add("infer", t)
            for i, p in enumerate(batch):
                row: dict[str, Any] = {"File": p.file.rel, **p.uids}
                for k, v in results.items():
                    row[k] = float(v[i])
                reason = _manifest_reason(p)
                try:
                    if sr_writer is not None and p.dataset is not None:
                        sr_writer.write(p, row)
                    if saliency is not None:
                        saliency.write(p, row)
                except Exception as e:  # one object that cannot be written must not lose the others
                    manifest.write(p.file.rel, "failed", f"failed: scored but writing its DICOM output failed: {type(e).__name__}: {str(e)[:160]}")
                    writer.write(row)
                    bar.update(1)
                    continue
                writer.write(row)
                manifest.write(p.file.rel, "ok", reason)
                scored += 1
                bar.update(1)
            timer.add("write", t)
    finally:
        bar.close()
        writer.close()
        manifest.close()
    n_failed = manifest.counts.get("failed", 0)
    n_skipped = manifest.counts.get("skipped", 0)
    tm = timer.as_dict(inputs=len(files), scored=scored, workers=workers, batch_size=args.batch_size)
    print(
        f"cxr-lung-risk: scored {scored}, skipped {n_skipped}, failed {n_failed} of {len(files)} inputs -> {out} "
        f"({tm['run_s']:.1f} s: load {tm['load_s']:.1f}, prepare {tm['prepare_s']:.1f}, models {tm['infer_s']:.1f}, "
        f"write {tm['write_s']:.1f})",
        file=sys.stderr,
    )
    if getattr(args, "timings", None):
        Path(args.timings).write_text(json.dumps(tm, indent=1) + "\n")
    if scored == 0:
        return EXIT_NONE
    return EXIT_SOME_FAILED if n_failed else EXIT_OK


class _SRWriter:
    """One DICOM SR per scored DICOM image, named after the source SOP Instance UID."""

    def __init__(self, out: Path, scorers: Sequence[Scorer], args: argparse.Namespace) -> None:
        from .outputs import sr

        self.sr = sr
        self.dir = out / "sr"
        self._written: dict[str, int] = {}
        self.scorers = scorers
        self.deterministic = bool(getattr(args, "deterministic", False))
        params = {
            "device": str(getattr(args, "device", "auto")),
            "precision": str(getattr(args, "precision", "fp32")),
            "im_version": str(getattr(args, "im_version", "")),
        }
        if getattr(args, "all_members", False):
            params["all_members"] = "true"
        if getattr(args, "model", "lung-risk") in ("age", "all"):
            params["tta"] = "true" if getattr(args, "tta", True) else "false"
        self.algorithm = sr.AlgorithmInfo(name="cxr-lung-risk", version=__version__, parameters=params)

    def write(self, p: Prepared, row: dict[str, Any]) -> None:
        measurements = []
        for s in self.scorers:
            measurements += s.measurements(row)
        ds = self.sr.build_measurement_report(p.dataset, measurements, algorithm=self.algorithm, deterministic=self.deterministic)
        self.dir.mkdir(parents=True, exist_ok=True)
        name = self.sr.sr_filename(p.uids.get("SOPInstanceUID", ""))
        if name in self._written:  # the same source image given twice: keep both reports
            self._written[name] += 1
            name = f"{name[:-4]}_{self._written[name]}.dcm"
        else:
            self._written[name] = 1
        self.sr.write_sr(ds, self.dir / name)


def _png_name(rel: str) -> str:
    r = Path(rel)
    if r.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return r.with_suffix(".png").as_posix()
    return r.as_posix() + ".png"


def run_preprocess(args: argparse.Namespace) -> int:
    from .cli import _selection_from_args
    from .preprocess import write_png

    files = _discover(args.inputs)
    if not files:
        raise UsageError("no input files found in " + ", ".join(map(str, args.inputs)))
    opts = PrepareOptions(selection=_selection_from_args(args), im_version=args.im_version, keep_512=True, accept_raster=False)
    workers = default_workers() if args.workers is None else args.workers
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    bar = _progress(len(files), "preprocessing")
    with ManifestWriter(out) as manifest:
        for p in iter_prepared(files, opts, workers=workers):
            bar.update(1)
            if p.status != "ok":
                manifest.write(p.file.rel, p.status, p.reason)
                continue
            dest = out / _png_name(p.file.rel)
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                write_png(dest, p.gray)
            except OSError as e:
                manifest.write(p.file.rel, "failed", f"failed: cannot write {dest}: {e.strerror or e}")
                continue
            manifest.write(p.file.rel, "ok", _manifest_reason(p))
            written += 1
        bar.close()
        n_failed = manifest.counts.get("failed", 0)
    print(f"cxr-lung-risk: wrote {written} PNG(s) of {len(files)} inputs -> {out}", file=sys.stderr)
    if written == 0:
        return EXIT_NONE
    return EXIT_SOME_FAILED if n_failed else EXIT_OK
