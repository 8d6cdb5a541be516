"""Decoding: the pixel data element read by hand (native or encapsulated, declared lengths
checked against what remains), then pydicom 3 with the pylibjpeg plug-ins, raw stored values."""
from __future__ import annotations

import struct
import warnings

import numpy as np
import pydicom
import pydicom.errors
import pydicom.filereader
import pydicom.multival
import pydicom.uid
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from ..preprocess import PixelMeta

from ._common import (  # noqa: F401
    CODESTREAM_PEEK,
    ITEM,
    PASS_THROUGH,
    PIXEL_DATA,
    SEQ_DELIM,
    UNDEFINED,
    fail,
    int_attr,
    short_error,
    skip,
    ts_name,
)

from .selection import (  # noqa: F401
    SelectionOptions,
)

from .reading import (  # noqa: F401
    DicomReader,
    FileSource,
    check_codestream,
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


def _native_element(reader: DicomReader, rows: int, cols: int, frames: int, meta: PixelMeta,
                    notes: list[str], read: bool = True) -> DataElement | None:
    """The native PixelData element, its declared length checked against the data left and
    only the bytes the image needs read (``read`` False: the checks only, nothing read)."""
    stop, src = reader.stop, reader.src
    declared, offset = stop.length, stop.offset
    need = _expected_native_bytes(rows, cols, frames, meta.bits_allocated)
    shape = f"{rows} x {cols}{f' x {frames} frames' if frames > 1 else ''} at {meta.bits_allocated} bits"
    # a file's size is known: check the whole declared length; a deflated stream is inflated
    # only as far as the image needs
    want = declared if isinstance(src, FileSource) else min(declared, need + 2)
    left = src.remaining(offset, want)
    if left < want:
        if left >= need:
            raise fail(f"PixelData declares {declared:,} bytes but only {left:,} remain in {src.where} "
                        f"(corrupt length); not read")
        raise fail(f"pixel data is truncated ({left:,} bytes, expected {need:,} for {shape}; "
                    f"{declared:,} declared)")
    if declared < need:
        raise fail(f"pixel data is truncated ({declared:,} bytes, expected {need:,} for {shape})")
    if declared > need + 1:
        notes.append(f"pixel data has {declared - need:,} bytes more than expected; extra bytes ignored")
    if not read:
        return None
    value = src.read(offset, min(declared, need + (need & 1)))
    vr = stop.vr if stop.vr in ("OB", "OW") else ("OB" if meta.bits_allocated <= 8 else "OW")
    return DataElement(PIXEL_DATA, vr, value)


def _encapsulated_element(reader: DicomReader, ds: Dataset, rows: int, cols: int, meta: PixelMeta,
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
                raise fail("pixel data is truncated (the file ends inside the encapsulated pixel data)")
            notes.append("encapsulated pixel data has no sequence delimiter (file truncated?)")
            break
        group, elem, length = struct.unpack("<HHI", head)
        tag = group << 16 | elem
        if tag == SEQ_DELIM:
            break
        if tag != ITEM:
            if len(fragments) < 2:
                raise fail(f"encapsulated pixel data is malformed (tag ({group:04X},{elem:04X}) where an item "
                            f"should be, at byte {pos:,})")
            notes.append(f"encapsulated pixel data ends without a sequence delimiter at byte {pos:,}; "
                         f"the rest of the file is ignored")
            break
        if length == UNDEFINED:
            raise fail("encapsulated pixel data has an item of undefined length (malformed)")
        left = src.remaining(pos + 8, length)
        if left < length:
            raise fail(f"pixel data is truncated (fragment {len(fragments)} declares {length:,} bytes but only "
                        f"{left:,} remain in {src.where})")
        fragments.append((pos + 8, length))
        pos += 8 + length
    peek = b""
    for offset, length in fragments[1:]:
        peek += src.read(offset, min(length, CODESTREAM_PEEK - len(peek)))
        if len(peek) >= CODESTREAM_PEEK:
            break
    samples = int_attr(ds, "SamplesPerPixel", 1) or 1
    check_codestream(peek, rows, cols, samples, meta, opts, notes)
    if not read:
        return None
    return DataElement(PIXEL_DATA, "OB", src.read(start, pos - start), is_undefined_length=True)


def decode_frames(ds: Dataset, reader: DicomReader, rows: int, cols: int, frames: int, meta: PixelMeta,
            opts: SelectionOptions, notes: list[str], decode: bool = True) -> np.ndarray | None:
    stop = reader.stop
    if stop.kind != "pixel" or stop.tag != PIXEL_DATA:
        if stop.kind == "pixel":
            raise skip("float pixel data is not a radiograph")
        if stop.kind == "zeros":
            raise fail(f"the data set runs into a block of zero bytes at byte {max(0, stop.offset - 8):,} and has "
                        f"no pixel data (file corrupt)")
        if reader.ends_inside_pixel_tag():
            raise fail("pixel data is truncated or unreadable (the data set ends inside PixelData)")
        raise fail("PixelData is missing")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        ts = _infer_native_syntax(ds, stop.length == UNDEFINED)
        if ts is None:
            raise fail("transfer syntax is unknown (no TransferSyntaxUID in the file meta)")
        notes.append(f"no TransferSyntaxUID in the file; read as {ts.name}")
    if not ts.is_transfer_syntax:
        raise fail(f"transfer syntax UID '{str(ts)[:64]}' is not a known transfer syntax")
    encapsulated = stop.length == UNDEFINED
    if ts.is_compressed != encapsulated:
        claim = "compressed" if ts.is_compressed else "uncompressed"
        actual = "encapsulated (compressed)" if encapsulated else "native (uncompressed)"
        raise fail(f"transfer syntax {ts_name(ds)} says {claim} but the pixel data is {actual}")
    if encapsulated:
        elem = _encapsulated_element(reader, ds, rows, cols, meta, opts, notes, read=decode)
    else:
        elem = _native_element(reader, rows, cols, frames, meta, notes, read=decode)
    if elem is None:  # screening: every check that needs no decoding has passed, nothing was read
        return None
    ds[PIXEL_DATA] = elem
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", ResourceWarning)
            try:
                arr = decode_pixels(ds, 0 if frames > 1 else None)
            except MemoryError:
                raise fail("not enough memory to decode the pixel data") from None
            except PASS_THROUGH:
                raise
            except BaseException as exc:  # noqa: BLE001 - Rust decoders (pyo3) panic with a BaseException
                raise fail(f"could not decode the pixel data ({ts_name(ds)}): {short_error(exc)}") from None
    finally:
        del ds[PIXEL_DATA]  # the header handed on stays without pixel data
    for w in caught:
        msg = short_error(w.message, 200)
        if msg and f"decoder: {msg}" not in notes:
            notes.append(f"decoder: {msg}")
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape != (rows, cols):
        raise fail(f"decoded pixel data has shape {arr.shape}, expected ({rows}, {cols})")
    if arr.dtype.kind not in "ui":
        raise fail(f"decoded pixel data has type {arr.dtype}, expected integers")
    if not arr.dtype.isnative:  # big endian input: hand on native byte order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return np.ascontiguousarray(arr)
