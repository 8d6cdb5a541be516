"""Listing the inputs of a run: local folders (:mod:`cxr_lung_risk.dicom_io`'s discovery) and
object stores (``s3://``, ``gs://``, ``file://``, any fsspec or pyarrow file system).

The job runner (:mod:`cxr_lung_risk.jobs`) plans with it; the Ray engine
(:mod:`cxr_lung_risk.cluster`) reads the objects it lists. fsspec/pyarrow are imported only when a
URL is listed (the ``[ray]`` extra).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from .dicom_io import InputFile, discover
from .errors import CxrLungRiskError, InputNotFoundError, UsageError
from .options import is_url

__all__ = ["RemoteFile", "RayError", "RAY_HINT", "discover_inputs", "list_inputs", "open_fs"]

RAY_HINT = "the ray engine needs Ray: pip install 'cxr-lung-risk[ray]'"


def discover_inputs(inputs: Sequence[Path], out: Path | None = None, follow_links: bool = False) -> list[InputFile]:
    """The local input files in order (``out`` left out); a missing input is an :class:`InputNotFoundError`."""
    try:
        return list(discover(inputs, exclude=[out] if out is not None else None, follow_links=follow_links))
    except FileNotFoundError as e:
        raise InputNotFoundError(getattr(e, "filename", None) or e) from None


class RayError(CxrLungRiskError):
    """Ray is missing or the cluster cannot be reached."""


# ------------------------------------------------------------------------------ listing
@dataclass(frozen=True)
class RemoteFile:
    """One object of an object store (or any fsspec/pyarrow file system)."""

    url: str  # what records call it
    rel: str  # the File column: the path under the URL given
    path: str  # the path inside ``fs``
    fs: Any  # an fsspec file system (picklable: it travels to the tasks)
    size: int | None = None
    mtime: Any = None

    def identity(self) -> dict[str, Any]:
        return {"input": self.url, "size": self.size, "mtime": self.mtime}


def open_fs(url: str) -> tuple[Any, str]:
    """``url`` -> (fsspec file system, path). fsspec's own implementation first (s3fs, gcsfs,
    whatever is registered for the protocol); where that is not installed, pyarrow's native file
    system (S3, GCS, HDFS, local) behind fsspec's ArrowFSWrapper."""
    try:
        import fsspec
    except ImportError:
        raise RayError(RAY_HINT) from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as first:
        try:
            import pyarrow.fs as pafs
            from fsspec.implementations.arrow import ArrowFSWrapper

            fs, path = pafs.FileSystem.from_uri(url)
            return ArrowFSWrapper(fs), path
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"cannot open {url}: {first}; pyarrow: {e}") from None


def _mtime(info: dict[str, Any]) -> Any:
    for k in ("mtime", "LastModified", "last_modified", "updated", "modified", "created", "ETag"):
        v = info.get(k)
        if v is not None:
            return v if isinstance(v, (int, float)) else str(v)
    return None


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in PurePosixPath(rel).parts[:-1])


def _list_url(url: str, prefix: str) -> list[RemoteFile]:
    fs, root = open_fs(url)
    try:
        info = fs.info(root)
    except FileNotFoundError:
        raise UsageError(f"input not found: {url}") from None
    base = url.rstrip("/")
    if info.get("type") == "directory":
        found = fs.find(root, detail=True)
        root_s = root.rstrip("/")
        items = []
        for path in sorted(found):
            meta = found[path]
            if meta.get("type", "file") != "file":
                continue
            rel = path[len(root_s):].lstrip("/") if path.startswith(root_s) else PurePosixPath(path).name
            if not rel or _hidden(rel):
                continue
            items.append(RemoteFile(f"{base}/{rel}", prefix + rel, path, fs, meta.get("size"), _mtime(meta)))
        return items
    name = PurePosixPath(root).name or "input"
    return [RemoteFile(url, name, root, fs, info.get("size"), _mtime(info))]


def list_inputs(inputs: Sequence[Path | str], exclude: Path | None = None, follow_links: bool = False) -> list[Any]:
    """This run's inputs in order: :class:`~cxr_lung_risk.dicom_io.InputFile` for local paths (as
    the local engine finds them), :class:`RemoteFile` for URLs. ``File`` names are unique: with
    several inputs a URL folder's objects are prefixed with the folder's base name."""
    local = [p for p in inputs if not is_url(p)]
    out: list[Any] = []
    used: set[str] = set()
    multi = len(inputs) > 1
    if local:
        files = discover_inputs(local, exclude, follow_links)
        out += files
        used.update(f.rel for f in files)
    for url in (p for p in inputs if is_url(p)):
        label = PurePosixPath(url.split("://", 1)[1].rstrip("/")).name or "input"
        for item in _list_url(url, label + "/" if multi else ""):
            rel, n = item.rel, 1
            while rel in used:
                n += 1
                stem = PurePosixPath(item.rel)
                rel = str(stem.with_name(f"{stem.stem}~{n}{stem.suffix}"))
            used.add(rel)
            out.append(item if rel == item.rel else RemoteFile(item.url, rel, item.path, item.fs, item.size, item.mtime))
    return out
