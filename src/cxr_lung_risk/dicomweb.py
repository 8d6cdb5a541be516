"""DICOMweb in and out: pull a study or series with QIDO-RS + WADO-RS, send results with STOW-RS.

Needs the optional extra ``pip install 'cxr-lung-risk[pacs]'`` (``dicomweb-client``, which brings
``requests``); nothing here is imported by the core package, and ``dicomweb-client`` only when a
DICOMweb source or destination is actually used.

A source is written as a ``predict`` INPUT::

    dicomweb+http://HOST:PORT/dicom-web/studies/<StudyInstanceUID>[/series/<SeriesInstanceUID>]
    dicomweb+https://...                   (TLS; --dicomweb-ca-bundle / --dicomweb-client-cert)

i.e. the DICOMweb base URL (``http://HOST:PORT/dicom-web``) prefixed with ``dicomweb+`` and followed
by the study (and optionally series) path. Every instance QIDO-RS lists is fetched with WADO-RS in
its stored transfer syntax and fed as bytes through :func:`cxr_lung_risk.api.prepare_input`, named
``<base>/studies/<uid>/series/<uid>/instances/<uid>`` in the tables and records; nothing is copied
to disk beyond a private temporary file per instance. An instance that cannot be fetched is
recorded as failed with the reason; a source that cannot be listed is one failed record.

:func:`stow` sends DICOM files (our SRs and result images) to a STOW-RS URL (the base URL,
``.../dicom-web``) with an optional bearer token and returns one :class:`StowResult` per file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import urlsplit

from .errors import UsageError

__all__ = [
    "SCHEME_PREFIX",
    "TOKEN_ENV",
    "STOW_TOKEN_ENV",
    "HttpOptions",
    "DicomwebSource",
    "RemoteInstance",
    "StowResult",
    "is_dicomweb_input",
    "parse_source",
    "list_instances",
    "fetch_instance",
    "iter_remote_prepared",
    "stow",
    "parse_stow_url",
    "expand_sources",
]

SCHEME_PREFIX = "dicomweb+"
TOKEN_ENV = "CXR_LUNG_RISK_DICOMWEB_TOKEN"  # bearer token of DICOMweb sources
STOW_TOKEN_ENV = "CXR_LUNG_RISK_STOW_TOKEN"  # bearer token of the --stow destination

_UID = r"[0-9]+(?:\.[0-9]+)*"
_PATH_RE = re.compile(rf"^(?P<base>.*?)/studies/(?P<study>{_UID})(?:/series/(?P<series>{_UID}))?/?$")
_MISSING_EXTRA = "DICOMweb needs the optional packages: pip install 'cxr-lung-risk[pacs]' ({})"


@dataclass(frozen=True)
class HttpOptions:
    """How to talk to a DICOMweb server: bearer token, TLS (CA bundle, client certificate and key)
    and the timeout of one request in seconds."""

    token: str | None = None
    ca_bundle: str | None = None  # a PEM file or folder; None: the system's / certifi's
    client_cert: str | None = None  # PEM certificate (with the key, or see client_key)
    client_key: str | None = None
    timeout: float = 60.0

    def session(self):
        """A ``requests.Session`` with these settings."""
        try:
            import requests
        except ImportError as e:  # pragma: no cover - requests comes with dicomweb-client
            raise UsageError(_MISSING_EXTRA.format(e)) from None
        ca_bundle = str(self.ca_bundle) if self.ca_bundle else None

        class _Session(requests.Session):
            def merge_environment_settings(self, url, proxies, stream, verify, cert):  # noqa: ANN001
                settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
                if ca_bundle:  # requests lets $REQUESTS_CA_BUNDLE / $CURL_CA_BUNDLE beat session.verify: not ours
                    settings["verify"] = ca_bundle
                return settings

        s = _Session()
        if self.token:
            s.headers["Authorization"] = f"Bearer {self.token}"
        if ca_bundle:
            s.verify = ca_bundle
        if self.client_cert:
            s.cert = (str(self.client_cert), str(self.client_key)) if self.client_key else str(self.client_cert)
        return s

    def validate(self) -> "HttpOptions":
        for what, p in (("CA bundle", self.ca_bundle), ("client certificate", self.client_cert), ("client key", self.client_key)):
            if p and not Path(p).exists():
                raise UsageError(f"the DICOMweb {what} {p} does not exist")
        if self.client_key and not self.client_cert:
            raise UsageError("a DICOMweb client key needs its client certificate")
        if self.timeout <= 0:
            raise UsageError("the DICOMweb timeout must be positive")
        return self


def _client(base_url: str, http: HttpOptions):
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError as e:
        raise UsageError(_MISSING_EXTRA.format(e)) from None
    c = DICOMwebClient(base_url, session=http.session(), timeout=http.timeout)
    c.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=200)
    return c


# ----------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class DicomwebSource:
    """A study (or one of its series) on a DICOMweb server."""

    base_url: str  # http(s)://host:port/dicom-web
    study_uid: str
    series_uid: str | None = None

    @property
    def url(self) -> str:
        u = f"{self.base_url}/studies/{self.study_uid}"
        return u + (f"/series/{self.series_uid}" if self.series_uid else "")

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.url


def is_dicomweb_input(text: object) -> bool:
    """Whether a ``predict`` INPUT names a DICOMweb source (``dicomweb+http(s)://...``)."""
    return isinstance(text, str) and text.lower().startswith(SCHEME_PREFIX)


def parse_source(text: str) -> DicomwebSource:
    """``dicomweb+http://host:port/dicom-web/studies/<uid>[/series/<uid>]`` -> :class:`DicomwebSource`
    (raises :class:`~cxr_lung_risk.errors.UsageError` with the expected form)."""
    form = "dicomweb+http(s)://HOST[:PORT]/BASE/studies/<StudyInstanceUID>[/series/<SeriesInstanceUID>]"
    if not is_dicomweb_input(text):
        raise UsageError(f"not a DICOMweb source: {text!r} (expected {form})")
    url = text[len(SCHEME_PREFIX):]
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise UsageError(f"a DICOMweb source must be an http(s) URL: {text!r} (expected {form})")
    if parts.query or parts.fragment:
        raise UsageError(f"a DICOMweb source takes no query or fragment: {text!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise UsageError(f"bad port in the DICOMweb source {text!r}") from None
    m = _PATH_RE.match(parts.path)
    if not m:
        raise UsageError(f"a DICOMweb source must name a study: {text!r} (expected {form})")
    for uid in (m.group("study"), m.group("series")):
        if uid and len(uid) > 64:
            raise UsageError(f"UID longer than 64 characters in {text!r}")
    base = f"{parts.scheme.lower()}://{parts.netloc}{m.group('base')}".rstrip("/")
    return DicomwebSource(base, m.group("study"), m.group("series"))


@dataclass(frozen=True)
class RemoteInstance:
    """One instance of a source, as QIDO-RS listed it."""

    source: DicomwebSource
    study_uid: str
    series_uid: str
    sop_uid: str

    @property
    def url(self) -> str:
        return f"{self.source.base_url}/studies/{self.study_uid}/series/{self.series_uid}/instances/{self.sop_uid}"

    @property
    def uids(self) -> dict[str, str]:
        return {"StudyInstanceUID": self.study_uid, "SeriesInstanceUID": self.series_uid, "SOPInstanceUID": self.sop_uid}


def _value(item: dict, tag: str) -> str:
    v = (item.get(tag) or {}).get("Value") or [""]
    return str(v[0]).strip()


QIDO_ACCEPT = "application/dicom+json"  # one media type: Orthanc logs an error for a list ("..., application/json")
_QIDO_FIELDS = ("0020000E", "00080018", "00200013", "00200011")  # series, SOP instance, instance and series numbers
_QIDO_PAGE = 1000
_QIDO_MAX = 1_000_000  # instances one source may list (a bound on a hostile or looping server)


def _qido_get(session: Any, url: str, params: dict[str, Any], http: HttpOptions) -> list[dict]:
    """One QIDO-RS GET -> its DICOM JSON list (``[]`` for 204 No Content); retries twice on a
    connection error or 5xx."""
    import time

    import requests

    for attempt in range(3):
        try:
            r = session.get(url, params=params, headers={"Accept": QIDO_ACCEPT}, timeout=http.timeout)
            if r.status_code >= 500 and attempt < 2:
                time.sleep(0.2 * 2 ** attempt)
                continue
            r.raise_for_status()
        except requests.ConnectionError:
            if attempt == 2:
                raise
            time.sleep(0.2 * 2 ** attempt)
            continue
        if r.status_code == 204 or not r.content:
            return []
        data = r.json()
        if isinstance(data, dict):  # some servers answer one data set instead of a list
            data = [data]
        if not isinstance(data, list):
            raise ValueError(f"QIDO-RS answer is not a DICOM JSON list ({type(data).__name__})")
        return data
    return []


def list_instances(source: DicomwebSource, http: HttpOptions | None = None, *, session: Any = None) -> list[RemoteInstance]:
    """QIDO-RS: the instances of the source's study (or series), sorted by series and instance
    number, asked page by page (``limit``/``offset``) with ``Accept: application/dicom+json``.
    Raises ``requests`` errors (connection refused, HTTP 4xx/5xx) to the caller."""
    http = http or HttpOptions()
    s = session or http.session()
    url = source.url + "/instances"
    found: list[dict] = []
    seen_sops: set[str] = set()
    offset = 0
    while offset < _QIDO_MAX:  # until an empty page: a server may cap a page below our limit
        page = [x for x in _qido_get(s, url, {"includefield": list(_QIDO_FIELDS), "limit": _QIDO_PAGE, "offset": offset}, http)
                if isinstance(x, dict)]
        new = {_value(x, "00080018") for x in page} - seen_sops
        if not page or not new:  # done, or a server that ignores offset
            break
        seen_sops |= new
        found += page
        offset += len(page)
    rows = []
    for item in found:
        sop = _value(item, "00080018")
        series = _value(item, "0020000E") or (source.series_uid or "")
        if not sop or not series:
            continue
        try:
            key = (int(_value(item, "00200011") or 0), series, int(_value(item, "00200013") or 0), sop)
        except ValueError:
            key = (0, series, 0, sop)
        rows.append((key, RemoteInstance(source, _value(item, "0020000D") or source.study_uid, series, sop)))
    rows.sort(key=lambda r: r[0])
    seen: set[str] = set()
    out = []
    for _, r in rows:
        if r.sop_uid not in seen:
            seen.add(r.sop_uid)
            out.append(r)
    return out


WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of a ``multipart/related`` message (RFC 2046)."""
    boundary = ""
    for param in content_type.split(";")[1:]:
        k, _, v = param.strip().partition("=")
        if k.strip().lower() == "boundary":
            boundary = v.strip().strip('"')
    if not boundary:
        raise ValueError(f"multipart answer without a boundary ({content_type[:80]})")
    parts = []
    for chunk in body.split(b"--" + boundary.encode("latin-1"))[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        _, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        parts.append(content[:-2] if content.endswith(b"\r\n") else content)
    return parts


def fetch_instance(inst: RemoteInstance, http: HttpOptions | None = None, *, session: Any = None, max_bytes: int | None = None) -> bytes:
    """WADO-RS: one instance's DICOM Part 10 file exactly as the server holds it (transfer syntax
    ``*``: nothing transcoded, nothing parsed here; the bounded reader of
    :func:`cxr_lung_risk.api.prepare_input` reads it). Raises ``requests`` errors (HTTP status,
    connection) and ``ValueError`` for an answer larger than ``max_bytes`` (default
    :data:`cxr_lung_risk.api.MAX_STREAM_BYTES`) or not holding exactly one instance."""
    from .api import MAX_STREAM_BYTES

    http = http or HttpOptions()
    limit = MAX_STREAM_BYTES if max_bytes is None else max_bytes
    s = session or http.session()
    with s.get(inst.url, headers={"Accept": WADO_ACCEPT}, stream=True, timeout=http.timeout) as r:
        r.raise_for_status()
        declared = r.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ValueError(f"the instance is larger than {limit} bytes ({declared})")
        buf = bytearray()
        for chunk in r.iter_content(1 << 20):
            buf += chunk
            if len(buf) > limit:
                raise ValueError(f"the instance is larger than {limit} bytes")
        ctype = r.headers.get("Content-Type", "")
    if ctype.lower().startswith("application/dicom"):  # a server that sends the part bare
        return bytes(buf)
    parts = _multipart_parts(bytes(buf), ctype)
    if len(parts) != 1:
        raise ValueError(f"WADO-RS answered {len(parts)} parts for one instance")
    return parts[0]


def _error_text(e: BaseException) -> str:
    resp = getattr(e, "response", None)
    if resp is not None and getattr(resp, "status_code", None):
        return f"HTTP {resp.status_code} {getattr(resp, 'reason', '') or ''}".strip()
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _failed(name: str, reason: str, uids: dict[str, str] | None = None):
    from .dicom_io import InputFile
    from .pipeline import Prepared
    from .records import Status

    return Prepared(InputFile(Path(name), name), Status.FAILED, reason, uids=dict(uids or {}), input_name=name)


def iter_remote_prepared(
    sources: Sequence[DicomwebSource | RemoteInstance],
    options: Any = None,
    http: HttpOptions | None = None,
) -> Iterator[Any]:
    """For each source (listed first when it is a :class:`DicomwebSource`) and each of its
    instances: fetch it and prepare it (:func:`cxr_lung_risk.api.prepare_input`) -> ``Prepared``
    (status ok / skipped / failed, never raising for a bad or unreachable instance)."""
    from . import api

    http = http or HttpOptions()
    session = http.session()
    for src in sources:
        if isinstance(src, DicomwebSource):
            try:
                items = list_instances(src, http, session=session)
            except Exception as e:  # noqa: BLE001 - one failed record for the source
                yield _failed(src.url, f"failed: could not list the DICOMweb source (QIDO-RS): {_error_text(e)}",
                              {"StudyInstanceUID": src.study_uid, **({"SeriesInstanceUID": src.series_uid} if src.series_uid else {})})
                continue
            if not items:
                yield _failed(src.url, "failed: the DICOMweb source lists no instances (QIDO-RS)", {"StudyInstanceUID": src.study_uid})
                continue
        else:
            items = [src]
        for inst in items:
            try:
                data = fetch_instance(inst, http, session=session)
            except Exception as e:  # noqa: BLE001 - recorded as this instance's failure
                yield _failed(inst.url, f"failed: could not fetch the instance (WADO-RS): {_error_text(e)}", inst.uids)
                continue
            p = api.prepare_input(data, name=inst.url, options=options)
            del data
            if not p.uids:
                p.uids = inst.uids
            yield p


def expand_sources(sources: Iterable[DicomwebSource], http: HttpOptions | None = None) -> list[DicomwebSource | RemoteInstance]:
    """List every source once (QIDO-RS), so a run knows its number of inputs before it starts:
    a source that lists is replaced by its instances, one that does not stays (and becomes one
    failed record in :func:`iter_remote_prepared`)."""
    http = http or HttpOptions()
    out: list[DicomwebSource | RemoteInstance] = []
    for s in sources:
        try:
            items = list_instances(s, http)
        except Exception:  # noqa: BLE001 - reported when iterated
            out.append(s)
            continue
        out.extend(items if items else [s])
    return out


# ----------------------------------------------------------------------------- STOW-RS
def parse_stow_url(url: str) -> str:
    """The DICOMweb base URL results are stored to (``http(s)://host:port/dicom-web``; a trailing
    ``/studies`` is dropped, since STOW-RS appends it)."""
    parts = urlsplit(str(url))
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise UsageError(f"--stow needs the http(s) base URL of a DICOMweb server, e.g. http://127.0.0.1:8042/dicom-web (got {url!r})")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise UsageError(f"bad port in the --stow URL {url!r}") from None
    base = str(url).rstrip("/")
    return base[: -len("/studies")] if base.endswith("/studies") else base


@dataclass
class StowResult:
    """What the destination said about one file."""

    path: str
    sop_uid: str
    ok: bool
    reason: str = ""
    status: int | None = None  # the HTTP status of the request that carried it

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sop_uid": self.sop_uid, "ok": self.ok, "reason": self.reason, "http_status": self.status}


@dataclass
class _Batch:
    files: list[Path] = field(default_factory=list)
    datasets: list[Any] = field(default_factory=list)


def _sop_uids_in(seq: Any) -> dict[str, str]:
    """SOP Instance UID -> failure reason (or "") of a STOW response's Referenced/Failed SOP Sequence."""
    out: dict[str, str] = {}
    for item in seq or []:
        uid = str(item.get("ReferencedSOPInstanceUID", "")).strip()
        reason = item.get("FailureReason")
        out[uid] = f"failure reason 0x{int(reason):04X}" if reason is not None else ""
    return out


def stow(
    url: str,
    files: Sequence[str | Path],
    *,
    http: HttpOptions | None = None,
    batch_size: int = 16,
) -> list[StowResult]:
    """STOW-RS: POST ``files`` (DICOM Part 10) to ``url`` (the DICOMweb base URL; ``/studies`` is
    appended) in batches of ``batch_size``. Returns one :class:`StowResult` per file, in order:
    ok when the server lists the instance as stored (Referenced SOP Sequence); failed with the
    server's reason, the HTTP status or the connection error otherwise. Never raises for a
    failed request (a destination that is down fails every file of the request)."""
    import pydicom

    http = http or HttpOptions()
    client = _client(parse_stow_url(url), http)
    results: list[StowResult] = []
    for start in range(0, len(files), max(1, batch_size)):
        chunk = [Path(f) for f in files[start:start + batch_size]]
        datasets, uids, pending = [], [], []
        done: dict[Path, StowResult] = {}
        for f in chunk:
            try:
                ds = pydicom.dcmread(f)
                datasets.append(ds)
                uids.append(str(ds.SOPInstanceUID))
                pending.append(f)
            except Exception as e:  # noqa: BLE001 - this file fails alone
                done[f] = StowResult(str(f), "", False, f"cannot read the file: {type(e).__name__}: {str(e)[:160]}")
        if not datasets:
            results += [done[f] for f in chunk]
            continue
        status, response, error = None, None, ""
        try:
            response = client.store_instances(datasets)
            status = 200
        except Exception as e:  # noqa: BLE001 - every file of this request fails with the reason
            resp = getattr(e, "response", None)
            status = getattr(resp, "status_code", None)
            error = _error_text(e)
            if resp is not None and status in (409, 202):  # the body may still say which failed
                try:
                    response = pydicom.Dataset.from_json(resp.content)
                except Exception:  # noqa: BLE001
                    response = None
        stored = _sop_uids_in(getattr(response, "ReferencedSOPSequence", None)) if response is not None else {}
        failed = _sop_uids_in(getattr(response, "FailedSOPSequence", None)) if response is not None else {}
        for f, uid in zip(pending, uids):
            if uid in stored and uid not in failed:
                done[f] = StowResult(str(f), uid, True, "", status)
            elif uid in failed:
                done[f] = StowResult(str(f), uid, False, f"the server refused it ({failed[uid] or 'no reason given'})", status)
            elif response is not None and not error:
                done[f] = StowResult(str(f), uid, False, "not listed as stored in the STOW-RS response", status)
            else:
                done[f] = StowResult(str(f), uid, False, error or "no STOW-RS response", status)
        results += [done[f] for f in chunk]
    return results
