"""Download: one URL to one file over HTTP(S) (or a ``file:`` URL / local path), with the
standard library's ``urllib``. Bytes go to ``<file>.part`` under an exclusive lock and are resumed
with an HTTP ``Range`` request when interrupted (the ``Content-Range`` answer is checked); free
space is checked first; the finished file is fsync'd, its size and SHA-256 checked, and renamed
into place atomically. ``tqdm`` draws a progress bar when stderr is a terminal."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from .. import __version__
from . import identity
from ._common import CHUNK, SHA256_RE, FetchError, fsync_dir
from .layout import check_space

_TIMEOUT_S = 60.0


def _normalize_url(url: str) -> str:
    """Accept http(s)/file URLs and plain local paths (turned into ``file:`` URLs)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https", "file"):
        return url
    if parsed.scheme and len(parsed.scheme) > 1:
        raise FetchError(f"unsupported URL scheme {parsed.scheme!r} in {url} (use http, https, file or a local path)")
    p = Path(url).expanduser()
    if not p.exists():
        raise FetchError(f"{url} is neither an http(s) URL nor an existing file")
    return p.resolve().as_uri()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive, non-blocking lock so two fetches never write the same ``.part``."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FetchError(f"another fetch-weights is already writing {path.parent}; wait for it to finish") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _progress_bar(total: int | None, initial: int, desc: str, progress: bool) -> Any:
    show = bool(progress) and sys.stderr.isatty()
    if not show:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr, leave=False)


class _Interrupted(Exception):
    """The transfer stopped early; the ``.part`` file is kept and may be resumed."""


class _Restart(Exception):
    """The ``.part`` file cannot be continued; start again from byte 0."""


_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.I)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(first byte, total)`` from a Content-Range header; ``None`` for what it does not say."""
    if not value:
        return None, None
    m = _CONTENT_RANGE_RE.match(value)
    if not m:
        return None, None
    first = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) not in (None, "*") else None
    return first, total


def _open(url: str, start: int) -> Any:
    headers = {"User-Agent": f"cxr-lung-risk/{__version__} (+fetch-weights)", "Accept-Encoding": "identity"}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    req = urllib.request.Request(url, headers=headers)
    return urllib.request.urlopen(req, timeout=_TIMEOUT_S)  # noqa: S310 (scheme checked)


def _transfer_once(url: str, part: Path, expected_size: int | None, progress: bool, desc: str) -> None:
    """One HTTP request: continue (or restart) ``part``. Returns when the body ended cleanly
    and is as long as announced; raises _Interrupted/_Restart/FetchError otherwise."""
    have = part.stat().st_size if part.exists() else 0
    if expected_size is not None and have > expected_size:
        part.unlink()
        have = 0
    if expected_size is not None and have == expected_size:
        return  # already complete; verified by the caller
    try:
        resp = _open(url, have)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have > 0:
            _, total = _parse_content_range(e.headers.get("Content-Range") if e.headers else None)
            e.close()
            if total is not None and total == have:
                return  # the partial file already holds the whole resource
            raise _Restart() from None
        e.close()
        if e.code == 429 or 500 <= e.code < 600:  # busy or failing server: worth another try
            raise _Interrupted(f"HTTP {e.code} {e.reason}") from None
        raise FetchError(f"could not download {url}: the server answered HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (TimeoutError, ConnectionResetError, ConnectionAbortedError)):
            raise _Interrupted(str(reason)) from None
        raise FetchError(f"could not reach {url}: {reason} (check the network, or pass --url for a mirror)") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise _Interrupted(str(e) or type(e).__name__) from None

    with resp:
        status = getattr(resp, "status", None) or 200
        length_hdr = resp.headers.get("Content-Length")
        length = int(length_hdr) if length_hdr and length_hdr.strip().isdigit() else None
        if status == 206 and have > 0:
            first, total = _parse_content_range(resp.headers.get("Content-Range"))
            if first != have:
                raise _Restart()
            if expected_size is not None and total is not None and total != expected_size:
                raise FetchError(
                    f"{url} is {total} bytes but {expected_size} were expected; it is not the expected file"
                )
            mode, offset = "ab", have
        elif status == 200:
            # Fresh download, or a server that ignored the Range header: start over.
            if expected_size is not None and length is not None and length != expected_size:
                raise FetchError(
                    f"{url} is {length} bytes but {expected_size} were expected; it is not the expected file"
                )
            mode, offset = "wb", 0
        else:
            raise FetchError(f"could not download {url}: unexpected HTTP status {status}")

        limit = expected_size
        announced_end = offset + length if length is not None else None
        received = offset
        with open(part, mode) as out, _progress_bar(limit or announced_end, offset, desc, progress) as bar:
            try:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    if limit is not None and received + len(chunk) > limit:
                        out.flush()
                        out.close()
                        part.unlink(missing_ok=True)
                        raise FetchError(
                            f"{url} sent more than the expected {expected_size} bytes; it is not the expected file"
                        )
                    out.write(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
                raise _Interrupted(str(e) or type(e).__name__) from None
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise FetchError(f"the disk holding {part.parent} is full ({e.strerror})") from None
                raise
            finally:
                if not out.closed:
                    out.flush()
                    os.fsync(out.fileno())
        if announced_end is not None and received < announced_end:
            raise _Interrupted(f"connection closed after {received} of {announced_end} bytes")


def download(
    url: str,
    dest: Path,
    *,
    expected_size: int | None,
    expected_sha256: str | None,
    progress: bool,
    retries: int = 3,
    retry_delay: float = 1.0,
) -> str:
    """Download ``url`` to ``dest`` and return the file's SHA-256 (hex).

    Bytes go to ``dest`` + ``.part``; an existing ``.part`` is continued with an HTTP
    ``Range`` request (a server that ignores it, answers 416 or a different range makes the
    download start over). A dropped connection is resumed up to ``retries`` times, waiting
    ``retry_delay * attempt`` seconds. The complete file is fsync'd, checked against
    ``expected_size`` and ``expected_sha256`` (when given) and renamed to ``dest`` atomically.
    A size or checksum mismatch deletes the ``.part`` and raises :class:`FetchError`; an
    interruption that outlasts the retries keeps it (run again to resume).
    """
    url = _normalize_url(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    if expected_sha256 is not None and not SHA256_RE.match(expected_sha256):
        raise FetchError(f"expected SHA-256 {expected_sha256!r} is not 64 hexadecimal digits")
    if expected_size is not None and expected_size < 0:
        raise FetchError(f"expected size {expected_size} is negative")
    if expected_size is not None:
        have = part.stat().st_size if part.exists() else 0
        check_space(dest.parent, max(expected_size - have, 0), f"{dest.name}")
    desc = dest.name
    attempt = 0
    restarted = False
    with _lock(dest.with_suffix(dest.suffix + ".lock")):
        while True:
            try:
                _transfer_once(url, part, expected_size, progress, desc)
                break
            except _Restart:
                if restarted:
                    part.unlink(missing_ok=True)
                    raise FetchError(f"could not resume {url}: the server's byte ranges are inconsistent") from None
                restarted = True
                part.unlink(missing_ok=True)
            except _Interrupted as e:
                attempt += 1
                if attempt > retries:
                    got = part.stat().st_size if part.exists() else 0
                    of = f" of {expected_size}" if expected_size is not None else ""
                    raise FetchError(
                        f"download of {url} was interrupted after {got}{of} bytes ({e}); "
                        f"run fetch-weights again to resume"
                    ) from None
                time.sleep(retry_delay * attempt)

        if not part.exists():
            raise FetchError(f"download of {url} produced no data")
        size = part.stat().st_size
        if expected_size is not None and size != expected_size:
            part.unlink(missing_ok=True)
            raise FetchError(f"{url} gave {size} bytes but {expected_size} were expected; it is not the expected file")
        h = hashlib.sha256()
        identity.hash_file(part, h)
        digest = h.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256.lower():
            part.unlink(missing_ok=True)
            raise FetchError(
                f"{url} has SHA-256 {digest} but {expected_sha256.lower()} was expected; the download is corrupt or not the expected file"
            )
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
        fsync_dir(dest.parent)
    return digest
