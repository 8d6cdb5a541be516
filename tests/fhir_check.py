"""FHIR test helpers: FHIR R4 validation and a loopback FHIR server.

:func:`validate_bundle` parses a bundle with two libraries, then checks what neither does:

* ``fhirclient`` (SMART on FHIR; its models are generated from FHIR **4.0.1**, R4) in strict mode:
  every element known to R4, required elements present, JSON types, date/dateTime/instant formats;
* ``fhir.resources`` (its ``R4B`` package, pydantic 2; R4B's Bundle, Observation, DiagnosticReport
  and Device are R4's): the same plus choice types (one ``value[x]``), primitive patterns (ids, codes,
  URIs) and cardinalities;
* here: the codes of the required bindings we use (statuses, Bundle.type, request.method,
  Device.deviceName.type), that every ``urn:uuid`` reference resolves inside the bundle, and each
  transaction entry's ``request``.

(``fhir.resources`` 6.1, the last release whose default package is R4, needs pydantic 1, which
Ray refuses to import with; hence fhirclient for R4 itself.)

:class:`FhirServer` is a stand-in for a FHIR server's base URL on 127.0.0.1 (no real one can be
installed here): it answers ``POST /fhir`` of a transaction Bundle with a transaction-response after
validating it with :func:`validate_bundle`, keeps what it got, and can be told to fail (``fail``:
HTTP status codes to answer with first, e.g. 503).
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

_STATUS = {
    "Observation": {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"},
    "DiagnosticReport": {"registered", "partial", "preliminary", "final", "amended", "corrected", "appended", "cancelled",
                         "entered-in-error", "unknown"},
    "Device": {"active", "inactive", "entered-in-error", "unknown"},
}
_DEVICE_NAME_TYPES = {"udi-label-name", "user-friendly-name", "patient-reported-name", "manufacturer-name", "model-name", "other"}


def _validators():
    try:
        import fhirclient.models.observation
        from fhir.resources.R4B.bundle import Bundle as R4BBundle
        from fhirclient.models.bundle import Bundle as R4Bundle
    except ImportError:  # pragma: no cover - the [test] extra installs them
        pytest.fail("fhirclient / fhir.resources are missing: pip install -e '.[test]'")
    with open(fhirclient.models.observation.__file__, encoding="utf-8") as f:
        header = f.readline()
    if "FHIR 4.0.1" not in header:  # pragma: no cover - pinned in the [test] extra
        pytest.fail(f"fhirclient's models are not FHIR R4 4.0.1: {header.strip()}")
    return R4Bundle, R4BBundle


def validate_bundle(bundle: dict[str, Any]) -> Any:
    """Validate a FHIR R4 bundle (raises on the first problem); returns fhirclient's parsed ``Bundle``."""
    R4Bundle, R4BBundle = _validators()
    parsed = R4Bundle(json.loads(json.dumps(bundle)), strict=True)  # FHIRValidationError with every problem
    R4BBundle.model_validate(bundle)  # pydantic ValidationError
    assert bundle["type"] in {"transaction", "collection", "batch", "document", "message"}
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(full_urls)) == len(full_urls), "fullUrl repeated"
    for e in bundle["entry"]:
        res = e["resource"]
        rt = res["resourceType"]
        if bundle["type"] == "transaction":
            assert e["request"]["method"] in {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"}
            assert e["request"]["url"] == f"{rt}/{res['id']}", e["request"]
            assert e["fullUrl"] == f"urn:uuid:{res['id']}"
        if rt in _STATUS:
            assert res["status"] in _STATUS[rt], (rt, res["status"])
        if rt == "Device":
            assert all(n["type"] in _DEVICE_NAME_TYPES for n in res.get("deviceName", []))
        for ref in _references(res):
            if ref.startswith("urn:uuid:"):
                assert ref in full_urls, f"{rt}/{res['id']}: reference {ref} resolves to no entry"
    return parsed


def _references(obj: Any):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from _references(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _references(v)


class _Handler(BaseHTTPRequestHandler):
    server: "FhirServer"

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def do_POST(self) -> None:  # noqa: N802
        srv = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
        with srv.lock:
            srv.attempts += 1
            status = srv.fail.pop(0) if srv.fail else None
        if self.path.rstrip("/") != "/fhir":
            return self._answer(404, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]})
        if status is not None:
            return self._answer(status, {"resourceType": "OperationOutcome",
                                         "issue": [{"severity": "error", "code": "transient", "diagnostics": "told to fail"}]})
        try:
            bundle = json.loads(body)
            validate_bundle(bundle)
        except Exception as e:  # noqa: BLE001 - a bundle that does not validate is refused, with the reason
            with srv.lock:
                srv.invalid.append(str(e)[:500])
            return self._answer(400, {"resourceType": "OperationOutcome",
                                      "issue": [{"severity": "error", "code": "invalid", "diagnostics": str(e)[:300]}]})
        with srv.lock:
            srv.received.append({"bundle": bundle, "headers": dict(self.headers)})
            for e in bundle["entry"]:
                srv.store[e["request"]["url"]] = e["resource"]
        entries = [{"response": {"status": "201 Created", "location": f"{e['request']['url']}/_history/1"}} for e in bundle["entry"]]
        self._answer(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": entries})

    def _answer(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FhirServer(ThreadingHTTPServer):
    """A loopback FHIR endpoint (``url``) that validates every POSTed bundle."""

    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.lock = threading.Lock()
        self.fail: list[int] = []
        self.attempts = 0
        self.received: list[dict[str, Any]] = []
        self.invalid: list[str] = []
        self.store: dict[str, dict[str, Any]] = {}
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/fhir"

    def start(self) -> "FhirServer":
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
