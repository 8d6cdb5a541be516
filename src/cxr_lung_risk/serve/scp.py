"""The listener: C-ECHO, and C-STORE for CR/DX written durably into the spool before success.

* Associations from calling AE titles outside ``--allow-ae`` are rejected (A-ASSOCIATE-RJ,
  "calling AE title not recognised") and logged.
* Every storage SOP class is accepted in every transfer syntax, so the node keeps the exact bytes
  the PACS holds (a JPEG 2000 image is not transcoded on the way), and so a PACS that sends a
  whole study (Orthanc's "Send to modality") is not stopped by its first CT or SR.
* What is not eligible -- another SOP class (CT, MR, SR, ...), the node's own earlier results, a
  radiograph the selection rules skip (lateral, FOR PROCESSING, another body part) -- is answered
  with success, stored nothing of, and audited as ``ignored`` with its reason. With
  ``--strict-sop-class`` other SOP classes get status 0x0122 (SOP class not supported) instead.
* A CR/DX is checked before it is acknowledged, without decoding (:func:`cxr_lung_risk.dicom_io.screen_image`:
  header, dimensions, photometric, transfer syntax, the pixel data's size against the bytes
  present): one that would certainly fail gets 0xC211 with the reason in ErrorComment, so the
  sender and the PACS see it at once.
* A dataset that cannot be parsed, or lacks the SOP Instance / Study Instance UID, gets 0xC210
  (cannot understand); the node stays up. A spool that cannot be written gets 0xA700.
"""
from __future__ import annotations

import io
import logging
import ssl
import threading
import time
from typing import Any

from pydicom import dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, DEFAULT_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    Verification,
)

from .audit import AuditLog
from .config import ServeConfig
from .metrics import Metrics
from .spool import Spool

__all__ = ["ACCEPTED_SOP_CLASSES", "StoreSCP", "STATUS_SOP_CLASS_NOT_SUPPORTED", "STATUS_CANNOT_UNDERSTAND",
           "STATUS_WILL_FAIL", "STATUS_OUT_OF_RESOURCES"]

LOG = logging.getLogger("cxr_lung_risk.serve")

ACCEPTED_SOP_CLASSES = {
    str(ComputedRadiographyImageStorage): "CR",
    str(DigitalXRayImageStorageForPresentation): "DX",
    str(DigitalXRayImageStorageForProcessing): "DX",
}
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_WILL_FAIL = 0xC211  # cannot understand: the image's checks failed (reason in ErrorComment)
STATUS_OUT_OF_RESOURCES = 0xA700
#: An acceptor picks the first of its own syntaxes that the peer proposes: the compressed ones come
#: first, so the node receives the bytes the sender holds (no transcoding on the way).
PREFERRED_SYNTAXES = [t for t in ALL_TRANSFER_SYNTAXES if t not in DEFAULT_TRANSFER_SYNTAXES] + list(DEFAULT_TRANSFER_SYNTAXES)


def _peer(event: Any) -> dict[str, Any]:
    r = event.assoc.requestor
    return {"calling_ae": (r.ae_title or "").strip(), "peer": f"{r.address}:{r.port}", "assoc": event.assoc.native_id}


def _called_ae(event: Any, default: str) -> str:
    """The AE title the peer called (its A-ASSOCIATE-RQ), which need not be ours."""
    try:
        return str(event.assoc.requestor.primitive.called_ae_title or "").strip() or default
    except AttributeError:
        return default


class _Refused(Exception):
    """The spooled copy failed its checks: answer ``status`` with ``reason``, keep nothing."""

    def __init__(self, status: int, reason: str, outcome: str = "refused") -> None:
        super().__init__(reason)
        self.status, self.reason, self.outcome = status, reason, outcome


def _status(code: int, comment: str = "") -> Any:
    """A C-STORE response status, with an ErrorComment (LO: 64 characters) when given."""
    if not comment:
        return code
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment.replace("\\", "/")[:64]
    return ds


def _parse(data: bytes):
    """Parse the received bytes fully (every element decoded, pixel data left as bytes); raises
    on a malformed dataset."""
    ds = dcmread(io.BytesIO(data), force=False)
    for elem in ds.iterall():  # converts every raw element: a broken one raises here
        _ = elem.value
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SOPClassUID"):
        if not str(ds.get(kw, "") or "").strip():
            raise ValueError(f"no {kw}")
    return ds


def server_ssl_context(cfg: ServeConfig) -> ssl.SSLContext | None:
    if cfg.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    if cfg.tls_ca is not None:
        ctx.load_verify_locations(str(cfg.tls_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class StoreSCP:
    def __init__(self, cfg: ServeConfig, spool: Spool, audit: AuditLog, metrics: Metrics, on_received=None, on_released=None) -> None:
        self.cfg, self.spool, self.audit, self.metrics = cfg, spool, audit, metrics
        self.on_received = on_received
        self.on_released = on_released
        self._lock = threading.Lock()
        self._assoc_studies: dict[int, set[str]] = {}  # association -> studies it delivered
        self._released: dict[str, float] = {}  # study -> when an association that delivered it ended
        self.selection = cfg.selection  # the worker's rules
        ae = self.ae = AE(ae_title=cfg.ae_title)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:  # every transfer syntax: refusals are explained per C-STORE
            ae.add_supported_context(cx.abstract_syntax, PREFERRED_SYNTAXES)
        if cfg.allow_ae:
            ae.require_calling_aet = list(cfg.allow_ae)
        ae.maximum_associations = 16
        ae.maximum_pdu_size = cfg.max_pdu
        ae.network_timeout = 60
        ae.dimse_timeout = 120
        ae.acse_timeout = 30
        self.server = None

    # ------------------------------------------------------------------ handlers
    def _on_echo(self, event: Any) -> int:
        self.audit.write("echo", **_peer(event))
        return 0x0000

    def _on_established(self, event: Any) -> None:
        self.metrics.associations.labels(result="accepted").inc()
        self.audit.write("association", result="accepted", called_ae=_called_ae(event, self.cfg.ae_title), **_peer(event))

    def _on_rejected(self, event: Any) -> None:
        self.metrics.associations.labels(result="rejected").inc()
        info = _peer(event)
        reason = "calling AE title not in --allow-ae" if self.cfg.allow_ae and info["calling_ae"] not in self.cfg.allow_ae else "rejected"
        LOG.warning("association from %s (%s) rejected: %s", info["calling_ae"], info["peer"], reason)
        self.audit.write("association", result="rejected", reason=reason, **info)

    def _association_done(self, event: Any) -> None:
        """The sender ended the association: the studies it delivered are complete (as far as it
        is concerned), so the worker need not wait for the quiet time."""
        with self._lock:
            studies = self._assoc_studies.pop(event.assoc.native_id, set())
            now = time.time()
            for s in studies:
                self._released[s] = now
            if len(self._released) > 10000:  # forget the oldest (their studies are long scored)
                for s, _ in sorted(self._released.items(), key=lambda kv: kv[1])[:5000]:
                    del self._released[s]
        if studies and self.on_released is not None:
            self.on_released(studies)

    def released_times(self) -> dict[str, float]:
        """study -> when an association that delivered instances of it was released or aborted."""
        with self._lock:
            return dict(self._released)

    def _on_released(self, event: Any) -> None:
        self.audit.write("association_end", result="released", **_peer(event))
        self._association_done(event)

    def _on_aborted(self, event: Any) -> None:
        self.audit.write("association_end", result="aborted", **_peer(event))
        self._association_done(event)

    def _refuse(self, event: Any, status: int, reason: str, **extra: Any) -> Any:
        self.metrics.refused.labels(reason=reason.split(":")[0]).inc()
        info = _peer(event)
        LOG.warning("C-STORE of %s from %s refused (0x%04X): %s", extra.get("sop_uid") or "?", info["calling_ae"], status, reason)
        self.audit.write("refused", status=f"0x{status:04X}", reason=reason, **extra, **info)
        return _status(status, reason if status == STATUS_WILL_FAIL else "")

    def _ignore(self, event: Any, reason: str, **extra: Any) -> int:
        """Success without keeping anything: the instance is not for this node."""
        self.metrics.ignored.labels(reason=reason.split(":")[0]).inc()
        info = _peer(event)
        LOG.info("ignored %s from %s: %s", extra.get("sop_uid") or "?", info["calling_ae"], reason)
        self.audit.write("ignored", reason=reason, **extra, **info)
        return 0x0000

    def _header(self, event: Any):
        """The received data set's header (no pixel data), or None when it cannot be parsed."""
        try:
            return dcmread(io.BytesIO(event.encoded_dataset(include_meta=True)), stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - an unparsable instance of a class we ignore anyway
            return None

    def _screen(self, path) -> None:
        """The checks of a CR/DX that need no decoding, on the written copy (raises :class:`_Refused`)."""
        from ..dicom_io import screen_image

        res = screen_image(path, self.selection)
        if res.status == "failed":
            raise _Refused(STATUS_WILL_FAIL, res.sentence)
        if res.status == "skipped":
            raise _Refused(0x0000, res.sentence, outcome="ignored")

    def _on_store(self, event: Any) -> Any:
        from ..dicom_io import own_result

        t0 = time.perf_counter()
        sop_class = str(event.context.abstract_syntax)
        rq = event.request
        sop_uid = str(getattr(rq, "AffectedSOPInstanceUID", "") or "")
        if sop_class not in ACCEPTED_SOP_CLASSES:
            from pydicom.uid import UID

            name = UID(sop_class).name
            if self.cfg.strict_sop_class:
                return self._refuse(
                    event, STATUS_SOP_CLASS_NOT_SUPPORTED,
                    f"not a chest radiograph SOP class: {name} ({sop_class}); this node scores CR and DX only",
                    sop_class=sop_class, sop_uid=sop_uid,
                )
            header = self._header(event)
            own = own_result(header) if header is not None else ""
            reason = f"own result: {own}" if own else f"not a chest radiograph SOP class: {name}; this node scores CR and DX only"
            return self._ignore(event, reason, sop_class=sop_class, sop_uid=sop_uid,
                                study_uid=str(header.get("StudyInstanceUID", "")) if header is not None else "",
                                modality=str(header.get("Modality", "")) if header is not None else "")
        try:
            data = event.encoded_dataset(include_meta=True)
            ds = _parse(data)
        except Exception as e:  # noqa: BLE001 - any parse error is the sender's malformed dataset
            return self._refuse(event, STATUS_CANNOT_UNDERSTAND, f"malformed dataset: {type(e).__name__}: {str(e)[:160]}",
                                sop_class=sop_class, sop_uid=sop_uid)
        study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        ids = {"sop_class": sop_class, "sop_uid": sop, "study_uid": study, "modality": str(ds.get("Modality", ""))}
        series = str(ds.get("SeriesInstanceUID", ""))
        del ds
        try:
            pending = self.spool.store(data, study, sop, check=self._screen)
        except _Refused as r:
            if r.outcome == "ignored":
                return self._ignore(event, r.reason, **ids)
            return self._refuse(event, r.status, r.reason, **ids)
        except OSError as e:
            return self._refuse(event, STATUS_OUT_OF_RESOURCES, f"spool not writable: {e.strerror or e}", sop_uid=sop)
        dt = time.perf_counter() - t0
        self.metrics.received.inc()
        self.metrics.observe("receive", dt)
        info = _peer(event)
        LOG.info("received %s (study %s, %s, %d bytes) from %s", sop, study, ids["modality"] or "?", len(data), info["calling_ae"])
        self.audit.write(
            "received", sop_class=sop_class, sop_uid=sop, study_uid=study, series_uid=series,
            modality=ids["modality"], bytes=len(data), transfer_syntax=str(event.context.transfer_syntax),
            spool=f"{pending.study}/{pending.sop}.dcm", **info,
        )
        with self._lock:
            self._assoc_studies.setdefault(event.assoc.native_id, set()).add(pending.study)
        if self.on_received is not None:
            self.on_received(pending)
        return 0x0000

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "StoreSCP":
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        self.server = self.ae.start_server((self.cfg.bind, self.cfg.port), block=False, evt_handlers=handlers,
                                           ssl_context=server_ssl_context(self.cfg))
        return self

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server is not None else self.cfg.port

    def stop(self) -> None:
        """Stop accepting associations; the ones in progress finish their current C-STORE."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
