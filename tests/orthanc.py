"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the PACS tests.

Each :class:`Orthanc` runs its own ``/usr/sbin/Orthanc`` process with a generated JSON
configuration: free 127.0.0.1 ports (HTTP and DICOM), its own storage folder, the DICOMweb plugin
at ``/dicom-web/``, remote access refused (loopback only), authentication off (or a generated
user), and ``DicomModalities`` from the caller, so Orthanc can C-STORE to the node under test. It
never touches the system service (``/etc/orthanc``, port 8042/4242) that the Debian package sets up.

Used through the fixtures of ``tests/pacs_fixtures.py`` (``orthanc``, ``orthanc_factory``); the
helpers talk to Orthanc's REST API with the standard library only (no proxies: loopback only)::

    oid = orthanc.upload(path)["ID"]                 # REST POST /instances
    orthanc.study_instances(study_uid)               # [{"ID", "MainDicomTags", ...}, ...]
    orthanc.tags(instance_id)                        # {keyword: value} (simplified tags)
    orthanc.send_study(study_uid, "node")            # /modalities/node/store (C-STORE to our node)
    orthanc.stop(); orthanc.start()                  # destination down / back up (same ports, same data)
"""
from __future__ import annotations

import base64
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

ORTHANC_BIN_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
PLUGIN_GLOBS = ("/usr/share/orthanc/plugins*/libOrthancDicomWeb.so*", "/usr/lib/orthanc/libOrthancDicomWeb.so*")

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def orthanc_binary() -> str | None:
    """The Orthanc executable (Debian package ``orthanc``), or None."""
    for c in ORTHANC_BIN_CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("Orthanc")


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's shared library (Debian package ``orthanc-dicomweb``), or None."""
    for pattern in PLUGIN_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancError(RuntimeError):
    pass


def make_test_pki(folder: str | os.PathLike) -> dict[str, Path]:
    """A throw-away CA with a server certificate for 127.0.0.1/localhost and a client certificate,
    made with the ``openssl`` command (PEM files in ``folder``): ``ca``, ``server_cert``,
    ``server_key``, ``client_cert``, ``client_key``."""
    exe = shutil.which("openssl")
    if exe is None:
        raise OrthancError("openssl is not installed (apt-get install openssl)")
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    f = {k: d / f"{k}.pem" for k in ("ca", "ca_key", "server_cert", "server_key", "client_cert", "client_key")}

    def run(*args: str) -> None:
        subprocess.run([exe, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=cxr-lung-risk test CA",
        "-keyout", str(f["ca_key"]), "-out", str(f["ca"]),
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for who, cn, ext in (("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                         ("client", "cxr-lung-risk test client", "extendedKeyUsage=clientAuth")):
        csr, extfile = d / f"{who}.csr", d / f"{who}.ext"
        extfile.write_text(ext + "\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", str(f[f"{who}_key"]), "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(f["ca"]), "-CAkey", str(f["ca_key"]), "-CAcreateserial",
            "-days", "2", "-out", str(f[f"{who}_cert"]), "-extfile", str(extfile))
    return f


class TlsFront:
    """An HTTPS front for a plain-HTTP Orthanc: terminates TLS on a free 127.0.0.1 port (server
    certificate ``cert``/``key``; with ``client_ca``, a client certificate signed by it is required)
    and pipes the bytes to ``127.0.0.1:target_port``.

    Why: Debian's Orthanc 1.10.1 crashes (SIGSEGV) on its first HTTPS connection when its own
    ``SslEnabled`` is on, so TLS towards Orthanc is tested the way sites usually deploy it: a TLS
    reverse proxy in front. ``url`` is ``https://127.0.0.1:PORT``.
    """

    def __init__(self, target_port: int, cert: str | os.PathLike, key: str | os.PathLike, client_ca: str | os.PathLike | None = None) -> None:
        self.target_port = target_port
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        if client_ca:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(str(client_ca))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.handshake_failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(30)
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshake_failures += 1
            raw.close()
            return
        try:
            up = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
        except OSError:
            conn.close()
            return

        def pipe(src, dst) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        t = threading.Thread(target=pipe, args=(up, conn), daemon=True)
        t.start()
        pipe(conn, up)
        t.join(30)
        conn.close()
        up.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(5)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGKILL this Orthanc when the test process dies (no server outlives a killed run)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Orthanc:
    """One Orthanc server under ``workdir`` (storage, index, configuration, log).

    ``modalities``: ``{name: (aet, host, port)}`` Orthanc may C-STORE to (host must be loopback);
    ``aet``: Orthanc's own AE title; ``auth``: True to require a generated HTTP user
    (:attr:`credentials`); ``overwrite``: ``OverwriteInstances`` (False: Orthanc keeps the first
    copy of a SOP Instance UID it already has); ``extra``: more configuration keys (merged last).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        auth: bool = False,
        overwrite: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise OrthancError("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
        plugin = dicomweb_plugin()
        if plugin is None:
            raise OrthancError("the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
        self.binary, self.plugin = binary, plugin
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.credentials: tuple[str, str] | None = ("cxr", secrets.token_hex(12)) if auth else None
        self.modalities: dict[str, tuple[str, str, int]] = dict(modalities or {})
        self.overwrite = overwrite
        self.extra = dict(extra or {})
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.proc: subprocess.Popen | None = None
        self._write_config()

    # ------------------------------------------------------------------ addresses
    @property
    def url(self) -> str:
        """REST base URL, e.g. ``http://127.0.0.1:40123``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """DICOMweb base URL (QIDO/WADO/STOW), e.g. ``http://127.0.0.1:40123/dicom-web``."""
        return f"{self.url}/dicom-web"

    @property
    def dicom_address(self) -> str:
        """``AET@127.0.0.1:PORT``, the form ``--send-to`` takes."""
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    # ------------------------------------------------------------------ configuration / process
    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": f"cxr-test-{self.http_port}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "StorageCompression": False,
            "Plugins": [self.plugin],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # loopback only
            "AuthenticationEnabled": self.credentials is not None,
            "RegisteredUsers": dict([self.credentials]) if self.credentials else {},
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomModalitiesInDatabase": False,
            "DicomModalities": {name: [aet, host, int(port)] for name, (aet, host, port) in self.modalities.items()},
            "DicomScuTimeout": 10,
            "OrthancPeers": {},
            "OverwriteInstances": self.overwrite,
            "SaveJobs": False,
            "HttpThreadsCount": 20,
            "ConcurrentJobs": 2,
            "StableAge": 2,
            "HttpsVerifyPeers": False,
            "WebDavEnabled": False,
            "ExecuteLuaEnabled": False,
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
        }
        cfg.update(self.extra)
        return cfg

    def _write_config(self) -> None:
        self.config_path.write_text(json.dumps(self.config(), indent=1))

    def set_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Add/replace a modality in the configuration; takes effect at the next :meth:`start`
        (or at once through REST when running)."""
        self.modalities[name] = (aet, host, int(port))
        self._write_config()
        if self.running:
            self.request("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": int(port)})

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> "Orthanc":
        """Start the server and wait until REST ``/system`` answers (same ports and data as before)."""
        if self.running:
            return self
        self._write_config()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [self.binary, f"--logfile={self.workdir / 'orthanc-internal.log'}", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent if os.name == "posix" else None,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OrthancError(f"Orthanc exited with status {self.proc.returncode} at start; log:\n{self.log_tail()}")
            try:
                self.get("/system", timeout=2)
                return self
            except (OSError, OrthancError) as e:
                last = e
                time.sleep(0.1)
        self.stop()
        raise OrthancError(f"Orthanc did not answer /system within {timeout} s ({last}); log:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); waits until its ports are closed."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self._wait_ports_closed(timeout=10)

    def kill(self) -> None:
        """SIGKILL the server (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        self._wait_ports_closed(timeout=10)

    def restart(self) -> "Orthanc":
        self.stop()
        return self.start()

    def _wait_ports_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = False
            for port in (self.http_port, self.dicom_port):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.settimeout(0.2)
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        busy = True
            if not busy:
                return
            time.sleep(0.1)

    def log_tail(self, n: int = 40) -> str:
        text = ""
        for p in (self.log_path, self.workdir / "orthanc-internal.log"):
            if p.is_file():
                text += p.read_text(errors="replace")
        return "\n".join(text.splitlines()[-n:])

    # ------------------------------------------------------------------ REST
    def request(self, method: str, path: str, body: Any = None, *, content_type: str | None = None,
                accept: str | None = None, timeout: float = 60.0, raw: bool = False) -> Any:
        """One REST call; JSON bodies/answers are (de)serialised unless ``raw`` (bytes answer)."""
        data = None
        headers: dict[str, str] = {}
        if isinstance(body, (bytes, bytearray)):
            data = bytes(body)
            headers["Content-Type"] = content_type or "application/dicom"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type or "application/json"
        if accept:
            headers["Accept"] = accept
        if self.credentials:
            token = base64.b64encode(f"{self.credentials[0]}:{self.credentials[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with _NO_PROXY.open(req, timeout=timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:2000].decode(errors="replace")
            raise OrthancError(f"{method} {path}: HTTP {e.code}: {detail}") from None
        if raw:
            return payload
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return payload

    def get(self, path: str, **kw) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw) -> Any:
        return self.request("POST", path, body, **kw)

    # ------------------------------------------------------------------ helpers
    def upload(self, path_or_bytes: str | os.PathLike | bytes) -> dict[str, Any]:
        """Store one DICOM file (REST ``POST /instances``) -> Orthanc's answer (``ID``,
        ``ParentStudy``, ``Status``: ``Success`` or ``AlreadyStored``)."""
        data = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else Path(path_or_bytes).read_bytes()
        return self.post("/instances", bytes(data))

    def lookup(self, uid: str, level: str | None = None) -> list[str]:
        """Orthanc IDs of the resources with this DICOM UID (``/tools/lookup``)."""
        hits = self.post("/tools/lookup", uid.encode(), content_type="text/plain") or []
        return [h["ID"] for h in hits if level is None or h.get("Type", "").lower() == level.lower()]

    def study_id(self, study_uid: str) -> str | None:
        ids = self.lookup(study_uid, "Study")
        return ids[0] if ids else None

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """The instances of a study (``/studies/{id}/instances``); [] when Orthanc has no such study."""
        sid = self.study_id(study_uid)
        return [] if sid is None else list(self.get(f"/studies/{sid}/instances"))

    def instances(self) -> list[str]:
        """Orthanc IDs of every instance stored."""
        return list(self.get("/instances"))

    def tags(self, instance_id: str) -> dict[str, Any]:
        """An instance's tags as ``{keyword: value}`` (``/instances/{id}/simplified-tags``)."""
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def file(self, instance_id: str) -> bytes:
        """An instance's DICOM file (``/instances/{id}/file``)."""
        return self.get(f"/instances/{instance_id}/file", raw=True)

    def send(self, modality: str, resources: list[str], *, synchronous: bool = True, timeout: float = 120.0) -> Any:
        """C-STORE Orthanc resources (IDs) to a configured modality (``/modalities/{name}/store``)."""
        body = {"Resources": list(resources), "Synchronous": synchronous, "Timeout": int(timeout)}
        return self.post(f"/modalities/{modality}/store", body, timeout=timeout + 10)

    def send_study(self, study_uid: str, modality: str, **kw) -> Any:
        """C-STORE a whole study (by StudyInstanceUID) to a configured modality."""
        sid = self.study_id(study_uid)
        if sid is None:
            raise OrthancError(f"Orthanc has no study {study_uid}")
        return self.send(modality, [sid], **kw)

    def echo(self, modality: str) -> bool:
        """C-ECHO a configured modality (``/modalities/{name}/echo``)."""
        try:
            self.post(f"/modalities/{modality}/echo", {})
            return True
        except OrthancError:
            return False

    def delete_all(self) -> None:
        """Delete every stored patient (a clean Orthanc between tests of one module)."""
        for pid in self.get("/patients"):
            self.request("DELETE", f"/patients/{pid}")

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
