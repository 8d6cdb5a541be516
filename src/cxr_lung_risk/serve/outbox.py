"""Delivery: one sender thread per destination drains its outbox with retry and backoff.

At-least-once: an entry leaves ``pending`` only after the destination acknowledged every object
in it; a destination that is down (no association, a connection error, an HTTP error) is retried
after ``retry_initial`` seconds, doubling up to ``retry_max``, for ever by default; the outbox is on
disk, so a restart of the node resumes where it was. Objects carry deterministic UIDs (derived from
the source instance), so a resend after a crash stores the same object again and never a second,
different one. An object the destination refuses (a failure status for that object) is retried
too, and moved to ``failed/`` after ``max_attempts`` attempts when that is set.
"""
from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from pydicom.filereader import read_file_meta_info

from ..errors import DeliveryError
from .audit import AuditLog
from .config import Destination, ServeConfig
from .metrics import Metrics
from .spool import Spool

__all__ = ["Sender", "DeliveryError", "send_dicom", "send_stow"]

LOG = logging.getLogger("cxr_lung_risk.serve")

_OK_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the C-STORE warnings (stored)
_PER_ROUND = 32  # entries per association / STOW round


def client_ssl_context(cfg: ServeConfig) -> ssl.SSLContext | None:
    if not cfg.send_tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.tls_ca))
    ctx.check_hostname = False  # DICOM peers are addressed by IP; the CA pins who they are
    if cfg.tls_cert is not None:
        ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    return ctx


def _os_reason(e: OSError) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (nothing listens on that port)"
    if isinstance(e, TimeoutError) or isinstance(e, socket.timeout):
        return "connection timed out"
    return (e.strerror or str(e) or type(e).__name__).lower()


def _probe(dest: Destination, timeout: float = 10.0) -> None:
    """After a failed association: open and close a TCP connection to ``dest`` (raises
    :class:`DeliveryError` with the cause when that fails too). pynetdicom reports a refused
    connection as an aborted association."""
    try:
        with socket.create_connection((dest.host, dest.port), timeout=timeout):
            pass
    except OSError as e:
        raise DeliveryError(f"cannot connect to {dest}: {_os_reason(e)}") from None


def send_dicom(cfg: ServeConfig, dest: Destination, files: Sequence[Path]) -> dict[Path, str]:
    """C-STORE ``files`` over one association -> {file: error} for the objects not stored
    (empty: all stored). Raises :class:`DeliveryError` when no association could be made."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # our files' bytes as written (no decode/re-encode)

    ae = AE(ae_title=cfg.ae_title)
    ae.acse_timeout = ae.network_timeout = 30
    ae.dimse_timeout = 120
    syntaxes: dict[str, list[str]] = {}
    for f in files:
        meta = read_file_meta_info(f)
        ts = syntaxes.setdefault(str(meta.MediaStorageSOPClassUID), [])
        for t in (str(meta.TransferSyntaxUID), str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)):
            if t not in ts:
                ts.append(t)
    for sop_class, ts in syntaxes.items():
        for t in ts:  # one context per transfer syntax: the file's own is always one the peer may accept
            ae.add_requested_context(sop_class, [t])
    ctx = client_ssl_context(cfg)
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.aet, tls_args=(ctx, dest.host) if ctx else None)
    except OSError as e:
        raise DeliveryError(f"cannot connect to {dest}: {_os_reason(e)}") from None
    if not assoc.is_established:
        if assoc.is_rejected:
            raise DeliveryError(f"association rejected by {dest} (is {cfg.ae_title!r} allowed there, and is "
                                f"{dest.aet!r} its AE title?)")
        _probe(dest)  # pynetdicom says "aborted" for a refused connection too: find the real cause
        if assoc.is_aborted:
            raise DeliveryError(f"association aborted by {dest} during negotiation" + (" (TLS handshake?)" if ctx else ""))
        raise DeliveryError(f"no association with {dest} (no answer within {ae.acse_timeout:.0f} s)")
    errors: dict[Path, str] = {}
    try:
        for f in files:
            status = assoc.send_c_store(f)
            code = getattr(status, "Status", None)
            if code is None:
                if not assoc.is_established:
                    raise DeliveryError(f"{dest} dropped the association")
                errors[f] = "no response (timeout or aborted)"
            elif int(code) not in _OK_STATUSES:
                errors[f] = f"status 0x{int(code):04X}"
    finally:
        if assoc.is_established:
            assoc.release()
    return errors


def send_stow(cfg: ServeConfig, dest: Destination, files: Sequence[Path]) -> dict[Path, str]:
    """STOW-RS ``files`` to ``dest.url`` with the DICOMweb module's sender -> {file: error}.
    Raises :class:`DeliveryError` when the server could not be reached or failed as a whole
    (connection error, 5xx, 401/403/404/408/429): nothing of this round was stored."""
    from ..dicomweb import HttpOptions, stow

    http = HttpOptions(token=dest.token, ca_bundle=str(cfg.stow_ca) if cfg.stow_ca else None)
    results = stow(dest.url, [str(f) for f in files], http=http)
    down = [r for r in results if not r.ok and (r.status is None or r.status >= 500 or r.status in (401, 403, 404, 408, 429))]
    if results and len(down) == len(results):
        raise DeliveryError(f"STOW-RS to {dest.url}: {down[0].reason}"[:300])
    return {Path(r.path): r.reason or "refused" for r in results if not r.ok}


def _sender_of(kind: str):
    """The function that delivers to a destination of ``kind`` (dicom, stow, fhir)."""
    if kind == "fhir":
        from .fhir import send_fhir

        return send_fhir
    return send_dicom if kind == "dicom" else send_stow


class Sender(threading.Thread):
    def __init__(self, cfg: ServeConfig, dest: Destination, spool: Spool, audit: AuditLog, metrics: Metrics, stop: threading.Event) -> None:
        super().__init__(name=f"serve-send-{dest.key}", daemon=True)
        self.cfg, self.dest, self.spool, self.audit, self.metrics = cfg, dest, spool, audit, metrics
        self.stop_event = stop
        self.wake = threading.Event()
        self.failures = 0  # consecutive failed rounds (the destination's backoff)
        self.last_error = ""
        self.not_before = 0.0
        self.retrying: set[str] = set()
        self.label = str(dest)

    def backoff(self, n: int) -> float:
        base = min(self.cfg.retry_max, self.cfg.retry_initial * (2 ** max(0, n - 1)))
        return base * (0.9 + 0.2 * random.random())

    def run(self) -> None:
        while not self.stop_event.is_set():
            now = time.time()
            did = False
            if now >= self.not_before:
                try:
                    did = self.round(now)
                except Exception as e:  # noqa: BLE001 - never let the sender die
                    LOG.exception("sender %s: unexpected error", self.label)
                    self.audit.write("send_error", destination=self.label, error=f"{type(e).__name__}: {str(e)[:200]}")
            if not did:
                self.wake.wait(self.cfg.poll * 2)
                self.wake.clear()

    def round(self, now: float) -> bool:
        due: list[tuple[Path, dict[str, Any]]] = []
        for entry in self.spool.entries(self.dest.key, "pending"):
            try:
                meta = self.spool.read_meta(entry)
            except (OSError, ValueError):
                continue  # being moved or broken: seen again next round
            if meta.get("next_attempt", 0) <= now:
                due.append((entry, meta))
            if len(due) >= _PER_ROUND:
                break
        if not due:
            return False
        files = [e / n for e, m in due for n in m.get("files", [])]
        try:
            errors = _sender_of(self.dest.kind)(self.cfg, self.dest, files) if files else {}
        except DeliveryError as e:
            self.failures += 1
            self.last_error = str(e)[:300]
            wait = self.backoff(self.failures)
            self.not_before = time.time() + wait
            self.metrics.send_errors.labels(destination=self.label).inc()
            for entry, meta in due:
                meta["attempts"] = int(meta.get("attempts", 0)) + 1
                meta["last_error"] = str(e)[:300]
                self.spool.update_meta(entry, meta)
                self.retrying.add(entry.name)
            self.metrics.retrying.labels(destination=self.label).set(len(self.retrying))
            LOG.warning("delivery to %s failed (%s); retrying in %.1f s", self.label, e, wait)
            self.audit.write("send_failed", destination=self.label, error=str(e)[:300], entries=len(due), retry_in_s=round(wait, 2))
            return False
        self.failures, self.not_before, self.last_error = 0, 0.0, ""
        for entry, meta in due:
            bad = {n: errors[entry / n] for n in meta.get("files", []) if (entry / n) in errors}
            if bad:
                self._entry_failed(entry, meta, bad)
            else:
                self._delivered(entry, meta)
        self.metrics.retrying.labels(destination=self.label).set(len(self.retrying))
        return True

    def _entry_failed(self, entry: Path, meta: dict[str, Any], bad: dict[str, str]) -> None:
        meta["attempts"] = n = int(meta.get("attempts", 0)) + 1
        meta["last_error"] = "; ".join(f"{k}: {v}" for k, v in bad.items())[:300]
        self.metrics.send_errors.labels(destination=self.label).inc()
        if self.cfg.max_attempts and n >= self.cfg.max_attempts:
            self.spool.move_entry(entry, "failed")
            self.retrying.discard(entry.name)
            self.metrics.queue_depth.labels(stage="outbox").dec()
            self.audit.write("send_gave_up", destination=self.label, source_sop_uid=meta.get("source_sop_uid"), attempts=n, error=meta["last_error"])
            return
        meta["next_attempt"] = time.time() + self.backoff(n)
        self.spool.update_meta(entry, meta)
        self.retrying.add(entry.name)
        self.audit.write("send_refused", destination=self.label, source_sop_uid=meta.get("source_sop_uid"), attempts=n, error=meta["last_error"])

    def _delivered(self, entry: Path, meta: dict[str, Any]) -> None:
        objects = []
        for n in meta.get("files", []):
            try:
                if n.endswith(".json"):  # a FHIR bundle
                    objects.append({"fhir_bundle": n})
                    continue
                fm = read_file_meta_info(entry / n)
                objects.append({"sop_uid": str(fm.MediaStorageSOPInstanceUID), "sop_class": str(fm.MediaStorageSOPClassUID)})
            except Exception:  # noqa: BLE001 - the receipt is still written
                objects.append({"file": n})
        self.spool.move_entry(entry, "delivered")
        self.retrying.discard(entry.name)
        now = time.time()
        self.metrics.sent.labels(destination=self.label).inc(len(objects))
        self.metrics.delivered.labels(destination=self.label).inc()
        LOG.info("delivered %d object(s) for %s to %s", len(objects), meta.get("source_sop_uid"), self.label)
        self.metrics.queue_depth.labels(stage="outbox").dec()
        self.metrics.observe("deliver", now - float(meta.get("scored", now)))
        self.metrics.observe("total", now - float(meta.get("received", now)))
        self.audit.write(
            "sent", destination=self.label, source_sop_uid=meta.get("source_sop_uid"), study_uid=meta.get("study_uid"),
            objects=objects, attempts=int(meta.get("attempts", 0)) + 1, latency_s=round(now - float(meta.get("received", now)), 3),
        )
