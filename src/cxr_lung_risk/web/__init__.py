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

import argparse
import os
import signal
import sys
import threading
from typing import Sequence

__all__ = ["add_parser", "run_web", "main_command"]

EPILOG = """\
Open the address it prints in a browser. Uploads and results stay in a private temporary folder
(deleted by the page's "Delete my results" button and when the server stops); nothing is written
anywhere else. It listens on 127.0.0.1 unless --host says otherwise; any other host needs a token
(--token or $CXR_LUNG_RISK_WEB_TOKEN) that the browser brings once as ?token=... Research use
only: not a medical device.
"""


def add_parser(sub, models: Sequence[str]) -> None:
    w = sub.add_parser(
        "web",
        help="a local web page: drop radiographs, see the scores, download the results (needs the [web] extra)",
        description="A local web page for people who do not use a terminal: drop DICOM/PNG/JPEG files or a zip, "
                    "get the scores, result cards and downloads.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = w.add_argument
    a("--port", type=int, default=8080, metavar="N", help="HTTP port (default 8080; 0: any free port)")
    a("--host", default="127.0.0.1", metavar="ADDR", help="address to listen on (default 127.0.0.1; another needs a token)")
    a("--token", metavar="TOKEN", help="access token (default $CXR_LUNG_RISK_WEB_TOKEN); required unless the host is loopback")
    a("--model", choices=list(models), default="lung-risk", help="which model(s) to run (default lung-risk)")
    a("--weights", metavar="PATH", help="CXR-Lung-Risk weights (default: the fetch-weights cache)")
    a("--age-weights", metavar="PATH", help="CXR-Age weights (with --model age or all)")
    a("--demo-weights", action="store_true", help="the SYNTHETIC weights `cxr-lung-risk demo` made (meaningless scores, labelled SYNTHETIC)")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="compute device (default auto)")
    a("--max-files", type=int, default=None, metavar="N", help="files kept per browser session (default 100)")
    a("--max-upload-mb", type=int, default=None, metavar="MB", help="largest upload request, e.g. one zip (default 1024)")
    a("--no-saliency", dest="saliency", action="store_false", help="no saliency overlay (faster)")


def config_from_args(args: argparse.Namespace):
    from ..errors import UsageError
    from .engine import TOKEN_ENV, WebConfig, is_loopback, weights_from_args

    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and not token:
        raise UsageError(f"--host {args.host} is not a loopback address: give --token (or ${TOKEN_ENV}) so only you can use the page")
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    cfg = WebConfig(models=args.model, weights=weights_from_args(args.weights, args.age_weights, args.demo_weights),
                    device=args.device, host=args.host, port=args.port, token=token, saliency=args.saliency)
    if args.max_files is not None:
        if args.max_files < 1:
            raise UsageError("--max-files must be at least 1")
        cfg.max_files = args.max_files
    if args.max_upload_mb is not None:
        if args.max_upload_mb < 1:
            raise UsageError("--max-upload-mb must be at least 1")
        cfg.max_upload_bytes = args.max_upload_mb << 20
        cfg.max_file_bytes = min(cfg.max_file_bytes, cfg.max_upload_bytes)
    return cfg


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


def main_command(args: argparse.Namespace) -> int:
    """The ``web`` command (cli.py dispatches here)."""
    try:
        import flask  # noqa: F401
        import waitress  # noqa: F401
    except ImportError as e:
        print(f"cxr-lung-risk: web needs the [web] extra ({e.name} is missing): pip install 'cxr-lung-risk[web]'", file=sys.stderr)
        return 1
    return run_web(config_from_args(args))
