"""Input -> prepared 224x224 crop, in order, optionally in worker processes.

One job: turn each discovered input (DICOM or PNG/JPEG) into the exact uint8 image the
networks see, or a recorded reason why not. Data flows one way: ``dicom_io`` ->
``preprocess`` -> ``transforms``.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
import warnings
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from . import dicom_io, preprocess, transforms
from .dicom_io import InputFile, SelectionOptions
from .records import Status, add_warnings

__all__ = ["PrepareOptions", "Prepared", "prepare", "iter_prepared", "PreparePool", "PrepareAhead", "file_sha256", "RASTER_SUFFIXES"]

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class PrepareOptions:
    selection: SelectionOptions = field(default_factory=SelectionOptions)
    im_version: str = preprocess.IM_AUTHORS
    size: int = 224
    keep_512: bool = False  # keep the preprocessed gray image (``preprocess`` command, saliency)
    accept_raster: bool = True  # PNG/JPEG inputs (already preprocessed by the user)


@dataclass
class Prepared:
    file: InputFile
    status: Status
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    kind: str = ""  # dicom | raster
    image: np.ndarray | None = None  # uint8 CHW 3 x size x size
    gray: np.ndarray | None = None  # uint8 preprocessed gray image (DICOM only, keep_512)
    dataset: Any = None  # pydicom header without pixel data (DICOM only)
    uids: dict[str, str] = field(default_factory=dict)
    input_name: str = ""  # what records call the input when it is not a local path (a URL, a stream's name)
    identity: dict[str, Any] = field(default_factory=dict)  # sha256 of the bytes read (+ size/mtime from the runner)


def prepare(item: InputFile, opts: PrepareOptions) -> Prepared:
    """Never raises for bad input: the reason lands in the returned record. Warnings raised by
    the libraries (pydicom, numpy, Pillow) while this input is read become its warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = _prepare(item, opts)
    digest = file_sha256(item.path)
    if digest:
        p.identity["sha256"] = digest
    add_warnings(caught, p.warnings)
    return p


#: Files larger than this are not hashed for their identity (a chest radiograph is far smaller).
HASH_MAX_BYTES = 2 << 30


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a regular file's bytes, or "" (not a regular file, too large, unreadable):
    the content part of an input's recorded identity (see :mod:`cxr_lung_risk.resume`)."""
    import hashlib
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return ""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > HASH_MAX_BYTES:
            return ""
        h = hashlib.sha256()
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)
    except OSError:
        return ""
    finally:
        os.close(fd)


def _clean_header_uids(loaded) -> None:
    """The writers copy UIDs from the header: give it the cleaned single values (a UID read as
    multi-valued because of a backslash, padding...) that the records and tables show; the
    reader's warning says what was changed."""
    ds = loaded.dataset
    if ds is None:
        return
    for kw, clean in (
        ("StudyInstanceUID", loaded.study_uid),
        ("SeriesInstanceUID", loaded.series_uid),
        ("SOPInstanceUID", loaded.sop_uid),
        ("SOPClassUID", loaded.sop_class_uid),
    ):
        try:
            if kw in ds and clean and str(ds[kw].value) != clean:
                ds[kw].value = clean
        except Exception:  # noqa: BLE001 - a value that cannot even be read stays as it is
            pass


def _is_empty_file(path: Path) -> bool:
    """A regular file of 0 bytes (``stat`` only: a FIFO is never opened)."""
    import stat

    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def _prepare(item: InputFile, opts: PrepareOptions) -> Prepared:
    path = item.path
    try:
        if item.skip:  # discover's verdict (a link to a folder outside the input folder)
            return Prepared(item, Status.SKIPPED, item.skip)
        if _is_empty_file(path):  # one rule for predict and preprocess (README: empty files fail)
            return Prepared(item, Status.FAILED, "failed: the file is empty (0 bytes)")
        if opts.accept_raster and dicom_io.is_raster_image(path):
            crop = transforms.raster_crop(path, opts.size, max_pixels=opts.selection.max_pixels)
            return Prepared(item, Status.OK, kind="raster", image=transforms.to_uint8_chw(crop))
        if opts.accept_raster and path.is_file() and not dicom_io.is_dicom_file(path):
            return Prepared(item, Status.SKIPPED, "skipped: not a DICOM file or a PNG/JPEG image")
        loaded = dicom_io.load_image(path, opts.selection)
        uids = {
            "StudyInstanceUID": loaded.study_uid or "",
            "SeriesInstanceUID": loaded.series_uid or "",
            "SOPInstanceUID": loaded.sop_uid or "",
        }
        _clean_header_uids(loaded)
        status = Status(str(loaded.status))
        if status is not Status.OK:
            return Prepared(item, status, loaded.reason, list(loaded.warnings), "dicom", uids=uids)
        try:
            handed, loaded.pixels = [loaded.pixels], None  # freed once rendered (a 100-megapixel image)
            gray = preprocess.preprocess_checked(handed, loaded.meta, version=opts.im_version)
        except preprocess.ImageRefused as e:
            return Prepared(item, Status.FAILED, f"failed: {e}", list(loaded.warnings), "dicom", dataset=loaded.dataset, uids=uids)
        crop = transforms.center_crop_resize(transforms.gray_to_pil(gray), opts.size)
        return Prepared(
            item,
            Status.OK,
            warnings=list(loaded.warnings),
            kind="dicom",
            image=transforms.to_uint8_chw(crop),
            gray=gray if opts.keep_512 else None,
            dataset=loaded.dataset,
            uids=uids,
        )
    except transforms.RasterError as e:
        return Prepared(item, Status.FAILED, f"failed: {e}")
    except MemoryError:
        return Prepared(item, Status.FAILED, "failed: not enough memory to decode this image")
    except Exception as e:  # a bug or an unforeseen file: record it, keep the batch going
        return Prepared(item, Status.FAILED, f"failed: {type(e).__name__}: {str(e)[:200]}")


def default_workers() -> int:
    """Decode processes: cores - 1 (at most 8), and at least one, which is the fence that keeps a
    hostile file from costing more than its own input (see :func:`iter_prepared`)."""
    n = os.cpu_count() or 1
    return max(1, min(8, n - 1))


#: Per-input limits of a decode worker (see :func:`iter_prepared`).
WORKER_TIMEOUT_S = 300.0
WORKER_MEMORY_BYTES = 1536 << 20


def _vm_size() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


#: File descriptors a forked decode worker closes first (e.g. the ``--out`` lock: a worker that
#: outlived its run must never keep the next run out). Registered by the holder, in the parent.
CLOSE_IN_WORKERS: set[int] = set()


def _die_with_parent(parent_pid: int) -> None:
    """Make this (forked) worker end when the process that started it ends, even by SIGKILL.

    Linux: ``PR_SET_PDEATHSIG`` (the kernel sends SIGKILL when the parent exits); then, and on
    other systems, a watcher thread that polls the parent id every half second (a worker blocked
    in a decoder still dies by the kernel's signal)."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError, TypeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    import threading

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _worker_main(conn, opts: PrepareOptions, memory_bytes: int | None, parent_pid: int | None = None,
                 close_fds: tuple[int, ...] = ()) -> None:
    """A decode worker: prepare one input per message until told to stop (``None``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (inherited by fork)
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    for fd in close_fds:  # closing our copy never releases the parent's flock (same open file)
        try:
            os.close(fd)
        except OSError:
            pass
    if memory_bytes:
        try:  # address space of this worker: what it has now plus the per-input allowance
            import resource

            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = _vm_size() + int(memory_bytes)
            if hard == resource.RLIM_INFINITY or limit < hard:
                resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        except (ImportError, ValueError, OSError):
            pass
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        idx, item = msg
        try:
            res = prepare(item, opts)
        except MemoryError:
            res = Prepared(item, Status.FAILED, "failed: decoding this image needed more memory than a worker may use")
        try:
            conn.send((idx, res))
        except MemoryError:
            conn.send((idx, Prepared(item, Status.FAILED, "failed: the decoded image was too large to hand on")))
        except (OSError, EOFError):
            return
        except Exception as e:  # noqa: BLE001 - e.g. RecursionError pickling a pathological header
            conn.send((idx, Prepared(item, Status.FAILED, f"failed: the result could not be handed on ({type(e).__name__})",
                                     list(res.warnings), res.kind)))


class _Slot:
    def __init__(self, ctx, opts: PrepareOptions, memory_bytes: int | None) -> None:
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, daemon=True,
                                args=(child, opts, memory_bytes, os.getpid(), tuple(sorted(CLOSE_IN_WORKERS))))
        self.proc.start()
        child.close()
        self.conn = parent
        self.task: tuple[int, InputFile] | None = None
        self.t0 = 0.0

    def stop(self, hard: bool = False) -> None:
        if hard and self.proc.is_alive():
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (OSError, EOFError, BrokenPipeError):
                pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()


def _receive(conn) -> tuple[int, Prepared]:
    """One (index, Prepared) from a worker. Unpickling rebuilds the pydicom header in this
    process, and pydicom validates values as it does ("Invalid value for VR UI"): those warnings
    (and its log records) are the input's, not stderr's."""
    from .dicom_io import library_messages, merge_library_messages, printable

    with library_messages() as messages:
        idx, res = conn.recv()
    if messages and isinstance(res, Prepared):
        res.warnings = [printable(w) for w in merge_library_messages(list(res.warnings), messages)]
    return idx, res


def _death_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = " (killed, e.g. by the out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"failed: the decode worker died from {name}{why} while reading this file"
    return f"failed: the decode worker exited (status {code}) while reading this file"


class PreparePool:
    """Fenced decode workers, driven by one thread: :meth:`give` hands an input to an idle worker,
    :meth:`collect` returns what finished (or failed) since.

    Each worker is a fence: its address space may grow by at most ``memory_bytes`` (beyond that
    an allocation fails and the input is recorded as failed), an input that takes longer than
    ``timeout_s`` has its worker killed and is recorded as failed, and a worker that dies (e.g.
    killed by the out-of-memory killer) costs only the input it was reading. A replacement
    worker takes over. Workers are forked from the calling thread and end with it (Linux's
    parent-death signal): create, use and :meth:`close` a pool in one thread."""

    def __init__(self, opts: PrepareOptions, workers: int, *, timeout_s: float | None = WORKER_TIMEOUT_S,
                 memory_bytes: int | None = WORKER_MEMORY_BYTES) -> None:
        import multiprocessing as mp

        self._ctx = mp.get_context("fork")
        self.opts, self.timeout_s, self.memory_bytes = opts, timeout_s, memory_bytes
        self.slots = [_Slot(self._ctx, opts, memory_bytes) for _ in range(max(1, workers))]

    def idle(self) -> list["_Slot"]:
        return [s for s in self.slots if s.task is None]

    @property
    def busy(self) -> int:
        return sum(1 for s in self.slots if s.task is not None)

    def give(self, slot: "_Slot", key: Any, item: InputFile) -> None:
        slot.task, slot.t0 = (key, item), time.monotonic()
        try:
            slot.conn.send((key, item))
        except (OSError, EOFError):
            pass  # a dead worker: found by collect() through its sentinel

    def _replace(self, k: int) -> None:
        self.slots[k].stop(hard=True)
        self.slots[k] = _Slot(self._ctx, self.opts, self.memory_bytes)

    def collect(self, timeout: float | None = None) -> list[tuple[Any, Prepared]]:
        """Wait until a busy worker answers, dies or runs out of time (at most ``timeout``
        seconds; ``None``: no limit but the workers' own), then return each ``(key, Prepared)``
        that is done."""
        from multiprocessing.connection import wait

        busy = [s for s in self.slots if s.task is not None]
        if not busy:
            return []
        wait_s = timeout
        if self.timeout_s:
            left = max(0.0, min(s.t0 + self.timeout_s - time.monotonic() for s in busy))
            wait_s = left if wait_s is None else min(wait_s, left)
        ready = wait([s.conn for s in busy] + [s.proc.sentinel for s in busy], timeout=wait_s)
        out: list[tuple[Any, Prepared]] = []
        for k, s in enumerate(self.slots):
            if s.task is None:
                continue
            key, item = s.task
            result = None
            if s.conn in ready or s.proc.sentinel in ready:
                try:
                    if s.conn.poll():
                        got, result = _receive(s.conn)
                        if got != key:  # pragma: no cover - protocol error
                            result = Prepared(item, Status.FAILED, "failed: internal error (worker answered for another input)")
                except (EOFError, OSError):
                    result = None
                except Exception as e:  # noqa: BLE001 - a result that cannot be unpickled
                    result = Prepared(item, Status.FAILED, f"failed: the decode worker's result could not be read "
                                                           f"({type(e).__name__})")
                if result is None:
                    s.proc.join(timeout=5)
                    result = Prepared(item, Status.FAILED, _death_reason(s.proc.exitcode))
                    self._replace(k)
                else:
                    s.task = None
            elif self.timeout_s and time.monotonic() - s.t0 > self.timeout_s:
                result = Prepared(item, Status.FAILED, f"failed: reading this file took longer than {self.timeout_s:.0f} s; stopped")
                self._replace(k)
            if result is not None:
                out.append((key, result))
        return out

    def close(self) -> None:
        for s in self.slots:
            s.stop(hard=s.task is not None)


def iter_prepared(
    files: Iterable[InputFile],
    opts: PrepareOptions,
    workers: int = 0,
    prefetch: int = 16,
    *,
    timeout_s: float | None = WORKER_TIMEOUT_S,
    memory_bytes: int | None = WORKER_MEMORY_BYTES,
) -> Iterator[Prepared]:
    """Prepared records in input order.

    With ``workers > 0`` decoding runs in the fenced worker processes of a :class:`PreparePool`
    (per input at most ``memory_bytes`` more address space and ``timeout_s`` seconds; a worker
    that dies costs only its input), a bounded number of items ahead of the consumer (constant
    memory in the number of inputs).
    """
    if workers <= 0:
        for f in files:
            yield prepare(f, opts)
        return
    pool = PreparePool(opts, workers, timeout_s=timeout_s, memory_bytes=memory_bytes)
    window = max(prefetch, workers * 2)
    done: dict[int, Prepared] = {}
    it = enumerate(files)
    next_out = submitted = 0
    exhausted = False
    try:
        while True:
            for s in pool.idle():  # hand out work, at most `window` items ahead of the consumer
                if exhausted or submitted - next_out >= window:
                    break
                try:
                    idx, item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                submitted += 1
                pool.give(s, idx, item)
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
            if not pool.busy:
                if exhausted:
                    break
                continue
            done.update(pool.collect())
    finally:
        pool.close()


class PrepareAhead:
    """Inputs prepared in the background, ahead of their use (the PACS node decodes the next
    instances while a batch is scored).

    :meth:`want` names the inputs needed soon, oldest first (it replaces the previous list);
    ``source``, when given, is asked for that list whenever the workers would otherwise idle (at
    most every ``refresh_s``), so inputs that arrive while the caller is busy are prepared too;
    :meth:`take` returns one prepared input, waiting for it (an input not wanted yet goes first).
    A thread of its own drives a :class:`PreparePool` (``workers > 0``: the fenced worker
    processes ``predict`` uses) or prepares in this process (``workers == 0``). At most
    ``window`` wanted inputs are held prepared or in hand; what is no longer wanted is dropped.
    Keys are the caller's (e.g. a path and its modification time, so a file replaced under the
    same name is prepared again)."""

    def __init__(self, opts: PrepareOptions, workers: int, window: int = 32, *,
                 source: Callable[[], Iterable[tuple[Any, InputFile]]] | None = None, refresh_s: float = 0.25,
                 timeout_s: float | None = WORKER_TIMEOUT_S, memory_bytes: int | None = WORKER_MEMORY_BYTES) -> None:
        import collections
        import threading

        self.opts, self.workers, self.window = opts, workers, max(1, window)
        self.source, self.refresh_s = source, refresh_s
        self._limits = {"timeout_s": timeout_s, "memory_bytes": memory_bytes}
        self._cv = threading.Condition()
        self._urgent: collections.deque = collections.deque()  # (key, item) a take() waits for
        self._wanted: dict[Any, InputFile] = {}  # key -> item, oldest first, not handed out yet
        self._inflight: set[Any] = set()
        self._done: dict[Any, Prepared] = {}
        self._awaited: set[Any] = set()
        self._taken: set[Any] = set()  # taken, not yet forgotten: never wanted again
        self._closed = False
        self._paused = 0
        self.error = ""
        self.prepared = 0  # inputs this object prepared (for tests and the status)
        self._thread = threading.Thread(target=self._run, name="prepare-ahead", daemon=True)
        self._thread.start()

    def want(self, items: Iterable[tuple[Any, InputFile]]) -> None:
        with self._cv:
            wanted: dict[Any, InputFile] = {}
            for key, item in items:
                if len(wanted) >= self.window:
                    break
                if key not in self._taken:
                    wanted[key] = item
            for key in [k for k in self._done if k not in wanted and k not in self._awaited]:
                del self._done[key]
            urgent = {k for k, _ in self._urgent}
            self._wanted = {k: v for k, v in wanted.items() if k not in self._done and k not in self._inflight and k not in urgent}
            self._cv.notify_all()

    def take(self, key: Any, item: InputFile) -> Prepared:
        with self._cv:
            self._awaited.add(key)
            try:
                if key not in self._done and key not in self._inflight:
                    self._wanted.pop(key, None)
                    self._urgent.append((key, item))
                    self._cv.notify_all()
                while key not in self._done:
                    if self.error or self._closed:
                        break
                    self._cv.wait(1.0)
                else:
                    self._taken.add(key)
                    return self._done.pop(key)
            finally:
                self._awaited.discard(key)
        return prepare(item, self.opts)  # the thread has ended (a bug: self.error says): prepare here

    def forget(self, keys: Iterable[Any]) -> None:
        """These taken inputs are finished (the node moved them out of its spool): a key that
        was taken is never prepared again until forgotten, though its file is still listed."""
        with self._cv:
            self._taken.difference_update(keys)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No new input is handed to a worker inside this block (what is being decoded goes on):
        the node scores a batch in it, so that decoding takes no core from the models' threads
        (on a machine they fill, sharing costs the models more than decoding gains)."""
        with self._cv:
            self._paused += 1
        try:
            yield
        finally:
            with self._cv:
                self._paused -= 1
                self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(30)

    def _next(self, free: int) -> list[tuple[Any, InputFile]]:
        out = []
        while free > 0:
            if self._urgent:
                out.append(self._urgent.popleft())
            elif self._wanted and not self._paused and len(self._done) + len(self._inflight) + len(out) < self.window:
                key = next(iter(self._wanted))
                out.append((key, self._wanted.pop(key)))
            else:
                break
            free -= 1
        self._inflight.update(k for k, _ in out)
        return out

    def _refresh(self, last: float) -> float:
        """Ask ``source`` for the wanted list when the workers would idle (and ``refresh_s`` passed)."""
        now = time.monotonic()
        if self.source is None or now - last < self.refresh_s:
            return last
        with self._cv:
            room = not self._wanted and len(self._done) + len(self._inflight) < self.window
        if room:
            self.want(self.source())
        return now

    def _run(self) -> None:
        pool = None
        last = 0.0
        try:
            if self.workers > 0:
                pool = PreparePool(self.opts, self.workers, **self._limits)
            while True:
                last = self._refresh(last)
                with self._cv:
                    if self._closed:
                        return
                    todo = self._next(len(pool.idle()) if pool else 1)
                    if not todo and not (pool and pool.busy):
                        self._cv.wait(self.refresh_s if self.source is not None else 1.0)
                        continue
                if pool is not None:
                    for (key, item), slot in zip(todo, pool.idle()):
                        pool.give(slot, key, item)
                    results = pool.collect(timeout=0.05)
                else:
                    results = [(key, prepare(item, self.opts)) for key, item in todo]
                with self._cv:
                    for key, res in results:
                        self._inflight.discard(key)
                        self._done[key] = res
                        self.prepared += 1
                    self._cv.notify_all()
        except BaseException as e:  # noqa: BLE001 - take() falls back to preparing in the caller
            self.error = f"{type(e).__name__}: {e}"
            import logging

            logging.getLogger("cxr_lung_risk").exception("preparing ahead stopped; inputs are prepared when scored")
        finally:
            if pool is not None:
                pool.close()
            with self._cv:
                self._closed = True
                self._cv.notify_all()
