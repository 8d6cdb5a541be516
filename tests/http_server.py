"""A real threaded HTTP/1.1 server on 127.0.0.1 for the download tests.

It serves in-memory files, honours ``Range: bytes=N-`` (206 + Content-Range, or 416 past the
end) and can misbehave on purpose:

- ``drop_after``: send only this many body bytes, then close the connection (for the first
  ``drop_times`` requests of a path);
- ``ignore_range``: answer every request with the whole file (200);
- ``corrupt_at``: flip the byte at this offset of the body;
- ``extra``: bytes appended to the body (Content-Length then counts them);
- ``no_length``: send no Content-Length (HTTP/1.0-style body ended by closing);
- ``fail_status``: answer this error status (e.g. 503) to the first ``drop_times`` requests.

``redirects`` maps a path to a Location answered with 302 (as download hosts often do).

Every request is recorded (path and Range header) in ``server.requests``.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Behaviour:
    drop_after: int | None = None
    drop_times: int = 1
    ignore_range: bool = False
    corrupt_at: int | None = None
    extra: bytes = b""
    no_length: bool = False
    fail_status: int | None = None  # answer this status to the first ``drop_times`` requests


@dataclass
class Request:
    path: str
    range: str | None
    status: int = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "LocalServer"

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        rec = Request(self.path, self.headers.get("Range"))
        with srv.lock:
            srv.requests.append(rec)
            body = srv.files.get(self.path)
            beh = srv.behaviour.get(self.path, Behaviour())
            count = srv.counts.get(self.path, 0)
            srv.counts[self.path] = count + 1
        target = srv.redirects.get(self.path)
        if target is not None:
            rec.status = 302
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if body is not None and beh.fail_status is not None and count < beh.drop_times:
            body = None
        if body is None:
            rec.status = 404 if beh.fail_status is None else beh.fail_status
            self.send_response(rec.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if beh.corrupt_at is not None:
            b = bytearray(body)
            b[beh.corrupt_at] ^= 0xFF
            body = bytes(b)
        body = body + beh.extra
        total = len(body)
        start = 0
        rng = rec.range
        status = 200
        if rng and not beh.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            if m:
                start = int(m.group(1))
                if start >= total:
                    rec.status = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{total}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
        payload = body[start:]
        rec.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        if beh.no_length:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if beh.drop_after is not None and count < beh.drop_times:
            self.wfile.write(payload[: beh.drop_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.behaviour: dict[str, Behaviour] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[Request] = []
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def start(self) -> "LocalServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def add(self, path: str, data: bytes, **behaviour) -> str:
        """Serve ``data`` at ``path``; return its full URL."""
        self.files[path] = data
        self.behaviour[path] = Behaviour(**behaviour)
        return self.url(path)

    def url(self, path: str) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}{path}"

    def requests_for(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]
