"""Installing: :func:`fetch_weights`, the ``fetch-weights`` subcommand's work. For each model it
keeps weights already installed, else downloads (:mod:`.downloading`), verifies, extracts
(:mod:`.extraction`) and writes the cache's ``SOURCE.json`` (:mod:`.layout`); a failed first
fetch leaves no empty folders behind."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

from . import identity
from ._common import FetchError
from .downloading import download
from .extraction import extract_zip_safely
from .layout import (
    MODELS,
    RECORD_NAME,
    age_weights_path,
    check_space,
    is_complete_dir,
    lung_risk_expected_members,
    lung_risk_files,
    lung_risk_weights_dir,
    model_dir,
    now,
    source_overrides,
    write_record,
)
from ..spec import lung_risk_spec


def _fetch_lung_risk(root: Path | None, url: str | None, size: int | None, sha: str | None, progress: bool, force: bool) -> Path:
    url_, size_, sha_ = source_overrides("lung-risk", url, size, sha)
    spec_w = lung_risk_spec().weights
    base = model_dir("lung-risk", root)
    final_dir = lung_risk_weights_dir(root)
    if not force and is_complete_dir(final_dir, lung_risk_files()):
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
        check_space(base, max(size_ - have, 0) + size_, "downloading and extracting the weights")
    if zip_path.is_file() and (size_ is None or zip_path.stat().st_size == size_):
        h = hashlib.sha256()
        identity.hash_file(zip_path, h)
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
        "date": now(),
        "folder": str(final_dir.relative_to(base)),
        "files": {m.rsplit("/", 1)[-1]: v for m, v in files.items()},
    }
    write_record(base / RECORD_NAME, record)
    zip_path.unlink(missing_ok=True)
    return final_dir


def _fetch_age(root: Path | None, url: str | None, size: int | None, sha: str | None, progress: bool, force: bool) -> Path:
    url_, size_, sha_ = source_overrides("age", url, size, sha)
    dest = age_weights_path(root)
    record_file = dest.parent / RECORD_NAME
    if not force and dest.is_file() and (size_ is None or dest.stat().st_size == size_):
        # Present (maybe copied in by hand): keep it if its checksum is right (about 1 s).
        if sha_ is None:
            return dest
        h = hashlib.sha256()
        identity.hash_file(dest, h)
        if h.hexdigest() == sha_.lower():
            if not record_file.is_file():
                write_record(record_file, {"model": "cxr-age", "url": None, "file": dest.name,
                                           "size": dest.stat().st_size, "sha256": h.hexdigest(),
                                           "sha256_source": "expected", "date": now()})
            return dest
    if force:
        dest.with_suffix(dest.suffix + ".part").unlink(missing_ok=True)
    digest = download(url_, dest, expected_size=size_, expected_sha256=sha_, progress=progress)
    write_record(
        record_file,
        {
            "model": "cxr-age",
            "url": url_,
            "file": dest.name,
            "size": dest.stat().st_size,
            "sha256": digest,
            "sha256_source": "expected" if sha_ is not None else "computed at download",
            "date": now(),
        },
    )
    return dest


_FETCHERS = {"lung-risk": _fetch_lung_risk, "age": _fetch_age}


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
    models = [model] if model in MODELS else list(MODELS)
    if len(models) > 1 and (url or expected_size is not None or expected_sha256):
        raise FetchError("--url, --expected-size and --sha256 apply to one model; add --model lung-risk or --model age")
    out: dict[str, Path] = {}
    for m in models:
        fn = _FETCHERS[m]
        with _remove_created_dirs_on_failure(model_dir(m, root)):
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
