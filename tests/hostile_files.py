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
           "empty_items", "with_empty_items", "with_nested_sequences", "run_tree_peak", "tree_pss_kib", "large_dicom", "large_png",
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


# ---------------------------------------------------------------- structure bombs (issue 25)
ITEM_EMPTY = struct.pack("<HHI", 0xFFFE, 0xE000, 0)
ITEM_UNDEFINED = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
ITEM_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
SEQUENCE_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def empty_items(n: int, per_chunk: int = 1 << 17):
    """``n`` empty sequence items (8 bytes each), in chunks."""
    block = ITEM_EMPTY * per_chunk
    while n > 0:
        yield block[: 8 * min(n, per_chunk)]
        n -= per_chunk


def _rg1_parts(rg1_pixels) -> tuple[bytes, bytes]:
    """RG1 crop's explicit VR little endian data set, split at its PixelData element."""
    import io

    buf = io.BytesIO()
    save(rg1_crop(rg1_pixels), buf)
    data = buf.getvalue()
    pix, start = pixel_element_at(data), dataset_start(data)
    return data[:pix], data[pix:]


def with_empty_items(rg1_pixels, dst: Path, n: int, deflate: bool = False) -> Path:
    """RG1 crop with a private sequence of ``n`` empty items before its pixel data (plain: 8 * n
    bytes on disk; deflated: a few hundred KB for millions of items)."""
    head, pixel = _rg1_parts(rg1_pixels)
    middle = [PRIVATE_CREATOR, explicit(0x7FDF1001, b"SQ", 0xFFFFFFFF), *empty_items(n), SEQUENCE_DELIMITER]
    if deflate:
        return deflated_file(rg1_pixels, dst, [head[dataset_start(head):], *middle, pixel])
    with open(dst, "wb") as f:
        for chunk in (head, *middle, pixel):
            f.write(chunk)
    return dst


def with_nested_sequences(rg1_pixels, dst: Path, depth: int) -> Path:
    """RG1 crop with private sequences nested ``depth`` deep (each one item of undefined length)."""
    head, pixel = _rg1_parts(rg1_pixels)
    down = (explicit(0x7FDF1001, b"SQ", 0xFFFFFFFF) + ITEM_UNDEFINED) * depth
    up = (ITEM_DELIMITER + SEQUENCE_DELIMITER) * depth
    dst.write_bytes(head + PRIVATE_CREATOR + down + up + pixel)
    return dst


# ---------------------------------------------------------------- the process tree's peak
def _tree_rss_kib(root: int) -> int:
    """Summed VmRSS (KiB) of ``root`` and its descendants (parents found through PPid)."""
    import os

    info: dict[int, tuple[int, int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        ppid = rss = 0
        try:
            with open(f"/proc/{d}/status") as f:
                for line in f:
                    if line.startswith("PPid:"):
                        ppid = int(line.split()[1])
                    elif line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
        info[int(d)] = (ppid, rss)
    return sum(info[p][1] for p in _descendants(root, {p: pp for p, (pp, _) in info.items()}) if p in info)


def _descendants(root: int, parent: dict[int, int]) -> set[int]:
    """``root`` and every process whose parent chain (``parent``: pid -> ppid) leads to it."""
    tree, changed = {root}, True
    while changed:
        changed = False
        for pid, pp in parent.items():
            if pid not in tree and pp in tree:
                tree.add(pid)
                changed = True
    return tree


def _tree_pids(root: int) -> set[int]:
    import os

    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return {p for p in _descendants(root, parent) if p in parent}


def tree_pss_kib(root: int) -> int | None:
    """Summed PSS (KiB) of ``root``'s process tree (pages shared by a forked worker counted once),
    or None when the tree changed while it was read (a worker started or exited: that sample
    would count the shared weights 1.5 times; see benchmarks/README.md)."""
    before = _tree_pids(root)
    total = 0
    for pid in sorted(before):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            return None
    return total if _tree_pids(root) == before else None


def run_tree_peak(cmd, *, env=None, timeout: float = 600, poll_s: float = 0.05, pss_every_s: float = 0.0):
    """Run ``cmd``; return (returncode, stdout, stderr, seconds, peak MiB of the summed VmRSS of
    its process tree sampled every ``poll_s``), as the hostile benchmark samples it (Linux).
    With ``pss_every_s`` the tree's PSS is sampled too (about that often) and its peak (MiB)
    is appended to the tuple."""
    import subprocess
    import threading
    import time

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0, 0]
    stop = threading.Event()

    def sample() -> None:
        last = -1e9
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss_kib(p.pid))
            if pss_every_s and time.perf_counter() - last >= pss_every_s:
                pss = tree_pss_kib(p.pid)
                if pss is not None:
                    peak[1] = max(peak[1], pss)
                    last = time.perf_counter()
            stop.wait(poll_s)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        stop.set()
        th.join()
    res = (p.returncode, out, err, time.perf_counter() - t0, peak[0] / 1024)
    return res + (peak[1] / 1024,) if pss_every_s else res


# ---------------------------------------------------------------- large legal images (issue 25)
def upscaled_rg1(rg1_pixels, rows: int, cols: int):
    """RG1's pixels resized (nearest neighbour) to rows x cols: a legal, very large chest image."""
    _, arr = rg1_pixels
    h, w = arr.shape
    r = (np.arange(rows, dtype=np.int64) * h) // rows
    c = (np.arange(cols, dtype=np.int64) * w) // cols
    return arr[r[:, None], c[None, :]]


def large_dicom(rg1_pixels, dst: Path, rows: int, cols: int) -> Path:
    """RG1's header with rows x cols 16-bit pixels (explicit VR little endian; 2 bytes a pixel on disk)."""
    ds = rg1_crop(rg1_pixels, 64)
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = upscaled_rg1(rg1_pixels, rows, cols).astype("<u2").tobytes()
    return save(ds, dst)


def large_png(rg1_pixels, dst: Path, rows: int, cols: int) -> Path:
    """An 8-bit gray PNG of rows x cols (RG1 upscaled, windowed to 8 bits)."""
    from PIL import Image

    a = upscaled_rg1(rg1_pixels, rows, cols)
    lo, hi = np.percentile(a[:: max(1, rows // 512), :: max(1, cols // 512)], (1, 99))
    img8 = np.clip((a.astype(np.float32) - lo) * (255.0 / max(1.0, hi - lo)), 0, 255).astype(np.uint8)
    del a
    Image.fromarray(img8, mode="L").save(dst, compress_level=1)
    return dst
