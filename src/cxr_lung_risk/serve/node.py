"""Start and stop the node: spool, listener, worker, senders, HTTP endpoint, audit log.

Order at start: open the spool (lock, crash recovery), start listening (instances are accepted
and spooled while the models load), load the models once, start the worker and the senders.
SIGTERM/SIGINT: stop accepting associations, let the worker finish its batch (or leave it
queued in the spool after ``drain_timeout``), let each sender finish its round, flush the audit
log, exit 0.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any, Callable

from .. import __version__
from .audit import AuditLog
from .config import ServeConfig, describe
from .metrics import HttpEndpoint, Metrics
from .outbox import Sender
from .scp import StoreSCP
from .status import StatusBoard
from .spool import Spool
from .worker import Worker

__all__ = ["Node", "run_serve"]

LOG = logging.getLogger("cxr_lung_risk.serve")
MAX_CRASHES = 3  # an instance in flight at this many crashes is quarantined (a poison pill)


def _say(msg: str, level: int = logging.INFO) -> None:
    """The node's messages go through its one log format (see :func:`configure_logging`)."""
    LOG.log(level, msg)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging() -> None:
    """One format for the node's, pynetdicom's and the libraries' messages, on stderr: the node's
    INFO lines (received, ignored, refused, scored, delivered), WARNING and up from the rest."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("cxr_lung_risk").setLevel(logging.INFO)
    for name in ("pynetdicom", "highdicom", "pydicom"):
        lg = logging.getLogger(name)
        lg.handlers = [h for h in lg.handlers if isinstance(h, logging.NullHandler)]
        lg.propagate = True
        lg.setLevel(logging.WARNING)


class Node:
    def __init__(self, cfg: ServeConfig, drain_timeout: float = 120.0) -> None:
        self.cfg = cfg
        self.drain_timeout = drain_timeout
        self.stop_event = threading.Event()
        self.metrics = Metrics()
        self.spool: Spool | None = None
        self.audit: AuditLog | None = None
        self.scp: StoreSCP | None = None
        self.http: HttpEndpoint | None = None
        self.worker: Worker | None = None
        self.senders: list[Sender] = []
        self.state = "starting"
        self.status = StatusBoard(self)  # the status page on the metrics port

    def health(self) -> dict[str, Any]:
        w = self.worker
        alive = w is not None and w.is_alive()
        status = "ok" if self.state == "running" and alive and self.scp is not None else self.state if self.state != "running" else "degraded"
        n = self.cfg.degraded_after
        failing = [s for s in self.senders if n and s.failures >= n]
        if status == "ok" and failing:
            status = "degraded"  # a destination keeps failing: results pile up in the outbox
        return {
            "status": status,
            "reason": (f"{len(failing)} destination(s) failed {n} or more delivery rounds in a row: "
                       + "; ".join(f"{s.label}: {s.last_error}" for s in failing)) if failing else None,
            "version": __version__,
            "ae_title": self.cfg.ae_title,
            "dicom_port": self.scp.port if self.scp else None,
            "incoming": len(self.spool.pending()) if self.spool else None,
            "outbox": self.spool.outbox_depth() if self.spool else None,
            "worker_busy": bool(w and w.busy),
            "worker_error": (w.error if w else "") or None,
            "destinations": [{"destination": s.label, "consecutive_failures": s.failures, "last_error": s.last_error or None}
                             for s in self.senders],
        }

    def start(self) -> "Node":
        cfg = self.cfg
        self.spool = Spool(cfg.spool).open()
        self.audit = self.status.tee(AuditLog(cfg.audit_path))
        for rel, n in self.spool.recover_inflight(MAX_CRASHES):
            _say(f"quarantined {rel}: it was being scored at {n} crashes of the node", logging.WARNING)
            self.metrics.failed.inc()
            self.audit.write("failed", spool=rel, reason=f"failed: the node died {n} times while scoring it; moved to quarantine/")
        requeued = self.spool.pending()
        outbox = self.spool.outbox_depth()
        self.metrics.queue_depth.labels(stage="incoming").set(len(requeued))
        self.metrics.queue_depth.labels(stage="outbox").set(outbox)
        self.audit.write("start", version=__version__, ae_title=cfg.ae_title, port=cfg.port, requeued=len(requeued), outbox=outbox,
                         destinations=[str(d) for d in cfg.destinations])
        if requeued or outbox:
            _say(f"resuming: {len(requeued)} received instance(s) to score, {outbox} result(s) to deliver")
        wake = lambda *_: self.worker and self.worker.wake.set()  # noqa: E731
        self.scp = StoreSCP(cfg, self.spool, self.audit, self.metrics, on_received=wake, on_released=wake).start()
        if cfg.metrics_port is not None:
            self.http = HttpEndpoint(self.metrics, self.health, cfg.metrics_bind, cfg.metrics_port, pages=self.status.page).start()
        _say(f"listening: {describe(cfg).replace(f':{cfg.port}', f':{self.scp.port}', 1)}"
             + (f"; metrics on http://{cfg.metrics_bind}:{self.http.port}/metrics" if self.http else ""))
        from .. import api

        t = time.perf_counter()
        _say(f"loading {cfg.model} (device {cfg.device}) ...")
        scorer = api.load_scorer(cfg.model, weights=cfg.weights_map, device=cfg.device, precision=cfg.precision)
        if "SYNTHETIC" in scorer.weights_label:
            _say("running on SYNTHETIC weights: the scores are meaningless", logging.WARNING)
        self.senders = [Sender(cfg, d, self.spool, self.audit, self.metrics, self.stop_event) for d in cfg.destinations]
        self.worker = Worker(cfg, self.spool, scorer, self.audit, self.metrics, self.stop_event, on_queued=self._wake_senders,
                             released=self.scp.released_times)
        self.worker.start()
        for s in self.senders:
            s.start()
        self.state = "running"
        _say(f"ready ({time.perf_counter() - t:.1f} s to load; weights {scorer.weights_label})")
        return self

    def _wake_senders(self) -> None:
        for s in self.senders:
            s.wake.set()

    def stop(self) -> None:
        """Clean shutdown: no new associations, the worker's batch finished (or left queued), the
        senders' rounds finished, the audit log flushed."""
        self.state = "stopping"
        self.stop_event.set()
        if self.scp is not None:
            self.scp.stop()
        if self.worker is not None:
            self.worker.wake.set()
            self.worker.join(self.drain_timeout)
        for s in self.senders:
            s.wake.set()
            s.join(60)
        if self.http is not None:
            self.http.stop()
        left = len(self.spool.pending()) if self.spool else 0
        out = self.spool.outbox_depth() if self.spool else 0
        if self.audit is not None:
            self.audit.write("stop", queued=left, outbox=out)
            self.audit.close()
        if self.spool is not None:
            self.spool.close()
        _say(f"stopped; {left} instance(s) to score and {out} result(s) to deliver stay in the spool for the next start")


def run_serve(cfg: ServeConfig, *, ready: Callable[[Node], None] | None = None) -> int:
    """Run the node until SIGTERM or SIGINT; returns 0 after a clean shutdown."""
    configure_logging()
    node = Node(cfg)
    stop = threading.Event()
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        _say(f"{signal.Signals(signum).name}: shutting down")
        stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for s in (signal.SIGTERM, signal.SIGINT):
            previous[s] = signal.signal(s, on_signal)
    try:
        try:
            node.start()
            if ready is not None:
                ready(node)
            while not stop.wait(1.0):
                if node.spool is not None:
                    node.metrics.queue_depth.labels(stage="outbox").set(node.spool.outbox_depth())
        finally:
            node.stop()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
