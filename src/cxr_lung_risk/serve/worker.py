"""The scoring worker: spooled instances -> batches -> the job runner -> outbox entries.

What is the job runner's (:mod:`cxr_lung_risk.jobs`, the same code path as ``predict``): each batch
is one :class:`~cxr_lung_risk.jobs.Job` -- :meth:`~cxr_lung_risk.jobs.Plan.batch` plans it,
:class:`NodeEngine` (this node's engine: it holds the models the node loaded once, at start)
prepares and scores it, the job writes the same tables, SRs and records as ``predict`` and
accounts each input. What is the node's (here): when a batch is due (:func:`next_batch`), the
writer's options (stable UIDs, csv + json + sr, + fhir when a FHIR destination exists, the result
image), the work folder committed into ``results/`` by one rename, an outbox entry per
destination, the audit log and the metrics. Instances are decoded ahead -- as they arrive, and
while a batch is written -- by the decode processes of a :class:`~cxr_lung_risk.pipeline.PrepareAhead`
(``--workers``; the same fences as ``predict``'s), which pauses while the models run.

A study is scored as soon as the association that delivered its last instance is released (the
sender says it is done: an idle node scores one image without waiting), else when no instance of
it arrived for ``quiet_time`` seconds (a sender that keeps its association open, a restart), or
earlier when the instances waiting fill a batch (oldest first: under load the node batches). A batch's outputs are written into ``work/``,
committed into ``results/`` by one rename, then each instance gets its outbox entries (one per
destination) and moves ``incoming -> scored``; see :mod:`.spool` for why a crash at any point
loses nothing and queues nothing twice.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Mapping, Sequence

from .. import api
from ..dicom_io import InputFile
from ..jobs import Job, Loaded, Plan, RunSummary, Sink
from ..outputs.writer import OutputWriter
from ..pipeline import PrepareAhead, PrepareOptions, Prepared, iter_prepared
from .audit import AuditLog
from .config import ServeConfig
from .metrics import Metrics
from .spool import Pending, Spool

__all__ = ["Worker", "NodeEngine", "next_batch", "serve_workers"]

LOG = logging.getLogger("cxr_lung_risk.serve")

FORMATS = ("csv", "json", "sr")


def next_batch(pending: Sequence[Pending], now: float, quiet_time: float, batch_size: int,
               released: Mapping[str, float] | None = None) -> list[Pending]:
    """The instances to score now: a full batch of the oldest when enough wait, else every
    instance of the studies that are complete -- quiet for ``quiet_time``, or whose last instance
    came before an association that delivered the study was released (``released``: study ->
    time of the latest such release) -- at most a batch."""
    if len(pending) >= batch_size:
        return list(pending[:batch_size])
    released = released or {}
    last: dict[str, float] = {}
    for p in pending:
        last[p.study] = max(last.get(p.study, 0.0), p.received)
    ready = {s for s, t in last.items() if now - t >= quiet_time or released.get(s, -1.0) >= t}
    return [p for p in pending if p.study in ready][:batch_size]


class NodeEngine:
    """The node's :class:`~cxr_lung_risk.jobs.Engine`: it holds the scorer the node loaded once, at
    start, and moves one spooled batch -- prepared by ``prepared`` (the worker's decode processes,
    ahead of scoring; default: in this process), its accepted inputs scored in one step, handed
    to the job before the skipped and failed ones. A scoring error fails the batch's accepted
    inputs with the reason instead of ending anything (the node carries on)."""

    name = "serve"
    stops_when_full = False  # a full spool disk fails the batch; it stays queued

    def __init__(self, scorer: Any, prepare_options: PrepareOptions,
                 prepared: Callable[[Sequence[InputFile]], Iterable[Prepared]] | None = None,
                 scoring: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> None:
        self.scorer, self.prepare_options = scorer, prepare_options
        self.prepared = prepared or (lambda files: iter_prepared(files, prepare_options))
        self.scoring = scoring  # the block the models run in (the worker pauses decoding in it)
        self.keys = [m.spec.key for m in scorer.models]

    def load(self, keys: Sequence[str], timer: Any, summary: RunSummary) -> Loaded:
        scorer = self.scorer  # loaded at the node's start: nothing to load per batch
        return Loaded(scorer.models, {m.spec.key: dict(m.weights_identity) for m in scorer.models},
                      {},  # run.json's models: the node writes no run.json
                      lambda uid: scorer.columns(uid_columns=uid))

    def move(self, plan: Plan, sink: Sink) -> None:
        timer = sink.timer
        prepared = [plan.stamp(p) for p in timer.timed("prepare", iter(self.prepared(plan.todo)))]
        ok = [p for p in prepared if p.status is api.Status.OK]
        if ok:
            t = time.perf_counter()
            try:
                with self.scoring():
                    rows = self.scorer.score(ok)
            except Exception as e:  # noqa: BLE001 - recorded per input
                LOG.exception("scoring failed")
                reason = f"failed: scoring failed: {type(e).__name__}: {str(e)[:160]}"
                for p in ok:
                    p.status, p.reason = api.Status.FAILED, reason
                ok = []
            else:
                t = timer.add("infer", t)
                sink.scored(ok, rows)
                timer.add("write", t)
        scored = {id(p) for p in ok}
        for p in prepared:
            if id(p) not in scored:
                sink.unscored(p)

    def close(self) -> None:
        pass


def spool_file(p: Pending) -> InputFile:
    """A spooled instance as a job's input: ``File`` is ``<study>/<sop>.dcm``."""
    return InputFile(p.path, f"{p.study}/{p.sop}.dcm", source=p.path)


def serve_workers() -> int:
    """The node's decode processes: one per core (at most 8). Unlike ``predict``'s (cores - 1),
    they decode only while the models do not run (:meth:`PrepareAhead.paused`), so every core
    can decode; measured faster than one process less on 2 cores (``bench_pacs.py``)."""
    return max(1, min(8, os.cpu_count() or 1))


def _ahead_key(p: Pending) -> tuple[str, int]:
    """What a prepared instance is known by: its spool path and time (a re-sent instance replaces
    the file under the same name and is prepared again)."""
    return (str(p.path), p.received_ns)


def _listed(pending: Sequence[Pending]) -> Iterable[tuple[tuple[str, int], InputFile]]:
    """The spool's instances as the decode stage wants them: (key, input), oldest first."""
    return ((_ahead_key(p), spool_file(p)) for p in pending)


class Worker(threading.Thread):
    def __init__(
        self,
        cfg: ServeConfig,
        spool: Spool,
        scorer: Any,
        audit: AuditLog,
        metrics: Metrics,
        stop: threading.Event,
        on_queued: Callable[[], None] = lambda: None,
        released: Callable[[], Mapping[str, float]] = dict,
    ) -> None:
        super().__init__(name="serve-worker", daemon=True)
        self.cfg, self.spool, self.scorer, self.audit, self.metrics = cfg, spool, scorer, audit, metrics
        self.stop_event = stop
        self.wake = threading.Event()
        self.on_queued = on_queued
        self.released = released  # study -> when an association that delivered it was released
        self.prepare_options = PrepareOptions(selection=cfg.selection, im_version=cfg.im_version)
        self.workers = serve_workers() if cfg.workers is None else cfg.workers
        self.ahead: PrepareAhead | None = None  # started by run(): its decode processes belong to this thread's node
        self._keys: dict[Path, tuple[str, int]] = {}  # the batch being scored: input path -> key
        self.engine = NodeEngine(scorer, self.prepare_options, prepared=self._prepared, scoring=self._scoring)
        self.busy = False
        self.error: str = ""
        self.batches = 0

    def _prepared(self, files: Sequence[InputFile]) -> Iterable[Prepared]:
        """The batch's inputs, prepared ahead (decode processes) while the previous batch was scored."""
        if self.ahead is None:
            return iter_prepared(files, self.prepare_options)
        return (self.ahead.take(self._keys[f.path], f) for f in files)

    def _scoring(self) -> ContextManager[Any]:
        return self.ahead.paused() if self.ahead is not None else contextlib.nullcontext()

    def run(self) -> None:
        self.ahead = PrepareAhead(self.prepare_options, self.workers, window=2 * self.cfg.batch_size,
                                  source=lambda: _listed(self.spool.pending()))
        try:
            self._loop()
        finally:
            self.ahead.close()

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                pending = self.spool.pending()
                self.metrics.queue_depth.labels(stage="incoming").set(len(pending))
                self.ahead.want(_listed(pending))
                batch = next_batch(pending, time.time(), self.cfg.quiet_time, self.cfg.batch_size, self.released())
                if batch:
                    self.busy = True
                    self.spool.begin_batch(batch)
                    try:
                        self.process(batch)
                    finally:
                        self.busy = False
                        self.spool.end_batch()
                        self.ahead.forget(_ahead_key(p) for p in batch)  # scored, or queued to be taken again
                    continue
            except Exception as e:  # noqa: BLE001 - the worker must survive; the batch stays queued
                self.error = f"{type(e).__name__}: {e}"
                LOG.exception("scoring batch failed; it stays in the spool and is retried")
                self.audit.write("worker_error", error=self.error[:300])
                self.stop_event.wait(max(1.0, self.cfg.poll * 4))
            self.wake.wait(self.cfg.poll)
            self.wake.clear()

    # ------------------------------------------------------------------ one batch
    def _writer(self, out: Path, loaded: Loaded, plan: Plan) -> OutputWriter:
        kw: dict[str, Any] = {"result_image": True} if self.cfg.result_image else {}
        formats = FORMATS + (("fhir",) if any(d.kind == "fhir" for d in self.cfg.destinations) else ())
        return OutputWriter(out, loaded.models, loaded.columns(plan.uid_columns), formats=formats, deterministic="stable",
                            im_version=self.cfg.im_version, sr_class=self.cfg.sr_class, **kw)

    def process(self, batch: Sequence[Pending]) -> None:
        """One batch: a job of the runner into a new work folder, committed by one rename; then
        each instance's outbox entries, audit line and metrics."""
        t0 = time.time()
        for p in batch:
            self.metrics.observe("queue", t0 - p.received)
        work = self.spool.new_batch_dir()
        try:
            plan = Plan.batch([spool_file(p) for p in batch])
            self._keys = {p.path: _ahead_key(p) for p in batch}
            job = Job(self.engine, RunSummary(out=work, inputs=plan.n_inputs), keep_records=True)
            loaded = job.load(self.engine.keys)
            records = {rec.file: rec for rec in job.move(plan, self._writer(work, loaded, plan))}
            t_scored = time.time()
            ph = job.timer.phases
            LOG.info("batch of %d: %.2f s waiting for decoding (done ahead, %s), %.2f s models, %.2f s writing", len(batch),
                     ph["prepare"], f"{self.workers} decode process(es)" if self.workers else "in the node's process",
                     ph["infer"], ph["write"])
            results = self.spool.commit_batch(work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        self.batches += 1
        per = (t_scored - t0)
        for p, f in zip(batch, plan.todo):
            self._finish(p, records[f.rel], results, t_scored, per)
        self.on_queued()

    def _finish(self, p: Pending, rec: Any, results: Path, t_scored: float, batch_s: float) -> None:
        status = str(rec.status)
        base = {"sop_uid": rec.sop_uid or p.sop, "study_uid": rec.study_uid or p.study, "batch": results.name}
        if rec.status is api.Status.OK:
            dicom = [results / rel for rels in rec.outputs.values() for rel in rels if rel.lower().endswith(".dcm")]
            fhir = [results / rel for rel in rec.outputs.get("fhir", [])]
            for dest in self.cfg.destinations:
                files = fhir if dest.kind == "fhir" else dicom
                meta = {
                    "destination": str(dest), "source_sop_uid": base["sop_uid"], "study_uid": base["study_uid"],
                    "received": p.received, "scored": t_scored, "batch": results.name,
                }
                if self.spool.enqueue(dest.key, p.entry_id, files, meta):
                    self.metrics.queue_depth.labels(stage="outbox").inc()
            self.metrics.scored.inc()
            self.metrics.observe("score", batch_s)
            values = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in (rec.values or {}).items())
            LOG.info("scored %s (%s); %d destination(s) queued", base["sop_uid"], values or "no values", len(self.cfg.destinations))
            self.audit.write("scored", **base, values=rec.values, outputs=sorted(r for rels in rec.outputs.values() for r in rels),
                             warnings=rec.warnings or None)
        else:
            (self.metrics.skipped if rec.status is api.Status.SKIPPED else self.metrics.failed).inc()
            LOG.log(logging.WARNING if rec.status is api.Status.FAILED else logging.INFO, "%s %s: %s", status, base["sop_uid"], rec.reason)
            self.audit.write(status, **base, reason=rec.reason)
        self.spool.mark_scored(p)
