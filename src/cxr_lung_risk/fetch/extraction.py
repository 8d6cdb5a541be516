"""Extraction: the expected members of a zip into a folder, safely. Every member is checked
before anything is written (no absolute path, no ``..``, no symbolic link), each expected member
is read fully (so its CRC is checked) into a staging folder, and the staging folder is renamed
into place only when all succeeded (:func:`extract_zip_safely`)."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Any, Sequence

from ._common import CHUNK, FetchError, fsync_dir
from .layout import check_space


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
            check_space(dest, sum(i.file_size for i in chosen.values()), f"extracting {zip_path.name}")
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
                        for chunk in iter(lambda: src.read(CHUNK), b""):
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
        fsync_dir(dest)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise FetchError(f"the disk holding {dest} is full while extracting {zip_path.name}") from None
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return result
