"""Cache layout: where the weights live, where a model's weights come from, and the
``SOURCE.json`` records.

``cache_dir()`` is ``$CXR_LUNG_RISK_HOME`` or the platform's user cache dir::

    <cache>/cxr_lung_risk/ensamble-model-weights/Lung_Age_081221_{0..19}.pth
    <cache>/cxr_lung_risk/SOURCE.json       url, size, sha256 of the zip, date, per-file sizes/sha256
    <cache>/cxr_age/PLCO_Fine_Tuned_120419.pth
    <cache>/cxr_age/SOURCE.json

URLs, sizes, checksums and names come from the model specs (``models/*.json``, ``weights``
section), overridden by a mirror's ``CXR_*_WEIGHTS_{URL,SIZE,SHA256}`` (:func:`source_overrides`).
:func:`find_lung_risk_weights` / :func:`find_age_weights` say where usable weights are.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Sequence

from ..errors import WeightsError, WeightsNotFoundError
from ..spec import age_spec, lung_risk_spec
from ._common import FetchError, fmt_bytes

#: Environment variables: cache root, and per-model mirror overrides (URL, size, SHA-256).
ENV_HOME = "CXR_LUNG_RISK_HOME"
ENV_OVERRIDES = {
    "lung-risk": ("CXR_LUNG_RISK_WEIGHTS_URL", "CXR_LUNG_RISK_WEIGHTS_SIZE", "CXR_LUNG_RISK_WEIGHTS_SHA256"),
    "age": ("CXR_AGE_WEIGHTS_URL", "CXR_AGE_WEIGHTS_SIZE", "CXR_AGE_WEIGHTS_SHA256"),
}
MODELS = ("lung-risk", "age")
RECORD_NAME = "SOURCE.json"
# Per model: its folder in the cache, its spec, and the spec's key for the downloaded file's size.
_SUBDIRS = {"lung-risk": "cxr_lung_risk", "age": "cxr_age"}
_SPECS = {"lung-risk": lung_risk_spec, "age": age_spec}
_SIZE_KEYS = {"lung-risk": "archive_size", "age": "size"}


def cache_dir() -> Path:
    """Root of the weights cache: ``$CXR_LUNG_RISK_HOME`` if set, else the user cache dir."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("cxr-lung-risk"))


def cache_root(root: Path | str | None) -> Path:
    """``root`` (a ``--cache`` folder) if given, else :func:`cache_dir`."""
    return Path(root).expanduser() if root is not None else cache_dir()


def model_dir(model: str, root: Path | None = None) -> Path:
    """``<cache>/cxr_lung_risk`` or ``<cache>/cxr_age``: a model's folder, holding its ``SOURCE.json``."""
    return cache_root(root) / _SUBDIRS[model]


def lung_risk_weights_dir(root: Path | None = None) -> Path:
    """``<cache>/cxr_lung_risk/<archive folder>``: where the 20 ensemble files are extracted."""
    return model_dir("lung-risk", root) / lung_risk_spec().weights["archive_folder"]


def age_weights_path(root: Path | None = None) -> Path:
    """``<cache>/cxr_age/<file>``: the cached CXR-Age state dict."""
    return model_dir("age", root) / age_spec().weights["file"]


def lung_risk_expected_members() -> list[str]:
    """Archive paths of the ensemble files inside the published zip, e.g.
    ``ensamble-model-weights/Lung_Age_081221_0.pth`` (from the spec)."""
    spec = lung_risk_spec()
    folder = spec.weights["archive_folder"]
    return [f"{folder}/{m.file}" for m in spec.members]


def lung_risk_files() -> list[str]:
    """File names of the ensemble members (``Lung_Age_081221_0.pth``, ...)."""
    return [m.file for m in lung_risk_spec().members]


def record_path(model: str, root: Path | None) -> Path:
    """The ``SOURCE.json`` of ``model`` in the cache (``root`` or :func:`cache_dir`)."""
    return model_dir(model, root) / RECORD_NAME


# --------------------------------------------------------------------------- the records


def read_record(path: Path) -> dict[str, Any] | None:
    """A ``SOURCE.json`` as a dict; ``None`` when missing, unreadable or not an object."""
    try:
        rec = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def write_record(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically (``.tmp``, fsync, rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def now() -> str:
    """The UTC time to the second, ISO 8601 (a record's ``date``)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------- sources


def source_overrides(model: str, url: str | None, expected_size: int | None, expected_sha256: str | None) -> tuple[str, int | None, str | None]:
    """URL, expected size and SHA-256 for ``model``: explicit arguments, else the environment
    (``CXR_*_WEIGHTS_URL/SIZE/SHA256``), else the spec."""
    w = _SPECS[model]().weights
    env_url, env_size, env_sha = ENV_OVERRIDES[model]
    url = url or os.environ.get(env_url) or None
    if expected_size is None and os.environ.get(env_size):
        raw = os.environ[env_size].strip()
        if not raw.isdigit():
            raise FetchError(f"{env_size}={raw!r} is not a whole number of bytes")
        expected_size = int(raw)
    if expected_sha256 is None and os.environ.get(env_sha):
        expected_sha256 = os.environ[env_sha].strip()
    spec_size = w.get(_SIZE_KEYS[model])
    size = expected_size if expected_size is not None else (int(spec_size) if spec_size is not None else None)
    sha = expected_sha256 if expected_sha256 is not None else w.get("sha256")
    return url or w["url"], size, sha


def check_space(d: Path, need: int, what: str) -> None:
    """Raise :class:`FetchError` when the disk holding ``d`` has less than ``need`` bytes free."""
    try:
        free = shutil.disk_usage(d).free
    except OSError:
        return
    if need > free:
        raise FetchError(
            f"not enough free disk space in {d} for {what}: need {fmt_bytes(need)}, "
            f"{fmt_bytes(free)} free (set {ENV_HOME} or --cache to another disk)"
        )


# --------------------------------------------------------------------------- lookup


def is_complete_dir(d: Path, names: Sequence[str]) -> bool:
    """True when folder ``d`` holds every file in ``names``, none of them empty."""
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
    return d if is_complete_dir(d, lung_risk_files()) else None


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
        ok = f.is_file() and (size is None or f.stat().st_size == int(size) or _recorded_size_ok(f))
    except OSError:
        ok = False
    return f if ok else None


def _recorded_size_ok(f: Path) -> bool:
    """True when the cache's record says ``f`` came from a mirror with that (overridden) size."""
    try:
        rec = json.loads((f.parent / RECORD_NAME).read_text("utf-8"))
        return int(rec.get("size", -1)) == f.stat().st_size
    except (OSError, ValueError, TypeError):
        return False
