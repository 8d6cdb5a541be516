"""Configuration of ``cxr-lung-risk serve``: one typed object from a YAML file and the command line.

The YAML file takes the command line's long option names as keys (``ae-title``, ``send-to``, ...;
``ae_title`` is accepted too); options given on the command line override the file. This module
imports neither torch nor pynetdicom, so a mistake costs no start-up time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import UsageError

__all__ = ["Destination", "ServeConfig", "load_config_file", "parse_destination", "CONFIG_KEYS"]

_AET_RE = re.compile(r"^[\x20-\x7e]{1,16}$")


def _check_aet(aet: str, what: str) -> str:
    aet = aet.strip()
    if not aet or not _AET_RE.match(aet) or "\\" in aet:
        raise UsageError(f"{what} {aet!r} is not a valid AE title (1 to 16 printable ASCII characters, no backslash)")
    return aet


@dataclass(frozen=True)
class Destination:
    """Where results go: a DICOM node (C-STORE), a DICOMweb STOW-RS endpoint or a FHIR server."""

    kind: str  # "dicom" | "stow" | "fhir"
    aet: str = ""
    host: str = ""
    port: int = 0
    url: str = ""
    token: str | None = None

    @property
    def key(self) -> str:
        """A file-name-safe, stable name of this destination (its outbox folder)."""
        import hashlib

        text = f"{self.aet}@{self.host}:{self.port}" if self.kind == "dicom" else self.url
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:40]
        return f"{self.kind}-{safe}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}" if self.kind == "dicom" else self.url


def parse_destination(text: str) -> Destination:
    """``AET@HOST:PORT`` -> a DICOM destination (``HOST`` may be ``[v6addr]``)."""
    m = re.fullmatch(r"\s*([^@]+)@(\[[^\]]+\]|[^:@]+):(\d{1,5})\s*", str(text))
    if not m:
        raise UsageError(f"--send-to takes AET@HOST:PORT (got {text!r})")
    port = int(m.group(3))
    if not 0 < port < 65536:
        raise UsageError(f"--send-to: port {port} is out of range")
    return Destination("dicom", aet=_check_aet(m.group(1), "--send-to"), host=m.group(2).strip("[]"), port=port)


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``serve`` needs. Times are seconds."""

    spool: Path
    port: int = 11112
    ae_title: str = "CXR-LUNG-RISK"
    bind: str = "127.0.0.1"
    weights: Path | None = None
    age_weights: Path | None = None
    model: str = "lung-risk"
    device: str = "auto"
    precision: str = "fp32"
    send_to: tuple[Destination, ...] = ()
    stow: tuple[str, ...] = ()
    stow_token: str | None = None
    stow_ca: Path | None = None  # CA bundle for an https --stow URL (default: the system's)
    fhir: tuple[str, ...] = ()  # FHIR servers' base URLs: each result's FHIR R4 bundle is POSTed there
    fhir_token: str | None = None
    fhir_ca: Path | None = None  # CA bundle for an https --fhir URL (default: the system's)
    allow_ae: tuple[str, ...] = ()  # empty: any calling AE title
    metrics_port: int | None = None  # None: no HTTP endpoint
    metrics_bind: str = "127.0.0.1"
    quiet_time: float = 5.0
    batch_size: int = 16
    workers: int | None = None  # decode worker processes (fences), ahead of scoring; None: one per core, 1..8; 0: in the node's process
    result_image: bool = True
    im_version: str = "6.8.9-9"
    sr_class: str = "3d"  # "3d": Comprehensive 3D SR (IHE AIR); "comprehensive": Comprehensive SR (...88.33)
    retry_initial: float = 2.0
    retry_max: float = 300.0
    max_attempts: int = 0  # 0: retry for ever; else an object refused this often goes to outbox/failed
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # given: peers must present a certificate signed by it
    send_tls: bool = False  # C-STORE to --send-to over TLS (trusting --tls-ca, presenting --tls-cert)
    audit_log: Path | None = None  # default: SPOOL/audit.jsonl
    max_pdu: int = 0
    poll: float = 0.25
    strict_sop_class: bool = False  # refuse (0x0122) instances of other SOP classes instead of ignoring them
    degraded_after: int = 5  # /healthz says 503 "degraded" once a destination failed this many rounds in a row (0: never)
    demo_weights: bool = False  # the SYNTHETIC weights `cxr-lung-risk demo` made in the cache (meaningless scores)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spool", Path(self.spool))
        for k in ("weights", "age_weights", "tls_cert", "tls_key", "tls_ca", "stow_ca", "fhir_ca", "audit_log"):
            v = getattr(self, k)
            if v is not None and not isinstance(v, Path):
                object.__setattr__(self, k, Path(v))

    @property
    def destinations(self) -> tuple[Destination, ...]:
        return (tuple(self.send_to) + tuple(Destination("stow", url=u, token=self.stow_token) for u in self.stow)
                + tuple(Destination("fhir", url=u, token=self.fhir_token) for u in self.fhir))

    @property
    def audit_path(self) -> Path:
        return self.audit_log or self.spool / "audit.jsonl"

    @property
    def selection(self):
        """The selection rules of the node: the listener screens with them before acknowledging,
        the worker prepares with them (``predict``'s defaults)."""
        from ..dicom_io import SelectionOptions

        return SelectionOptions()

    @property
    def weights_map(self) -> dict[str, Path]:
        if self.demo_weights:
            from ..demo import demo_weights

            lung, age = demo_weights()
            return {"lung-risk": lung, "age": age}
        w = {}
        if self.weights is not None:
            w["lung-risk"] = self.weights
        if self.age_weights is not None:
            w["age"] = self.age_weights
        return w

    def validate(self) -> "ServeConfig":
        from ..options import IM_VERSIONS, check_compute, check_sr_class
        from ..registry import resolve_models

        resolve_models(self.model)
        for name in ("port", "metrics_port"):
            v = getattr(self, name)
            if v is not None and not 0 <= int(v) < 65536:
                raise UsageError(f"--{name.replace('_', '-')} must be a TCP port (0-65535)")
        _check_aet(self.ae_title, "--ae-title")
        for a in self.allow_ae:
            _check_aet(a, "--allow-ae")
        if self.demo_weights and (self.weights is not None or self.age_weights is not None):
            raise UsageError("--demo-weights and --weights/--age-weights exclude each other")
        if self.demo_weights:
            from ..demo import demo_weights

            demo_weights()  # says what to do when demo has not made them yet
        if self.degraded_after < 0:
            raise UsageError("--degraded-after must be 0 (never) or more failed rounds")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.workers is not None and not 0 <= self.workers <= 64:
            raise UsageError("--workers must be between 0 and 64")
        if self.quiet_time < 0:
            raise UsageError("--quiet-time must be 0 or more seconds")
        if self.retry_initial <= 0 or self.retry_max < self.retry_initial:
            raise UsageError("--retry-initial must be > 0 and --retry-max at least --retry-initial")
        check_compute(self.device, self.precision)
        if self.im_version not in IM_VERSIONS:
            raise UsageError(f"--im-version must be one of {', '.join(IM_VERSIONS)}")
        check_sr_class(self.sr_class)
        for u in self.stow:
            if not re.match(r"^https?://", u):
                raise UsageError(f"--stow takes an http(s) URL (got {u!r})")
        for u in self.fhir:
            if not re.match(r"^https?://", u):
                raise UsageError(f"--fhir takes a FHIR server's http(s) base URL (got {u!r})")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("--tls-cert and --tls-key go together")
        if self.send_tls and self.tls_ca is None:
            raise UsageError("--send-tls needs --tls-ca (the CA that signed the destinations' certificates)")
        for k in ("tls_cert", "tls_key", "tls_ca", "stow_ca", "fhir_ca", "weights", "age_weights"):
            v = getattr(self, k)
            if v is not None and not v.exists():
                raise UsageError(f"--{k.replace('_', '-')} {v} does not exist")
        if self.spool.exists() and not self.spool.is_dir():
            raise UsageError(f"--spool {self.spool} exists and is not a folder")
        return self

    def with_(self, **changes: Any) -> "ServeConfig":
        return replace(self, **changes)


#: YAML keys (the long option names) -> field names.
CONFIG_KEYS = {f.name.replace("_", "-"): f.name for f in fields(ServeConfig)}


def _as_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    if isinstance(v, (list, tuple)):
        out: list[str] = []
        for x in v:
            out += _as_list(x) if isinstance(x, str) else [str(x)]
        return out
    return [str(v)]


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of option names to values -> ``{field name: value}`` (unknown keys refused)."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - the [pacs] extra installs it
        raise UsageError("--config needs PyYAML: pip install 'cxr-lung-risk[pacs]'") from None
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read --config {p}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise UsageError(f"--config {p} must be a mapping of option names to values")
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = str(k).replace("_", "-")
        if key not in CONFIG_KEYS:
            raise UsageError(f"--config {p}: unknown key {k!r} (known: {', '.join(sorted(CONFIG_KEYS))})")
        out[CONFIG_KEYS[key]] = v
    return out


def build_config(values: Mapping[str, Any]) -> ServeConfig:
    """``{field name: value}`` (from YAML and/or the command line, strings or typed) -> a validated
    :class:`ServeConfig`."""
    v = dict(values)
    if v.get("spool") in (None, ""):
        raise UsageError("serve needs --spool DIR (or `spool:` in --config)")
    if "send_to" in v:
        v["send_to"] = tuple(d if isinstance(d, Destination) else parse_destination(d) for d in _as_list(v["send_to"]))
    for k in ("stow", "allow_ae", "fhir"):
        if k in v:
            v[k] = tuple(_as_list(v[k]))
    for k in ("port", "batch_size", "workers", "max_attempts", "max_pdu", "degraded_after"):
        if k in v and v[k] is not None:
            v[k] = _int(v[k], k)
    if v.get("metrics_port") is not None:
        v["metrics_port"] = _int(v["metrics_port"], "metrics_port")
    for k in ("quiet_time", "retry_initial", "retry_max", "poll"):
        if k in v and v[k] is not None:
            try:
                v[k] = float(v[k])
            except (TypeError, ValueError):
                raise UsageError(f"--{k.replace('_', '-')} must be a number of seconds (got {v[k]!r})") from None
    for k in ("result_image", "send_tls", "strict_sop_class", "demo_weights"):
        if k in v and isinstance(v[k], str):
            v[k] = v[k].strip().lower() in ("1", "true", "yes", "on")
    return ServeConfig(**{k: x for k, x in v.items() if x is not None or k in ("metrics_port",)}).validate()


def _int(x: Any, name: str) -> int:
    try:
        return int(x)
    except (TypeError, ValueError):
        raise UsageError(f"--{name.replace('_', '-')} must be a whole number (got {x!r})") from None


def merge(file_values: Mapping[str, Any], cli_values: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults < the YAML file < the command line (``None`` on the command line: not given)."""
    out = dict(file_values)
    out.update({k: v for k, v in cli_values.items() if v is not None and v != () and v != []})
    return out


def describe(cfg: ServeConfig) -> str:
    dests: Sequence[Destination] = cfg.destinations
    return (
        f"AE {cfg.ae_title} on {cfg.bind}:{cfg.port}{' (TLS)' if cfg.tls_cert else ''}, spool {cfg.spool}, "
        f"results to {', '.join(map(str, dests)) or 'nowhere (kept in the spool)'}"
    )
