"""``cxr-lung-risk web``: a local web page to score radiographs without a terminal (extra ``[web]``).

Drop DICOM/PNG/JPEG files (or a zip of a DICOM folder) on the page: each gets a progress bar, a
row with its status (and the reason when it was not scored), scores with units, the weights'
identity, its result card (the result image the PACS node sends; the saliency overlay on and off)
and downloads (SR, result image, CSV, JSON, everything as a zip). Built on the stable API
(:func:`~cxr_lung_risk.api.prepare_input`, :class:`~cxr_lung_risk.scoring.Scorer`,
:class:`~cxr_lung_risk.api.OutputWriter`) with the models loaded once (:mod:`.engine`); Flask
application in :mod:`.app`, served by waitress; the page is plain HTML + JavaScript + CSS shipped
in the package (works offline, no build step).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Sequence

__all__ = ["web_config", "run_web", "missing_extra", "EPILOG"]

EPILOG = """\
Open the address it prints in a browser. Uploads and results stay in a private temporary folder
(deleted by the page's "Delete my results" button and when the server stops); nothing is written
anywhere else. It listens on 127.0.0.1 unless --host says otherwise; any other host needs a token
(--token or $CXR_LUNG_RISK_WEB_TOKEN) that the browser brings once as ?token=... Research use
only: not a medical device.
"""


def web_config(*, models: str = "lung-risk", weights: str | None = None, age_weights: str | None = None,
               demo_weights: bool = False, device: str = "auto", host: str = "127.0.0.1", port: int = 8080,
               token: str | None = None, saliency: bool = True, max_files: int | None = None,
               max_upload_mb: int | None = None):
    """The checked :class:`~.engine.WebConfig` of the ``web`` command's options (the CLI's argparse
    calls this; a bad value raises :class:`~cxr_lung_risk.errors.UsageError` with one sentence)."""
    from ..errors import UsageError
    from ..demo import weights_map
    from .engine import TOKEN_ENV, WebConfig, is_loopback

    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and not token:
        raise UsageError(f"--host {host} is not a loopback address: give --token (or ${TOKEN_ENV}) so only you can use the page")
    if not 0 <= port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    cfg = WebConfig(models=models, weights=weights_map(weights, age_weights, demo_weights),
                    device=device, host=host, port=port, token=token, saliency=saliency)
    if max_files is not None:
        if max_files < 1:
            raise UsageError("--max-files must be at least 1")
        cfg.max_files = max_files
    if max_upload_mb is not None:
        if max_upload_mb < 1:
            raise UsageError("--max-upload-mb must be at least 1")
        cfg.max_upload_bytes = max_upload_mb << 20
        cfg.max_file_bytes = min(cfg.max_file_bytes, cfg.max_upload_bytes)
    return cfg


def missing_extra() -> str | None:
    """The sentence to show when the ``[web]`` extra is not installed, else None."""
    try:
        import flask  # noqa: F401
        import waitress  # noqa: F401
    except ImportError as e:
        return f"web needs the [web] extra ({e.name} is missing): pip install 'cxr-lung-risk[web]'"
    return None


def run_web(cfg, *, ready=None) -> int:
    """Serve the page until SIGINT/SIGTERM; the private folder is deleted on the way out."""
    from waitress.server import create_server

    from .app import create_app
    from .engine import Engine

    engine = Engine(cfg)
    stop = threading.Event()
    server = None
    try:
        app = create_app(engine)
        server = create_server(app, host=cfg.host, port=cfg.port, threads=8, ident="cxr-lung-risk",
                               max_request_body_size=cfg.max_upload_bytes + (16 << 20), clear_untrusted_proxy_headers=True)
        engine.start()
        port = server.effective_port
        host = cfg.host if ":" not in cfg.host else f"[{cfg.host}]"
        url = f"http://{host}:{port}/" + (f"?token={cfg.token}" if cfg.token else "")
        print(f"cxr-lung-risk web: open {url} (Ctrl-C stops it and deletes the uploads)", file=sys.stderr, flush=True)
        if ready is not None:
            ready(server, engine)

        def on_signal(signum, frame):  # noqa: ARG001
            stop.set()
            server.close()

        previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                previous[s] = signal.signal(s, on_signal)
        try:
            server.run()
        except (KeyboardInterrupt, OSError):
            if not stop.is_set():
                raise
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    finally:
        if server is not None:
            try:
                server.close()
            except Exception:  # noqa: BLE001 - closing twice
                pass
        engine.close()
        print("cxr-lung-risk web: stopped; uploads and results deleted", file=sys.stderr, flush=True)
    return 0
