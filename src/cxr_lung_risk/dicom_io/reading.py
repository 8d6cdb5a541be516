"""Bounded reading: regular files only, reads clamped to the size at open, file kinds (DICOM,
PNG/JPEG), the header parsed up to PixelData with its structure scanned first (element count,
nesting, time), Deflate inflated incrementally, and the codestream checks of frame 1 (JPEG SOFn,
JPEG-LS, JPEG 2000 SIZ) against the header before any decoder runs."""
from __future__ import annotations

import io
import logging
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pydicom.errors
import pydicom.filereader
import pydicom.multival
import pydicom.uid
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset

from ..preprocess import PixelMeta

from ._common import (  # noqa: F401
    DEFLATE_HEADER_ALLOWANCE,
    ITEM,
    JPEG_MAGIC,
    PASS_THROUGH,
    PIXEL_TAGS,
    PNG_MAGIC,
    Refusal,
    SEQ_DELIM,
    UNDEFINED,
    VRS,
    fail,
    short_error,
)

from .selection import (  # noqa: F401
    SelectionOptions,
)


# --------------------------------------------------------------------------------------------
# opening files safely
# --------------------------------------------------------------------------------------------
class NotRegular(OSError):
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


def open_regular(path: str | Path) -> _ClampedReader:
    """Open a regular file for reading; never opens a FIFO, socket or device.

    ``stat`` first (a FIFO opened for reading would block until a writer appears), then
    ``open(O_RDONLY | O_NONBLOCK)`` and ``fstat`` again (the path may have been swapped in
    between).  Raises :class:`NotRegular` or :class:`OSError`.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegular(_file_kind(st.st_mode))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(_file_kind(st.st_mode))
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
        with open_regular(path) as f:
            head = f.read(8)
    except OSError:
        return None
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    return None


def is_raster_image(path: str | Path) -> bool:
    """True for a PNG or JPEG file (by magic bytes, whatever its name)."""
    return raster_kind(path) is not None


def looks_like_dicom(head: bytes, size: int) -> bool:
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return _looks_like_bare_dataset(head, size)


def is_dicom_file(path: str | Path) -> bool:
    """True when the file looks like DICOM: 'DICM' at offset 128 (Part 10 with preamble), or a
    data set starting at offset 0 with a group 0002 or 0008 tag followed by a plausible explicit
    VR or implicit-VR length (files written without preamble / file meta).  False for anything
    that is not a regular file."""
    try:
        with open_regular(path) as f:
            return looks_like_dicom(f.read(132), f.size)
    except OSError:
        return False


def _looks_like_bare_dataset(head: bytes, size: int) -> bool:
    if len(head) < 8:
        return False
    for endian in ("<", ">"):
        group, elem = struct.unpack(endian + "HH", head[:4])
        if group not in (0x0002, 0x0008):
            continue
        if head[4:6] in VRS:  # explicit VR
            return True
        (length,) = struct.unpack(endian + "I", head[4:8])  # implicit VR
        if elem <= 0x2000 and (length == 0xFFFFFFFF or (length % 2 == 0 and 8 + length <= size)):
            return True
    return False



# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def read_header(path: str | Path) -> Dataset:
    """Read a DICOM header (everything before PixelData), bounded like :func:`load_image`.

    Files without the preamble are read when :func:`is_dicom_file` agrees; raises
    :class:`pydicom.errors.InvalidDicomError` otherwise (also for a FIFO or device, never opened).
    """
    try:
        f = open_regular(path)
    except OSError as exc:
        raise pydicom.errors.InvalidDicomError(f"{path} is not a DICOM file ({short_error(exc, 100)})") from None
    with f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not looks_like_dicom(f.read(132), f.size):
            raise pydicom.errors.InvalidDicomError(f"{path} is not a DICOM file")
        try:
            return DicomReader(f, Path(path)).read_header()
        except Refusal as refusal:
            raise pydicom.errors.InvalidDicomError(f"{path}: {refusal.reason}") from None



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


class FileSource:
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

    def __init__(self, src: "FileSource | _InflateSource | bytes | memoryview", size: int):
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
            raise fail(f"the header holds more than {MAX_HEADER_ELEMENTS:,} data elements and sequence items before "
                        f"the pixel data (at byte {pos:,}); not parsed")
        if not count & 0xFFF and time.monotonic() - t0 > MAX_HEADER_SCAN_S:
            raise fail(f"reading the header took longer than {MAX_HEADER_SCAN_S:.0f} s (at byte {pos:,}); not parsed")
        if group == 0xFFFE:  # item, item delimiter, sequence delimiter: 4-byte length, no VR
            (length,) = struct.unpack(e + "I", head[4:8])
            pos += 8
            if tag == SEQ_DELIM:
                if kind in ("seq", "frag"):
                    stack.pop()  # the sequence ends: back in the data set that holds it
                continue
            if tag == _ITEM_DELIM:
                if kind == "ds" and len(stack) > 1:
                    stack.pop()
                continue
            if tag != ITEM or kind == "ds":
                return  # an item where an element should be: the parser decides
            if kind == "frag":
                if length == UNDEFINED:
                    return
                pos += length
                continue
            depth = sum(1 for k, _ in stack if k == "seq")
            if depth > MAX_SEQUENCE_DEPTH:
                raise fail(f"sequence nesting deeper than {MAX_SEQUENCE_DEPTH} (at byte {pos - 8:,}); not parsed")
            stack.append(("ds", frame_end if length == UNDEFINED else min(frame_end, pos + length)))
            continue
        if kind != "ds":
            return
        if len(stack) == 1 and tag in PIXEL_TAGS:
            return
        if implicit:
            vr = b""
            (length,) = struct.unpack(e + "I", head[4:8])
            pos += 8
        else:
            vr = head[4:6]
            if vr not in VRS:
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
        if length == UNDEFINED:
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
        if tag in PIXEL_TAGS:
            kind = "pixel"
        elif tag == 0 and length == 0:
            kind = "zeros"
        elif length != UNDEFINED and length > size - fp.tell():
            kind = "overlong"
        else:
            return False
        stop.kind, stop.tag, stop.vr, stop.length, stop.offset = kind, int(tag), vr, int(length), fp.tell()
        return True

    ds = pydicom.filereader.read_dataset(fp, implicit, little, stop_when=stop_when)
    return ds, stop


class DicomReader:
    """One pass over one open file: :meth:`read_header`, then the pixel data element."""

    def __init__(self, f: _ClampedReader, path: Path):
        self.f = f
        self.path = path
        self.src: FileSource | _InflateSource = FileSource(f)
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
            raise fail("deflated data sets need pydicom's file meta reader (pydicom too old or too new)")
        stop = _Stop()
        size = self.src.size
        f = self.f

        def stop_when(tag: int, vr: str | None, length: int) -> bool:
            if tag in PIXEL_TAGS or (tag == 0 and length == 0) or (length != UNDEFINED and length > size - f.tell()):
                stop.kind = "pixel" if tag in PIXEL_TAGS else "zeros" if tag == 0 else "overlong"
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
                    except PASS_THROUGH:
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
                raise fail(
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
            raise fail(
                f"element ({stop.tag >> 16:04X},{stop.tag & 0xFFFF:04X}) declares {stop.length:,} bytes but only "
                f"{left:,} remain in {self.src.where} (truncated or corrupt); not read"
            )

    def ends_inside_pixel_tag(self) -> bool:
        """Whether the last bytes hold the start of a (7FE0,0010) element (either byte order)."""
        if isinstance(self.src, FileSource):
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


def check_codestream(frame_start: bytes, rows: int, cols: int, samples: int, meta: PixelMeta,
                      opts: SelectionOptions, notes: list[str]) -> None:
    """Refuse a codestream whose own header disagrees with the DICOM header (before decoding)."""
    geo = _codestream_geometry(frame_start)
    if geo is None:
        return  # not a JPEG family stream (RLE, ...) or no header found: the decoder decides
    kind, h, w, nc, precision = geo
    height_ok = h == rows or (kind != "JPEG 2000" and h == 0)  # 0: height given by a DNL marker
    if not height_ok or w != cols or nc != samples:
        raise fail(
            f"the {kind} codestream of frame 1 is {h} x {w} pixels with {nc} component(s) but the header says "
            f"{rows} x {cols} with {samples} sample(s) per pixel; not decoded"
        )
    if max(h, rows) * w * max(nc, 1) > opts.max_pixels:
        raise fail(f"the {kind} codestream of frame 1 is too large ({h} x {w} x {nc}, limit "
                    f"{opts.max_pixels:,} pixels); not decoded")
    if precision > meta.bits_allocated:
        notes.append(f"the {kind} codestream has {precision}-bit samples, more than BitsAllocated {meta.bits_allocated}")
