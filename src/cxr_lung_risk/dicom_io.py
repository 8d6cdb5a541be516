"""DICOM in: find input files, decide which ones are frontal chest radiographs, decode them.

Every input ends up as a :class:`LoadedImage` whose ``status`` is ``'ok'``, ``'skipped'``
(a policy refusal: not a DICOM file, not a radiograph, a lateral view, ...) or ``'failed'``
(a broken file: truncated, malformed, undecodable, absurd dimensions).  ``reason`` is one human
sentence that starts with the status (``"skipped: modality CT is not a radiograph (CR/DX)"``);
:func:`load_image` never raises for bad input.

Selection policy (each rule can be widened through :class:`SelectionOptions`):

* DICOMDIR files and non-image objects (SR, PR, KO, RT plans/structures, waveforms, ... i.e.
  files without Rows/Columns) are skipped.
* Modality must be CR or DX.  A file without Modality takes it from its SOP class (Computed
  Radiography / Digital X-Ray storage).  Secondary Capture objects (Modality SC or OT, or a
  Secondary Capture SOP class without Modality) are accepted only when they look like a
  radiograph: ConversionType DF (digitized film) or DI (digital interface), or a chest-like
  BodyPartExamined.  Everything else (CT, MR, US, NM, SEG, MG, ...) is skipped.
* DX ``FOR PROCESSING`` images (PresentationIntentType or the For-Processing SOP class) are
  skipped: they hold raw detector data the models never saw.
* Only single-frame (NumberOfFrames <= 1), single-sample MONOCHROME1/MONOCHROME2 images.
* Lateral views (ViewPosition LL/RL/LATERAL/LAT/LLD/RLD..., 'LATERAL' in ImageType, or a view
  code whose meaning says lateral) are skipped; PA, AP and an unknown view are accepted.
* BodyPartExamined must be missing/empty or chest-like: CHEST, THORAX, LUNG(S), TORSO,
  CHEST_TO_PELVIS, or a value with such a word in it, compared case-, space- and accent-
  insensitively ('Chest', 'CHEST PA', 'THORAX AP') including common non-English terms (PECHO,
  TORAX, BRUST, BRUSTKORB, TORACE, PETTO, POITRINE).  Anything else (EXTREMITY, HAND, SKULL, ...)
  is skipped unless ``allow_non_chest`` (CLI ``--allow-non-chest``), which scores it with a
  warning.
* Rows x Columns x frames is checked against ``max_pixels`` and the aspect ratio against
  ``max_aspect_ratio`` (4:1) BEFORE anything is decoded.

Hostile input (each case is a ``failed``/``skipped`` result, never a hang, a traceback or an
unbounded allocation):

* the file is opened once, only after ``stat`` says it is a regular file (a FIFO, socket or
  device is ``skipped: not a regular file (FIFO)``; it is never opened for reading), with
  ``O_NONBLOCK``; every read is clamped to the file size known at open time;
* the header is parsed up to PixelData only (nothing after the pixel data is parsed, so a valid
  file followed by hundreds of MB of zeros costs milliseconds); an element whose declared length
  runs past the end of the file stops the parse before anything is allocated for it;
* the pixel data element is read by hand: its declared length is checked against the bytes that
  remain, native data is read only up to the size Rows x Columns x BitsAllocated needs, and
  encapsulated fragments are walked item by item;
* the codestream header of frame 1 (JPEG SOFn, JPEG-LS SOF55, JPEG 2000 SIZ, also inside JP2
  boxes) must agree with Rows/Columns/SamplesPerPixel and ``max_pixels`` before the decoder runs;
* a Deflated Explicit VR Little Endian data set is inflated incrementally: at most 32 MiB before
  the pixel data, then only the pixel bytes the header needs;
* warnings of pydicom/numpy/Pillow and the 'pydicom' logger are recorded on the result instead
  of reaching stderr; UIDs are returned as one clean string (a backslash or an invalid UID is a
  warning).

Decoding goes through pydicom 3 (``pydicom.pixels.pixel_array(..., raw=True)``) with the
pylibjpeg plug-ins, so every common transfer syntax works; the array holds the raw stored values
(no Modality LUT/rescale, no VOI, no colour conversion): rendering is :mod:`.preprocess`'s job.
"""
from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import stat
import struct
import unicodedata
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pydicom
import pydicom.errors
import pydicom.filereader
import pydicom.multival
import pydicom.uid
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import UID

from .errors import InputNotFoundError
from .preprocess import PixelMeta

__all__ = [
    "InputFile",
    "LoadedImage",
    "SelectionOptions",
    "discover",
    "is_dicom_file",
    "is_raster_image",
    "raster_kind",
    "load_image",
    "screen_image",
    "own_result",
    "read_header",
    "decode_pixels",
    "DicomInputError",
]

# --------------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------------
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC and multi-frame SC classes

#: SOP classes that imply a modality when the Modality attribute is absent.
_MODALITY_FROM_SOP = {CR_STORAGE: "CR", DX_PRESENTATION: "DX", DX_PROCESSING: "DX"}

CHEST_BODY_PARTS = frozenset({"", "CHEST", "THORAX", "LUNG", "LUNGS", "TORSO", "CHEST_TO_PELVIS"})
#: Words that make a BodyPartExamined chest-like when they appear in it (after upper-casing,
#: accent folding and splitting at spaces, '_', '-', '/', ',', '.', '+'): the DICOM terms and the
#: usual local-language ones (es/pt PECHO/TORAX, de BRUST/BRUSTKORB/THORAX, it TORACE/PETTO,
#: fr POITRINE/THORAX, nl BORST).
CHEST_WORDS = frozenset({"CHEST", "THORAX", "THORACIC", "LUNG", "LUNGS", "TORSO", "PECHO", "TORAX",
                         "BRUST", "BRUSTKORB", "TORACE", "PETTO", "POITRINE", "BORST"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLAT", "RLAT", "LEFT LATERAL",
                           "RIGHT LATERAL", "LATERAL LEFT", "LATERAL RIGHT"})
SC_RADIOGRAPH_CONVERSION_TYPES = frozenset({"DF", "DI"})
_SUPPORTED_BITS_ALLOCATED = (8, 16, 32)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"

#: Every two-letter VR of PS3.5 (used to recognise explicit-VR data without a preamble).
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR "
    b"US UT UV".split()
)


#: Exceptions that are about the process, not the file: never turned into a 'failed' result.
_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)

_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # PixelData, Float, DoubleFloat
_ITEM, _SEQ_DELIM = 0xFFFEE000, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF

#: Inflated bytes a Deflated Explicit VR Little Endian data set may hold before its pixel data.
DEFLATE_HEADER_ALLOWANCE = 32 << 20
#: Bytes of frame 1 parsed for its JPEG / JPEG-LS / JPEG 2000 codestream header.
_CODESTREAM_PEEK = 64 << 10
#: Library warnings kept per file (the rest are counted).
_MAX_LIBRARY_WARNINGS = 10


class DicomInputError(InputNotFoundError):
    """An INPUT path does not exist (the package's :class:`~cxr_lung_risk.errors.InputNotFoundError`)."""


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


# --------------------------------------------------------------------------------------------
# opening files safely
# --------------------------------------------------------------------------------------------
class _NotRegular(OSError):
    """Internal: the path exists but is not a regular file (``kind`` says what it is)."""

    def __init__(self, kind: str):
        super().__init__(f"not a regular file ({kind})")
        self.kind = kind


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


class _ClampedReader(io.BufferedReader):
    """A buffered reader that never reads (or allocates for) more than the file held when it
    was opened: pydicom's ``fp.read(declared_length)`` of a hostile length stays small."""

    def __init__(self, raw: io.RawIOBase, size: int):
        super().__init__(raw, buffer_size=1 << 16)
        self.size = size

    def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
        left = max(0, self.size - self.tell())
        return super().read(left if n is None or n < 0 else min(n, left))


def _open_regular(path: str | Path) -> _ClampedReader:
    """Open a regular file for reading; never opens a FIFO, socket or device.

    ``stat`` first (a FIFO opened for reading would block until a writer appears), then
    ``open(O_RDONLY | O_NONBLOCK)`` and ``fstat`` again (the path may have been swapped in
    between).  Raises :class:`_NotRegular` or :class:`OSError`.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _NotRegular(_file_kind(st.st_mode))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _NotRegular(_file_kind(st.st_mode))
        raw = io.FileIO(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise
    try:
        return _ClampedReader(raw, st.st_size)
    except BaseException:
        raw.close()
        raise


def raster_kind(path: str | Path) -> str | None:
    """'png' or 'jpeg' when the file starts with that format's magic bytes, else None (also for
    anything that is not a regular file: a FIFO is never opened)."""
    try:
        with _open_regular(path) as f:
            head = f.read(8)
    except OSError:
        return None
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    return None


def is_raster_image(path: str | Path) -> bool:
    """True for a PNG or JPEG file (by magic bytes, whatever its name)."""
    return raster_kind(path) is not None


def _looks_like_dicom(head: bytes, size: int) -> bool:
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return _looks_like_bare_dataset(head, size)


def is_dicom_file(path: str | Path) -> bool:
    """True when the file looks like DICOM: 'DICM' at offset 128 (Part 10 with preamble), or a
    data set starting at offset 0 with a group 0002 or 0008 tag followed by a plausible explicit
    VR or implicit-VR length (files written without preamble / file meta).  False for anything
    that is not a regular file."""
    try:
        with _open_regular(path) as f:
            return _looks_like_dicom(f.read(132), f.size)
    except OSError:
        return False


def _looks_like_bare_dataset(head: bytes, size: int) -> bool:
    if len(head) < 8:
        return False
    for endian in ("<", ">"):
        group, elem = struct.unpack(endian + "HH", head[:4])
        if group not in (0x0002, 0x0008):
            continue
        if head[4:6] in _VRS:  # explicit VR
            return True
        (length,) = struct.unpack(endian + "I", head[4:8])  # implicit VR
        if elem <= 0x2000 and (length == 0xFFFFFFFF or (length % 2 == 0 and 8 + length <= size)):
            return True
    return False


# --------------------------------------------------------------------------------------------
# selection options and result
# --------------------------------------------------------------------------------------------
@dataclass
class SelectionOptions:
    """Selection rules; each option widens one rule.

    allow_lateral: accept lateral views (with a warning).
    allow_for_processing: accept DX FOR PROCESSING images (with a warning).
    allow_non_chest: accept a BodyPartExamined that is not chest-like (EXTREMITY, HAND, SKULL...)
        with a warning (True, CLI ``--allow-non-chest``) or skip it (False, the default).
    allowed_modalities: modalities accepted unconditionally.
    accept_radiograph_like_sc: accept Secondary Capture that looks like a radiograph (see module doc).
    allow_multiframe: accept multi-frame images, using frame 1 only (with a warning).
    max_pixels: refuse images whose Rows x Columns x frames exceeds this (memory-bomb guard),
        checked before decoding (and against the codestream header of compressed data).
    max_aspect_ratio: refuse images whose long side is more than this many times the short
        side (a chest radiograph is never 1:1000; the 512-pixel short-side resize of such an
        image would be hundreds of millions of pixels), checked before decoding.
    """

    allow_lateral: bool = False
    allow_for_processing: bool = False
    allow_non_chest: bool = False
    allowed_modalities: tuple[str, ...] = ("CR", "DX")
    accept_radiograph_like_sc: bool = True
    allow_multiframe: bool = False
    max_pixels: int = 100_000_000
    max_aspect_ratio: float = 4.0


@dataclass
class LoadedImage:
    """What :func:`load_image` made of one file."""

    status: str  # 'ok' | 'skipped' | 'failed'
    reason: str = ""  # '' when ok; otherwise one sentence starting with "skipped: "/"failed: "
    warnings: list[str] = field(default_factory=list)
    pixels: np.ndarray | None = None  # 2-D raw stored values
    meta: PixelMeta | None = None
    dataset: Dataset | None = None  # header without PixelData (file meta included)
    #: Clean UID strings by keyword, computed once by :func:`load_image` (see :func:`_clean_uid`).
    uids: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def sentence(self) -> str:
        """The reason without its leading status word ("failed: ", "skipped: ")."""
        prefix = f"{self.status}: "
        return self.reason[len(prefix):] if self.reason.startswith(prefix) else self.reason

    def _uid(self, keyword: str) -> str:
        if keyword in self.uids:
            return self.uids[keyword]
        if self.dataset is None:
            return ""
        return _clean_uid(self.dataset, keyword)[0]

    @property
    def study_uid(self) -> str:
        return self._uid("StudyInstanceUID")

    @property
    def series_uid(self) -> str:
        return self._uid("SeriesInstanceUID")

    @property
    def sop_uid(self) -> str:
        return self._uid("SOPInstanceUID")

    @property
    def sop_class_uid(self) -> str:
        return self._uid("SOPClassUID")

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _Refusal(Exception):
    """Internal: stop processing one file with a status and a reason."""

    def __init__(self, status: str, sentence: str):
        sentence = printable(sentence)
        super().__init__(sentence)
        self.status = status
        self.reason = f"{status}: {sentence}"


def printable(text: str, limit: int = 300) -> str:
    """One printable line: control/undecodable characters (from corrupt headers) become '?'."""
    text = "".join(ch if ch.isprintable() else "?" for ch in " ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _skip(sentence: str) -> _Refusal:
    return _Refusal("skipped", sentence)


def _fail(sentence: str) -> _Refusal:
    return _Refusal("failed", sentence)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def read_header(path: str | Path) -> Dataset:
    """Read a DICOM header (everything before PixelData), bounded like :func:`load_image`.

    Files without the preamble are read when :func:`is_dicom_file` agrees; raises
    :class:`pydicom.errors.InvalidDicomError` otherwise (also for a FIFO or device, never opened).
    """
    try:
        f = _open_regular(path)
    except OSError as exc:
        raise pydicom.errors.InvalidDicomError(f"{path} is not a DICOM file ({_short(exc, 100)})") from None
    with f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not _looks_like_dicom(f.read(132), f.size):
            raise pydicom.errors.InvalidDicomError(f"{path} is not a DICOM file")
        try:
            return _DicomReader(f, Path(path)).read_header()
        except _Refusal as refusal:
            raise pydicom.errors.InvalidDicomError(f"{path}: {refusal.reason}") from None


def _short(exc: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return msg


# --------------------------------------------------------------------------------------------
# bounded reading: header up to the pixel data, then the pixel data element by hand
# --------------------------------------------------------------------------------------------
@dataclass
class _Stop:
    """Where (and why) the header parse stopped: '' read to the end, 'pixel' at a pixel data
    element, 'zeros' at a (0000,0000) element of length 0 (a run of zero bytes), 'overlong' at
    an element whose declared length runs past the end of the data."""

    kind: str = ""
    tag: int = 0
    vr: str | None = None
    length: int = 0
    offset: int = 0  # where the element's value starts (in the file, or in the inflated stream)


class _FileSource:
    """The data set's bytes are the file's."""

    where = "the file"

    def __init__(self, f: _ClampedReader):
        self.f = f
        self.size = f.size

    def remaining(self, offset: int, want: int) -> int:
        return max(0, self.size - offset)

    def read(self, offset: int, n: int) -> bytes:
        self.f.seek(offset)
        return self.f.read(n)


class _InflateSource:
    """The data set's bytes are a raw deflate stream, inflated only as far as asked."""

    where = "the inflated data set"

    def __init__(self, f: _ClampedReader, start: int):
        self.f = f
        self.start = start
        self.pos = start
        self.z = zlib.decompressobj(-zlib.MAX_WBITS)
        self.buf = bytearray()
        self.eof = False

    def available(self, end: int) -> int:
        """Inflate until ``end`` bytes are there (never more) or the stream ends."""
        while len(self.buf) < end and not self.eof:
            data = self.z.unconsumed_tail
            if not data:
                self.f.seek(self.pos)
                data = self.f.read(1 << 20)
                self.pos += len(data)
                if not data:
                    self.eof = True
                    break
            self.buf += self.z.decompress(data, end - len(self.buf))
            if self.z.eof:
                self.eof = True
        return min(end, len(self.buf))

    def remaining(self, offset: int, want: int) -> int:
        return max(0, self.available(offset + want) - offset)

    def read(self, offset: int, n: int) -> bytes:
        self.available(offset + n)
        return bytes(self.buf[offset:offset + n])


#: At most this many data elements and sequence items (at any depth) before the pixel data: a
#: chest radiograph's header has a few hundred; millions of empty items (8 bytes each) would
#: cost gigabytes and minutes as pydicom objects. Counted by :func:`_scan_structure` before parsing.
MAX_HEADER_ELEMENTS = 100_000
#: Sequences nested deeper than this are refused (before parsing; real headers nest a few levels).
MAX_SEQUENCE_DEPTH = 32
#: Seconds the structure scan of one header may take.
MAX_HEADER_SCAN_S = 10.0

_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_ITEM_DELIM = 0xFFFEE00D


class _Window:
    """Random access to a file's bytes through one sliding buffer (small reads stay cheap)."""

    def __init__(self, src: "_FileSource | _InflateSource | bytes | memoryview", size: int):
        self.src = src
        self.size = size
        self.base = 0
        self.buf = b""

    def get(self, offset: int, n: int) -> bytes:
        if isinstance(self.src, (bytes, memoryview)):
            return bytes(self.src[offset:offset + n])
        if not (self.base <= offset and offset + n <= self.base + len(self.buf)):
            self.base = offset
            self.buf = self.src.read(offset, max(n, 1 << 20))
        i = offset - self.base
        return self.buf[i:i + n]


def _is_sq_tag(tag: int) -> bool:
    try:
        from pydicom.datadict import dictionary_VR

        return dictionary_VR(tag) == "SQ"
    except (KeyError, ValueError):
        return False


def _scan_structure(data: "_Window", start: int, end: int, implicit: bool, little: bool) -> None:
    """Walk the element and item headers from ``start`` to the top-level pixel data (or ``end``)
    without building anything, and refuse a header with more than MAX_HEADER_ELEMENTS elements
    and items, sequences nested deeper than MAX_SEQUENCE_DEPTH, or a walk longer than
    MAX_HEADER_SCAN_S. Anything it cannot follow ends the walk silently (the parser decides)."""
    import time

    e = "<" if little else ">"
    t0 = time.monotonic()
    pos, count = start, 0
    # frames: (kind, end): 'ds' elements up to end (or an item delimiter), 'seq' items up to end (or a
    # sequence delimiter), 'frag' items whose bytes are skipped (encapsulated data)
    stack: list[tuple[str, int]] = [("ds", end)]
    while stack:
        kind, frame_end = stack[-1]
        if pos >= frame_end:
            stack.pop()
            continue
        head = data.get(pos, 8)
        if len(head) < 8:
            return
        group, elem = struct.unpack(e + "HH", head[:4])
        tag = group << 16 | elem
        count += 1
        if count > MAX_HEADER_ELEMENTS:
            raise _fail(f"the header holds more than {MAX_HEADER_ELEMENTS:,} data elements and sequence items before "
                        f"the pixel data (at byte {pos:,}); not parsed")
        if not count & 0xFFF and time.monotonic() - t0 > MAX_HEADER_SCAN_S:
            raise _fail(f"reading the header took longer than {MAX_HEADER_SCAN_S:.0f} s (at byte {pos:,}); not parsed")
        if group == 0xFFFE:  # item, item delimiter, sequence delimiter: 4-byte length, no VR
            (length,) = struct.unpack(e + "I", head[4:8])
            pos += 8
            if tag == _SEQ_DELIM:
                if kind in ("seq", "frag"):
                    stack.pop()  # the sequence ends: back in the data set that holds it
                continue
            if tag == _ITEM_DELIM:
                if kind == "ds" and len(stack) > 1:
                    stack.pop()
                continue
            if tag != _ITEM or kind == "ds":
                return  # an item where an element should be: the parser decides
            if kind == "frag":
                if length == _UNDEFINED:
                    return
                pos += length
                continue
            depth = sum(1 for k, _ in stack if k == "seq")
            if depth > MAX_SEQUENCE_DEPTH:
                raise _fail(f"sequence nesting deeper than {MAX_SEQUENCE_DEPTH} (at byte {pos - 8:,}); not parsed")
            stack.append(("ds", frame_end if length == _UNDEFINED else min(frame_end, pos + length)))
            continue
        if kind != "ds":
            return
        if len(stack) == 1 and tag in _PIXEL_TAGS:
            return
        if implicit:
            vr = b""
            (length,) = struct.unpack(e + "I", head[4:8])
            pos += 8
        else:
            vr = head[4:6]
            if vr not in _VRS:
                return
            if vr in _LONG_VRS:
                more = data.get(pos + 8, 4)
                if len(more) < 4:
                    return
                (length,) = struct.unpack(e + "I", more)
                pos += 12
            else:
                (length,) = struct.unpack(e + "H", head[6:8])
                pos += 8
        if len(stack) == 1 and tag == 0 and length == 0:
            return  # a run of zero bytes: the parser stops there
        if length == _UNDEFINED:
            if vr == b"SQ" or vr == b"UN" or implicit:
                stack.append(("seq", frame_end))
            else:
                stack.append(("frag", frame_end))
            continue
        if pos + length > frame_end:
            return  # declared longer than what is left: the parser refuses it
        if vr == b"SQ" or (implicit and length and _is_sq_tag(tag)):
            stack.append(("seq", pos + length))
            continue
        pos += length


def _parse_dataset(fp: Any, implicit: bool, little: bool, size: int) -> tuple[Dataset, _Stop]:
    """pydicom's top-level data set parse, stopped at the pixel data, at a run of zero bytes or
    at an element longer than what is left of ``size`` bytes (before its value is read)."""
    stop = _Stop()

    def stop_when(tag: int, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_TAGS:
            kind = "pixel"
        elif tag == 0 and length == 0:
            kind = "zeros"
        elif length != _UNDEFINED and length > size - fp.tell():
            kind = "overlong"
        else:
            return False
        stop.kind, stop.tag, stop.vr, stop.length, stop.offset = kind, int(tag), vr, int(length), fp.tell()
        return True

    ds = pydicom.filereader.read_dataset(fp, implicit, little, stop_when=stop_when)
    return ds, stop


class _DicomReader:
    """One pass over one open file: :meth:`read_header`, then the pixel data element."""

    def __init__(self, f: _ClampedReader, path: Path):
        self.f = f
        self.path = path
        self.src: _FileSource | _InflateSource = _FileSource(f)
        self.stop = _Stop()

    def read_header(self) -> FileDataset:
        f = self.f
        f.seek(0)
        read_meta = getattr(pydicom.filereader, "_read_file_meta_info", None)
        if read_meta is None:  # pragma: no cover - a pydicom without its file-meta reader
            return self._read_header_public()
        preamble = pydicom.filereader.read_preamble(f, True)
        file_meta = read_meta(f)
        start = f.tell()
        ts = file_meta.get("TransferSyntaxUID")
        if ts == pydicom.uid.DeflatedExplicitVRLittleEndian:
            return self._read_deflated(preamble, file_meta, start)
        # the encoding as pydicom's read_partial decides it
        implicit, little = True, True
        peek = f.read(6)
        f.seek(start)
        if len(peek) < 6:
            pass
        elif ts is None:
            from pydicom.values import converters

            group = struct.unpack("<H", peek[:2])[0]
            vr = peek[4:6].decode("latin-1")
            if vr in converters:
                implicit = False
                little = group < 1024
        elif ts == pydicom.uid.ImplicitVRLittleEndian:
            pass
        elif ts == pydicom.uid.ExplicitVRBigEndian:
            implicit, little = False, False
        elif ts in getattr(pydicom.uid, "PrivateTransferSyntaxes", ()):
            known = pydicom.uid.PrivateTransferSyntaxes[pydicom.uid.PrivateTransferSyntaxes.index(ts)]
            implicit, little = known.is_implicit_VR, known.is_little_endian
        else:
            implicit = False
        _scan_structure(_Window(self.src, self.src.size), start, self.src.size, implicit, little)
        f.seek(start)
        ds, self.stop = _parse_dataset(f, implicit, little, self.src.size)
        return self._file_dataset(ds, preamble, file_meta, implicit, little)

    def _read_header_public(self) -> FileDataset:  # pragma: no cover - see read_header
        head = self.f.read(4096)
        self.f.seek(0)
        if pydicom.uid.DeflatedExplicitVRLittleEndian.encode() in head:
            raise _fail("deflated data sets need pydicom's file meta reader (pydicom too old or too new)")
        stop = _Stop()
        size = self.src.size
        f = self.f

        def stop_when(tag: int, vr: str | None, length: int) -> bool:
            if tag in _PIXEL_TAGS or (tag == 0 and length == 0) or (length != _UNDEFINED and length > size - f.tell()):
                stop.kind = "pixel" if tag in _PIXEL_TAGS else "zeros" if tag == 0 else "overlong"
                stop.tag, stop.vr, stop.length, stop.offset = int(tag), vr, int(length), f.tell()
                return True
            return False

        ds = pydicom.filereader.read_partial(f, stop_when, force=True)
        self.stop = stop
        return ds

    def _read_deflated(self, preamble: bytes | None, file_meta: FileMetaDataset, start: int) -> FileDataset:
        """Inflate step by step (256 KiB, x4 ...) until the header parses up to the pixel data
        or the stream ends; never more than DEFLATE_HEADER_ALLOWANCE bytes for the header."""
        src = _InflateSource(self.f, start)
        self.src = src
        want = 1 << 18
        while True:
            have = src.available(want)
            complete = src.eof and have >= len(src.buf)
            view = memoryview(src.buf)[:have]
            try:  # refuses too many elements/items or too deep a nesting before pydicom builds them
                _scan_structure(_Window(view, have), 0, have, False, True)
            finally:
                view.release()
            error: BaseException | None = None
            logger = logging.getLogger("pydicom")
            disabled, logger.disabled = logger.disabled, True  # partial parses: only the last one's
            try:                                                 # warnings are passed on (below)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        ds, stop = _parse_dataset(io.BytesIO(memoryview(src.buf)[:have]), False, True, have)
                    except _PASS_THROUGH:
                        raise
                    except Exception as exc:  # a parse of a partly inflated stream may fail
                        error = exc
            finally:
                logger.disabled = disabled
            if error is None and (complete or stop.kind in ("pixel", "zeros")):
                break
            if complete:
                assert error is not None
                raise error
            # an element declared longer than what is inflated so far says how far to go
            end = stop.offset + stop.length if error is None and stop.kind == "overlong" else 0
            if want >= DEFLATE_HEADER_ALLOWANCE or end > DEFLATE_HEADER_ALLOWANCE:
                big = (f": element ({stop.tag >> 16:04X},{stop.tag & 0xFFFF:04X}) declares {stop.length:,} bytes"
                       if end > DEFLATE_HEADER_ALLOWANCE else "")
                raise _fail(
                    f"the deflated data set holds more than {DEFLATE_HEADER_ALLOWANCE >> 20} MiB before its pixel "
                    f"data{big} (a decompression bomb?); not inflated further"
                )
            want = min(max(want * 4, end + (1 << 16)), DEFLATE_HEADER_ALLOWANCE)
        for w in caught:  # the final parse's warnings only
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self.stop = stop
        return self._file_dataset(ds, preamble, file_meta, False, True)

    def _file_dataset(self, ds: Dataset, preamble: bytes | None, file_meta: FileMetaDataset, implicit: bool,
                      little: bool) -> FileDataset:
        out = FileDataset(str(self.path), ds, preamble=preamble, file_meta=file_meta, is_implicit_VR=implicit,
                          is_little_endian=little)
        out.set_original_encoding(implicit, little, getattr(ds, "_character_set", None) or "iso8859")
        return out

    def check_header(self) -> None:
        """Refuse a header whose parse stopped at an element longer than the data left."""
        stop = self.stop
        if stop.kind == "overlong":
            left = max(0, self.src.remaining(stop.offset, 0))
            raise _fail(
                f"element ({stop.tag >> 16:04X},{stop.tag & 0xFFFF:04X}) declares {stop.length:,} bytes but only "
                f"{left:,} remain in {self.src.where} (truncated or corrupt); not read"
            )

    def ends_inside_pixel_tag(self) -> bool:
        """Whether the last bytes hold the start of a (7FE0,0010) element (either byte order)."""
        if isinstance(self.src, _FileSource):
            tail = self.src.read(max(0, self.src.size - 16), 16)
        else:
            tail = bytes(self.src.buf[-16:])
        return b"\xe0\x7f\x10\x00" in tail or b"\x7f\xe0\x00\x10" in tail


# --------------------------------------------------------------------------------------------
# codestream headers (JPEG, JPEG-LS, JPEG 2000 / JP2)
# --------------------------------------------------------------------------------------------
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_sof(data: bytes) -> tuple[str, int, int, int, int] | None:
    """(kind, rows, columns, components, precision) from a JPEG / JPEG-LS frame header."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        while i + 1 < n and data[i + 1] == 0xFF:  # fill bytes
            i += 1
        marker = data[i + 1]
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            i += 2
            continue
        if marker in (0xD9, 0xDA) or i + 4 > n:  # EOI / SOS before any frame header
            return None
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _JPEG_SOF or marker == 0xF7:
            if i + 10 > n:
                return None
            precision = data[i + 4]
            rows, cols = struct.unpack(">HH", data[i + 5:i + 9])
            return ("JPEG-LS" if marker == 0xF7 else "JPEG", rows, cols, data[i + 9], precision)
        if length < 2:
            return None
        i += 2 + length
    return None


def _j2k_siz(data: bytes) -> tuple[str, int, int, int, int] | None:
    """The same from a JPEG 2000 codestream (SOC then SIZ): Ysiz-YOsiz, Xsiz-XOsiz, Csiz, Ssiz."""
    if len(data) < 4 + 38 + 3 or data[:4] != b"\xff\x4f\xff\x51":
        return None
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[8:24])
    (csiz,) = struct.unpack(">H", data[40:42])
    precision = (data[42] & 0x7F) + 1
    return ("JPEG 2000", ysiz - yo, xsiz - xo, csiz, precision)


def _jp2_codestream(data: bytes) -> bytes | None:
    """The contiguous codestream box ('jp2c') of a JP2 file, as far as ``data`` goes."""
    i = 0
    while i + 8 <= len(data):
        (length,) = struct.unpack(">I", data[i:i + 4])
        kind = data[i + 4:i + 8]
        head = 8
        if length == 1:
            if i + 16 > len(data):
                return None
            (length,) = struct.unpack(">Q", data[i + 8:i + 16])
            head = 16
        elif length == 0:
            length = len(data) - i
        if kind == b"jp2c":
            return data[i + head:]
        if length < head:
            return None
        i += length
    return None


def _codestream_geometry(data: bytes) -> tuple[str, int, int, int, int] | None:
    if data[:2] == b"\xff\xd8":
        return _jpeg_sof(data)
    if data[:4] == b"\xff\x4f\xff\x51":
        return _j2k_siz(data)
    if data[4:8] == b"jP  ":
        stream = _jp2_codestream(data)
        return _j2k_siz(stream) if stream else None
    return None


def _check_codestream(frame_start: bytes, rows: int, cols: int, samples: int, meta: PixelMeta,
                      opts: SelectionOptions, notes: list[str]) -> None:
    """Refuse a codestream whose own header disagrees with the DICOM header (before decoding)."""
    geo = _codestream_geometry(frame_start)
    if geo is None:
        return  # not a JPEG family stream (RLE, ...) or no header found: the decoder decides
    kind, h, w, nc, precision = geo
    height_ok = h == rows or (kind != "JPEG 2000" and h == 0)  # 0: height given by a DNL marker
    if not height_ok or w != cols or nc != samples:
        raise _fail(
            f"the {kind} codestream of frame 1 is {h} x {w} pixels with {nc} component(s) but the header says "
            f"{rows} x {cols} with {samples} sample(s) per pixel; not decoded"
        )
    if max(h, rows) * w * max(nc, 1) > opts.max_pixels:
        raise _fail(f"the {kind} codestream of frame 1 is too large ({h} x {w} x {nc}, limit "
                    f"{opts.max_pixels:,} pixels); not decoded")
    if precision > meta.bits_allocated:
        notes.append(f"the {kind} codestream has {precision}-bit samples, more than BitsAllocated {meta.bits_allocated}")


# --------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_MAX_UID_TEXT = 256


def _uid_problem(uid: str) -> str:
    if len(uid) > 64:
        return f"{len(uid)} characters, more than 64"
    if any(ch not in "0123456789." for ch in uid):
        return "characters other than digits and dots"
    return "an empty component or a leading zero"


def _clean_uid(ds: Dataset, keyword: str) -> tuple[str, str | None]:
    """One clean string for a UID attribute, from its raw value, and a warning or None.

    A value with a backslash (which pydicom reads as several values) becomes one string with the
    backslash replaced by '.'; unprintable characters become '?'; more than 256 characters are
    cut; a value that is still not a valid UID is kept as text with a warning.
    """
    try:
        if keyword not in ds:
            return "", None
        elem = ds.get_item(keyword)
        value = elem.value if elem is not None else None
    except Exception as exc:  # noqa: BLE001 - a malformed value must not make a property raise
        return "", f"{keyword} is unreadable ({_short(exc, 80)})"
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("latin-1")
    elif isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        text = "\\".join(str(v) for v in value)
    elif value is None:
        text = ""
    else:
        text = str(value)
    text = text.strip(" \x00")
    if not text:
        return "", None
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    problems: list[str] = []
    if "\\" in clean:
        parts = [p.strip(" \x00") for p in clean.split("\\")]
        parts = [p for p in parts if p]
        clean = ".".join(parts)
        problems.append(f"holds {len(parts)} values (a backslash in a UID)")
    if len(clean) > _MAX_UID_TEXT:
        clean = clean[:_MAX_UID_TEXT]
        problems.append(f"is longer than {_MAX_UID_TEXT} characters (cut)")
    if not UID(clean).is_valid:
        problems.append(f"is not a valid UID ({_uid_problem(clean)})")
    if not problems:
        return clean, None
    shown = printable(text, 80)
    using = f"; using '{printable(clean, 80)}'" if clean != text else "; kept as text"
    return clean, f"{keyword} '{shown}' {' and '.join(problems)}{using}"


def _collect_uids(ds: Dataset, notes: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for keyword in _UID_KEYWORDS:
        out[keyword], warning = _clean_uid(ds, keyword)
        if warning:
            notes.append(warning)
    return out


def _is_chest_body_part(body: str) -> bool:
    """Whether an (upper-cased) BodyPartExamined is empty or chest-like (see CHEST_WORDS)."""
    if body in CHEST_BODY_PARTS:
        return True
    folded = unicodedata.normalize("NFKD", body).encode("ascii", "ignore").decode("ascii").upper()
    words = re.split(r"[\s_\-/,.+;:()&]+", folded)
    return any(w in CHEST_WORDS for w in words)


# --------------------------------------------------------------------------------------------
# library warnings
# --------------------------------------------------------------------------------------------
def _warning_source(filename: str) -> str:
    f = str(filename).replace("\\", "/")
    for key, name in (("/pydicom/", "pydicom"), ("/numpy/", "numpy"), ("/PIL/", "Pillow"),
                      ("/pylibjpeg", "pylibjpeg"), ("/openjpeg/", "openjpeg"), ("/libjpeg/", "libjpeg"),
                      ("/jpeg_ls/", "pyjpegls"), ("/rle/", "pylibjpeg-rle")):
        if key in f:
            return name
    return "warning"


class _LogCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a broken log call must not break reading
            pass


@contextlib.contextmanager
def library_messages() -> Iterator[list[tuple[str, str]]]:
    """Collect (source, message) of the warnings raised and of pydicom's log records (WARNING
    and above) inside the block, instead of letting them reach stderr."""
    out: list[tuple[str, str]] = []
    logger = logging.getLogger("pydicom")
    handler = _LogCollector()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # the garbage collector's complaints about some other object are not this file's
            warnings.simplefilter("ignore", ResourceWarning)
            try:
                yield out
            finally:
                out.extend((_warning_source(w.filename), str(w.message)) for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        out.extend(("pydicom", m) for m in handler.messages)


def merge_library_messages(notes: list[str], messages: list[tuple[str, str]]) -> list[str]:
    """``notes`` plus one 'source: message' per new message (deduplicated, at most
    _MAX_LIBRARY_WARNINGS, then a count)."""
    out = list(notes)
    extra = 0
    added = 0
    for source, msg in messages:
        msg = " ".join(str(msg).split())
        if not msg:
            continue
        key = msg[:150]
        if any(key in note for note in out):
            continue
        if added >= _MAX_LIBRARY_WARNINGS:
            extra += 1
            continue
        out.append(f"{source}: {_short(Exception(msg), 200)}")
        added += 1
    if extra:
        out.append(f"{extra} more library warning(s) not shown")
    return out


def _text(ds: Dataset, keyword: str) -> str:
    """A string attribute, upper-cased and stripped; '' when absent or unreadable."""
    try:
        value = ds.get(keyword, None)
    except Exception:
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = "\\".join(str(v) for v in value)
    return str(value).strip().upper()


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword, None)
    except Exception as exc:
        raise _fail(f"{keyword} is unreadable ({_short(exc, 80)})") from None
    if value is None or value == "":
        return default
    try:
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0]
        return int(value)
    except (TypeError, ValueError, IndexError):
        raise _fail(f"{keyword} has an invalid value {value!r}") from None


def _float(ds: Dataset, keyword: str, default: float, notes: list[str]) -> float:
    try:
        value = ds.get(keyword, None)
        if value is None or value == "":
            return default
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0]
        out = float(value)
        if not np.isfinite(out):
            raise ValueError
        return out
    except Exception:
        notes.append(f"{keyword} is invalid; using {default:g}")
        return default


def _sop_class_name(uid: str) -> str:
    if not uid:
        return "object"
    name = UID(uid).name
    return name if name and name != uid else f"SOP class {printable(uid, 80)}"


def _ts_name(ds: Dataset) -> str:
    try:
        ts = ds.file_meta.TransferSyntaxUID
        return f"{ts.name} ({ts})" if ts.name != ts else str(ts)
    except Exception:
        return "unknown transfer syntax"


# --------------------------------------------------------------------------------------------
# policy
# --------------------------------------------------------------------------------------------
def _is_dicomdir(path: Path, ds: Dataset) -> bool:
    media = ""
    try:
        media = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    except Exception:
        pass
    if media == MEDIA_STORAGE_DIRECTORY or str(ds.get("SOPClassUID", "") or "") == MEDIA_STORAGE_DIRECTORY:
        return True
    return "DirectoryRecordSequence" in ds


#: The Manufacturer of every DICOM object this package writes (SR, result image, saliency SC).
OWN_MANUFACTURER = "cxr-lung-risk open implementation"


def own_result(ds: Dataset) -> str:
    """What kind of this tool's own output ``ds`` is (e.g. "a result image (SC) made by
    cxr-lung-risk 0.1.0"), or '' when it is not one: a study sent back to the node, or a folder
    holding an earlier run's outputs, must not have its results scored as radiographs."""
    if _text(ds, "Manufacturer") != OWN_MANUFACTURER.upper():
        return ""

    def raw(kw: str) -> str:
        try:
            return str(ds.get(kw, "") or "").strip()[:64]
        except Exception:  # noqa: BLE001 - a malformed value is left out of the message
            return ""

    sop_class = raw("SOPClassUID")
    kind = ("a structured report" if sop_class.startswith("1.2.840.10008.5.1.4.1.1.88")
            else "a derived image (SC)" if sop_class.startswith(SECONDARY_CAPTURE_PREFIX) else "an object")
    series, version = raw("SeriesDescription"), raw("SoftwareVersions")
    return (f"{kind} made by cxr-lung-risk{' ' + version if version else ''}"
            + (f" ({series})" if series else "") + ", not a source image")


def _modality(ds: Dataset, sop_class: str) -> str:
    modality = _text(ds, "Modality")
    if not modality:
        modality = _MODALITY_FROM_SOP.get(sop_class, "")
    return modality


def _is_lateral(ds: Dataset) -> str:
    """A short description of why the view is lateral, or '' when it is not (or unknown)."""
    view = _text(ds, "ViewPosition")
    if view in LATERAL_VIEWS:
        return f"ViewPosition {view}"
    image_type = [v.strip() for v in _text(ds, "ImageType").split("\\")]
    if "LATERAL" in image_type:
        return "ImageType contains LATERAL"
    try:
        for item in ds.get("ViewCodeSequence", None) or []:
            meaning = str(item.get("CodeMeaning", "") or "")
            if "lateral" in meaning.lower() and "medio" not in meaning.lower():
                return f"view code '{meaning}'"
    except Exception:
        pass
    return ""


def _check_policy(path: Path, ds: Dataset, opts: SelectionOptions, notes: list[str]) -> tuple[int, int, int]:
    """Apply the selection rules to a header; returns (rows, columns, frames) or raises _Refusal."""
    if _is_dicomdir(path, ds):
        raise _skip("DICOMDIR (a media directory index, not an image)")
    own = own_result(ds)
    if own:
        raise _skip(f"own result: {own}")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if not sop_class:
        try:
            sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
        except Exception:
            sop_class = ""
    if sop_class and not UID(sop_class).is_valid:
        raise _fail(f"SOPClassUID '{sop_class[:64]}' is not a valid UID (corrupt header)")
    modality = _modality(ds, sop_class)
    if "Rows" not in ds and "Columns" not in ds:
        what = _sop_class_name(sop_class)
        if not sop_class:
            raise _fail("the header has neither a SOP Class UID nor Rows/Columns (file truncated or corrupt)")
        if "Image Storage" in what:
            raise _fail(f"{what} header has no Rows/Columns (file truncated or malformed)")
        mod = f", modality {modality}" if modality else ""
        raise _skip(f"{what}{mod} is not an image (no pixel data)")

    allowed = tuple(m.upper() for m in opts.allowed_modalities)
    if modality not in allowed:
        is_sc = modality in ("SC", "OT", "") and (
            sop_class.startswith(SECONDARY_CAPTURE_PREFIX) or modality == "SC"
        )
        if is_sc and opts.accept_radiograph_like_sc:
            conversion = _text(ds, "ConversionType")
            body = _text(ds, "BodyPartExamined")
            if conversion in SC_RADIOGRAPH_CONVERSION_TYPES or (body and _is_chest_body_part(body)):
                notes.append(
                    f"secondary capture (modality {modality or 'missing'}, ConversionType "
                    f"{conversion or 'missing'}, BodyPartExamined {body or 'missing'}) accepted as a radiograph"
                )
            else:
                raise _skip(
                    f"secondary capture (modality {modality or 'missing'}, ConversionType "
                    f"{conversion or 'missing'}, BodyPartExamined {body or 'missing'}) does not look like "
                    f"a radiograph (needs ConversionType DF/DI or a chest BodyPartExamined)"
                )
        elif not modality:
            raise _skip(f"modality is missing and {_sop_class_name(sop_class)} is not a radiograph (CR/DX)")
        else:
            raise _skip(f"modality {modality} is not a radiograph ({'/'.join(allowed)})")

    intent = _text(ds, "PresentationIntentType")
    if intent == "FOR PROCESSING" or sop_class == DX_PROCESSING:
        if not opts.allow_for_processing:
            raise _skip("DX image is FOR PROCESSING (raw detector data), not FOR PRESENTATION")
        notes.append("FOR PROCESSING image accepted (raw detector data)")

    frames = _int(ds, "NumberOfFrames", 1)
    if frames is None or frames < 1:
        frames = 1
    if frames > 1:
        if not opts.allow_multiframe:
            raise _skip(f"multi-frame image ({frames} frames); only single-frame radiographs are supported")
        notes.append(f"multi-frame image: only frame 1 of {frames} is used")

    photometric = _text(ds, "PhotometricInterpretation")
    samples = _int(ds, "SamplesPerPixel", 1)
    if not photometric:
        raise _fail("PhotometricInterpretation is missing")
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1:
        raise _skip(
            f"photometric interpretation {photometric} ({samples} samples per pixel) is not "
            f"monochrome (MONOCHROME1/MONOCHROME2)"
        )

    lateral = _is_lateral(ds)
    if lateral:
        if not opts.allow_lateral:
            raise _skip(f"lateral view ({lateral}); only frontal (PA/AP) chest radiographs are supported")
        notes.append(f"lateral view accepted ({lateral})")

    body = _text(ds, "BodyPartExamined")
    if not _is_chest_body_part(body):
        body = printable(body, 64)
        if not opts.allow_non_chest:
            raise _skip(f"BodyPartExamined is '{body}', not a chest radiograph (use --allow-non-chest to score it)")
        notes.append(f"BodyPartExamined is '{body}', not chest-like")

    rows = _int(ds, "Rows", 0) or 0
    cols = _int(ds, "Columns", 0) or 0
    if rows <= 0 or cols <= 0:
        raise _fail(f"image dimensions are missing or zero (Rows {rows}, Columns {cols})")
    total = rows * cols * (frames if opts.allow_multiframe else 1)
    if total > opts.max_pixels:
        raise _fail(
            f"image is too large ({rows} x {cols} = {rows * cols:,} pixels, limit {opts.max_pixels:,}); "
            f"not decoded"
        )
    long_side, short_side = max(rows, cols), min(rows, cols)
    if long_side > opts.max_aspect_ratio * short_side:
        ratio = long_side / short_side
        r = f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.1f}"
        raise _fail(
            f"image aspect ratio {f'1:{r}' if cols > rows else f'{r}:1'} cannot be a chest radiograph "
            f"(Rows {rows} x Columns {cols}, limit {opts.max_aspect_ratio:g}:1); not decoded"
        )
    return rows, cols, frames


def _pixel_meta(ds: Dataset, notes: list[str]) -> PixelMeta:
    bits_allocated = _int(ds, "BitsAllocated", None)
    if bits_allocated not in _SUPPORTED_BITS_ALLOCATED:
        raise _fail(f"BitsAllocated {bits_allocated} is not supported (8, 16 or 32)")
    bits_stored = _int(ds, "BitsStored", bits_allocated)
    if bits_stored is None or not 1 <= bits_stored <= bits_allocated:
        raise _fail(f"BitsStored {bits_stored} is not between 1 and BitsAllocated {bits_allocated}")
    high_bit = _int(ds, "HighBit", bits_stored - 1)
    if high_bit != bits_stored - 1:
        notes.append(f"HighBit {high_bit} is not BitsStored - 1 ({bits_stored - 1}); assuming {bits_stored - 1}")
    rep = _int(ds, "PixelRepresentation", 0)
    if rep not in (0, 1):
        raise _fail(f"PixelRepresentation {rep} is invalid (0 or 1)")
    slope = _float(ds, "RescaleSlope", 1.0, notes)
    intercept = _float(ds, "RescaleIntercept", 0.0, notes)
    if slope == 0.0:
        notes.append("RescaleSlope is 0; using 1")
        slope = 1.0
    if "ModalityLUTSequence" in ds:
        notes.append("Modality LUT Sequence is ignored (as dcmj2pnm without options does)")
    shape = _text(ds, "PresentationLUTShape") or None
    if shape not in (None, "IDENTITY", "INVERSE"):
        notes.append(f"PresentationLUTShape {shape} is not IDENTITY/INVERSE; ignored")
        shape = None
    return PixelMeta(
        photometric=_text(ds, "PhotometricInterpretation"),
        bits_stored=bits_stored,
        bits_allocated=bits_allocated,
        pixel_representation=rep,
        rescale_slope=slope,
        rescale_intercept=intercept,
        presentation_lut_shape=shape,
    )


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------
def decode_pixels(ds: Dataset, frame: int | None = None) -> np.ndarray:
    """Raw stored values of ``ds`` (no rescale, VOI or colour conversion); ``frame`` picks one
    frame of a multi-frame image (0-based).  Raises on undecodable data."""
    from pydicom.pixels import pixel_array

    plugin = ""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts == pydicom.uid.RLELossless:
        # pydicom's own RLE decoder: pylibjpeg-rle (Rust) panics on some corrupt segments,
        # printing a backtrace to stderr; pydicom's raises a normal exception (0.2 s per CXR).
        plugin = "pydicom"
    return pixel_array(ds, index=frame, raw=True, decoding_plugin=plugin)


def _infer_native_syntax(ds: Dataset, encapsulated: bool | None = None) -> UID | None:
    """For a data set stored without file meta: the native syntax pydicom found it in (an
    encapsulated PixelData cannot be interpreted without its transfer syntax)."""
    encoding = getattr(ds, "original_encoding", (None, None))
    implicit, little = encoding if encoding else (None, None)
    if implicit is None or little is None:
        return None
    if encapsulated is None:
        encapsulated = "PixelData" in ds and ds["PixelData"].is_undefined_length
    if encapsulated:
        return None
    if implicit:
        ts = pydicom.uid.ImplicitVRLittleEndian
    else:
        ts = pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ts


def _expected_native_bytes(rows: int, cols: int, frames: int, bits_allocated: int) -> int:
    return (rows * cols * frames * bits_allocated + 7) // 8


def _native_element(reader: _DicomReader, rows: int, cols: int, frames: int, meta: PixelMeta,
                    notes: list[str], read: bool = True) -> DataElement | None:
    """The native PixelData element, its declared length checked against the data left and
    only the bytes the image needs read (``read`` False: the checks only, nothing read)."""
    stop, src = reader.stop, reader.src
    declared, offset = stop.length, stop.offset
    need = _expected_native_bytes(rows, cols, frames, meta.bits_allocated)
    shape = f"{rows} x {cols}{f' x {frames} frames' if frames > 1 else ''} at {meta.bits_allocated} bits"
    # a file's size is known: check the whole declared length; a deflated stream is inflated
    # only as far as the image needs
    want = declared if isinstance(src, _FileSource) else min(declared, need + 2)
    left = src.remaining(offset, want)
    if left < want:
        if left >= need:
            raise _fail(f"PixelData declares {declared:,} bytes but only {left:,} remain in {src.where} "
                        f"(corrupt length); not read")
        raise _fail(f"pixel data is truncated ({left:,} bytes, expected {need:,} for {shape}; "
                    f"{declared:,} declared)")
    if declared < need:
        raise _fail(f"pixel data is truncated ({declared:,} bytes, expected {need:,} for {shape})")
    if declared > need + 1:
        notes.append(f"pixel data has {declared - need:,} bytes more than expected; extra bytes ignored")
    if not read:
        return None
    value = src.read(offset, min(declared, need + (need & 1)))
    vr = stop.vr if stop.vr in ("OB", "OW") else ("OB" if meta.bits_allocated <= 8 else "OW")
    return DataElement(_PIXEL_DATA, vr, value)


def _encapsulated_element(reader: _DicomReader, ds: Dataset, rows: int, cols: int, meta: PixelMeta,
                          opts: SelectionOptions, notes: list[str], read: bool = True) -> DataElement | None:
    """The encapsulated PixelData element, walked item by item (each length checked against the
    data left), with frame 1's codestream header checked against the DICOM header (``read``
    False: the checks only, the fragments' bytes not read)."""
    src, start = reader.src, reader.stop.offset
    pos = start
    fragments: list[tuple[int, int]] = []  # (offset, length); the first item is the offset table
    while True:
        head = src.read(pos, 8)
        if len(head) < 8:
            if len(fragments) < 2:
                raise _fail("pixel data is truncated (the file ends inside the encapsulated pixel data)")
            notes.append("encapsulated pixel data has no sequence delimiter (file truncated?)")
            break
        group, elem, length = struct.unpack("<HHI", head)
        tag = group << 16 | elem
        if tag == _SEQ_DELIM:
            break
        if tag != _ITEM:
            if len(fragments) < 2:
                raise _fail(f"encapsulated pixel data is malformed (tag ({group:04X},{elem:04X}) where an item "
                            f"should be, at byte {pos:,})")
            notes.append(f"encapsulated pixel data ends without a sequence delimiter at byte {pos:,}; "
                         f"the rest of the file is ignored")
            break
        if length == _UNDEFINED:
            raise _fail("encapsulated pixel data has an item of undefined length (malformed)")
        left = src.remaining(pos + 8, length)
        if left < length:
            raise _fail(f"pixel data is truncated (fragment {len(fragments)} declares {length:,} bytes but only "
                        f"{left:,} remain in {src.where})")
        fragments.append((pos + 8, length))
        pos += 8 + length
    peek = b""
    for offset, length in fragments[1:]:
        peek += src.read(offset, min(length, _CODESTREAM_PEEK - len(peek)))
        if len(peek) >= _CODESTREAM_PEEK:
            break
    samples = _int(ds, "SamplesPerPixel", 1) or 1
    _check_codestream(peek, rows, cols, samples, meta, opts, notes)
    if not read:
        return None
    return DataElement(_PIXEL_DATA, "OB", src.read(start, pos - start), is_undefined_length=True)


def _decode(ds: Dataset, reader: _DicomReader, rows: int, cols: int, frames: int, meta: PixelMeta,
            opts: SelectionOptions, notes: list[str], decode: bool = True) -> np.ndarray | None:
    stop = reader.stop
    if stop.kind != "pixel" or stop.tag != _PIXEL_DATA:
        if stop.kind == "pixel":
            raise _skip("float pixel data is not a radiograph")
        if stop.kind == "zeros":
            raise _fail(f"the data set runs into a block of zero bytes at byte {max(0, stop.offset - 8):,} and has "
                        f"no pixel data (file corrupt)")
        if reader.ends_inside_pixel_tag():
            raise _fail("pixel data is truncated or unreadable (the data set ends inside PixelData)")
        raise _fail("PixelData is missing")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        ts = _infer_native_syntax(ds, stop.length == _UNDEFINED)
        if ts is None:
            raise _fail("transfer syntax is unknown (no TransferSyntaxUID in the file meta)")
        notes.append(f"no TransferSyntaxUID in the file; read as {ts.name}")
    if not ts.is_transfer_syntax:
        raise _fail(f"transfer syntax UID '{str(ts)[:64]}' is not a known transfer syntax")
    encapsulated = stop.length == _UNDEFINED
    if ts.is_compressed != encapsulated:
        claim = "compressed" if ts.is_compressed else "uncompressed"
        actual = "encapsulated (compressed)" if encapsulated else "native (uncompressed)"
        raise _fail(f"transfer syntax {_ts_name(ds)} says {claim} but the pixel data is {actual}")
    if encapsulated:
        elem = _encapsulated_element(reader, ds, rows, cols, meta, opts, notes, read=decode)
    else:
        elem = _native_element(reader, rows, cols, frames, meta, notes, read=decode)
    if elem is None:  # screening: every check that needs no decoding has passed, nothing was read
        return None
    ds[_PIXEL_DATA] = elem
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", ResourceWarning)
            try:
                arr = decode_pixels(ds, 0 if frames > 1 else None)
            except MemoryError:
                raise _fail("not enough memory to decode the pixel data") from None
            except _PASS_THROUGH:
                raise
            except BaseException as exc:  # noqa: BLE001 - Rust decoders (pyo3) panic with a BaseException
                raise _fail(f"could not decode the pixel data ({_ts_name(ds)}): {_short(exc)}") from None
    finally:
        del ds[_PIXEL_DATA]  # the header handed on stays without pixel data
    for w in caught:
        msg = _short(w.message, 200)
        if msg and f"decoder: {msg}" not in notes:
            notes.append(f"decoder: {msg}")
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape != (rows, cols):
        raise _fail(f"decoded pixel data has shape {arr.shape}, expected ({rows}, {cols})")
    if arr.dtype.kind not in "ui":
        raise _fail(f"decoded pixel data has type {arr.dtype}, expected integers")
    if not arr.dtype.isnative:  # big endian input: hand on native byte order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def load_image(path: str | Path, options: SelectionOptions | None = None) -> LoadedImage:
    """Read, select and decode one file.  Never raises for bad input: every problem becomes a
    ``'skipped'`` or ``'failed'`` :class:`LoadedImage` with a one-sentence reason.  Warnings of
    the libraries (pydicom, numpy, Pillow, decoders) and pydicom's log messages become entries
    of ``warnings`` ('pydicom: ...', 'decoder: ...') instead of reaching stderr."""
    return _load_reporting(path, options, decode=True)


def screen_image(path: str | Path, options: SelectionOptions | None = None) -> LoadedImage:
    """:func:`load_image` without decoding: the selection rules and every check that needs no
    decoding (header, dimensions, photometric, transfer syntax, the pixel data's declared size
    against the bytes present, the codestream's header against the DICOM header). ``ok`` means
    the file is eligible and not certainly broken (``pixels`` is None); a ``failed`` or
    ``skipped`` result is what :func:`load_image` would say. Used by the PACS node to answer a
    C-STORE before acknowledging it."""
    return _load_reporting(path, options, decode=False)


def _load_reporting(path: str | Path, options: SelectionOptions | None, decode: bool) -> LoadedImage:
    """:func:`_load_image` with the libraries' warnings and log messages made the input's."""
    with library_messages() as messages:
        res = _load_image(Path(os.fsdecode(path)), options if options is not None else SelectionOptions(), decode=decode)
    res.warnings = [printable(w) for w in merge_library_messages(res.warnings, messages)]
    return res


def _open_failure(path: Path, exc: OSError) -> _Refusal:
    """The reason for a path that cannot be opened (dangling or looping symbolic links named)."""
    try:
        is_link = stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        is_link = False
    if exc.errno == errno.ELOOP:
        return _fail("symbolic link loop")
    if is_link and exc.errno == errno.ENOENT:
        return _fail("broken symbolic link")
    return _fail(f"cannot read the file ({_short(exc, 100)})")


def _load_image(path: Path, opts: SelectionOptions, decode: bool = True) -> LoadedImage:
    notes: list[str] = []
    header: Dataset | None = None
    uids: dict[str, str] = {}
    try:
        try:
            f = _open_regular(path)
        except _NotRegular as exc:
            if exc.kind == "directory":
                raise _fail("not a regular file") from None
            raise _skip(f"not a regular file ({exc.kind})") from None
        except OSError as exc:
            raise _open_failure(path, exc) from None
        with f:
            if f.size == 0:
                raise _fail("the file is empty (0 bytes)")
            if not _looks_like_dicom(f.read(132), f.size):
                raise _skip("not a DICOM file")
            reader = _DicomReader(f, path)
            try:
                header = reader.read_header()
            except (_Refusal, MemoryError):
                raise
            except _PASS_THROUGH:
                raise
            except BaseException as exc:  # noqa: BLE001
                raise _fail(f"malformed DICOM header: {_short(exc)}") from None
            if len(header) == 0 and not getattr(header, "file_meta", None):
                raise _fail("malformed DICOM: no data elements could be read")
            uids = _collect_uids(header, notes)
            rows, cols, frames = _check_policy(path, header, opts, notes)
            meta = _pixel_meta(header, notes)
            reader.check_header()
            pixels = _decode(header, reader, rows, cols, frames, meta, opts, notes, decode)
        return LoadedImage("ok", "", notes, pixels, meta, header, uids)
    except _Refusal as refusal:
        return LoadedImage(refusal.status, refusal.reason, notes, None, None, header, uids)
    except MemoryError:
        return LoadedImage("failed", "failed: not enough memory to read the file", notes, None, None, header, uids)
    except _PASS_THROUGH:
        raise
    except BaseException as exc:  # noqa: BLE001 - last resort: never let a bad file escape
        return LoadedImage("failed", f"failed: unexpected error reading the file ({type(exc).__name__}: "
                           f"{_short(exc, 120)})", notes, None, None, header, uids)
