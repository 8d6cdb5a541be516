"""The spool: the node's durable state, moved between folders by atomic renames only.

::

    SPOOL/
      tmp/                              instances being received (removed at start: never acknowledged)
      incoming/<study>/<sop>.dcm        acknowledged (C-STORE success sent), waiting to be scored;
                                        the file's mtime is the time of receipt
      scored/<study>/<sop>.dcm          scored (or skipped by the selection rules); outbox entries exist
      work/<batch>/                     the outputs of the batch being scored (removed at start)
      results/<batch>/                  committed outputs: cxr_lung_risk.csv/.json, sr/, records.jsonl ...
      outbox/tmp/                       entries being staged (removed at start)
      outbox/<destination>/pending/<entry>/    meta.json + the DICOM objects to deliver
      outbox/<destination>/delivered/<entry>/  delivered (kept as a receipt)
      outbox/<destination>/failed/<entry>/     refused by the destination --max-attempts times
      inflight.json                     the batch being scored (crash accounting)
      quarantine/<study>/<sop>.dcm      instances that were in flight at 3 crashes: never scored again
      audit.jsonl                       the audit log
      node.lock                         one node per spool

An instance moves ``incoming -> scored`` only after its outbox entries exist (files fsynced,
entry folder renamed into place), and an entry moves ``pending -> delivered`` only after the
destination acknowledged every object. After a crash (SIGKILL, power loss) whatever was in
flight is simply still in ``incoming`` or ``pending`` and is done again; an entry's name is derived
from the source SOP Instance UID and its time of receipt, so a rescored instance whose entry
already exists (pending or delivered) is not queued a second time, and the deterministic UIDs make
a resent object identical to the first.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import UsageError
from ..outputs.base import uid_stem

__all__ = ["Spool", "Pending", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_json(path: Path, value: object, indent: int | None = None) -> None:
    """Write ``value`` as JSON to ``path`` durably and atomically (``.<name>.tmp``, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    _write_durable(tmp, json.dumps(value, indent=indent).encode())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Pending:
    """One acknowledged instance waiting in ``incoming``."""

    path: Path
    study: str
    sop: str
    received: float  # epoch seconds
    received_ns: int

    @property
    def entry_id(self) -> str:
        return f"{self.sop}-{self.received_ns}"


class Spool:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.incoming = self.root / "incoming"
        self.scored = self.root / "scored"
        self.work = self.root / "work"
        self.results = self.root / "results"
        self.outbox = self.root / "outbox"
        self.outbox_tmp = self.outbox / "tmp"
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ life cycle
    def open(self) -> "Spool":
        """Create the folders, take the node lock, and recover from a crash: partial receives,
        partial batches and partial outbox entries are removed (none was acknowledged or counted)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create --spool {self.root}: {e.strerror or e}") from None
        fd = os.open(self.root / "node.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"another cxr-lung-risk serve is using the spool {self.root}") from None
        self._lock_fd = fd
        for d in (self.tmp, self.work, self.outbox_tmp):
            shutil.rmtree(d, ignore_errors=True)
        for d in (self.tmp, self.incoming, self.scored, self.work, self.results, self.outbox, self.outbox_tmp):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ receiving
    def store(self, data: bytes, study_uid: str, sop_uid: str, check: Callable[[Path], None] | None = None) -> Pending:
        """Write one received instance durably: temporary file, ``check`` (may raise: then nothing
        is kept), fsync, rename into ``incoming``, fsync the folder. Returns when the instance
        survives a crash; only then may the C-STORE success status be sent."""
        study, sop = uid_stem(study_uid, prefix="study"), uid_stem(sop_uid, prefix="sop")
        fd, tmp = tempfile.mkstemp(prefix="rx-", suffix=".dcm", dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if check is not None:
                    check(Path(tmp))
                os.fsync(f.fileno())
            d = self.incoming / study
            dest = d / f"{sop}.dcm"
            for attempt in range(5):  # the worker removes a study folder it emptied: make it again
                d.mkdir(exist_ok=True)
                try:
                    os.replace(tmp, dest)
                    break
                except FileNotFoundError:
                    if attempt == 4:
                        raise
            fsync_dir(d)
            fsync_dir(self.incoming)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        st = dest.stat()
        return Pending(dest, study, sop, st.st_mtime, st.st_mtime_ns)

    def pending(self) -> list[Pending]:
        """Every instance in ``incoming``, oldest first."""
        out: list[Pending] = []
        try:
            studies = list(os.scandir(self.incoming))
        except FileNotFoundError:
            return out
        for s in studies:
            if not s.is_dir(follow_symlinks=False):
                continue
            try:
                for e in os.scandir(s.path):
                    if e.name.endswith(".dcm") and e.is_file(follow_symlinks=False):
                        try:
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        out.append(Pending(Path(e.path), s.name, e.name[:-4], st.st_mtime, st.st_mtime_ns))
            except FileNotFoundError:
                continue
        out.sort(key=lambda p: (p.received_ns, p.sop))
        return out

    def mark_scored(self, p: Pending) -> None:
        """``incoming -> scored`` (atomic rename; the study folder in ``incoming`` goes when empty)."""
        d = self.scored / p.study
        d.mkdir(exist_ok=True)
        os.replace(p.path, d / p.path.name)
        fsync_dir(d)
        fsync_dir(p.path.parent)
        try:
            p.path.parent.rmdir()
        except OSError:
            pass

    # ------------------------------------------------------------------ poison pills
    def begin_batch(self, batch: Iterable[Pending]) -> None:
        """Record the batch being scored (``inflight.json``): if the node dies while scoring it,
        the next start knows which instances were in flight."""
        rel = [f"{p.study}/{p.path.name}" for p in batch]
        _replace_json(self.root / "inflight.json", rel)

    def end_batch(self) -> None:
        (self.root / "inflight.json").unlink(missing_ok=True)

    def recover_inflight(self, max_crashes: int) -> list[tuple[str, int]]:
        """At start: count one crash for each instance that was in flight when the node died;
        an instance that was in flight ``max_crashes`` times (it kills the node: a decoder bug,
        a memory bomb) moves to ``quarantine/`` instead of being scored again. Returns the
        quarantined ``(path, crashes)``."""
        f = self.root / "inflight.json"
        if not f.exists():
            return []
        try:
            rel = [str(x) for x in json.loads(f.read_text())]
        except (OSError, ValueError):
            rel = []
        counts_file = self.root / "crashes.json"
        try:
            counts = json.loads(counts_file.read_text()) if counts_file.exists() else {}
        except (OSError, ValueError):
            counts = {}
        out = []
        for r in rel:
            src = self.incoming / r
            if not src.exists():
                continue
            counts[r] = n = int(counts.get(r, 0)) + 1
            if n >= max_crashes:
                dest = self.root / "quarantine" / r
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
                out.append((r, n))
        _replace_json(counts_file, counts)
        f.unlink(missing_ok=True)
        return out

    # ------------------------------------------------------------------ batches
    def new_batch_dir(self) -> Path:
        name = time.strftime("%Y%m%dT%H%M%S") + f"-{time.time_ns() % 1_000_000_000:09d}"
        d = self.work / name
        d.mkdir(parents=True)
        return d

    def commit_batch(self, work_dir: Path) -> Path:
        dest = self.results / work_dir.name
        _fsync_tree(work_dir)
        os.replace(work_dir, dest)
        fsync_dir(self.results)
        return dest

    # ------------------------------------------------------------------ outbox
    def dest_dir(self, dest_key: str, state: str) -> Path:
        return self.outbox / dest_key / state

    def entry_exists(self, dest_key: str, entry_id: str) -> bool:
        return any((self.outbox / dest_key / s / entry_id).exists() for s in ("pending", "delivered", "failed"))

    def enqueue(self, dest_key: str, entry_id: str, files: Iterable[Path], meta: dict[str, Any]) -> bool:
        """Stage an outbox entry (hard links or copies of ``files`` + ``meta.json``, all fsynced) and
        rename it into ``pending``. False (nothing done) when this entry exists already."""
        if self.entry_exists(dest_key, entry_id):
            return False
        pending = self.dest_dir(dest_key, "pending")
        pending.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f"{entry_id[:40]}-", dir=self.outbox_tmp))
        try:
            names = []
            for i, f in enumerate(files):
                name = f"{i:02d}-{f.name}"
                try:
                    os.link(f, stage / name)
                except OSError:
                    shutil.copyfile(f, stage / name)
                with open(stage / name, "rb+") as fh:
                    os.fsync(fh.fileno())
                names.append(name)
            meta = dict(meta, files=names, attempts=0, next_attempt=0.0)
            _write_durable(stage / "meta.json", json.dumps(meta, indent=1).encode())
            fsync_dir(stage)
            os.replace(stage, pending / entry_id)
            fsync_dir(pending)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return True

    def entries(self, dest_key: str, state: str = "pending") -> list[Path]:
        d = self.dest_dir(dest_key, state)
        try:
            return sorted((Path(e.path) for e in os.scandir(d) if e.is_dir()), key=lambda p: p.name)
        except FileNotFoundError:
            return []

    @staticmethod
    def read_meta(entry: Path) -> dict[str, Any]:
        return json.loads((entry / "meta.json").read_text())

    def update_meta(self, entry: Path, meta: dict[str, Any]) -> None:
        _replace_json(entry / "meta.json", meta, indent=1)
        fsync_dir(entry)

    def move_entry(self, entry: Path, state: str) -> Path:
        """``pending -> delivered`` or ``pending -> failed`` (atomic rename)."""
        d = entry.parent.parent / state
        d.mkdir(exist_ok=True)
        dest = d / entry.name
        if dest.exists():  # delivered before a crash, then re-staged: keep the first receipt
            shutil.rmtree(entry, ignore_errors=True)
        else:
            os.replace(entry, dest)
        fsync_dir(d)
        fsync_dir(entry.parent)
        return dest

    def outbox_depth(self) -> int:
        n = 0
        try:
            for d in os.scandir(self.outbox):
                if d.is_dir() and d.name != "tmp":
                    n += len(self.entries(d.name, "pending"))
        except FileNotFoundError:
            pass
        return n


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    os.fsync(fh.fileno())
            except OSError:
                pass
        fsync_dir(Path(dirpath))
