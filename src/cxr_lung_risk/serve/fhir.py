"""Delivery of the FHIR bundles (``serve --fhir URL``): each outbox entry's bundle is POSTed to the
FHIR server's base URL as a transaction (``Content-Type: application/fhir+json``), with the bearer
token and CA bundle of ``--fhir-token``/``--fhir-ca`` (the same HTTP session code as STOW-RS).

The bundle's entries are PUTs of ids derived from the SR's UIDs (:mod:`cxr_lung_risk.outputs.fhir`),
so a retry after a lost answer updates the same resources instead of making new ones. A server
that cannot be reached or fails as a whole (connection error, 5xx, 401/403/404/408/429) raises
:class:`~cxr_lung_risk.errors.DeliveryError` (the round is retried with backoff); a bundle the
server refuses (another 4xx, or a transaction-response entry that is not 2xx) fails alone, with the
server's OperationOutcome diagnostics as the reason.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

__all__ = ["send_fhir", "FHIR_TOKEN_ENV"]

FHIR_TOKEN_ENV = "CXR_LUNG_RISK_FHIR_TOKEN"
_DOWN = (401, 403, 404, 408, 429)


def _reason(resp: Any) -> str:
    """The OperationOutcome's diagnostics (or the HTTP status line) of a refusal."""
    text = f"HTTP {resp.status_code} {getattr(resp, 'reason', '') or ''}".strip()
    try:
        body = resp.json()
    except Exception:  # noqa: BLE001 - not JSON: the status says it
        return text
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        msgs = [str(i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code") or "") for i in body.get("issue", [])]
        msgs = [m for m in msgs if m]
        if msgs:
            return f"{text}: {'; '.join(msgs)}"[:300]
    return text


def _refused_entries(resp: Any) -> str:
    """A transaction-response whose entries are not all 2xx -> the reason; '' when all are."""
    try:
        body = resp.json()
    except Exception:  # noqa: BLE001 - a server that answers 2xx without a body stored it
        return ""
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        return ""
    bad = [str((e.get("response") or {}).get("status", "")) for e in body.get("entry", []) or []]
    bad = [s for s in bad if s and not s.strip().startswith("2")]
    return f"the server refused {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} of the transaction ({bad[0]})" if bad else ""


def send_fhir(cfg: Any, dest: Any, files: Sequence[Path]) -> dict[Path, str]:
    """POST each bundle of ``files`` to ``dest.url`` -> {file: error} for those not stored.
    Raises :class:`~cxr_lung_risk.errors.DeliveryError` when the server is down."""
    from ..dicomweb import HttpOptions
    from ..errors import DeliveryError

    import requests

    http = HttpOptions(token=dest.token, ca_bundle=str(cfg.fhir_ca) if getattr(cfg, "fhir_ca", None) else None, timeout=60.0)
    session = http.session()
    url = dest.url.rstrip("/")
    headers = {"Content-Type": "application/fhir+json; charset=utf-8", "Accept": "application/fhir+json"}
    errors: dict[Path, str] = {}
    down: list[str] = []
    try:
        for f in files:
            try:
                data = Path(f).read_bytes()
                json.loads(data)
            except (OSError, ValueError) as e:
                errors[Path(f)] = f"cannot read the bundle: {type(e).__name__}: {str(e)[:160]}"
                continue
            try:
                resp = session.post(url, data=data, headers=headers, timeout=http.timeout)
            except requests.ConnectionError as e:
                text = str(e)
                reason = ("connection refused (nothing listens on that port)" if "refused" in text.lower()
                          else "connection timed out" if "timed out" in text.lower() else text[:200])
                raise DeliveryError(f"FHIR POST to {dest.url}: cannot connect: {reason}") from None
            except requests.RequestException as e:
                raise DeliveryError(f"FHIR POST to {dest.url}: {type(e).__name__}: {str(e)[:200]}") from None
            if resp.status_code >= 500 or resp.status_code in _DOWN:
                down.append(_reason(resp))
                errors[Path(f)] = down[-1]
                continue
            if not 200 <= resp.status_code < 300:
                errors[Path(f)] = f"the server refused the bundle ({_reason(resp)})"
                continue
            refused = _refused_entries(resp)
            if refused:
                errors[Path(f)] = refused
    finally:
        session.close()
    if files and len(down) == len(files):
        raise DeliveryError(f"FHIR POST to {dest.url}: {down[0]}"[:300])
    return errors
