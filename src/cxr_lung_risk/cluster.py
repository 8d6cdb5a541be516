"""``predict --engine ray``: score an archive on a Ray cluster (``pip install 'cxr-lung-risk[ray]'``).

Stages, each where it scales:

* **list** (the driver): local folders through :func:`~cxr_lung_risk.dicom_io.discover` (the same
  ``File`` names as the local engine), object-store URLs (``s3://``, ``gs://``, ``file://``, any
  fsspec or pyarrow file system) through the file system's listing; no local copy of the archive;
* **read + prepare** (CPU tasks, ``batch_size`` inputs per task, retried when a worker dies): the
  bytes come from the file system API (a local path is read where the task runs, so it must be
  visible there: a shared file system), then :func:`cxr_lung_risk.api.prepare_input`;
* **score** (actors, each loads the models once; one GPU per actor where the cluster has GPUs):
  batches of ``batch_size`` prepared images, plus the DICOM SR of each scored image as bytes
  (:class:`~cxr_lung_risk.outputs.writer.ObjectBuilder`; UIDs derived from the source, so a retried
  batch makes identical objects);
* **write** (the driver, the only writer of ``--out``): the same CSV/JSON, manifest, records and
  SR files as the local engine, in the same order, plus ``parquet/part-*.parquet``.

Batches are formed from the prepared inputs in input order and written in input order, so a run
equals the local engine's run with the same ``--batch-size`` row for row. Ray is imported only
here, lazily; the core package never needs it.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .dicom_io import InputFile
from .options import PredictOptions
from .pipeline import PrepareOptions, Prepared
from .progress import say
from .records import Status
from .sources import RAY_HINT, RayError, RemoteFile, list_inputs, open_fs  # noqa: F401  (listing lives in sources)

__all__ = ["RayEngine", "RemoteFile", "list_inputs", "open_fs", "FAULT_ENV", "LOCAL_NODE_IP"]

#: Fault injection for tests: ``"N:MARKER"`` makes the worker preparing the N-th input (0-based,
#: in this run's order) exit abruptly, once (the MARKER file records that it happened).
FAULT_ENV = "CXR_LUNG_RISK_TEST_PREPARE_EXIT"
#: The address of a Ray started for one run. Ray replaces 127.0.0.1 (and "localhost") with the
#: machine's network address; 127.0.0.2 is loopback too (all of 127.0.0.0/8 is, on Linux) and Ray
#: keeps it, so a run's Ray talks over loopback only.
LOCAL_NODE_IP = "127.0.0.2"


# ------------------------------------------------------------------------------ tasks and actors
def _maybe_fault(index: int, fault: str | None) -> None:
    if not fault:
        return
    n, _, marker = fault.partition(":")
    if n.strip().isdigit() and int(n) == index and marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(f"{os.getpid()}\n")
        os._exit(17)  # the worker dies as if killed: Ray retries the task elsewhere


def prepare_chunk(items: list[tuple[int, Any]], prep: PrepareOptions, fault: str | None = None) -> tuple[list[Prepared], dict[str, float]]:
    """A CPU task: read and prepare ``items`` ((index, InputFile | RemoteFile) pairs)."""
    from . import api
    from .pipeline import prepare

    out, read_s, prep_s = [], 0.0, 0.0
    for index, f in items:
        _maybe_fault(index, fault)
        t0 = time.perf_counter()
        if isinstance(f, InputFile):
            p = prepare(f, prep)
            t1 = t0
        else:
            try:
                data = f.fs.cat_file(f.path)
            except Exception as e:  # noqa: BLE001 - an object that cannot be read fails alone
                data = None
                p = Prepared(InputFile(Path(f.rel), f.rel), Status.FAILED, f"failed: could not read {f.url}: {type(e).__name__}: {str(e)[:160]}",
                             input_name=f.url)
            t1 = time.perf_counter()
            if data is not None:
                p = api.prepare_input(data, name=f.url, rel=f.rel, options=prep)
                del data
        t2 = time.perf_counter()
        read_s += t1 - t0
        prep_s += t2 - t1
        out.append(p)
    return out, {"read_s": read_s, "prepare_s": prep_s}


class ScoreActor:
    """Loads the models once; scores batches and builds their SRs (as bytes)."""

    def __init__(self, opts: PredictOptions, threads: int | None = None) -> None:
        import torch

        from .outputs.writer import ObjectBuilder
        from .jobs import models_info
        from .scoring import Scorer

        if threads:  # Ray gives a worker OMP_NUM_THREADS=1: use the local engine's thread count
            torch.set_num_threads(threads)  # (the same arithmetic, so the same scores to the last bit)
        t = time.perf_counter()
        self.scorer = Scorer.load(opts.models, options_for=opts.model_options, linkage=opts.linkage)
        self.builder = ObjectBuilder(self.scorer.models, formats=opts.formats, deterministic=opts.uid_policy, im_version=opts.im_version,
                                     sr_class=opts.sr_class)
        self.info_ = {
            "models": models_info(self.scorer.models),
            "weights": {m.spec.key: dict(m.weights_identity) for m in self.scorer.models},
            "value_columns": self.scorer.value_columns,
            "columns": {True: self.scorer.columns(True), False: self.scorer.columns(False)},
            "load_s": time.perf_counter() - t,
            "pid": os.getpid(),
        }

    def info(self) -> dict[str, Any]:
        return self.info_

    def score(self, batch: list[Prepared]) -> tuple[list[dict[str, Any]], list[Any], dict[str, float]]:
        t0 = time.perf_counter()
        rows = self.scorer.score(batch)
        t1 = time.perf_counter()
        built = [self.builder.build(p, r) for p, r in zip(batch, rows)]
        return rows, built, {"infer_s": t1 - t0, "build_s": time.perf_counter() - t1}


# ------------------------------------------------------------------------------ driver
def _import_ray():
    try:
        import ray
    except ImportError:
        raise RayError(RAY_HINT) from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Connect to Ray; True when this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
    if address:
        try:
            ray.init(address=address, **kw)
        except Exception as e:  # noqa: BLE001
            raise RayError(f"cannot connect to the Ray cluster at {address}: {e}") from None
    else:
        import sys

        if sys.platform.startswith("linux"):
            kw["_node_ip_address"] = LOCAL_NODE_IP
        ray.init(**kw)
    return True


@dataclass
class _Batch:
    items: list[Prepared]
    ref: Any = None
    actor: int = 0
    result: Any = None
    tries: int = 0


class RayEngine:
    """The :class:`~cxr_lung_risk.jobs.Engine` of ``--engine ray``: prepare tasks and scoring
    actors on a Ray cluster (see the module docstring); results go to the run in input order."""

    name = "ray"
    stops_when_full = False

    def __init__(self, opts: PredictOptions) -> None:
        self.opts = opts
        self.ray: Any = None
        self.started = False
        self.actors: list[Any] = []

    def load(self, keys: Sequence[str], timer: Any, summary: Any) -> Any:
        from .jobs import Loaded

        opts = self.opts
        ray = self.ray = _import_ray()
        self.started = _connect(ray, opts.ray_address)
        self.summary = summary
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if opts.device != "cpu" else 0
        self.cpus = max(1, int(resources.get("CPU", 1)))
        self.n_actors = opts.ray_actors or max(1, gpus)
        actor_opts = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        actor_cls = ray.remote(max_restarts=2, max_task_retries=2, **actor_opts)(ScoreActor)
        if opts.progress:
            say(f"Ray: {self.cpus} CPU(s), {gpus} GPU(s); {self.n_actors} scoring actor(s) loading the models ...")
        t = time.perf_counter()
        import torch

        threads = None if gpus else torch.get_num_threads()
        self.actors = [actor_cls.remote(opts, threads) for _ in range(self.n_actors)]
        info = self.info = ray.get(self.actors[0].info.remote())
        timer.add("load", t)
        return Loaded([], info["weights"], info["models"], lambda uid: info["columns"][uid], value_columns=info["value_columns"])

    def move(self, plan: Any, sink: Any) -> None:
        _drive(self.ray, self.opts, plan, sink, self.actors, self.info, self.cpus, self.summary)

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
        if self.started:
            self.started = False
            self.ray.shutdown()


def _drive(ray, opts, plan, sink, actors, info, cpus, summary) -> None:
    timer = sink.timer
    n_actors = len(actors)
    prep_task = ray.remote(num_cpus=1, max_retries=3)(prepare_chunk)
    prep = PrepareOptions(selection=opts.selection, im_version=opts.im_version)
    fault = os.environ.get(FAULT_ENV) or None
    stage = {"read_s": 0.0, "prepare_s": 0.0, "infer_s": 0.0, "build_s": 0.0}

    chunk = max(1, opts.batch_size)
    indexed = list(enumerate(plan.todo))
    chunks = [indexed[i:i + chunk] for i in range(0, len(indexed), chunk)]
    max_prep = max(2, 2 * cpus)  # prepare tasks in flight
    max_batches = 2 * n_actors  # scoring batches in flight
    pending_prep: dict[Any, tuple[int, int | None]] = {}  # ref -> (chunk index, position when retried alone)
    ready_chunks: dict[int, list[Prepared]] = {}
    split: dict[int, list[Any]] = {}  # chunk index -> per-item results while retried one by one
    next_submit = next_consume = 0
    events: deque = deque()  # in input order: ("account", Prepared) | ("batch", _Batch)
    open_batch: list[Prepared] = []
    inflight: dict[Any, _Batch] = {}
    rr = 0

    def submit_batch(b: _Batch) -> None:
        nonlocal rr
        b.actor = rr % n_actors
        rr += 1
        b.ref = actors[b.actor].score.remote(b.items)
        inflight[b.ref] = b

    def close_batch() -> None:
        nonlocal open_batch
        if open_batch:
            b = _Batch(open_batch)
            submit_batch(b)
            events.append(("batch", b))
            open_batch = []

    def flush_events() -> None:
        t = time.perf_counter()
        wrote = False
        while events:
            kind, x = events[0]
            if kind == "account":
                sink.unscored(x)
            else:
                if x.result is None:
                    break
                rows, built = x.result
                for p, row, b in zip(x.items, rows, built):
                    sink.built(p, row, b)
                wrote = True
            events.popleft()
        if wrote:
            sink.flush()
        timer.add("write", t)

    while next_consume < len(chunks):
        while next_submit < len(chunks) and len(pending_prep) < max_prep and next_submit - next_consume < max_prep * 2:
            pending_prep[prep_task.remote(chunks[next_submit], prep, fault)] = (next_submit, None)
            next_submit += 1
        # consume prepared chunks in order while there is room for their batches
        while next_consume in ready_chunks and len(inflight) < max_batches:
            for p in ready_chunks.pop(next_consume):
                plan.stamp(p)
                if p.status is Status.OK:
                    sink.advance(0.1)
                    open_batch.append(p)
                    if len(open_batch) >= opts.batch_size:
                        close_batch()
                else:
                    events.append(("account", p))
            next_consume += 1
            if next_consume == len(chunks):
                close_batch()
        flush_events()
        if next_consume >= len(chunks):
            break
        waiting = list(pending_prep) + list(inflight)
        if not waiting:
            continue
        done, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
        for ref in done:
            if ref in pending_prep:
                ci, pos = pending_prep.pop(ref)
                try:
                    prepared, st = ray.get(ref)
                    stage["read_s"] += st["read_s"]
                    stage["prepare_s"] += st["prepare_s"]
                except ray.exceptions.RayError as e:
                    prepared = _chunk_failed(e, ci, pos, chunks, split, pending_prep, prep_task, prep)
                if prepared is None:
                    continue
                if pos is None:
                    ready_chunks[ci] = prepared
                else:
                    split[ci][pos] = prepared[0]
                    if None not in split[ci]:
                        ready_chunks[ci] = split.pop(ci)
            else:
                _batch_done(ray, ref, inflight, submit_batch, stage)
    close_batch()
    while events:
        flush_events()
        if events and inflight:
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in done:
                _batch_done(ray, ref, inflight, submit_batch, stage)
    summary.timings.update({k: round(v, 4) for k, v in stage.items()})
    summary.timings["load_s_actor"] = info.get("load_s")
    summary.timings["actors"] = n_actors
    summary.timings["workers"] = cpus


def _chunk_failed(err, ci, pos, chunks, split, pending_prep, prep_task, prep) -> list[Prepared] | None:
    """A prepare task failed for good (its worker died on every try). A chunk's inputs are then
    retried one by one (once each, without fault injection); an input whose own task fails too
    is recorded as failed (returned)."""
    if pos is None:
        split[ci] = [None] * len(chunks[ci])
        for k, item in enumerate(chunks[ci]):
            pending_prep[prep_task.options(max_retries=1).remote([item], prep, None)] = (ci, k)
        return None
    _, f = chunks[ci][pos]
    reason = f"failed: the worker preparing this input died ({type(err).__name__})"
    name = getattr(f, "url", None)
    return [Prepared(InputFile(Path(f.rel), f.rel) if name else f, Status.FAILED, reason, input_name=name or "")]


def _batch_done(ray, ref, inflight, submit_batch, stage) -> None:
    b = inflight.pop(ref)
    try:
        rows, built, st = ray.get(ref)
        stage["infer_s"] += st["infer_s"]
        stage["build_s"] += st["build_s"]
        b.result = (rows, built)
    except ray.exceptions.RayError as e:
        b.tries += 1
        if b.tries <= 2:
            submit_batch(b)
            return
        raise RayError(f"scoring failed on the cluster: {type(e).__name__}: {str(e)[:300]}") from None
