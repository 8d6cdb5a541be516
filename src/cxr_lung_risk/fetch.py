"""Download, verify, extract and find the model weights (the ``fetch-weights`` subcommand).

Cache layout (``cache_dir()`` is ``$CXR_LUNG_RISK_HOME`` or the platform's user cache dir)::

    <cache>/cxr_lung_risk/ensamble-model-weights/Lung_Age_081221_{0..19}.pth
    <cache>/cxr_lung_risk/SOURCE.json       url, size, sha256 of the zip, date, per-file sizes/sha256
    <cache>/cxr_age/PLCO_Fine_Tuned_120419.pth
    <cache>/cxr_age/SOURCE.json

URLs, sizes, checksums and names come from the model specs (``models/*.json``, ``weights``
section). Downloads go to ``<file>.part`` and are resumed with an HTTP ``Range`` request when
interrupted; the finished file is fsync'd and renamed into place atomically, then its size and
SHA-256 are checked. The CXR-Lung-Risk zip is extracted into a staging folder that is renamed
into place only once every expected member has been read and CRC-checked, and the zip is then
deleted (its SHA-256 is kept in ``SOURCE.json``).

Only the standard library's ``urllib`` is used for HTTP; ``tqdm`` draws a progress bar when
stderr is a terminal. Every failure a user can cause or meet is raised as :class:`FetchError`
with one clear sentence.
"""
from __future__ import annotations

from .errors import CxrLungRiskError, WeightsError, WeightsNotFoundError
import contextlib
import datetime as _dt
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import __version__
from .spec import age_spec, lung_risk_spec

__all__ = [
    "FetchError",
    "cache_dir",
    "lung_risk_weights_dir",
    "age_weights_path",
    "lung_risk_expected_members",
    "find_lung_risk_weights",
    "find_age_weights",
    "download",
    "extract_zip_safely",
    "fetch_weights",
    "weights_identity",
    "main",
]

#: Environment variables: cache root, and per-model mirror overrides (URL, size, SHA-256).
ENV_HOME = "CXR_LUNG_RISK_HOME"
ENV_OVERRIDES = {
    "lung-risk": ("CXR_LUNG_RISK_WEIGHTS_URL", "CXR_LUNG_RISK_WEIGHTS_SIZE", "CXR_LUNG_RISK_WEIGHTS_SHA256"),
    "age": ("CXR_AGE_WEIGHTS_URL", "CXR_AGE_WEIGHTS_SIZE", "CXR_AGE_WEIGHTS_SHA256"),
}
MODELS = ("lung-risk", "age")
RECORD_NAME = "SOURCE.json"
_LUNG_SUBDIR = "cxr_lung_risk"
_AGE_SUBDIR = "cxr_age"
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


class FetchError(CxrLungRiskError):
    """A download, verification, extraction or lookup failed; the message is one sentence."""


# --------------------------------------------------------------------------- cache layout


def cache_dir() -> Path:
    """Root of the weights cache: ``$CXR_LUNG_RISK_HOME`` if set, else the user cache dir."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("cxr-lung-risk"))


def _root(root: Path | str | None) -> Path:
    return Path(root).expanduser() if root is not None else cache_dir()


def lung_risk_weights_dir(root: Path | None = None) -> Path:
    """``<cache>/cxr_lung_risk/<archive folder>``: where the 20 ensemble files are extracted."""
    return _root(root) / _LUNG_SUBDIR / lung_risk_spec().weights["archive_folder"]


def age_weights_path(root: Path | None = None) -> Path:
    """``<cache>/cxr_age/<file>``: the cached CXR-Age state dict."""
    return _root(root) / _AGE_SUBDIR / age_spec().weights["file"]


def lung_risk_expected_members() -> list[str]:
    """Archive paths of the ensemble files inside the published zip, e.g.
    ``ensamble-model-weights/Lung_Age_081221_0.pth`` (from the spec)."""
    spec = lung_risk_spec()
    folder = spec.weights["archive_folder"]
    return [f"{folder}/{m.file}" for m in spec.members]


def _lung_risk_files() -> list[str]:
    return [m.file for m in lung_risk_spec().members]


def _record_path(model: str, root: Path | None) -> Path:
    sub = _LUNG_SUBDIR if model == "lung-risk" else _AGE_SUBDIR
    return _root(root) / sub / RECORD_NAME


# --------------------------------------------------------------------------- lookup


def _is_complete_dir(d: Path, names: Sequence[str]) -> bool:
    try:
        return all((d / n).is_file() and (d / n).stat().st_size > 0 for n in names)
    except OSError:
        return False


def find_lung_risk_weights(explicit: str | Path | None = None) -> Path | None:
    """Where the CXR-Lung-Risk ensemble weights are.

    ``explicit`` (a directory holding the ``.pth`` files, a directory holding the archive
    folder, or the published zip) wins; a path that does not exist or is neither a folder nor a
    zip raises :class:`FetchError`. Without it, the cached folder is returned if it holds all 20
    files, else ``None`` (run ``cxr-lung-risk fetch-weights``).
    """
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_dir():
            sub = p / lung_risk_spec().weights["archive_folder"]
            if not any(p.glob("*.pth")) and sub.is_dir():
                return sub
            return p
        if p.is_file():
            if zipfile.is_zipfile(p):
                return p
            raise WeightsError(f"weights path {p} is neither a folder nor a zip archive")
        raise WeightsNotFoundError(f"weights path {p} does not exist")
    d = lung_risk_weights_dir()
    return d if _is_complete_dir(d, _lung_risk_files()) else None


def find_age_weights(explicit: str | Path | None = None) -> Path | None:
    """Where the CXR-Age weights file is: ``explicit`` (a ``.pth`` file, or a folder holding the
    spec's file name), else the cached file if present with the spec's size, else ``None``."""
    name = age_spec().weights["file"]
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_dir():
            if (p / name).is_file():
                return p / name
            raise WeightsNotFoundError(f"folder {p} does not contain {name}")
        if p.is_file():
            return p
        raise WeightsNotFoundError(f"weights path {p} does not exist")
    f = age_weights_path()
    size = age_spec().weights.get("size")
    try:
        ok = f.is_file() and (size is None or f.stat().st_size == int(size) or _recorded_size_ok("age", f))
    except OSError:
        ok = False
    return f if ok else None


def _recorded_size_ok(model: str, f: Path) -> bool:
    """True when the cache's record says ``f`` came from a mirror with that (overridden) size."""
    try:
        rec = json.loads((f.parent / RECORD_NAME).read_text("utf-8"))
        return int(rec.get("size", -1)) == f.stat().st_size
    except (OSError, ValueError, TypeError):
        return False


# --------------------------------------------------------------------------- download helpers


def _fmt_bytes(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0  # type: ignore[assignment]
    return str(n)


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


def _hash_file(path: Path, h: "hashlib._Hash") -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)


def _fsync_dir(d: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


def _check_space(d: Path, need: int, what: str) -> None:
    try:
        free = shutil.disk_usage(d).free
    except OSError:
        return
    if need > free:
        raise FetchError(
            f"not enough free disk space in {d} for {what}: need {_fmt_bytes(need)}, "
            f"{_fmt_bytes(free)} free (set {ENV_HOME} or --cache to another disk)"
        )


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
                    chunk = resp.read(_CHUNK)
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
    if expected_sha256 is not None and not _SHA256_RE.match(expected_sha256):
        raise FetchError(f"expected SHA-256 {expected_sha256!r} is not 64 hexadecimal digits")
    if expected_size is not None and expected_size < 0:
        raise FetchError(f"expected size {expected_size} is negative")
    if expected_size is not None:
        have = part.stat().st_size if part.exists() else 0
        _check_space(dest.parent, max(expected_size - have, 0), f"{dest.name}")
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
        _hash_file(part, h)
        digest = h.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256.lower():
            part.unlink(missing_ok=True)
            raise FetchError(
                f"{url} has SHA-256 {digest} but {expected_sha256.lower()} was expected; the download is corrupt or not the expected file"
            )
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
        _fsync_dir(dest.parent)
    return digest


# --------------------------------------------------------------------------- zip extraction


def _unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    parts = re.split(r"[/\\]", name)
    if ".." in parts:
        return "a '..' component"
    mode = info.external_attr >> 16
    if mode and stat.S_ISLNK(mode):
        return "a symbolic link"
    return None


def _resolve_members(zf: zipfile.ZipFile, zip_path: Path, expected: Sequence[str]) -> dict[str, zipfile.ZipInfo]:
    infos = zf.infolist()
    for info in infos:
        why = _unsafe_reason(info)
        if why is not None:
            raise FetchError(f"{zip_path} is unsafe: member {info.filename!r} is {why}; refusing to extract it")
    by_name: dict[str, list[zipfile.ZipInfo]] = {}
    by_base: dict[str, list[zipfile.ZipInfo]] = {}
    for info in infos:
        if info.is_dir():
            continue
        by_name.setdefault(info.filename, []).append(info)
        by_base.setdefault(info.filename.replace("\\", "/").rsplit("/", 1)[-1], []).append(info)
    chosen: dict[str, zipfile.ZipInfo] = {}
    missing: list[str] = []
    for member in expected:
        cands = by_name.get(member) or by_base.get(member.rsplit("/", 1)[-1], [])
        if len(cands) == 1:
            chosen[member] = cands[0]
        elif not cands:
            missing.append(member)
        else:
            raise FetchError(f"{zip_path} holds {len(cands)} members named {member!r}; it is not the expected archive")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FetchError(f"{zip_path} lacks the expected member {missing[0]}{more}; it is not the expected archive")
    return chosen


def extract_zip_safely(zip_path: Path, dest: Path, *, expected_members: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Extract ``expected_members`` (archive paths such as
    ``ensamble-model-weights/Lung_Age_081221_0.pth``) from ``zip_path`` to ``dest/<path>``.

    Every member of the archive is checked first: an absolute path, a ``..`` component or a
    symbolic link anywhere rejects the whole archive before anything is written. An expected
    member missing at its exact path is accepted under another folder if exactly one member has
    its file name. Members are read fully (so zipfile checks each CRC) into a staging folder
    inside ``dest``, which is renamed into place only when all succeeded. Returns
    ``{member: {"size": bytes, "sha256": hex}}``. Corruption raises :class:`FetchError`.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    if not expected_members:
        raise FetchError("no expected members given for extraction")
    for m in expected_members:
        if _unsafe_reason(zipfile.ZipInfo(m)) is not None or not m.strip("/"):
            raise FetchError(f"expected member {m!r} is not a safe relative path")
    corrupt = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, zipfile.LargeZipFile)
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / f".extract-{uuid.uuid4().hex[:12]}"
    result: dict[str, dict[str, Any]] = {}
    try:
        try:
            zf = zipfile.ZipFile(zip_path)
        except FileNotFoundError:
            raise FetchError(f"{zip_path} does not exist") from None
        except corrupt as e:
            raise FetchError(f"{zip_path} is corrupt: {e}; delete it and run fetch-weights again") from None
        with zf:
            # The .pth members are zip files themselves: a truncated archive can make zipfile
            # find a member's directory instead of the archive's. A whole archive starts at 0.
            offsets = [i.header_offset for i in zf.infolist()]
            if not offsets or min(offsets) != 0:
                raise FetchError(
                    f"{zip_path} is corrupt: its central directory is missing or truncated; "
                    f"delete it and run fetch-weights again"
                )
            chosen = _resolve_members(zf, zip_path, expected_members)
            _check_space(dest, sum(i.file_size for i in chosen.values()), f"extracting {zip_path.name}")
            staging.mkdir()
            for member, info in chosen.items():
                target = staging.joinpath(*member.split("/"))
                if not target.resolve().is_relative_to(staging.resolve()):
                    raise FetchError(f"{zip_path} is unsafe: member {member!r} escapes the destination")
                target.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                n = 0
                try:
                    with zf.open(info) as src, open(target, "wb") as out:
                        for chunk in iter(lambda: src.read(_CHUNK), b""):
                            out.write(chunk)
                            h.update(chunk)
                            n += len(chunk)
                        out.flush()
                        os.fsync(out.fileno())
                except corrupt as e:
                    raise FetchError(
                        f"{zip_path} is corrupt: member {info.filename} cannot be read ({e}); delete it and run fetch-weights again"
                    ) from None
                if n != info.file_size:
                    raise FetchError(
                        f"{zip_path} is corrupt: member {info.filename} gave {n} of {info.file_size} bytes; delete it and run fetch-weights again"
                    )
                result[member] = {"size": n, "sha256": h.hexdigest()}
        # All members read and CRC-checked: move the top-level entries into place.
        for top in sorted({m.split("/", 1)[0] for m in expected_members}):
            final = dest / top
            src = staging / top
            old = None
            if final.exists() or final.is_symlink():
                old = dest / f".old-{uuid.uuid4().hex[:12]}"
                os.replace(final, old)
            os.replace(src, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        _fsync_dir(dest)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise FetchError(f"the disk holding {dest} is full while extracting {zip_path.name}") from None
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- fetch orchestration


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _overrides(model: str, url: str | None, expected_size: int | None, expected_sha256: str | None) -> tuple[str, int | None, str | None]:
    """URL, expected size and SHA-256 for ``model``: explicit arguments, else the environment
    (``CXR_*_WEIGHTS_URL/SIZE/SHA256``), else the spec."""
    w = lung_risk_spec().weights if model == "lung-risk" else age_spec().weights
    env_url, env_size, env_sha = ENV_OVERRIDES[model]
    url = url or os.environ.get(env_url) or None
    if expected_size is None and os.environ.get(env_size):
        raw = os.environ[env_size].strip()
        if not raw.isdigit():
            raise FetchError(f"{env_size}={raw!r} is not a whole number of bytes")
        expected_size = int(raw)
    if expected_sha256 is None and os.environ.get(env_sha):
        expected_sha256 = os.environ[env_sha].strip()
    spec_size = w.get("archive_size") if model == "lung-risk" else w.get("size")
    size = expected_size if expected_size is not None else (int(spec_size) if spec_size is not None else None)
    sha = expected_sha256 if expected_sha256 is not None else w.get("sha256")
    return url or w["url"], size, sha


def _fetch_lung_risk(root: Path | None, url: str | None, size: int | None, sha: str | None, progress: bool, force: bool) -> Path:
    url_, size_, sha_ = _overrides("lung-risk", url, size, sha)
    spec_w = lung_risk_spec().weights
    base = _root(root) / _LUNG_SUBDIR
    final_dir = lung_risk_weights_dir(root)
    if not force and _is_complete_dir(final_dir, _lung_risk_files()):
        return final_dir
    base.mkdir(parents=True, exist_ok=True)
    zip_path = base / spec_w["archive"]
    part = zip_path.with_suffix(zip_path.suffix + ".part")
    if force:
        for p in (zip_path, part):
            p.unlink(missing_ok=True)
    if size_ is not None:
        # The zip and its extracted members (about as large: packed weights barely compress).
        have = zip_path.stat().st_size if zip_path.is_file() else part.stat().st_size if part.is_file() else 0
        _check_space(base, max(size_ - have, 0) + size_, "downloading and extracting the weights")
    if zip_path.is_file() and (size_ is None or zip_path.stat().st_size == size_):
        h = hashlib.sha256()
        _hash_file(zip_path, h)
        digest = h.hexdigest()
        if sha_ is not None and digest != sha_.lower():
            zip_path.unlink()
            digest = download(url_, zip_path, expected_size=size_, expected_sha256=sha_, progress=progress)
    else:
        zip_path.unlink(missing_ok=True)
        digest = download(url_, zip_path, expected_size=size_, expected_sha256=sha_, progress=progress)
    files = extract_zip_safely(zip_path, base, expected_members=lung_risk_expected_members())
    record = {
        "model": "cxr-lung-risk",
        "url": url_,
        "archive": spec_w["archive"],
        "size": zip_path.stat().st_size,
        "sha256": digest,
        "sha256_source": "expected" if sha_ is not None else "computed at download",
        "date": _now(),
        "folder": str(final_dir.relative_to(base)),
        "files": {m.rsplit("/", 1)[-1]: v for m, v in files.items()},
    }
    _write_json_atomic(base / RECORD_NAME, record)
    zip_path.unlink(missing_ok=True)
    return final_dir


def _fetch_age(root: Path | None, url: str | None, size: int | None, sha: str | None, progress: bool, force: bool) -> Path:
    url_, size_, sha_ = _overrides("age", url, size, sha)
    dest = age_weights_path(root)
    record_path = dest.parent / RECORD_NAME
    if not force and dest.is_file() and (size_ is None or dest.stat().st_size == size_):
        # Present (maybe copied in by hand): keep it if its checksum is right (about 1 s).
        if sha_ is None:
            return dest
        h = hashlib.sha256()
        _hash_file(dest, h)
        if h.hexdigest() == sha_.lower():
            if not record_path.is_file():
                _write_json_atomic(record_path, {"model": "cxr-age", "url": None, "file": dest.name,
                                                 "size": dest.stat().st_size, "sha256": h.hexdigest(),
                                                 "sha256_source": "expected", "date": _now()})
            return dest
    if force:
        dest.with_suffix(dest.suffix + ".part").unlink(missing_ok=True)
    digest = download(url_, dest, expected_size=size_, expected_sha256=sha_, progress=progress)
    _write_json_atomic(
        record_path,
        {
            "model": "cxr-age",
            "url": url_,
            "file": dest.name,
            "size": dest.stat().st_size,
            "sha256": digest,
            "sha256_source": "expected" if sha_ is not None else "computed at download",
            "date": _now(),
        },
    )
    return dest


def fetch_weights(
    model: str = "lung-risk",
    *,
    url: str | None = None,
    root: Path | None = None,
    progress: bool = True,
    force: bool = False,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
) -> dict[str, Path]:
    """Download (if needed), verify and install weights into the cache; return their paths.

    ``model`` is ``'lung-risk'``, ``'age'`` or ``'all'``. ``url``/``expected_size``/
    ``expected_sha256`` override the spec for a mirror (only with a single model); they can
    also come from ``CXR_LUNG_RISK_WEIGHTS_{URL,SIZE,SHA256}`` / ``CXR_AGE_WEIGHTS_{...}``.
    Already-installed weights are kept unless ``force``. Returns ``{'lung-risk': folder,
    'age': file}`` for the models fetched and writes ``SOURCE.json`` next to each.
    """
    if model not in (*MODELS, "all"):
        raise FetchError(f"unknown model {model!r}; choose lung-risk, age or all")
    models = list(MODELS) if model == "all" else [model]
    if len(models) > 1 and (url or expected_size is not None or expected_sha256):
        raise FetchError("--url, --expected-size and --sha256 apply to one model; add --model lung-risk or --model age")
    out: dict[str, Path] = {}
    for m in models:
        fn = _fetch_lung_risk if m == "lung-risk" else _fetch_age
        with _remove_created_dirs_on_failure(_record_path(m, root).parent):
            out[m] = fn(root, url, expected_size, expected_sha256, progress, force)
    return out


@contextlib.contextmanager
def _remove_created_dirs_on_failure(folder: Path) -> Iterator[None]:
    """On failure, remove the folders up to and including ``folder`` that did not exist before
    and are empty now (a failed first fetch leaves no empty ``cxr_lung_risk/`` or cache root
    behind). A folder holding anything (a resumable ``.part``, a user's file) is kept."""
    created: list[Path] = []
    p = Path(os.path.abspath(folder))
    while not p.exists() and p.parent != p:
        created.append(p)  # deepest first
        p = p.parent
    try:
        yield
    except BaseException:
        for d in created:
            try:
                d.rmdir()  # only ever removes an empty folder
            except OSError:
                break  # not empty (or not ours to remove): keep it and its parents
        raise


# --------------------------------------------------------------------------- weights identity

#: The marker :func:`cxr_lung_risk.synthetic.write_synthetic_weights` writes next to its files.
SYNTHETIC_MARKER = "SYNTHETIC_WEIGHTS_README.txt"

# sha256 of files already hashed in this process, by (resolved path, size, mtime_ns)
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


_HASHES_FILE = "file_hashes.json"  # in the cache folder: sha256 of weights files by (path, size, mtime, inode)
_HASHES_MAX = 4096


def _disk_hashes() -> tuple[Path | None, dict[str, str]]:
    try:
        f = cache_dir() / _HASHES_FILE
        data = json.loads(f.read_text("utf-8")) if f.is_file() else {}
        return f, (data if isinstance(data, dict) else {})
    except (OSError, ValueError):
        return None, {}


def _cached_file_sha256(path: Path) -> str:
    """SHA-256 of a file, hashed once for the same (path, size, mtime, inode): remembered in this
    process and, best effort, in the cache folder's ``file_hashes.json`` (so that a second run on
    the same weights does not read 1-2 GB again to say which weights it used)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _SHA256_CACHE.get(key)
    if digest is not None:
        return digest
    disk_key = f"{key[0]}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    store, known = _disk_hashes()
    digest = known.get(disk_key)
    if not (isinstance(digest, str) and len(digest) == 64):
        h = hashlib.sha256()
        _hash_file(path, h)
        digest = h.hexdigest()
        if store is not None:
            known[disk_key] = digest
            if len(known) > _HASHES_MAX:
                known = dict(list(known.items())[-_HASHES_MAX:])
            try:
                store.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".hashes-", suffix=".tmp", dir=store.parent)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(known, f)
                os.replace(tmp, store)
            except OSError:
                pass  # a read-only cache only costs the hashing next time
    _SHA256_CACHE[key] = digest
    return digest


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _synthetic_recipe(folder: Path) -> dict[str, Any] | None:
    """The recipe recorded in ``folder``'s synthetic-weights marker; ``None`` without marker
    (``{}`` when the marker has no readable recipe line)."""
    try:
        text = (folder / SYNTHETIC_MARKER).read_text("utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Recipe:"):
            with contextlib.suppress(ValueError):
                recipe = json.loads(line[len("Recipe:"):].strip())
                if isinstance(recipe, dict):
                    return recipe
    return {}


def _combined_sha256(files: dict[str, dict[str, Any]]) -> str:
    """One SHA-256 for a folder of weight files: the SHA-256 of ``sha256sum``'s lines
    (``<sha256>  <name>\n``) for the files sorted by name."""
    text = "".join(f"{files[n]['sha256']}  {n}\n" for n in sorted(files))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _published_lung_risk_sha256(*records: dict[str, Any] | None) -> str | None:
    """SHA-256 of the published CXR-Lung-Risk zip: the spec's when it states one, else the one
    fetch-weights recorded when it downloaded the published URL with the published size (from
    ``records`` or the default cache's ``SOURCE.json``)."""
    w = lung_risk_spec().weights
    if w.get("sha256"):
        return str(w["sha256"]).lower()
    with contextlib.suppress(Exception):
        records = (*records, _read_record(_record_path("lung-risk", None)))
    for rec in records:
        if (rec and rec.get("url") == w.get("url") and rec.get("size") == w.get("archive_size")
                and isinstance(rec.get("sha256"), str)):
            return rec["sha256"].lower()
    return None


def _lung_risk_zip_members(path: Path) -> dict[str, dict[str, Any]] | None:
    """``{file name: {"size", "crc32"}}`` of the ensemble members in a zip; ``None`` when
    ``path`` is not a zip holding any of them (e.g. a torch ``.pth``, itself a zip)."""
    names = set(_lung_risk_files())
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return None
    found = {}
    for info in infos:
        base = info.filename.replace("\\", "/").rsplit("/", 1)[-1]
        if base in names and not info.is_dir():
            found[base] = {"size": info.file_size, "crc32": f"{info.CRC:08x}"}
    return found or None


def weights_identity(location: Path) -> dict[str, Any]:
    """Which weights ``location`` is: a CXR-Lung-Risk folder (what ``find_lung_risk_weights``
    returns, or a folder holding its archive folder) or zip, or a single weights file (CXR-Age).

    Returns a JSON-able dict::

        {"model": "lung-risk" | "age",
         "kind": "folder" | "zip" | "file",
         "source": str,       # recorded download URL, "synthetic (...)", or "local <kind> <name>"
         "sha256": str,       # see below
         "sha256_from": "SOURCE.json" | "computed",
         "files": {name: {"size": int, "sha256": str}},   # zip: {"size", "crc32"} per member
         "published": bool,   # the identity is the published weights'
         "synthetic": bool}   # (plus "recipe" for synthetic weights)

    ``sha256`` is the published zip's SHA-256 for a folder fetch-weights extracted (from its
    ``SOURCE.json``, which is used only while the folder's member files have the recorded names
    and sizes) and for a zip; for any other folder the SHA-256 of ``sha256sum``'s lines of its
    member files sorted by name; for a file its own SHA-256. ``published`` is true when it
    equals the published SHA-256 (CXR-Age: the spec's; CXR-Lung-Risk: the spec's, else the one
    fetch-weights recorded from the published URL). A folder with the marker written by
    :mod:`cxr_lung_risk.synthetic` is ``synthetic`` (never published). Large files are hashed
    once per process (cached by path, size and mtime), and not at all when a ``SOURCE.json``
    next to them records their SHA-256 for their size. Raises
    :class:`~cxr_lung_risk.errors.WeightsNotFoundError` when ``location`` does not exist.
    """
    p = Path(location).expanduser()
    if not p.exists():
        raise WeightsNotFoundError(f"weights path {p} does not exist")
    if p.is_dir():
        sub = p / lung_risk_spec().weights["archive_folder"]
        if not any(p.glob("*.pth")) and sub.is_dir():
            p = sub
        age_name = age_spec().weights["file"]
        if not any((p / n).is_file() for n in _lung_risk_files()) and (p / age_name).is_file():
            return weights_identity(p / age_name)
        return _folder_identity(p)
    members = _lung_risk_zip_members(p)
    if members is not None:
        digest = _cached_file_sha256(p)
        published = digest == _published_lung_risk_sha256()
        return {"model": "lung-risk", "kind": "zip", "source": f"local zip {p.name}", "sha256": digest,
                "sha256_from": "computed", "files": dict(sorted(members.items())),
                "published": published, "synthetic": False}
    return _file_identity(p)


def _folder_identity(d: Path) -> dict[str, Any]:
    names = [n for n in _lung_risk_files() if (d / n).is_file()]
    if not names:
        names = sorted(f.name for f in d.glob("*.pth") if f.is_file())
    sizes = {n: (d / n).stat().st_size for n in names}
    recipe = _synthetic_recipe(d)
    ident: dict[str, Any] = {"model": "lung-risk", "kind": "folder"}

    record = None
    for cand in (d / RECORD_NAME, d.parent / RECORD_NAME):
        rec = _read_record(cand)
        if rec is None or rec.get("model") != "cxr-lung-risk":
            continue
        if cand.parent != d and rec.get("folder") not in (None, d.name):
            continue
        rfiles = rec.get("files")
        if (isinstance(rfiles, dict) and names and set(rfiles) == set(names)
                and all(isinstance(rfiles[n], dict) and rfiles[n].get("size") == sizes[n] for n in names)
                and isinstance(rec.get("sha256"), str)):
            record = rec
            break

    if record is not None and recipe is None:
        ident.update(
            source=str(record.get("url") or f"local folder {d.name}"),
            sha256=record["sha256"].lower(),
            sha256_from=RECORD_NAME,
            files={n: {"size": sizes[n], "sha256": str(record["files"][n].get("sha256", ""))} for n in sorted(names)},
        )
        ident["published"] = ident["sha256"] == _published_lung_risk_sha256(record)
        ident["synthetic"] = False
        return ident

    files = {n: {"size": sizes[n], "sha256": _cached_file_sha256(d / n)} for n in sorted(names)}
    ident.update(source=f"local folder {d.name}", sha256=_combined_sha256(files), sha256_from="computed",
                 files=files, published=False, synthetic=recipe is not None)
    if recipe is not None:
        tag = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode("utf-8")).hexdigest()[:16]
        ident["source"] = f"synthetic (cxr_lung_risk.synthetic, recipe {tag})"
        ident["recipe"] = recipe
    return ident


def _file_identity(f: Path) -> dict[str, Any]:
    size = f.stat().st_size
    rec = _read_record(f.parent / RECORD_NAME)
    recorded = (rec is not None and rec.get("file") == f.name and rec.get("size") == size
                and isinstance(rec.get("sha256"), str) and _SHA256_RE.match(rec["sha256"]) is not None)
    if recorded:
        digest, how = rec["sha256"].lower(), RECORD_NAME  # type: ignore[index]
    else:
        digest, how = _cached_file_sha256(f), "computed"
    published_sha = age_spec().weights.get("sha256")
    published = bool(published_sha) and digest == str(published_sha).lower()
    recipe = None if published else _synthetic_recipe(f.parent)
    ident: dict[str, Any] = {
        "model": "lung-risk" if f.name in _lung_risk_files() else "age",  # one ensemble member, or CXR-Age
        "kind": "file",
        "source": str(rec.get("url") or f"local file {f.name}") if recorded else f"local file {f.name}",  # type: ignore[union-attr]
        "sha256": digest,
        "sha256_from": how,
        "files": {f.name: {"size": size, "sha256": digest}},
        "published": published,
        "synthetic": recipe is not None,
    }
    if recipe is not None:
        tag = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode("utf-8")).hexdigest()[:16]
        ident["source"] = f"synthetic (cxr_lung_risk.synthetic, recipe {tag})"
        ident["recipe"] = recipe
    return ident
