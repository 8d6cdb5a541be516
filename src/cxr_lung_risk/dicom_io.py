"""DICOM in: find input files, decide which ones are frontal chest radiographs, decode them.

Owner: DICOM-input stage (issue 3, items 1-3 and 6).

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
* a Deflated Explicit VR Little Endian data set is inflated incrementally: at most 64 MiB before
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
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import UID

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
DEFLATE_HEADER_ALLOWANCE = 64 << 20
#: Bytes of frame 1 parsed for its JPEG / JPEG-LS / JPEG 2000 codestream header.
_CODESTREAM_PEEK = 64 << 10
#: Library warnings kept per file (the rest are counted).
_MAX_LIBRARY_WARNINGS = 10


class DicomInputError(Exception):
    """A problem with the inputs themselves (e.g. a path that does not exist)."""


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


def _walk(root: Path, excluded: Sequence[str]) -> list[tuple[str, Path]]:
    """(escaped relative path, path) of every non-directory entry under ``root``, sorted.

    Directories whose name starts with '.' are not entered; symbolic links to directories are
    followed, except into a directory already on the current branch (a cycle) or already
    walked; anything else (regular files, FIFOs, sockets, devices, dangling symbolic links,
    symbolic link loops) is listed: :func:`load_image` reports it.  Directories under
    ``excluded`` (real paths) are not entered.
    """
    found: list[tuple[str, Path]] = []
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
                found.append((prefix.rstrip("/"), folder))
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
                found.append((rel, full))
                continue
            if name.startswith("."):
                continue
            real = _real(full)
            if real in walked or _is_under(real, excluded):
                continue
            walked.add(real)
            stack.append((full, rel + "/"))
    found.sort(key=lambda t: t[0])
    return found


def discover(inputs: Sequence[str | Path], exclude: Sequence[str | Path] | None = None) -> Iterator[InputFile]:
    """Yield every file under ``inputs`` (files and directories, recursive), deterministically.

    Inputs are visited in the order given; inside a directory files are sorted by their
    relative path.  Directories whose name starts with '.' (``.git``, ``.cache``...) are not
    entered; files are never filtered by name or type (a hidden or extension-less file may be
    DICOM; a non-DICOM file, FIFO, dangling or looping symbolic link is yielded and reported by
    :func:`load_image`).  A file reached twice (through two inputs) is yielded once.  Nothing
    under the paths in ``exclude`` (e.g. the output folder) is walked.  ``rel`` is unique over
    the call (see :class:`InputFile`).  Raises :class:`DicomInputError` for an input that does
    not exist.
    """
    if isinstance(inputs, (str, Path, bytes)):
        inputs = [inputs]
    paths = [Path(os.fsdecode(p)) for p in inputs]
    for p in paths:  # fail before yielding anything: a typo should not cost a half run
        if not os.path.lexists(p):
            raise DicomInputError(f"input not found: {_escape_name(str(p))}")
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
            for rel, full in _walk(p, excluded):
                if _once(full):
                    yield InputFile(full, _unique(prefix + rel, True), p)
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
        sentence = _printable(sentence)
        super().__init__(sentence)
        self.status = status
        self.reason = f"{status}: {sentence}"


def _printable(text: str, limit: int = 300) -> str:
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
    """Read a DICOM header (everything before PixelData).

    ``force=True`` is used only after :func:`is_dicom_file` agreed, so that files without the
    preamble load; raises :class:`pydicom.errors.InvalidDicomError` otherwise.
    """
    if not is_dicom_file(path):
        raise pydicom.errors.InvalidDicomError(f"{path} is not a DICOM file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)


def _short(exc: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return msg


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
    return name if name and name != uid else f"SOP class {_printable(uid, 80)}"


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
            if conversion in SC_RADIOGRAPH_CONVERSION_TYPES or (body and body in CHEST_BODY_PARTS):
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
    if body not in CHEST_BODY_PARTS:
        if not opts.allow_non_chest:
            raise _skip(f"BodyPartExamined is '{body}', not chest-like")
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


def _infer_native_syntax(ds: Dataset) -> UID | None:
    """For a data set stored without file meta: the native syntax pydicom found it in (an
    encapsulated PixelData cannot be interpreted without its transfer syntax)."""
    encoding = getattr(ds, "original_encoding", (None, None))
    implicit, little = encoding if encoding else (None, None)
    if implicit is None or little is None:
        return None
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        return None
    if implicit:
        ts = pydicom.uid.ImplicitVRLittleEndian
    else:
        ts = pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ts


def _has_pixel_data_tag(path: Path) -> bool:
    """Whether the raw bytes hold a (7FE0,0010) tag (either byte order)."""
    with open(path, "rb") as f:
        data = f.read()
    return b"\xe0\x7f\x10\x00" in data or b"\x7f\xe0\x00\x10" in data


def _expected_native_bytes(rows: int, cols: int, frames: int, bits_allocated: int) -> int:
    return (rows * cols * frames * bits_allocated + 7) // 8


def _decode(ds: Dataset, rows: int, cols: int, frames: int, meta: PixelMeta, opts: SelectionOptions,
            notes: list[str]) -> np.ndarray:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise _skip("float pixel data is not a radiograph")
        raise _fail("PixelData is missing")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        ts = _infer_native_syntax(ds)
        if ts is None:
            raise _fail("transfer syntax is unknown (no TransferSyntaxUID in the file meta)")
        notes.append(f"no TransferSyntaxUID in the file; read as {ts.name}")
    if not ts.is_transfer_syntax:
        raise _fail(f"transfer syntax UID '{str(ts)[:64]}' is not a known transfer syntax")
    elem = ds["PixelData"]
    encapsulated = elem.is_undefined_length
    if ts.is_compressed != encapsulated:
        claim = "compressed" if ts.is_compressed else "uncompressed"
        actual = "encapsulated (compressed)" if encapsulated else "native (uncompressed)"
        raise _fail(f"transfer syntax {_ts_name(ds)} says {claim} but the pixel data is {actual}")
    if not encapsulated:
        value = elem.value
        have = len(value) if value is not None else 0
        need = _expected_native_bytes(rows, cols, frames, meta.bits_allocated)
        if have < need:
            raise _fail(
                f"pixel data is truncated ({have:,} bytes, expected {need:,} for {rows} x {cols}"
                f"{f' x {frames} frames' if frames > 1 else ''} at {meta.bits_allocated} bits)"
            )
        if have > need + 1:
            notes.append(f"pixel data has {have - need:,} bytes more than expected; extra bytes ignored")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            arr = decode_pixels(ds, 0 if frames > 1 else None)
        except MemoryError:
            raise _fail("not enough memory to decode the pixel data") from None
        except _PASS_THROUGH:
            raise
        except BaseException as exc:  # noqa: BLE001 - Rust decoders (pyo3) panic with a BaseException
            raise _fail(f"could not decode the pixel data ({_ts_name(ds)}): {_short(exc)}") from None
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
    ``'skipped'`` or ``'failed'`` :class:`LoadedImage` with a one-sentence reason."""
    with warnings.catch_warnings():
        # pydicom warns about every odd value it meets; the sentence we return says what matters
        warnings.simplefilter("ignore")
        res = _load_image(Path(path), options if options is not None else SelectionOptions())
    res.warnings = [_printable(w) for w in res.warnings]
    return res


def _load_image(path: Path, opts: SelectionOptions) -> LoadedImage:
    notes: list[str] = []
    header: Dataset | None = None
    try:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise _fail(f"cannot read the file ({_short(exc, 100)})") from None
        if not path.is_file():
            raise _fail("not a regular file")
        if size == 0:
            raise _fail("the file is empty (0 bytes)")
        if not is_dicom_file(path):
            raise _skip("not a DICOM file")
        try:
            header = read_header(path)
        except _PASS_THROUGH:
            raise
        except BaseException as exc:  # noqa: BLE001
            raise _fail(f"malformed DICOM header: {_short(exc)}") from None
        if len(header) == 0 and not getattr(header, "file_meta", None):
            raise _fail("malformed DICOM: no data elements could be read")
        rows, cols, frames = _check_policy(path, header, opts, notes)
        meta = _pixel_meta(header, notes)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                full = pydicom.dcmread(path, force=True)
        except _PASS_THROUGH:
            raise
        except BaseException as exc:  # noqa: BLE001
            raise _fail(f"malformed DICOM data set: {_short(exc)}") from None
        if "PixelData" not in full and _has_pixel_data_tag(path):
            raise _fail("pixel data is truncated or unreadable (the data set ends inside PixelData)")
        pixels = _decode(full, rows, cols, frames, meta, opts, notes)
        return LoadedImage("ok", "", notes, pixels, meta, header)
    except _Refusal as refusal:
        return LoadedImage(refusal.status, refusal.reason, notes, None, None, header)
    except MemoryError:
        return LoadedImage("failed", "failed: not enough memory to read the file", notes, None, None, header)
    except _PASS_THROUGH:
        raise
    except BaseException as exc:  # noqa: BLE001 - last resort: never let a bad file escape
        return LoadedImage("failed", f"failed: unexpected error reading the file ({type(exc).__name__}: "
                           f"{_short(exc, 120)})", notes, None, None, header)
