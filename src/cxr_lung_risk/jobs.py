"""The job runner: every way in (``predict``, ``predict --engine ray``, the PACS node's worker)
runs its inputs through the same steps, owned here:

    plan (discover/list, shard, resume) -> prepare -> score -> write -> account

Who does what:

* :class:`Job` is the core they share: an :class:`Engine` loads the models (or hands over the ones
  it holds) and moves a :class:`Plan`'s inputs -- prepares and scores them in batches -- and hands
  every result to the job (its :class:`Sink`) in input order (the node's engine: a batch's scored
  inputs first, as the node always wrote them); the job writes it through one
  :class:`~cxr_lung_risk.outputs.writer.OutputWriter` and accounts it (:class:`Accounting`:
  counts, progress, warnings).
* :class:`Run` is a ``predict`` run around one job: the output folder's lock, :func:`plan_run`
  (discovery or listing, shards, resume), ``run.json``, a full disk's one sentence, ``--stow`` and
  the timings.
* The engines only move batches: :class:`LocalEngine` (a decode worker pool and the models in
  this process), :class:`cxr_lung_risk.cluster.RayEngine` (Ray tasks and actors) and the node's
  :class:`cxr_lung_risk.serve.worker.NodeEngine` (one spooled batch, :meth:`Plan.batch`, scored
  by the models the node loaded at start). The node runs one job per batch into a work folder and
  keeps what is its own (spool, outbox, audit log, metrics; :mod:`cxr_lung_risk.serve.worker`).

``predict``, ``cluster`` and ``serve`` are thin adapters over this module and import nothing
private from each other.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from . import __version__
from .dicom_io import InputFile, is_dicom_file
from .errors import DiskFullError, OutputError, OutputLockedError, UsageError
from .options import PredictOptions
from .outputs.base import open_output
from .outputs.writer import OutputWriter
from .pipeline import PrepareOptions, Prepared, default_workers, iter_prepared
from .progress import Progress, say
from .records import InputRecord, Status
from .registry import Model, resolve_models
from .scoring import Scorer
from .sources import discover_inputs, list_inputs

__all__ = [
    "RunSummary", "Plan", "plan_run", "Run", "Job", "Engine", "Sink", "Loaded", "LocalEngine", "Accounting", "PhaseTimer",
    "OutputLock", "open_writer", "models_info", "warn_synthetic", "prepare_out", "stop_when_full",
    "run_formats", "discover_inputs", "RUN_JSON", "LOCK_FILE", "STOP_AFTER_ENV",
]

RUN_JSON = "run.json"
LOCK_FILE = ".cxr-lung-risk.lock"

# Progress of one scored input: decoded, the networks, written.
STEP_PREPARED, STEP_WRITTEN = 0.1, 0.1
STEP_MODELS = 1.0 - STEP_PREPARED - STEP_WRITTEN


@dataclass
class RunSummary:
    """What a run did: counts by status and where its outputs are."""

    out: Path
    inputs: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "skipped": 0, "failed": 0})
    timings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # about the run itself (e.g. an unwritable --timings)
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)
    resumed: int = 0  # inputs an earlier run into the same folder had finished (counted in ``counts``)
    stow: list[dict[str, Any]] = field(default_factory=list)  # --stow: one result per file sent (see dicomweb.StowResult)

    @property
    def stow_failed(self) -> int:
        return sum(1 for r in self.stow if not r.get("ok"))

    @property
    def scored(self) -> int:
        return self.counts.get("ok", 0)

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)

    @property
    def skipped(self) -> int:
        return self.counts.get("skipped", 0)

    @property
    def synthetic(self) -> bool:
        return any(w.get("synthetic") for w in self.weights.values())



# --------------------------------------------------------------------------------- helpers
def _process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``), else None: the start-up phase
    (interpreter, imports) that precedes the job."""
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


def _process_start(pid: int) -> str | None:
    """The start time (clock ticks since boot) of process ``pid``, or None when there is none:
    with the pid it names one process, even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, ValueError):
        if sys.platform.startswith("linux"):
            return None
    try:  # no /proc: the pid alone
        os.kill(pid, 0)
        return ""
    except ProcessLookupError:
        return None
    except OSError:
        return ""


class OutputLock:
    """An exclusive lock on the output folder: a second run into the same ``--out`` is refused.

    The lock is a ``flock`` on ``.cxr-lung-risk.lock``, which holds the holder's pid and start
    time. The kernel releases a flock when its holder dies (decode workers close their copy and
    die with their parent); a lock file left by a run that was killed is taken over with a
    warning, and so is one still locked by some other process after the recorded run has gone
    (e.g. an orphaned worker of an older version): the file is replaced.
    """

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE
        self._fd: int | None = None
        self.warnings: list[str] = []

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(self.path, flags, 0o666)
        except OSError as e:
            raise OutputError(f"cannot use the output folder {self.path.parent}: {e.strerror or e}") from None

    @staticmethod
    def _holder(fd: int) -> tuple[int, str] | None:
        try:
            text = os.pread(fd, 200, 0).decode("ascii", "replace").split()
            return int(text[0]), text[1] if len(text) > 1 else ""
        except (OSError, ValueError, IndexError):
            return None

    def _locked_error(self) -> OutputLockedError:
        return OutputLockedError(
            f"another cxr-lung-risk run is writing into {self.path.parent}; wait for it to finish or choose another --out"
        )

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        say(f"warning: {msg}")

    def __enter__(self) -> "OutputLock":
        from .pipeline import CLOSE_IN_WORKERS

        for attempt in (0, 1):
            fd = self._open()
            holder = self._holder(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                gone = holder is not None and holder[0] != os.getpid() and _process_start(holder[0]) not in ("", holder[1])
                if attempt == 0 and gone:
                    # the recorded run has ended, yet something it left (an orphaned process)
                    # still holds the lock: replace the file (that process writes nothing here)
                    self._warn(f"the run (pid {holder[0]}) that locked {self.path.parent} has ended but another "
                               f"process still holds its lock; taking the folder over")
                    try:
                        if os.fstat(fd).st_ino == os.lstat(self.path).st_ino:
                            os.unlink(self.path)
                    except OSError:
                        pass
                    os.close(fd)
                    continue
                os.close(fd)
                raise self._locked_error() from None
            try:  # locked: is it still the file at the path (not replaced meanwhile)?
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
            except OSError:
                same = False
            if not same:
                os.close(fd)
                if attempt == 0:
                    continue
                raise self._locked_error()
            if holder is not None and holder[0] != os.getpid() and not any(
                    "taking the folder over" in w for w in self.warnings):
                self._warn(f"an earlier run (pid {holder[0]}) into {self.path.parent} ended without releasing its "
                           f"lock (killed?); taking it over")
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {_process_start(os.getpid()) or '-'}\n".encode("ascii"), 0)
            except OSError:
                pass
            self._fd = fd
            CLOSE_IN_WORKERS.add(fd)
            return self
        raise self._locked_error()  # pragma: no cover - the loop returns or raises

    def __exit__(self, *exc: Any) -> None:
        from .pipeline import CLOSE_IN_WORKERS

        if self._fd is not None:
            CLOSE_IN_WORKERS.discard(self._fd)
            try:
                self.path.unlink(missing_ok=True)
            finally:
                os.close(self._fd)
                self._fd = None


def prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"the output folder {out} is not writable")


def write_json_quietly(path: Path, data: dict[str, Any], summary: RunSummary, what: str) -> None:
    try:
        tmp = path.with_name(f".{path.name}.tmp")
        with open_output(tmp.parent, tmp.name, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=1, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        msg = f"could not write {what} {path}: {e.strerror or e}"
        summary.warnings.append(msg)
        say(f"warning: {msg}")


#: Test hook (interruption tests): stop the run like Ctrl-C after this many inputs were finished.
STOP_AFTER_ENV = "CXR_LUNG_RISK_TEST_STOP_AFTER"


def stop_after() -> int | None:
    v = os.environ.get(STOP_AFTER_ENV, "").strip()
    return int(v) if v.isdigit() else None


def _uid_columns(files: Sequence[Any]) -> bool:
    """Whether the table has the UID columns: any input that is (or, for a URL, may be) DICOM."""
    from .pipeline import RASTER_SUFFIXES

    for f in files:
        if isinstance(f, InputFile):
            if is_dicom_file(f.path):
                return True
        elif not f.rel.lower().endswith(RASTER_SUFFIXES):
            return True
    return False


def _identity(f: Any) -> dict[str, Any]:
    from .resume import input_identity

    return input_identity(f.path) if isinstance(f, InputFile) else f.identity()


def _previous_resume_key(out: Path) -> Any:
    try:
        return json.loads((out / RUN_JSON).read_text(encoding="utf-8")).get("resume_key")
    except (OSError, ValueError, AttributeError):
        return None


@dataclass
class Plan:
    """What a run has to do, after discovery, sharding and resume (shared by the engines)."""

    todo: list[Any]  # InputFile (paths) or sources.RemoteFile (URLs), in input order
    identities: dict[str, dict[str, Any]]  # File -> identity
    kept: list[InputRecord] | None  # records kept from an earlier run (None: a fresh folder)
    uid_columns: bool
    n_inputs: int
    remote: list[Any] = field(default_factory=list)  # DICOMweb instances (always fetched; not resumed)

    @classmethod
    def batch(cls, files: Sequence[InputFile], *, uid_columns: bool = True) -> "Plan":
        """A plan of ``files``, all to do: no discovery, shards or resume (the node's spooled batch,
        whose inputs were accepted as DICOM: the table has the UID columns)."""
        return cls(todo=list(files), identities={}, kept=None, uid_columns=uid_columns, n_inputs=len(files))

    def stamp(self, p: Prepared) -> Prepared:
        """Give a prepared input its identity (listing + the sha256 its preparation computed)."""
        p.identity = {**self.identities.get(p.file.rel, {}), **(p.identity or {})}
        return p


def plan_run(opts: PredictOptions) -> Plan:
    """Discover (or list) the inputs, keep this shard's, and find what an earlier run finished."""
    from .resume import completed_records, resume_key, shard_of

    if opts.engine == "ray":
        files: list[Any] = list_inputs(opts.inputs, exclude=opts.out, follow_links=opts.follow_links)
    else:
        files = discover_inputs(opts.inputs, opts.out, opts.follow_links) if opts.inputs or not opts.dicomweb else []
    remote = remote_items(opts)
    if not files and not remote:
        raise UsageError("no input files found in " + ", ".join(map(str, opts.inputs)))
    uid_columns = bool(remote) or _uid_columns(files)
    if opts.shard is not None:
        k, n = opts.shard
        files = [f for f in files if shard_of(f.rel, n) == k]
    identities = {f.rel: _identity(f) for f in files}
    kept = None
    out = opts.out
    if opts.resume and not remote and (out / "records.jsonl").is_file():
        if _previous_resume_key(out) == json.loads(json.dumps(resume_key(opts))):
            kept = completed_records(out, identities, sorted(run_formats(opts)))
        elif opts.progress:
            say(f"the earlier run in {out} used other options: starting afresh (its files are replaced)")
    done = {r.file for r in kept or ()}
    todo = [f for f in files if f.rel not in done]
    return Plan(todo=todo, identities=identities, kept=kept, uid_columns=uid_columns, n_inputs=len(files) + len(remote), remote=remote)


def run_formats(opts: PredictOptions) -> frozenset[str]:
    """The run's table formats: ``--engine ray`` always adds Parquet."""
    return opts.formats | {"parquet"} if opts.engine == "ray" else opts.formats


@contextmanager
def stop_when_full(out: Path, summary: RunSummary, n_inputs: int):
    """A full disk under ``out`` ends the run with one sentence: how many inputs are done (their
    rows are whole; the tables were closed) and that a rerun after freeing space finishes it."""
    try:
        yield
    except DiskFullError:
        from .records import RECORDS_JSONL, json_lines

        done = sum(1 for _ in json_lines(out / RECORDS_JSONL))  # the inputs whose record (and rows) are whole
        raise DiskFullError(
            f"the disk holding {out} is full: {done} of {n_inputs} inputs are done (their rows are complete); "
            f"free some space and run the same command again to finish the rest (it resumes)", path=out
        ) from None


def remote_items(opts: PredictOptions) -> list:
    """The DICOMweb sources' instances (QIDO-RS), listed before the run so it knows its size."""
    if not opts.dicomweb:
        return []
    from .dicomweb import expand_sources, parse_source

    return expand_sources([parse_source(s) for s in opts.dicomweb], opts.dicomweb_http)


def stow_outputs(opts: PredictOptions, summary: RunSummary) -> list[dict[str, Any]]:
    """--stow: send this run's DICOM outputs (SR, SC, result image) with STOW-RS; ``stow.json``."""
    from .dicomweb import stow
    from .records import read_records

    rels = [rel for rec in read_records(opts.out) for kind in ("sr", "result_image", "sc") for rel in rec.outputs.get(kind, [])]
    if opts.progress:
        say(f"sending {len(rels)} DICOM object(s) to {opts.stow} (STOW-RS) ...")
    results = [r.to_json() for r in stow(opts.stow, [opts.out / r for r in rels], http=opts.stow_http)]
    for r, rel in zip(results, rels):
        r["path"] = rel
    write_json_quietly(opts.out / "stow.json", {"url": opts.stow, "results": results}, summary, "the STOW-RS results")
    return results


def iter_inputs(files: list[InputFile], remote: Sequence, prep: PrepareOptions, workers: int, http: Any) -> Iterator[Prepared]:
    """Local files (worker pool), then the DICOMweb instances (fetched and prepared in turn)."""
    yield from iter_prepared(files, prep, workers=workers) if files else ()
    if remote:
        from .dicomweb import iter_remote_prepared

        yield from iter_remote_prepared(remote, prep, http)


def warn_synthetic(summary: RunSummary) -> None:
    if summary.synthetic:
        say("WARNING: running on SYNTHETIC weights: the scores are meaningless (see `cxr-lung-risk fetch-weights`)")


def _title(key: str) -> str:
    from .registry import spec_for

    return spec_for(key).title


def models_info(models: Sequence[Model]) -> dict[str, Any]:
    """run.json's ``models``: title, device, precision, weights identity and (models that choose
    one per architecture, :mod:`cxr_lung_risk.layout`) the inference layout per model."""
    out: dict[str, Any] = {}
    for m in models:
        out[m.spec.key] = {
            "title": m.spec.title,
            "device": m.placement.device_name,
            "precision": m.placement.precision,
            "weights": m.weights_identity,
        }
        layouts = getattr(m, "layouts", None)
        if layouts:
            out[m.spec.key]["layout"] = {arch: c.as_dict() for arch, c in layouts.items()}
    return out


def open_writer(opts: PredictOptions, plan: Plan, loaded: "Loaded", summary: RunSummary) -> OutputWriter:
    """The run's :class:`OutputWriter` (resuming when the plan kept records) and its run.json."""
    writer = OutputWriter(
        opts.out,
        loaded.models,
        loaded.columns(bool(plan.uid_columns)),
        formats=run_formats(opts),
        deterministic=opts.uid_policy,
        saliency=opts.saliency_method if opts.saliency else None,
        im_version=opts.im_version,
        sr_class=opts.sr_class,
        result_image=opts.result_image,
        value_columns=loaded.value_columns,
        resume=plan.kept,
    )
    write_json_quietly(opts.out / RUN_JSON, run_info(opts, loaded.info, plan.n_inputs), summary, "the run description")
    return writer


class Accounting:
    """Counts finished inputs into the summary and the progress display (every engine).
    ``stop_after``: end like Ctrl-C after that many inputs (the test hook :data:`STOP_AFTER_ENV`)."""

    def __init__(self, summary: RunSummary, n: int, *, progress: bool = False, stop_after: int | None = None) -> None:
        self.summary, self.show = summary, progress
        self.progress = Progress(n, desc="scoring", enabled=progress)
        self.stop_after = stop_after
        self.n = 0

    def finish(self, rec: InputRecord, done: float) -> None:
        self.summary.counts[str(rec.status)] = self.summary.counts.get(str(rec.status), 0) + 1
        self.progress.finish_input(rec.status, done)
        if rec.warnings and self.show:
            for w in rec.warnings:
                say(f"warning: {rec.file}: {w}")
        self.n += 1
        if self.stop_after is not None and self.n >= self.stop_after:
            raise KeyboardInterrupt(f"{STOP_AFTER_ENV}={self.stop_after}")

    def close(self) -> None:
        self.progress.close()


# --------------------------------------------------------------------------------- the runner
@dataclass
class Loaded:
    """What an engine loaded, as the run needs it to open its writer."""

    models: Sequence[Model]  # the models in this process ([] when they live elsewhere, e.g. Ray actors)
    weights: dict[str, dict[str, Any]]  # model key -> weights identity (summary, synthetic warning)
    info: dict[str, Any]  # run.json's ``models``
    columns: Callable[[bool], list[str]]  # uid_columns -> the table's columns
    value_columns: Sequence[str] | None = None  # when ``models`` is empty: the value columns


class Sink(Protocol):
    """Where an engine hands its results, in input order (the :class:`Job`: writer + accounting)."""

    timer: "PhaseTimer"

    def advance(self, fraction: float) -> None:
        """Progress: a further ``fraction`` of one input's work is done."""

    def unscored(self, p: Prepared) -> None:
        """An input that was skipped or failed before scoring: its record (and manifest row)."""

    def scored(self, batch: Sequence[Prepared], rows: Sequence[dict[str, Any]]) -> None:
        """A scored batch: its rows, DICOM objects and records."""

    def built(self, p: Prepared, row: dict[str, Any], built: Any) -> None:
        """One scored input whose DICOM objects an engine built elsewhere (as bytes)."""

    def flush(self) -> None:
        """Make what was written so far durable (tables closed after a batch)."""


class Engine(Protocol):
    """Moves batches: loads the models where they run, prepares and scores the plan's inputs and
    hands every result to the sink in input order. Writes nothing itself."""

    name: str
    stops_when_full: bool  # a full disk ends the run with the one-sentence summary

    def load(self, keys: Sequence[str], timer: "PhaseTimer", summary: RunSummary) -> Loaded: ...

    def move(self, plan: Plan, sink: Sink) -> None: ...

    def close(self) -> None: ...


def load_models(keys: Sequence[str], options: PredictOptions) -> list[Model]:
    """Load the models ``keys`` (registry keys) with the run's options, in output order."""
    return Scorer.load(keys, options_for=options.model_options).models


class LocalEngine:
    """Inputs decoded by a worker-process pool (DICOMweb instances fetched in turn), scored in
    batches of ``batch_size`` by the models in this process."""

    name = "local"
    stops_when_full = True

    def __init__(self, opts: PredictOptions) -> None:
        self.opts = opts
        self.scorer: Scorer | None = None

    def load(self, keys: Sequence[str], timer: "PhaseTimer", summary: RunSummary) -> Loaded:
        opts = self.opts
        t = time.perf_counter()
        models = load_models(keys, opts)
        timer.add("load", t)
        self.workers = default_workers() if opts.workers is None else opts.workers
        summary.timings["workers"] = self.workers
        scorer = self.scorer = Scorer(models, linkage=opts.linkage)
        return Loaded(models, {m.spec.key: dict(m.weights_identity) for m in models}, models_info(models),
                      lambda uid: scorer.columns(uid_columns=uid))

    def move(self, plan: Plan, sink: Sink) -> None:
        opts, timer, scorer = self.opts, sink.timer, self.scorer
        assert scorer is not None, "load() first"
        prep = PrepareOptions(selection=opts.selection, im_version=opts.im_version)

        def score(batch: list[Prepared]) -> None:
            t = time.perf_counter()
            n = len(batch)
            rows = scorer.score(batch, on_step=lambda f: sink.advance(f * STEP_MODELS * n))
            t = timer.add("infer", t)
            sink.scored(batch, rows)
            timer.add("write", t)

        batch: list[Prepared] = []
        stream = timer.timed("prepare", iter_inputs(plan.todo, plan.remote, prep, self.workers, opts.dicomweb_http))
        for p in stream:
            plan.stamp(p)
            if p.status is not Status.OK:
                sink.unscored(p)
                continue
            sink.advance(STEP_PREPARED)
            batch.append(p)
            if len(batch) >= opts.batch_size:
                score(batch)
                batch = []
        if batch:
            score(batch)

    def close(self) -> None:
        pass


class Job:
    """The core every way in shares: the engine loads (:meth:`load`), then moves the plan's inputs
    while this job, its :class:`Sink`, writes each result through ``writer`` and accounts it
    (:meth:`move`). Writes nothing else: no lock, no run.json (that is :class:`Run`'s; the node
    commits its work folder itself). ``keep_records``: keep every record, in the order written
    (the node's one batch; a ``predict`` run has them in ``records.jsonl``)."""

    def __init__(self, engine: Engine, summary: RunSummary, timer: PhaseTimer | None = None, *, progress: bool = False,
                 stop_after: int | None = None, keep_records: bool = False) -> None:
        self.engine, self.summary = engine, summary
        self.timer = timer if timer is not None else PhaseTimer()
        self.progress, self.stop_after = progress, stop_after
        self.records: list[InputRecord] | None = [] if keep_records else None
        self.writer: OutputWriter | None = None
        self.acc: Accounting | None = None

    def load(self, keys: Sequence[str]) -> Loaded:
        """The engine loads the models ``keys`` (or hands over those it holds)."""
        loaded = self.engine.load(keys, self.timer, self.summary)
        self.summary.weights = loaded.weights
        return loaded

    def move(self, plan: Plan, writer: OutputWriter) -> list[InputRecord]:
        """The engine moves ``plan``'s inputs; each result is written by ``writer`` (closed at the
        end) and accounted. Returns the records kept (``keep_records``), else []."""
        self.writer = writer
        self.acc = Accounting(self.summary, len(plan.todo) + len(plan.remote), progress=self.progress, stop_after=self.stop_after)
        try:
            self.engine.move(plan, self)
        finally:
            self.acc.close()
            writer.close()
        return list(self.records or ())

    # ------------------------------------------------------------------ the sink
    def _finish(self, rec: InputRecord, done: float) -> None:
        if self.records is not None:
            self.records.append(rec)
        self.acc.finish(rec, done)

    def advance(self, fraction: float) -> None:
        self.acc.progress.advance(fraction)

    def unscored(self, p: Prepared) -> None:
        self._finish(self.writer.account(p), 0.0)

    def scored(self, batch: Sequence[Prepared], rows: Sequence[dict[str, Any]]) -> None:
        for rec in self.writer.write_scored(batch, rows):
            self._finish(rec, 1.0 - STEP_WRITTEN)

    def built(self, p: Prepared, row: dict[str, Any], built: Any) -> None:
        self._finish(self.writer.write_built(p, row, built), STEP_PREPARED)

    def flush(self) -> None:
        self.writer.flush()


class Run:
    """One ``predict`` run around one :class:`Job`: lock ``out``, plan, load (the engine), open
    the writer and run.json, let the job move the inputs, ``--stow``, timings. Returns a
    :class:`RunSummary`; never exits the process."""

    def __init__(self, opts: PredictOptions, engine: Engine | None = None) -> None:
        self.opts = opts
        self.engine = engine if engine is not None else LocalEngine(opts)
        self.timer = PhaseTimer()

    def _score(self, plan: Plan, keys: Sequence[str], summary: RunSummary) -> None:
        opts, engine = self.opts, self.engine
        job = Job(engine, summary, self.timer, progress=opts.progress, stop_after=stop_after())
        try:
            loaded = job.load(keys)
            warn_synthetic(summary)
            with stop_when_full(opts.out, summary, plan.n_inputs) if engine.stops_when_full else nullcontext():
                job.move(plan, open_writer(opts, plan, loaded, summary))
        finally:
            engine.close()

    def execute(self) -> RunSummary:
        opts, timer = self.opts, self.timer
        opts.validate()
        keys = resolve_models(opts.models)
        out = opts.out
        prepare_out(out)
        with OutputLock(out) as lock:
            plan = plan_run(opts)
            summary = RunSummary(out=out, inputs=plan.n_inputs)
            summary.warnings.extend(lock.warnings)
            for r in plan.kept or ():
                summary.counts[str(r.status)] = summary.counts.get(str(r.status), 0) + 1
            summary.resumed = len(plan.kept or ())
            todo = len(plan.todo) + len(plan.remote)
            if opts.progress:
                shard = f" (shard {opts.shard[0]}/{opts.shard[1]})" if opts.shard else ""
                done = f"; {summary.resumed} already done in {out}, {todo} to do" if plan.kept is not None else ""
                titles = ", ".join(_title(k) for k in keys)
                loading = f"; loading {titles} (device {opts.device}, precision {opts.precision}) ..." if todo and opts.engine != "ray" else ""
                say(f"{plan.n_inputs} input file(s) found{shard}{done}{loading}")
            if todo:
                self._score(plan, keys, summary)
            if opts.stow:
                t = time.perf_counter()
                summary.stow = stow_outputs(opts, summary)
                timer.phases["send"] = time.perf_counter() - t
        extra = {k: v for k, v in summary.timings.items() if k not in timer.phases and k != "workers"}
        tm = timer.as_dict(inputs=plan.n_inputs, scored=summary.scored, resumed=summary.resumed, done_now=len(plan.todo) + len(plan.remote),
                           workers=summary.timings.get("workers"), batch_size=opts.batch_size, engine=opts.engine, **extra)
        summary.timings = tm
        if opts.timings is not None:
            write_json_quietly(Path(opts.timings), tm, summary, "the timings file")
        return summary


def run_info(opts: PredictOptions, models: dict[str, Any], n_inputs: int) -> dict[str, Any]:
    import torch

    from .resume import resume_key

    return {
        "software": {"name": "cxr-lung-risk", "version": __version__, "torch": torch.__version__},
        "inputs": [str(p) for p in opts.inputs] + list(opts.dicomweb),
        "n_inputs": n_inputs,
        "engine": opts.engine,
        "shard": list(opts.shard) if opts.shard else None,
        "models": models,
        "options": {
            "batch_size": opts.batch_size,
            "formats": sorted(run_formats(opts)),
            "per_model": opts.per_model,
            "all_members": opts.all_members,
            "deterministic": opts.deterministic,
            "tta": opts.tta,
            "saliency": opts.saliency_method if opts.saliency else None,
            "im_version": opts.im_version,
            "linkage_columns": opts.linkage,
            "result_image": opts.result_image,
            "sr_class": opts.sr_class,
            "stow": opts.stow,
        },
        "resume_key": resume_key(opts),
    }


