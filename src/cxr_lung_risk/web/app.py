"""``cxr-lung-risk web``: the Flask application and its waitress server.

Routes (all answer JSON errors as ``{"error": sentence}``):

* ``GET /`` the page; ``GET /static/...`` its script and style (shipped in the package; no CDN);
* ``GET /api/state`` models, weights, limits and this browser's files with status and progress;
* ``POST /api/upload`` one or more files (multipart field ``files``; a zip is unpacked);
* ``GET /api/items/<id>/<kind>`` ``sr``, ``result`` (the result image, DICOM), ``card`` /
  ``card_overlay`` (the result card as PNG, without / with the saliency overlay), ``saliency``;
* ``GET /api/results.csv``, ``/api/results.json``, ``/api/results.zip`` (everything);
* ``POST /api/delete`` deletes this browser's files and results; ``GET /healthz``.

A browser is a session (a random cookie); its files live in its own folder of the engine's
private temporary folder. Bound to a loopback address the server answers only requests whose
``Host`` is loopback (no DNS rebinding); with a token (``--token``, ``$CXR_LUNG_RISK_WEB_TOKEN``,
required off loopback) every request must carry it: ``?token=`` once (then a cookie), or
``Authorization: Bearer``.
"""
from __future__ import annotations

import csv
import hmac
import io
import json
import math
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from flask import Flask, Request, abort, jsonify, make_response, render_template, request, send_file
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .engine import Engine, UploadRefused, WebConfig, is_loopback

__all__ = ["create_app"]

SESSION_COOKIE = "cxr_lung_risk_session"
TOKEN_COOKIE = "cxr_lung_risk_token"
_KINDS = {"sr": ("application/dicom", ".dcm"), "sc": ("application/dicom", ".dcm"), "result": ("application/dicom", ".dcm"), "saliency": ("image/png", ".png"),
          "card": ("image/png", ".png"), "card_overlay": ("image/png", ".png")}


def _download_name(item_name: str, kind: str) -> str:
    base = item_name.rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80] or "image"
    return f"{stem}.{kind}{_KINDS[kind][1]}"


def create_app(engine: Engine) -> Flask:
    cfg: WebConfig = engine.cfg
    here = Path(__file__).parent

    class PrivateRequest(Request):
        """Large form parts are spooled into the engine's private folder, never the system's."""

        def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):  # noqa: D401
            return tempfile.TemporaryFile(dir=engine.root)

    app = Flask(__name__, template_folder=str(here / "templates"), static_folder=str(here / "static"))
    app.request_class = PrivateRequest
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_upload_bytes + (1 << 20)
    app.config["MAX_FORM_MEMORY_SIZE"] = 1 << 20
    app.config["SEND_FILE_MAX_AGE_DEFAULT"] = 0
    loopback = is_loopback(cfg.host)

    @app.before_request
    def _guard():
        if loopback:
            host = (request.host or "").rsplit(":", 1)[0] if not (request.host or "").startswith("[") else request.host.split("]")[0] + "]"
            if not is_loopback(host):
                return _error(f"this server answers only on a loopback address (Host {request.host!r} refused)", 403)
        if cfg.token:
            given = request.args.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
            auth = request.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                given = auth[7:]
            if not hmac.compare_digest(given.encode(), cfg.token.encode()):
                return _error("a token is needed: open the address the server printed (with ?token=...)", 401)
        return None

    @app.after_request
    def _headers(resp):
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                                   "script-src 'self'; connect-src 'self'; frame-ancestors 'none'")
        resp.headers.setdefault("Cache-Control", "no-store")
        if cfg.token and request.args.get("token"):
            resp.set_cookie(TOKEN_COOKIE, cfg.token, httponly=True, samesite="Strict")
        return resp

    def _error(msg: str, code: int):
        return make_response(jsonify({"error": msg}), code)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(e):
        return _error(f"the upload is larger than {cfg.max_upload_bytes / (1 << 20):.0f} MB; send fewer or smaller files "
                      "(or one zip at most that large)", 413)

    @app.errorhandler(HTTPException)
    def _http(e):
        return _error(e.description or e.name, e.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(e):  # a bug in one request: the server stays up and says what happened
        app.logger.exception("unexpected error")
        return _error(f"unexpected {type(e).__name__}: {str(e)[:200]}", 500)

    def _session(create: bool = False):
        s = engine.session(request.cookies.get(SESSION_COOKIE))
        if s is None and create:
            s = engine.new_session()
        return s

    def _with_cookie(resp, s):
        if s is not None and request.cookies.get(SESSION_COOKIE) != s.id:
            resp.set_cookie(SESSION_COOKIE, s.id, httponly=True, samesite="Strict")
        return resp

    @app.get("/")
    def index():
        from .. import __version__
        from ..outputs.result_image import RESEARCH_ONLY

        return render_template("index.html", research=RESEARCH_ONLY, version=__version__, cfg=cfg,
                               max_upload_mb=cfg.max_upload_bytes // (1 << 20), max_file_mb=cfg.max_file_bytes // (1 << 20))

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok" if engine.state == "ready" else engine.state})

    @app.get("/api/state")
    def state():
        s = _session()
        out = engine.info()
        if s is not None:
            with engine.lock:
                items = list(s.items.values())
            out["items"] = [it.public() for it in items]
            out["folder"] = str(s.dir)
        else:
            out["items"], out["folder"] = [], None
        return jsonify(out)

    @app.post("/api/upload")
    def upload():
        files = request.files.getlist("files")
        if not files:
            return _error("no file in the upload (multipart field 'files')", 400)
        s = _session(create=True)
        added: list[dict[str, Any]] = []
        try:
            for f in files:
                added += [it.public() for it in engine.add_upload(s, f.filename or "upload", f.stream)]
        except UploadRefused as e:
            return _with_cookie(make_response(jsonify({"error": str(e), "items": added}), e.code), s)
        return _with_cookie(jsonify({"items": added}), s)

    def _item(iid: str):
        s = _session()
        it = s.items.get(iid) if s is not None else None
        if it is None:
            abort(404, "no such file in this session")
        return it

    @app.get("/api/items/<iid>/<kind>")
    def item_file(iid: str, kind: str):
        it = _item(iid)
        path = it.files.get(kind)
        if kind not in _KINDS or path is None or not path.is_file():
            abort(404, f"no {kind} for {it.name}")
        ctype, _ = _KINDS[kind]
        return send_file(path, mimetype=ctype, as_attachment=request.args.get("download") == "1",
                         download_name=_download_name(it.name, kind), max_age=0)

    def _csv_bytes(s) -> bytes:
        cols = engine.columns()
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        for row in engine.rows(s):
            w.writerow(["" if row.get(c) is None else (repr(row[c]) if isinstance(row.get(c), float) else str(row[c])) for c in cols])
        return buf.getvalue().encode("utf-8")

    def _json_bytes(s) -> bytes:
        rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in engine.rows(s)]
        return (json.dumps(rows, indent=1) + "\n").encode("utf-8")

    def _manifest_bytes(s) -> bytes:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["File", "status", "reason"])
        for it in list(s.items.values()):
            w.writerow([it.name, it.status, it.reason])
        return buf.getvalue().encode("utf-8")

    def _need_session():
        s = _session()
        if s is None:
            abort(404, "nothing uploaded in this session")
        return s

    @app.get("/api/results.csv")
    def results_csv():
        data = _csv_bytes(_need_session())
        return send_file(io.BytesIO(data), mimetype="text/csv", as_attachment=True, download_name="cxr_lung_risk.csv")

    @app.get("/api/results.json")
    def results_json():
        data = _json_bytes(_need_session())
        return send_file(io.BytesIO(data), mimetype="application/json", as_attachment=True, download_name="cxr_lung_risk.json")

    @app.get("/api/results.zip")
    def results_zip():
        s = _need_session()
        buf = tempfile.TemporaryFile(dir=engine.root)
        used: set[str] = set()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("cxr_lung_risk.csv", _csv_bytes(s))
            zf.writestr("cxr_lung_risk.json", _json_bytes(s))
            zf.writestr("manifest.csv", _manifest_bytes(s))
            for it in list(s.items.values()):
                for kind, path in sorted(it.files.items()):
                    if path.is_file():
                        name = f"{kind}/{_download_name(it.name, kind)}"
                        k = 2
                        while name in used:
                            name = f"{kind}/{k}-{_download_name(it.name, kind)}"
                            k += 1
                        used.add(name)
                        zf.write(path, name)
        buf.seek(0)
        return send_file(buf, mimetype="application/zip", as_attachment=True, download_name="cxr_lung_risk_results.zip")

    @app.post("/api/delete")
    def delete():
        s = _session()
        if s is not None:
            engine.delete_session(s)
        resp = jsonify({"deleted": s is not None})
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    return app
