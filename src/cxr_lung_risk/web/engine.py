"""The web page's back end without HTTP: private folders, uploads, and one scoring thread.

:class:`Engine` owns a private temporary folder (mode 0700) with one sub-folder per browser
session: ``in/<item>/`` the uploaded files, ``out/<batch>/`` what :class:`~cxr_lung_risk.api.OutputWriter`
writes (SR, result image, saliency overlay, tables) and ``card/`` the result cards shown on the
page. Nothing is written anywhere else; :meth:`Engine.delete_session` and :meth:`Engine.close`
remove it.

Scoring runs in one background thread (at a lower CPU priority) that loads the models once
(:func:`cxr_lung_risk.api.load_scorer`) and takes the queued files in batches: :func:`~cxr_lung_risk.api.prepare_input` (the exact
published preprocessing and the hostile-input-safe reader), :meth:`~cxr_lung_risk.scoring.Scorer.score`,
:class:`~cxr_lung_risk.api.OutputWriter`; then, unless new files are waiting (their scores
come first), the saliency overlays of the batch. Request threads only queue work and read state,
so the page answers while a batch is scored.
"""
from __future__ import annotations

import io
import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable

__all__ = ["WebConfig", "Item", "Session", "Engine", "UploadRefused", "safe_name", "TOKEN_ENV"]

TOKEN_ENV = "CXR_LUNG_RISK_WEB_TOKEN"
MAX_FILES = 100  # files (zip members count one each) kept per browser session
MAX_UPLOAD_BYTES = 1 << 30  # one upload request (one file or one zip)
MAX_FILE_BYTES = 512 << 20  # one file, also one zip member unpacked
_CHUNK = 1 << 20
_UNITS = {"a": "years", "mo": "months", "d": "days"}


@dataclass
class WebConfig:
    """What ``cxr-lung-risk web`` runs with."""

    models: str = "lung-risk"
    weights: dict[str, Path] = field(default_factory=dict)
    device: str = "auto"
    precision: str = "fp32"
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    max_files: int = MAX_FILES
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_file_bytes: int = MAX_FILE_BYTES
    saliency: bool = True
    batch_size: int = 8
    temp_parent: Path | None = None  # where the private folder is made (default: the system's temp folder)


class UploadRefused(Exception):
    """An upload refused as a whole (too many files, too large): the message says why."""

    def __init__(self, message: str, code: int = 413) -> None:
        super().__init__(message)
        self.code = code


def safe_name(name: str, default: str = "upload") -> str:
    """A file name from a browser or a zip member as a harmless display name: POSIX separators,
    no empty, ``.`` or ``..`` parts, printable, at most 200 characters."""
    parts = [p for p in str(name or "").replace("\\", "/").split("/") if p not in ("", ".", "..")]
    text = "/".join(parts) or default
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text[-200:]


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.0f} MB"


@dataclass
class Item:
    """One uploaded file (or zip member) and what became of it."""

    id: str
    name: str
    path: Path | None
    status: str = "queued"  # queued, reading, scoring, writing, ok, skipped, failed
    progress: float = 0.0
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    row: dict[str, Any] | None = None
    files: dict[str, Path] = field(default_factory=dict)  # sr, result, saliency, card, card_overlay
    uploaded: float = field(default_factory=time.time)
    finished: float | None = None
    overlay: str = ""  # the saliency overlay: "", pending, ok, or failed: reason

    @property
    def done(self) -> bool:
        return self.status in ("ok", "skipped", "failed")

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "status": self.status, "progress": round(self.progress, 3),
            "reason": self.reason, "warnings": list(self.warnings), "scores": list(self.scores),
            "risk_group": _risk_group(self.row), "files": sorted(self.files), "overlay": self.overlay,
            "seconds": None if self.finished is None else round(self.finished - self.uploaded, 3),
        }


def _risk_group(row: dict[str, Any] | None) -> str:
    """A risk group column, when the outputs carry one (``*Risk_Group*``); "" otherwise."""
    for k, v in (row or {}).items():
        if "risk_group" in k.lower() and v not in (None, ""):
            return str(v)
    return ""


class Session:
    """One browser's uploads: a folder of its own in the engine's private folder."""

    def __init__(self, sid: str, folder: Path) -> None:
        self.id = sid
        self.dir = folder
        self.items: dict[str, Item] = {}
        self.deleted = False
        self.batches = 0


class Engine:
    def __init__(self, cfg: WebConfig, *, scorer: Any = None) -> None:
        self.cfg = cfg
        parent = str(cfg.temp_parent) if cfg.temp_parent else None
        self.root = Path(tempfile.mkdtemp(prefix="cxr-lung-risk-web-", dir=parent))  # mode 0700
        self.lock = threading.Condition()
        self.sessions: dict[str, Session] = {}
        self.queue: deque[tuple[Session, Item]] = deque()
        self.overlay_jobs: deque[tuple[Any, ...]] = deque()  # (session, out, names, items): saliency after the scores
        self.scorer = scorer
        self.state = "ready" if scorer is not None else "loading"
        self.error = ""
        self.weights: list[Any] = []  # WeightsLine per model
        self.busy: Session | None = None
        self.stopping = False
        self.on_batch: Callable[[float, int], None] | None = None  # (seconds, n) after each batch (benchmarks)
        self._thread = threading.Thread(target=self._run, name="web-scorer", daemon=True)

    # ------------------------------------------------------------------ lifetime
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the scoring thread (after its batch) and delete every upload and result."""
        with self.lock:
            self.stopping = True
            self.queue.clear()
            self.overlay_jobs.clear()
            self.lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(120)
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ sessions
    def new_session(self) -> Session:
        sid = secrets.token_urlsafe(24)
        folder = self.root / secrets.token_hex(8)
        folder.mkdir(mode=0o700)
        s = Session(sid, folder)
        with self.lock:
            self.sessions[sid] = s
        return s

    def session(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self.lock:
            s = self.sessions.get(sid)
        return s if s is not None and not s.deleted else None

    def delete_session(self, s: Session) -> None:
        """Forget the session's items and delete its folder now (and once more when the batch in
        progress, if it is this session's, has finished: what it still writes goes too)."""
        with self.lock:
            s.deleted = True
            self.sessions.pop(s.id, None)
            self.queue = deque((ss, it) for ss, it in self.queue if ss is not s)
            self.overlay_jobs = deque(j for j in self.overlay_jobs if j[0] is not s)
        shutil.rmtree(s.dir, ignore_errors=True)

    # ------------------------------------------------------------------ state
    @property
    def synthetic(self) -> bool:
        return any(getattr(w, "synthetic", False) for w in self.weights)

    def info(self) -> dict[str, Any]:
        return {
            "models": self.state, "error": self.error or None,
            "weights": [{"model": w.title, "kind": w.kind, "sha256": w.sha256, "text": w.text} for w in self.weights],
            "synthetic": self.synthetic,
            "queued": len(self.queue),
            "limits": {"files": self.cfg.max_files, "upload_bytes": self.cfg.max_upload_bytes, "file_bytes": self.cfg.max_file_bytes},
        }

    # ------------------------------------------------------------------ uploads
    def add_upload(self, s: Session, name: str, stream: BinaryIO) -> list[Item]:
        """Keep one uploaded file (a zip: each of its files) in the session and queue it."""
        name = safe_name(name)
        with self.lock:
            room = self.cfg.max_files - len(s.items)
        if room <= 0:
            raise UploadRefused(f"at most {self.cfg.max_files} files per session: delete your results to start again")
        item = self._new_item(s, name)
        ok = self._copy(stream, item.path, self.cfg.max_file_bytes if not name.lower().endswith(".zip") else self.cfg.max_upload_bytes)
        items = [item]
        if not ok:
            self._fail(item, f"failed: the file is larger than {_mb(self.cfg.max_file_bytes)}; not read")
        elif name.lower().endswith(".zip") or _is_zip(item.path):
            items = self._unzip(s, item, room)
        with self.lock:
            for it in items:
                s.items[it.id] = it
                if not it.done:
                    self.queue.append((s, it))
            self.lock.notify_all()
        return items

    def _new_item(self, s: Session, name: str) -> Item:
        iid = secrets.token_hex(6)
        d = s.dir / "in" / iid
        d.mkdir(parents=True, mode=0o700)
        suffix = PurePosixPath(name).suffix.lower()[:16]
        return Item(iid, name, d / ("input" + (suffix if suffix.isascii() and suffix[1:].isalnum() else "")))

    @staticmethod
    def _copy(src: BinaryIO, dest: Path, limit: int) -> bool:
        total = 0
        with open(dest, "wb") as f:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    return True
                total += len(chunk)
                if total > limit:
                    return False
                f.write(chunk)

    @staticmethod
    def _fail(item: Item, reason: str) -> None:
        item.status, item.reason, item.progress, item.finished = "failed", reason, 1.0, time.time()
        if item.path is not None:
            shutil.rmtree(item.path.parent, ignore_errors=True)
            item.path = None

    def _unzip(self, s: Session, zitem: Item, room: int) -> list[Item]:
        """The files of an uploaded zip, one item each, unpacked with limits (count, size per file,
        total): a zip bomb becomes one failed row with its reason."""
        cfg = self.cfg
        try:
            zf = zipfile.ZipFile(zitem.path)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            self._fail(zitem, f"failed: not a readable zip file ({type(e).__name__})")
            return [zitem]
        items: list[Item] = []
        with zf:
            members = [i for i in zf.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
            if not members:
                self._fail(zitem, "failed: the zip holds no files")
                return [zitem]
            if len(members) > room:
                self._fail(zitem, f"failed: the zip holds {len(members)} files; at most {room} more fit in this session "
                                  f"(at most {cfg.max_files}); nothing unpacked")
                return [zitem]
            total = 0
            for info in members:
                it = self._new_item(s, f"{zitem.name}/{safe_name(info.filename)}")
                items.append(it)
                if info.flag_bits & 0x1:
                    self._fail(it, "failed: the zip member is encrypted; not unpacked")
                    continue
                limit = min(cfg.max_file_bytes, cfg.max_upload_bytes - total)
                try:
                    with zf.open(info) as src:
                        ok = self._copy(src, it.path, limit)
                        written = it.path.stat().st_size
                except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as e:
                    self._fail(it, f"failed: could not unpack it from the zip: {type(e).__name__}: {str(e)[:160]}")
                    continue
                except Exception as e:  # noqa: BLE001 - zlib.error and friends: one member fails
                    self._fail(it, f"failed: could not unpack it from the zip: {type(e).__name__}: {str(e)[:160]}")
                    continue
                total += written
                if not ok:
                    self._fail(it, f"failed: it unpacks to more than {_mb(limit)} (a zip bomb?); not unpacked further")
                    if total >= cfg.max_upload_bytes:
                        break
        zitem.path.unlink(missing_ok=True)
        shutil.rmtree(zitem.path.parent, ignore_errors=True)
        return items

    # ------------------------------------------------------------------ scoring thread
    def _load(self) -> None:
        from .. import api
        from ..outputs.result_image import ResultImageWriter

        if self.scorer is None:
            self.scorer = api.load_scorer(self.cfg.models, weights=self.cfg.weights or None, device=self.cfg.device,
                                          precision=self.cfg.precision)
        self.weights = ResultImageWriter(self.root, self.scorer.models, deterministic=True, names=None).weights

    def _run(self) -> None:
        _lower_priority()  # the page's requests come first (the models' threads inherit this)
        try:
            self._load()
            self.state = "ready"
        except BaseException as e:  # noqa: BLE001 - shown on the page; queued files fail with it
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
        while True:
            job = None
            with self.lock:
                while not self.queue and not self.overlay_jobs and not self.stopping:
                    self.lock.wait()
                if self.stopping:
                    return
                if self.queue:  # new files first: their scores before the overlays of earlier ones
                    s, first = self.queue.popleft()
                    batch = [first]
                    rest = deque()
                    while self.queue and len(batch) < self.cfg.batch_size:
                        ss, it = self.queue.popleft()
                        if ss is s:
                            batch.append(it)
                        else:
                            rest.append((ss, it))
                    self.queue.extendleft(reversed(rest))
                else:
                    job = self.overlay_jobs.popleft()
                    s, batch = job[0], []
                self.busy = s
            t0 = time.perf_counter()
            try:
                if job is not None:
                    if not s.deleted:
                        self._overlays(*job[1:])
                elif self.state != "ready":
                    for it in batch:
                        self._fail(it, f"failed: the models could not be loaded: {self.error}")
                else:
                    self.process(s, batch)
            except BaseException as e:  # noqa: BLE001 - never let the thread die: the batch fails
                for it in batch:
                    if not it.done:
                        it.status, it.reason, it.finished = "failed", f"failed: {type(e).__name__}: {str(e)[:200]}", time.time()
                        it.progress = 1.0
            finally:
                with self.lock:
                    self.busy = None
                    if s.deleted:
                        shutil.rmtree(s.dir, ignore_errors=True)
            if self.on_batch is not None and job is None:
                self.on_batch(time.perf_counter() - t0, len(batch))

    def process(self, s: Session, batch: list[Item]) -> None:
        """Read, score and write one batch. The rows are done (status ``ok``, scores, SR, result
        image: the one the node sends) before the saliency overlay is computed for them (the
        overlay card follows; ``overlay`` says ``pending`` until then)."""
        from .. import __version__, api
        from ..outputs.result_image import ResultValue, render_result

        scorer = self.scorer
        prepared = []
        for it in batch:
            it.status, it.progress = "reading", 0.05
            p = api.prepare_input(it.path, name=it.name)
            it.warnings = list(p.warnings)
            if p.status is api.Status.OK:
                prepared.append((it, p))
                it.status, it.progress = "scoring", 0.3
            else:
                it.status, it.reason, it.progress, it.finished = str(p.status), p.reason, 1.0, time.time()
                self._drop_upload(it)
        if not prepared:
            return

        def step(f: float) -> None:
            for it, _ in prepared:
                it.progress = min(0.8, it.progress + 0.5 * f)

        rows = scorer.score([p for _, p in prepared], on_step=step)
        for it, _ in prepared:
            it.status, it.progress = "writing", 0.85
        s.batches += 1
        out = s.dir / "out" / f"batch-{s.batches:04d}-{secrets.token_hex(3)}"
        with api.OutputWriter(out, scorer.models, scorer.columns(), formats=("csv", "json", "sr"), result_image=True) as w:
            records = w.write_scored([p for _, p in prepared], rows)
        cards = s.dir / "card"
        cards.mkdir(exist_ok=True)
        models = [m for m in scorer.models]
        done = []
        for (it, p), row, rec in zip(prepared, rows, records):
            scored = [m for m in models if m.spec.column in row]
            values = [ResultValue(m.spec.title, float(row[m.spec.column]), m.spec.unit) for m in scored]
            it.scores = [{"title": v.title, "column": m.spec.column, "value": v.value, "unit": _UNITS.get(v.unit, v.unit), "text": v.text}
                         for v, m in zip(values, scored)]
            it.row = dict(row)
            it.warnings = list(rec.warnings)
            for kind, rels in rec.outputs.items():
                if rels:
                    it.files[{"result_image": "result"}.get(kind, kind)] = out / rels[0]
            try:  # the card: the result image's pixels, for DICOM and PNG inputs alike
                it.files["card"] = _save_png(render_result(p.image, values, self.weights, software_version=__version__),
                                             cards / f"{it.id}.png")
            except Exception as e:  # noqa: BLE001 - the scores stand; the card is missing
                it.warnings.append(f"the result card could not be drawn: {type(e).__name__}: {str(e)[:160]}")
            it.status = str(rec.status)
            it.reason = rec.reason if rec.status is not api.Status.OK else ""
            it.progress, it.finished = 1.0, time.time()
            self._drop_upload(it)
            if rec.status is api.Status.OK:
                done.append((it, p, row, values))
                it.overlay = "pending" if self.cfg.saliency else ""
        if self.cfg.saliency and done and not s.deleted:  # next, unless new files are waiting
            with self.lock:
                self.overlay_jobs.append((s, out, w.names, done))

    def _overlays(self, out: Path, names: Any, done: list) -> None:
        """The saliency overlay (PNG + DICOM SC) and the overlay card of each scored item."""
        from .. import __version__
        from ..outputs.result_image import render_result
        from ..saliency import SaliencyWriter

        scorer = self.scorer
        try:
            sw = SaliencyWriter(out, scorer.models, method="gradient", deterministic=True, names=names)
            written = sw.write_batch([p for _, p, _, _ in done])
        except Exception as e:  # noqa: BLE001 - the scores stand; no overlay
            for it, *_ in done:
                it.overlay = f"failed: {type(e).__name__}: {str(e)[:160]}"
            return
        import numpy as np
        from PIL import Image

        for (it, p, row, values), files in zip(done, written):
            try:
                for kind, rel in files:
                    it.files.setdefault(kind, out / rel)
                with Image.open(it.files["saliency"]) as im:
                    overlay = np.asarray(im.convert("RGB"))
                card = render_result(p.image, values, self.weights, software_version=__version__, overlay=overlay,
                                     overlay_title=f"Saliency overlay ({scorer.models[0].spec.title})")
                it.files["card_overlay"] = _save_png(card, out.parent.parent / "card" / f"{it.id}.overlay.png")
                it.overlay = "ok"
            except Exception as e:  # noqa: BLE001 - this item has no overlay
                it.overlay = f"failed: {type(e).__name__}: {str(e)[:160]}"

    @staticmethod
    def _drop_upload(it: Item) -> None:
        if it.path is not None:  # the upload itself is not needed any more
            shutil.rmtree(it.path.parent, ignore_errors=True)
            it.path = None

    # ------------------------------------------------------------------ tables
    def columns(self) -> list[str]:
        return self.scorer.columns() if self.scorer is not None else ["File"]

    def rows(self, s: Session) -> list[dict[str, Any]]:
        with self.lock:
            items = list(s.items.values())
        return [it.row for it in items if it.row is not None and it.status == "ok"]


#: How much lower the scoring thread's CPU priority is than the request threads' (Linux ``nice``).
SCORING_NICE = 10


def _lower_priority() -> None:
    """Lower this thread's CPU priority (Linux: per thread; the compute threads it starts inherit
    it), so a request is answered at once while a batch is scored."""
    import os
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SCORING_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: the same priority
        pass


def _is_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[:4] == b"PK\x03\x04" and head[128:132] != b"DICM"


def _save_png(rgb: Any, path: Path) -> Path:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", optimize=False)
    path.write_bytes(buf.getvalue())
    return path


def is_loopback(host: str) -> bool:
    h = host.strip("[]")
    return h in ("localhost", "::1") or h.startswith("127.")

