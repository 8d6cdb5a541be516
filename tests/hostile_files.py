"""Builders of hostile DICOM inputs, all from a real file (pydicom-data's RG1 chest CR): shared by
``tests/test_hostile_input.py`` and ``benchmarks/bench_hostile.py`` (which puts ``tests/`` on its
path), so the benchmark measures exactly the files the tests check."""
from __future__ import annotations

import copy
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

__all__ = ["rg1_crop", "save", "pixel_element_at", "dataset_start", "deflated_file", "zeros", "explicit",
           "PRIVATE_CREATOR", "patch_j2k"]


def rg1_crop(rg1_pixels, size: int = 64, **changes) -> pydicom.Dataset:
    """A centre crop of RG1 (real header, real pixels), explicit VR little endian."""
    src, arr = rg1_pixels
    ds = copy.deepcopy(src)
    r0, c0 = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    ds.PixelData = np.ascontiguousarray(arr[r0:r0 + size, c0:c0 + size]).astype("<u2").tobytes()
    ds.Rows = ds.Columns = size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom on writing 'Chest' (not a CS value): the point
        for key, value in changes.items():
            if value is None:
                if key in ds:
                    delattr(ds, key)
            else:
                setattr(ds, key, value)
    return ds


def save(ds: pydicom.Dataset, path: Path, ts=None) -> Path:
    if ts is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.compress(ts)
    ds.save_as(path, enforce_file_format=True)
    return path


def pixel_element_at(data: bytes) -> int:
    """Offset of the (7FE0,0010) OW/OB element of an explicit VR little endian file."""
    for vr in (b"OW", b"OB"):
        i = data.rfind(b"\xe0\x7f\x10\x00" + vr)
        if i >= 0:
            return i
    raise AssertionError("no PixelData element")


def dataset_start(data: bytes) -> int:
    assert data[128:132] == b"DICM"
    (meta_len,) = struct.unpack("<I", data[140:144])
    return 144 + meta_len


def deflated_file(rg1_pixels, dst: Path, chunks) -> Path:
    """RG1's file meta with the Deflated transfer syntax, then ``chunks`` deflated on the fly."""
    ds = rg1_crop(rg1_pixels)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    with open(dst, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, ds.file_meta, enforce_standard=True)
        for chunk in chunks:
            f.write(comp.compress(chunk))
        f.write(comp.flush())
    return dst


def zeros(n: int, chunk: int = 1 << 22):
    block = bytes(chunk)
    while n > 0:
        yield block[: min(n, chunk)]
        n -= chunk


def explicit(tag: int, vr: bytes, value_or_length: bytes | int) -> bytes:
    """An explicit VR little endian element header (and value when bytes are given)."""
    g, e = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        n = value_or_length if isinstance(value_or_length, int) else len(value_or_length)
        head = struct.pack("<HH2sHI", g, e, vr, 0, n)
    else:
        n = value_or_length if isinstance(value_or_length, int) else len(value_or_length)
        head = struct.pack("<HH2sH", g, e, vr, n)
    return head + (b"" if isinstance(value_or_length, int) else value_or_length)


PRIVATE_CREATOR = explicit(0x7FDF0010, b"LO", b"HOSTILE ")


def patch_j2k(path: Path, rows: int, cols: int) -> Path:
    data = bytearray(path.read_bytes())
    i = data.find(b"\xff\x4f\xff\x51")
    assert i > 0
    struct.pack_into(">IIII", data, i + 8, cols, rows, 0, 0)  # Xsiz Ysiz XOsiz YOsiz
    struct.pack_into(">II", data, i + 24, cols, rows)  # one tile
    path.write_bytes(bytes(data))
    return path
