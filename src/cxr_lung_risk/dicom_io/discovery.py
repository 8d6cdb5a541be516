"""Discovery: walk the inputs into :class:`InputFile` s with unique, printable ``File`` names
(odd entries, links outside the input folder, the output folder left out)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence



from ._common import (  # noqa: F401
    DicomInputError,
)


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputFile:
    """One file to consider.

    ``rel`` names the file in outputs and the manifest; it is unique within one
    :func:`discover` call and always a printable ``str`` (posix separators).  With one folder
    argument it is the path relative to that folder; with one file argument, the file name.
    With several arguments, a folder's files are prefixed with the folder's base name
    (``A/x.dcm``, ``B/x.dcm``; a repeated base name becomes ``data~2``, ``data~3``...) and a file
    given directly keeps its name (``x~2.dcm`` when that name is taken).  Bytes of a name that
    are not valid in the file-system encoding appear as ``\\xNN``, other unprintable characters
    as ``\\xNN``/``\\uNNNN`` and a backslash as ``\\\\``; ``path`` is the real, openable path.
    ``source`` is the input argument the file came from (not part of equality).
    """

    path: Path
    rel: str
    source: Path | None = field(default=None, compare=False)
    #: Set by :func:`discover` for an entry it lists without reading (a symbolic link to a folder
    #: outside the folder given): the ``skipped: ...`` reason.
    skip: str = field(default="", compare=False)


def _escape_name(text: str) -> str:
    """A printable, reversible spelling of a file-name component (see :class:`InputFile`)."""
    out = []
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # os.fsdecode's surrogateescape for an undecodable byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif not ch.isprintable():
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
        else:
            out.append(ch)
    return "".join(out)


def _real(path: str | Path) -> str:
    try:
        return os.path.realpath(path)
    except (OSError, RuntimeError, ValueError):
        return os.path.abspath(path)


def _is_under(real: str, roots: Sequence[str]) -> bool:
    for r in roots:
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


def _arg_label(p: Path) -> str:
    """The base name that prefixes a folder argument's files (never '', '.' or '..')."""
    name = p.name
    if name in ("", ".", ".."):
        name = Path(_real(p)).name
    return _escape_name(name) or "root"


def _numbered(name: str, n: int, is_file: bool) -> str:
    if is_file:
        stem, dot, suffix = name.rpartition(".")
        if dot and stem:  # x.dcm -> x~2.dcm
            return f"{stem}~{n}.{suffix}"
    return f"{name}~{n}"


def _walk(root: Path, excluded: Sequence[str], follow_links: bool = False) -> list[tuple[str, Path, str]]:
    """(escaped relative path, path, skip reason) of every non-directory entry under ``root``, sorted.

    Directories whose name starts with '.' are not entered; symbolic links to directories are
    followed when they lead inside ``root`` (or, with ``follow_links``, anywhere), except into a
    directory already on the current branch (a cycle) or already walked; a link to a directory
    outside ``root`` (``..``, ``/``, a sibling folder) is listed with a skip reason instead.
    Anything else (regular files, FIFOs, sockets, devices, dangling symbolic links, symbolic
    link loops) is listed: :func:`load_image` reports it. Directories under ``excluded`` (real
    paths) are not entered.
    """
    found: list[tuple[str, Path, str]] = []
    root_real = _real(root)
    if _is_under(root_real, excluded):
        return found
    walked = {root_real}
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            if prefix:  # an unreadable sub-folder: listed, so that it gets a manifest row
                found.append((prefix.rstrip("/"), folder, ""))
            continue
        for entry in entries:
            name = entry.name
            full = folder / name
            rel = prefix + _escape_name(name)
            try:
                is_dir = entry.is_dir()  # follows links; False for dangling links and loops
            except OSError:
                is_dir = False
            if not is_dir:
                found.append((rel, full, ""))
                continue
            if name.startswith("."):
                continue
            real = _real(full)
            if real in walked or _is_under(real, excluded):
                continue
            if not follow_links and not _is_under(real, [root_real]):  # a link out of the folder given
                found.append((rel, full, f"skipped: symbolic link to a folder outside {_escape_name(str(root))} "
                                         f"({_escape_name(real)}); not followed (--follow-links follows it)"))
                continue
            walked.add(real)
            stack.append((full, rel + "/"))
    found.sort(key=lambda t: t[0])
    return found


def discover(inputs: Sequence[str | Path], exclude: Sequence[str | Path] | None = None,
             follow_links: bool = False) -> Iterator[InputFile]:
    """Yield every file under ``inputs`` (files and directories, recursive), deterministically.

    Inputs are visited in the order given; inside a directory files are sorted by their
    relative path.  Directories whose name starts with '.' (``.git``, ``.cache``...) are not
    entered; files are never filtered by name or type (a hidden or extension-less file may be
    DICOM; a non-DICOM file, FIFO, dangling or looping symbolic link is yielded and reported by
    :func:`load_image`).  A file reached twice (through two inputs) is yielded once.  Nothing
    under the paths in ``exclude`` (e.g. the output folder) is walked.  ``rel`` is unique over
    the call (see :class:`InputFile`).  Raises :class:`DicomInputError` for an input that does
    not exist. A symbolic link to a folder outside the folder given is not followed unless
    ``follow_links``: it is yielded with its ``skip`` reason (links within the folder are
    followed; loops never).
    """
    if isinstance(inputs, (str, Path, bytes)):
        inputs = [inputs]
    paths = [Path(os.fsdecode(p)) for p in inputs]
    for p in paths:  # fail before yielding anything: a typo should not cost a half run
        if not os.path.lexists(p):
            raise DicomInputError(_escape_name(str(p)))
    excluded = [_real(os.fsdecode(e)) for e in (exclude or [])]
    multi = len(paths) > 1
    seen: set[str] = set()
    used: set[str] = set()
    labels: set[str] = set()

    def _once(path: Path) -> bool:
        try:
            key = str(path.resolve())
        except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (Python < 3.13)
            key = os.path.abspath(path)
        if key in seen:
            return False
        seen.add(key)
        return True

    def _unique(rel: str, is_file: bool) -> str:
        out, n = rel, 1
        while out in used:
            n += 1
            out = _numbered(rel, n, is_file)
        used.add(out)
        return out

    for p in paths:
        if p.is_dir():
            prefix = ""
            if multi:
                base = _arg_label(p)
                label, n = base, 1
                while label in labels:
                    n += 1
                    label = _numbered(base, n, False)
                labels.add(label)
                prefix = label + "/"
            for rel, full, skip in _walk(p, excluded, follow_links):
                if _once(full):
                    yield InputFile(full, _unique(prefix + rel, True), p, skip)
        else:
            if _once(p):
                name = _escape_name(p.name) or _escape_name(str(p))
                yield InputFile(p, _unique(name, True), p)
