"""Operations endpoint: ``/healthz`` (JSON) and Prometheus ``/metrics`` on a local HTTP port.

Metric names (all prefixed ``cxr_serve_``): ``received_total``, ``refused_total{reason}``,
``ignored_total{reason}`` (answered success, nothing kept: another SOP class, an own result, a
radiograph the selection rules skip),
``scored_total``, ``skipped_total``, ``failed_total``, ``sent_total{destination}`` (result
*objects* delivered: an SR and a result image count 2; the audit log's ``sent`` event is one per
source instance and lists its objects), ``delivered_total{destination}`` (source instances whose
results were all delivered: one per audit ``sent`` event),
``send_errors_total{destination}``, ``associations_total{result}``, gauges ``retrying{destination}``,
``queue_depth{stage}`` (``incoming``: received, not yet scored; ``outbox``: results not yet
delivered) and the histogram ``stage_seconds{stage}`` (``receive``: writing one instance durably;
``queue``: receipt to scoring; ``score``: one batch's preparation, models and outputs per
instance; ``deliver``: scored to delivered; ``total``: receipt to result delivered).
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "HttpEndpoint"]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "cxr_serve_"
        self.received = Counter(p + "received", "Instances received and stored durably (success status sent)", registry=r)
        self.refused = Counter(p + "refused", "Instances refused at C-STORE", ["reason"], registry=r)
        self.scored = Counter(p + "scored", "Instances scored", registry=r)
        self.skipped = Counter(p + "skipped", "Instances not scored by the selection rules (reason in the audit log)", registry=r)
        self.failed = Counter(p + "failed", "Instances that failed preparation, scoring or writing", registry=r)
        self.ignored = Counter(p + "ignored", "Instances answered with success but not kept (another SOP class, an own result, "
                               "a radiograph the selection rules skip; reason in the audit log)", ["reason"], registry=r)
        self.sent = Counter(p + "sent", "Result objects (SR, result image, ...) delivered; an audit 'sent' event lists the objects "
                            "of one source instance (see delivered_total)", ["destination"], registry=r)
        self.delivered = Counter(p + "delivered", "Source instances whose results were all delivered (one per audit 'sent' event)",
                                 ["destination"], registry=r)
        self.send_errors = Counter(p + "send_errors", "Failed delivery attempts", ["destination"], registry=r)
        self.associations = Counter(p + "associations", "Associations by outcome", ["result"], registry=r)
        self.retrying = Gauge(p + "retrying", "Outbox entries waiting for a retry after a failed attempt", ["destination"], registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Work waiting, by stage", ["stage"], registry=r)
        self.stage = Histogram(p + "stage_seconds", "Latency per stage", ["stage"], buckets=_BUCKETS, registry=r)

    def observe(self, stage: str, seconds: float) -> None:
        self.stage.labels(stage=stage).observe(max(0.0, seconds))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class HttpEndpoint:
    """A small threaded HTTP server: ``GET /metrics`` and ``GET /healthz`` (200 healthy, 503 not);
    ``pages(path)`` answers the other paths ((body, content type, status) or None: 404), e.g. the
    status page (:mod:`cxr_lung_risk.serve.status`)."""

    def __init__(self, metrics: Metrics, health: Callable[[], dict[str, Any]], host: str, port: int,
                 pages: Callable[[str], tuple[bytes, str, int] | None] | None = None) -> None:
        m, h = metrics, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = m.exposition(), CONTENT_TYPE_LATEST, 200
                elif path in ("/healthz", "/health"):
                    state = h()
                    body = (json.dumps(state, default=str) + "\n").encode()
                    ctype, code = "application/json", 200 if state.get("status") == "ok" else 503
                else:
                    try:
                        page = pages(path) if pages is not None else None
                    except Exception as e:  # noqa: BLE001 - a page's bug must not take the endpoint down
                        page = (f"error: {type(e).__name__}\n".encode(), "text/plain", 500)
                    body, ctype, code = page if page is not None else (b"not found\n", "text/plain", 404)
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="serve-http", daemon=True)

    def start(self) -> "HttpEndpoint":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
