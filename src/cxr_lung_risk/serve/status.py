"""The node's status page on its metrics port: ``GET /`` (or ``/status``) for a person,
``/status.json`` for a program, ``/status/thumb/<n>.png`` the thumbnails.

It shows at a glance whether the node works: listening address and AE title, each destination
with its state (``ok``, ``retrying``: the last round failed, ``failing``: ``--degraded-after``
rounds in a row failed; with the last error), the queue depths, the counts (received, scored,
skipped, ignored, refused, failed, sent), the last :data:`KEEP` results with a thumbnail of the
result image the node sends, and links to ``/metrics`` and ``/healthz``.

No patient names or IDs: the board is fed by the audit log's events (:class:`_TeeAudit`; the
audit log never carries them) and a thumbnail is the result image's pixels only (the crop the
model saw and the scores; the image burns in no patient data). Results are named by the last
digits of their SOP Instance UID. The page refreshes itself every 5 seconds (no JavaScript).
"""
from __future__ import annotations

import html
import io
import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

__all__ = ["StatusBoard", "KEEP"]

KEEP = 12  # results shown
THUMB_WIDTH = 360
_COUNTS = (("received", "received"), ("scored", "scored"), ("skipped", "skipped"), ("ignored", "ignored"),
           ("refused", "refused"), ("failed", "failed"), ("sent", "sent (objects)"), ("delivered", "delivered (instances)"))


def _short_uid(uid: str) -> str:
    uid = str(uid or "")
    return ("…" + uid[-12:]) if len(uid) > 13 else uid


def thumbnail_png(path: Path, width: int = THUMB_WIDTH) -> bytes:
    """A small PNG of a DICOM result image's pixels (never its header)."""
    import numpy as np
    import pydicom
    from PIL import Image

    ds = pydicom.dcmread(path)
    arr = np.asarray(ds.pixel_array)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, mode="RGB" if arr.ndim == 3 else "L")
    h = max(1, round(im.height * width / im.width))
    im = im.resize((width, h), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


class _TeeAudit:
    """The node's audit log, with each event also handed to the status board."""

    def __init__(self, audit: Any, board: "StatusBoard") -> None:
        self._audit = audit
        self._board = board

    def write(self, event: str, **fields: Any) -> None:
        self._audit.write(event, **fields)
        try:
            self._board.on_event(event, fields)
        except Exception:  # noqa: BLE001 - the page never gets in the way of the node
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._audit, name)


class StatusBoard:
    def __init__(self, node: Any, keep: int = KEEP) -> None:
        self.node = node
        self.lock = threading.Lock()
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self.thumbs: dict[int, bytes] = {}  # made on the first request
        self.thumb_paths: dict[int, Path] = {}  # result n -> its result image
        self.started = time.time()
        self._n = 0

    def tee(self, audit: Any) -> _TeeAudit:
        return _TeeAudit(audit, self)

    # ------------------------------------------------------------------ events
    def on_event(self, event: str, fields: dict[str, Any]) -> None:
        if event == "scored":
            entry = self._entry("scored", fields)
            entry["values"] = {k: v for k, v in (fields.get("values") or {}).items() if isinstance(v, (int, float))}
            spool = getattr(self.node, "spool", None)
            rel = next((r for r in fields.get("outputs") or [] if str(r).startswith("result/")), None)
            if spool is not None and rel and fields.get("batch"):
                # made when the page asks for it (the worker thread that sends this event is the
                # node's scoring loop: a PNG per result there cost ~4 % of its throughput)
                with self.lock:
                    self.thumb_paths[entry["n"]] = Path(spool.results) / str(fields["batch"]) / str(rel)
                entry["thumb"] = True
            self._add(entry)
        elif event in ("failed", "skipped"):
            entry = self._entry(event, fields)
            entry["reason"] = str(fields.get("reason") or "")[:300]
            self._add(entry)
        elif event == "sent":
            sop = str(fields.get("source_sop_uid") or "")
            with self.lock:
                for e in self.recent:
                    if e["sop_full"] == sop:
                        e["sent_to"] = sorted(set(e.get("sent_to", [])) | {str(fields.get("destination"))})

    def _entry(self, status: str, fields: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self._n += 1
            n = self._n
        sop = str(fields.get("sop_uid") or "")
        return {"n": n, "time": time.time(), "status": status, "sop": _short_uid(sop), "sop_full": sop}

    def _add(self, entry: dict[str, Any]) -> None:
        with self.lock:
            if len(self.recent) == self.recent.maxlen:
                old = self.recent[0]
                self.thumbs.pop(old["n"], None)
                self.thumb_paths.pop(old["n"], None)
            self.recent.append(entry)

    # ------------------------------------------------------------------ state
    def _count(self, name: str) -> float:
        m = getattr(self.node, "metrics", None)
        if m is None:
            return 0.0
        total = 0.0
        want = f"cxr_serve_{name}_total"
        for metric in m.registry.collect():
            for s in metric.samples:
                if s.name == want:
                    total += s.value
        return total

    def state(self) -> dict[str, Any]:
        node = self.node
        cfg = node.cfg
        health = node.health()
        n = cfg.degraded_after
        dests = []
        senders = {s.label: s for s in getattr(node, "senders", [])}
        for d in cfg.destinations:
            s = senders.get(str(d))
            if s is None:
                dests.append({"destination": str(d), "state": "starting", "last_error": None, "failures": 0, "retrying": 0})
                continue
            state = "failing" if (n and s.failures >= n) else ("retrying" if s.failures or s.retrying else "ok")
            dests.append({"destination": s.label, "state": state, "last_error": s.last_error or None, "failures": s.failures,
                          "retrying": len(s.retrying)})
        scp = getattr(node, "scp", None)
        with self.lock:
            recent = [{k: v for k, v in e.items() if k != "sop_full"} for e in reversed(self.recent)]
        return {
            "status": health.get("status"), "reason": health.get("reason"), "version": health.get("version"),
            "ae_title": cfg.ae_title, "listening": f"{cfg.bind}:{scp.port if scp else cfg.port}", "tls": bool(cfg.tls_cert),
            "queues": {"incoming": health.get("incoming"), "outbox": health.get("outbox"), "worker_busy": health.get("worker_busy")},
            "worker_error": health.get("worker_error"),
            "destinations": dests,
            "counts": {k: int(self._count(k)) for k, _ in _COUNTS},
            "recent": recent,
            "uptime_s": round(time.time() - self.started, 1),
        }

    # ------------------------------------------------------------------ HTTP
    def page(self, path: str) -> tuple[bytes, str, int] | None:
        """(body, content type, status) for the status paths; None for any other path."""
        if path in ("/", "/status", "/status/"):
            return self.html().encode("utf-8"), "text/html; charset=utf-8", 200
        if path == "/status.json":
            return (json.dumps(self.state(), default=str) + "\n").encode(), "application/json", 200
        if path.startswith("/status/thumb/") and path.endswith(".png"):
            try:
                n = int(path[len("/status/thumb/"):-4])
            except ValueError:
                return None
            with self.lock:
                png, src = self.thumbs.get(n), self.thumb_paths.get(n)
            if png is None and src is not None:
                try:
                    png = thumbnail_png(src)
                except Exception:  # noqa: BLE001 - the row is shown without its picture
                    return None
                with self.lock:
                    if n in self.thumb_paths:  # still shown
                        self.thumbs[n] = png
            return (png, "image/png", 200) if png is not None else None
        return None

    def html(self) -> str:
        st = self.state()
        e = html.escape
        status = st["status"] or "unknown"
        rows_dest = "".join(
            f"<tr><td>{e(d['destination'])}</td><td class='st-{e(d['state'])}'>{e(d['state'])}</td>"
            f"<td>{d['retrying']}</td><td>{e(d['last_error'] or '')}</td></tr>" for d in st["destinations"]
        ) or "<tr><td colspan='4'>none (results are kept in the spool only)</td></tr>"
        counts = "".join(f"<tr><th>{e(label)}</th><td id='count-{k}'>{st['counts'][k]}</td></tr>" for k, label in _COUNTS)
        cards = []
        for r in st["recent"]:
            when = time.strftime("%H:%M:%S", time.localtime(r["time"]))
            values = ", ".join(f"{e(k)} {v:.1f}" for k, v in r.get("values", {}).items())
            thumb = (f"<img src='/status/thumb/{r['n']}.png' alt='result image' width='{THUMB_WIDTH}'>" if r.get("thumb") else "")
            detail = e(r.get("reason", "")) if r["status"] != "scored" else values
            sent = ", ".join(e(x) for x in r.get("sent_to", []))
            cards.append(f"<div class='result'><div><b class='st-{e(r['status'])}'>{e(r['status'])}</b> {when} &middot; SOP {e(r['sop'])}</div>"
                         f"<div>{detail}</div>{'<div>sent to ' + sent + '</div>' if sent else ''}{thumb}</div>")
        q = st["queues"]
        reason = f"<p class='reason'>{e(st['reason'])}</p>" if st["reason"] else ""
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>cxr-lung-risk node: {e(status)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 0; background: #fafafa; color: #1b1b1b; }}
main {{ max-width: 1200px; margin: 0 auto; padding: 0 16px 24px; }}
.banner {{ background: #8a1111; color: #fff; text-align: center; font-weight: 700; padding: 6px; }}
table {{ border-collapse: collapse; background: #fff; margin-bottom: 12px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }}
.st-ok, .st-scored {{ color: #17702a; font-weight: 600; }} .st-retrying, .st-skipped, .st-starting {{ color: #8a5a00; font-weight: 600; }}
.st-failing, .st-failed, .st-degraded, .st-stopping {{ color: #b00000; font-weight: 600; }}
#status {{ font-size: 1.4em; }} .reason {{ color: #b00000; }}
.grid {{ display: flex; gap: 32px; flex-wrap: wrap; }}
#recent {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.result {{ background: #fff; border: 1px solid #ccc; border-radius: 6px; padding: 8px; max-width: {THUMB_WIDTH + 4}px; font-size: .9em; }}
.result img {{ display: block; margin-top: 6px; }}
</style></head>
<body><div class="banner">RESEARCH USE ONLY - NOT FOR CLINICAL USE</div><main>
<h1>cxr-lung-risk node <span id="status" class="st-{e(status)}">{e(status)}</span></h1>{reason}
<p>AE title <b id="ae-title">{e(st['ae_title'])}</b> listening on <b id="listening">{e(st['listening'])}</b>{' (TLS)' if st['tls'] else ''}
&middot; version {e(str(st['version']))} &middot; up {st['uptime_s']:.0f} s
&middot; <a href="/metrics">/metrics</a> &middot; <a href="/healthz">/healthz</a> &middot; <a href="/status.json">status.json</a></p>
<div class="grid">
<div><h2>Destinations</h2><table id="destinations"><tr><th>destination</th><th>state</th><th>retrying</th><th>last error</th></tr>{rows_dest}</table>
<h2>Queues</h2><table id="queues"><tr><th>incoming (to score)</th><td id="queue-incoming">{q['incoming']}</td></tr>
<tr><th>outbox (to deliver)</th><td id="queue-outbox">{q['outbox']}</td></tr>
<tr><th>worker</th><td>{'scoring' if q['worker_busy'] else 'idle'}{(' - ' + e(st['worker_error'])) if st['worker_error'] else ''}</td></tr></table></div>
<div><h2>Counts</h2><table id="counts">{counts}</table></div>
</div>
<h2>Last {len(st['recent'])} results</h2><div id="recent">{''.join(cards) or '<p>none yet</p>'}</div>
</main></body></html>
"""
