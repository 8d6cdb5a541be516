"""Helpers of the PACS-node tests and benchmark: run ``cxr-lung-risk serve`` as a real subprocess,
make distinct copies of a real chest CR, push them with pynetdicom SCUs, read the audit log.

Loopback only (127.0.0.1); every wait is bounded.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CR = REPO / "src" / "cxr_lung_risk" / "samples" / "chest_cr_RG1_J2KI.dcm"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])  # deterministic in ``parts``


def make_instances(dest: Path, n: int, *, studies: int = 1, source: Path = SAMPLE_CR, tag: str = "t",
                   modality: str | None = None, sop_class: str | None = None) -> list[Path]:
    """``n`` distinct instances of ``source`` (new Study/Series/SOP Instance UIDs; ``studies``
    studies, instances spread round-robin), written into ``dest``. Pixel data untouched."""
    import pydicom

    dest.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(source)
    out = []
    for i in range(n):
        ds = base.copy()
        s = i % studies
        ds.StudyInstanceUID = uid(tag, "study", s)
        ds.SeriesInstanceUID = uid(tag, "series", s)
        ds.SOPInstanceUID = uid(tag, "sop", i)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if modality:
            ds.Modality = modality
        if sop_class:
            ds.SOPClassUID = sop_class
            ds.file_meta.MediaStorageSOPClassUID = sop_class
        p = dest / f"{tag}_{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def push(port: int, files: Sequence[Path], *, calling: str = "TESTSCU", called: str = "CXR-LUNG-RISK") -> list[int | None]:
    """C-STORE ``files`` over one association -> the status of each (None: no response).
    Raises RuntimeError when the association is not accepted."""
    return [int(st.Status) if st is not None and "Status" in st else None
            for st in push_responses(port, files, calling=calling, called=called)]


def push_responses(port: int, files: Sequence[Path], *, calling: str = "TESTSCU", called: str = "CXR-LUNG-RISK") -> list[Any]:
    """C-STORE ``files`` over one association -> each response's status data set (Status,
    ErrorComment, ...; None: no response). Raises RuntimeError when the association is not accepted."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes as they are (no decode/re-encode)
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 60
    seen: dict[str, list[str]] = {}
    for f in files:
        fm = pydicom.filereader.read_file_meta_info(f)
        ts = seen.setdefault(str(fm.MediaStorageSOPClassUID), [])
        for t in (str(fm.TransferSyntaxUID), ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if t not in ts:
                ts.append(t)
    for k, ts in seen.items():
        for t in ts:  # one context per transfer syntax (as PACS do): the file's own is always available
            ae.add_requested_context(k, [t])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"association not accepted (rejected={assoc.is_rejected}, aborted={assoc.is_aborted})")
    out: list[Any] = []
    try:
        for f in files:
            st = assoc.send_c_store(f)
            out.append(st if st and "Status" in st else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def echo(port: int, *, calling: str = "TESTSCU", called: str = "CXR-LUNG-RISK") -> int | None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        st = assoc.send_c_echo()
        return int(st.Status) if st and "Status" in st else None
    finally:
        assoc.release()


def read_audit(spool: Path) -> list[dict[str, Any]]:
    p = spool / "audit.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def events(spool: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in read_audit(spool) if e["event"] == name]


def wait_for(pred, timeout: float, what: str, interval: float = 0.25):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class ServeProcess:
    """``cxr-lung-risk serve`` as a real subprocess (stderr into SPOOL/../serve-N.log)."""

    def __init__(self, spool: Path, weights: Path | None, *, port: int | None = None, metrics_port: int | None = None,
                 extra: Sequence[str] = (), ae_title: str = "CXR-LUNG-RISK", env: dict[str, str] | None = None) -> None:
        """``weights`` None: no --weights (e.g. ``--demo-weights`` in ``extra``); ``env``: more
        environment variables of the process."""
        self.spool = Path(spool)
        self.weights = weights
        self.env = dict(env or {})
        self.port = port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.extra = list(extra)
        self.ae_title = ae_title
        self.proc: subprocess.Popen | None = None
        self.logs: list[Path] = []

    def argv(self) -> list[str]:
        exe = shutil.which("cxr-lung-risk") or str(Path(sys.executable).with_name("cxr-lung-risk"))
        weights = ["--weights", str(self.weights)] if self.weights is not None else []
        return [exe, "serve", "--port", str(self.port), "--ae-title", self.ae_title, "--spool", str(self.spool),
                *weights, "--metrics-port", str(self.metrics_port), "--device", "cpu", *self.extra]

    def start(self, timeout: float = 180.0) -> "ServeProcess":
        log = self.spool.parent / f"{self.spool.name}-serve-{len(self.logs)}.log"
        self.logs.append(log)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), **self.env)
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(self.argv(), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(self.spool.parent))
        wait_for(lambda: self.proc.poll() is not None or self.health().get("status") == "ok", timeout, "the node to be ready")
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log_tail()}")
        return self

    def health(self) -> dict[str, Any]:
        try:
            with _NO_PROXY.open(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=5) as r:
                return json.loads(r.read())
        except Exception:  # noqa: BLE001 - not up (yet), or 503 while starting
            return {}

    def healthz(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of /healthz: 200 ok, 503 otherwise (the body says why)."""
        import urllib.error

        try:
            with _NO_PROXY.open(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def metrics(self) -> str:
        with _NO_PROXY.open(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, labels: str = "") -> float:
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith(name + (("{" + labels) if labels else "")) and not line.startswith("#"):
                head, value = line.rsplit(" ", 1)
                if head == name or head.startswith(name + "{"):
                    total += float(value)
        return total

    def log_tail(self, n: int = 60) -> str:
        if not self.logs or not self.logs[-1].exists():
            return ""
        return "\n".join(self.logs[-1].read_text(errors="replace").splitlines()[-n:])

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 120.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("serve did not stop within the timeout after SIGTERM")
        return self.proc.returncode


class Receiver:
    """A pynetdicom storage SCP on 127.0.0.1 that keeps what it receives (a stand-in destination
    for the unit-level tests; the PACS tests use a real Orthanc)."""

    def __init__(self, aet: str = "RECEIVER", port: int | None = None, ssl_context=None) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, ALL_TRANSFER_SYNTAXES, evt

        self.port = port or free_port()
        self.received: list[tuple[str, str]] = []  # (SOP Class UID, SOP Instance UID)
        self.ssl_context = ssl_context
        self._lock = threading.Lock()
        ae = self.ae = AE(ae_title=aet)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)

        def on_store(event):
            ds = event.dataset
            with self._lock:
                self.received.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
            return 0x0000

        self._handlers = [(evt.EVT_C_STORE, on_store)]
        self.server = None

    def start(self) -> "Receiver":
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=self._handlers,
                                           ssl_context=self.ssl_context)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def malformed_file(dest: Path, source: Path = SAMPLE_CR) -> Path:
    """A file whose meta is valid but whose dataset is not DICOM a parser can read: the source's
    header (no pixel data, explicit VR little endian) followed by an element with an invalid VR."""
    import io

    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(source, stop_before_pixels=True)
    ds.SOPInstanceUID = uid("malformed", dest.name)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    # (0099,0010) with the VR "ZZ": no such value representation
    dest.write_bytes(buf.getvalue() + b"\x99\x00\x10\x00ZZ\x04\x00abcd")
    return dest


def sent_by_source(spool: Path, destination: str | None = None) -> dict[str, int]:
    """Source SOP Instance UID -> how many ``sent`` events (deliveries; to ``destination`` only
    when given, else to any)."""
    out: dict[str, int] = {}
    for e in events(spool, "sent"):
        if destination is None or e["destination"] == destination:
            out[e["source_sop_uid"]] = out.get(e["source_sop_uid"], 0) + 1
    return out


def sop_of(path: Path) -> str:
    import pydicom

    return str(pydicom.filereader.read_file_meta_info(path).MediaStorageSOPInstanceUID)


def truncated_cr(dest: Path, source: Path = SAMPLE_CR) -> Path:
    """A CR whose pixel data is truncated: the source decoded to native 16-bit pixels, with only
    the first half of them (a complete, parsable data set that no decoder can make an image of)."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(source)
    arr = ds.pixel_array
    ds.SOPInstanceUID = uid("truncated", dest.name)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.BitsAllocated = 16
    data = arr.astype("<u2").tobytes()
    ds.PixelData = data[: len(data) // 2]
    ds["PixelData"].VR = "OW"
    ds.save_as(dest, enforce_file_format=True)
    return dest


def with_attributes(dest: Path, source: Path = SAMPLE_CR, **attrs: Any) -> Path:
    """A copy of ``source`` with new UIDs (from ``dest``'s name) and the given attributes set."""
    import pydicom

    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = uid("attrs", dest.name)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(dest, enforce_file_format=True)
    return dest
