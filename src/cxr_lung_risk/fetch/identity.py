"""Identity: which weights a file, folder or zip is (:func:`weights_identity`: model, source,
SHA-256, published or synthetic), and hashing (:func:`hash_file`; :func:`cached_file_sha256`
hashes a file once per (path, size, mtime): remembered in this process and in the cache's
``file_hashes.json``)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ..errors import WeightsNotFoundError
from ..spec import age_spec, lung_risk_spec
from ._common import CHUNK, SHA256_RE
from .layout import RECORD_NAME, cache_dir, lung_risk_files, read_record, record_path


def hash_file(path: Path, h: "hashlib._Hash") -> None:
    """Feed the bytes of ``path`` to the hash object ``h``. Every file the fetch modules hash
    from its content goes through here (looked up on this module, so a test can count them)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)


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


def cached_file_sha256(path: Path) -> str:
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
        hash_file(path, h)
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
        records = (*records, read_record(record_path("lung-risk", None)))
    for rec in records:
        if (rec and rec.get("url") == w.get("url") and rec.get("size") == w.get("archive_size")
                and isinstance(rec.get("sha256"), str)):
            return rec["sha256"].lower()
    return None


def _lung_risk_zip_members(path: Path) -> dict[str, dict[str, Any]] | None:
    """``{file name: {"size", "crc32"}}`` of the ensemble members in a zip; ``None`` when
    ``path`` is not a zip holding any of them (e.g. a torch ``.pth``, itself a zip)."""
    names = set(lung_risk_files())
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
        if not any((p / n).is_file() for n in lung_risk_files()) and (p / age_name).is_file():
            return weights_identity(p / age_name)
        return _folder_identity(p)
    members = _lung_risk_zip_members(p)
    if members is not None:
        digest = cached_file_sha256(p)
        published = digest == _published_lung_risk_sha256()
        return {"model": "lung-risk", "kind": "zip", "source": f"local zip {p.name}", "sha256": digest,
                "sha256_from": "computed", "files": dict(sorted(members.items())),
                "published": published, "synthetic": False}
    return _file_identity(p)


def _folder_identity(d: Path) -> dict[str, Any]:
    names = [n for n in lung_risk_files() if (d / n).is_file()]
    if not names:
        names = sorted(f.name for f in d.glob("*.pth") if f.is_file())
    sizes = {n: (d / n).stat().st_size for n in names}
    recipe = _synthetic_recipe(d)
    ident: dict[str, Any] = {"model": "lung-risk", "kind": "folder"}

    record = None
    for cand in (d / RECORD_NAME, d.parent / RECORD_NAME):
        rec = read_record(cand)
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

    files = {n: {"size": sizes[n], "sha256": cached_file_sha256(d / n)} for n in sorted(names)}
    ident.update(source=f"local folder {d.name}", sha256=_combined_sha256(files), sha256_from="computed",
                 files=files, published=False, synthetic=recipe is not None)
    if recipe is not None:
        tag = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode("utf-8")).hexdigest()[:16]
        ident["source"] = f"synthetic (cxr_lung_risk.synthetic, recipe {tag})"
        ident["recipe"] = recipe
    return ident


def _file_identity(f: Path) -> dict[str, Any]:
    size = f.stat().st_size
    rec = read_record(f.parent / RECORD_NAME)
    recorded = (rec is not None and rec.get("file") == f.name and rec.get("size") == size
                and isinstance(rec.get("sha256"), str) and SHA256_RE.match(rec["sha256"]) is not None)
    if recorded:
        digest, how = rec["sha256"].lower(), RECORD_NAME  # type: ignore[index]
    else:
        digest, how = cached_file_sha256(f), "computed"
    published_sha = age_spec().weights.get("sha256")
    published = bool(published_sha) and digest == str(published_sha).lower()
    recipe = None if published else _synthetic_recipe(f.parent)
    ident: dict[str, Any] = {
        "model": "lung-risk" if f.name in lung_risk_files() else "age",  # one ensemble member, or CXR-Age
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
