"""What the dicom_io modules share (private to the package): constants, the refusal sentences
(skip/fail), printable text, pydicom/numpy/Pillow messages captured, header attribute readers."""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

import numpy as np
import pydicom
import pydicom.errors
import pydicom.filereader
import pydicom.multival
import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.uid import UID

from ..errors import InputNotFoundError




# --------------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------------
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC and multi-frame SC classes

#: SOP classes that imply a modality when the Modality attribute is absent.
MODALITY_FROM_SOP = {CR_STORAGE: "CR", DX_PRESENTATION: "DX", DX_PROCESSING: "DX"}

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
SUPPORTED_BITS_ALLOCATED = (8, 16, 32)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"

#: Every two-letter VR of PS3.5 (used to recognise explicit-VR data without a preamble).
VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR "
    b"US UT UV".split()
)


#: Exceptions that are about the process, not the file: never turned into a 'failed' result.
PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)

PIXEL_DATA = 0x7FE00010
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # PixelData, Float, DoubleFloat
ITEM, SEQ_DELIM = 0xFFFEE000, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF

#: Inflated bytes a Deflated Explicit VR Little Endian data set may hold before its pixel data.
DEFLATE_HEADER_ALLOWANCE = 32 << 20
#: Bytes of frame 1 parsed for its JPEG / JPEG-LS / JPEG 2000 codestream header.
CODESTREAM_PEEK = 64 << 10
#: Library warnings kept per file (the rest are counted).
_MAX_LIBRARY_WARNINGS = 10


class DicomInputError(InputNotFoundError):
    """An INPUT path does not exist (the package's :class:`~cxr_lung_risk.errors.InputNotFoundError`)."""



class Refusal(Exception):
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


def skip(sentence: str) -> Refusal:
    return Refusal("skipped", sentence)


def fail(sentence: str) -> Refusal:
    return Refusal("failed", sentence)



def short_error(exc: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return msg



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
        out.append(f"{source}: {short_error(Exception(msg), 200)}")
        added += 1
    if extra:
        out.append(f"{extra} more library warning(s) not shown")
    return out


def text_attr(ds: Dataset, keyword: str) -> str:
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


def int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword, None)
    except Exception as exc:
        raise fail(f"{keyword} is unreadable ({short_error(exc, 80)})") from None
    if value is None or value == "":
        return default
    try:
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0]
        return int(value)
    except (TypeError, ValueError, IndexError):
        raise fail(f"{keyword} has an invalid value {value!r}") from None


def float_attr(ds: Dataset, keyword: str, default: float, notes: list[str]) -> float:
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


def sop_class_name(uid: str) -> str:
    if not uid:
        return "object"
    name = UID(uid).name
    return name if name and name != uid else f"SOP class {printable(uid, 80)}"


def ts_name(ds: Dataset) -> str:
    try:
        ts = ds.file_meta.TransferSyntaxUID
        return f"{ts.name} ({ts})" if ts.name != ts else str(ts)
    except Exception:
        return "unknown transfer syntax"
