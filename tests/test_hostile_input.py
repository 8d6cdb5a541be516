"""Hostile input: odd file-system entries, decompression bombs, lying lengths, extreme shapes,
odd values, library warnings, zip bombs in weights.

Every case is built from a real file (pydicom-data's RG1 chest CR, pydicom's test files) by
changing its header or pixel bytes; large cases are sparse files or streamed through zlib, so
the tests stay small and fast.  Each test failed before the guard it checks existed.
"""
from __future__ import annotations

import copy
import logging
import os
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from cxr_lung_risk import preprocess
from hostile_files import (
    PRIVATE_CREATOR,
    dataset_start,
    deflated_file,
    explicit,
    patch_j2k,
    pixel_element_at,
    rg1_crop,
    save,
    zeros,
)
from cxr_lung_risk.dicom_io import (
    LoadedImage,
    SelectionOptions,
    discover,
    is_dicom_file,
    is_raster_image,
    load_image,
)

# ------------------------------------------------------------------------------------------
# builders (all from the real RG1 chest CR; the shared ones are in hostile_files.py)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rg1_pixels(dicom_data) -> tuple[pydicom.Dataset, np.ndarray]:
    ds = pydicom.dcmread(dicom_data / "RG1_UNCR.dcm")
    return ds, ds.pixel_array


def plain(rg1_pixels, tmp_path: Path, size: int = 64, **changes) -> Path:
    return save(rg1_crop(rg1_pixels, size, **changes), tmp_path / f"plain_{size}.dcm")


def peak_mib(fn):
    """(result, tracemalloc peak in MiB, seconds) of ``fn()``."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return out, peak / 2**20, elapsed


# ------------------------------------------------------------------------------------------
# A. body part
# ------------------------------------------------------------------------------------------
def test_non_chest_is_skipped_by_default():
    assert SelectionOptions().allow_non_chest is False


@pytest.mark.parametrize("body", ["CHEST", "Chest", " chest ", "CHEST PA", "THORAX AP", "THORAX", "LUNG", "TORSO",
                                  "CHEST_TO_PELVIS", "PECHO", "BRUST", "BRUSTKORB", "TORACE", "POITRINE", "TORAX",
                                  "", None])
def test_chest_like_body_parts_are_scored(rg1_pixels, tmp_path, body):
    res = load_image(plain(rg1_pixels, tmp_path, BodyPartExamined=body))
    assert res.status == "ok", res.reason
    assert res.warnings == []


@pytest.mark.parametrize("body", ["EXTREMITY", "HAND", "SKULL", "ABDOMEN", "Knee", "BREAST"])
def test_non_chest_body_parts_are_skipped_unless_allowed(rg1_pixels, tmp_path, body):
    path = plain(rg1_pixels, tmp_path, BodyPartExamined=body)
    res = load_image(path)
    shown = body.upper()
    assert (res.status, res.reason) == (
        "skipped", f"skipped: BodyPartExamined is '{shown}', not a chest radiograph (use --allow-non-chest to score it)")
    res = load_image(path, SelectionOptions(allow_non_chest=True))
    assert res.status == "ok" and res.warnings == [f"BodyPartExamined is '{shown}', not chest-like"]


def test_real_extremity_crs_are_skipped(dicom_data):
    for name in ("RG3_UNCR", "RG3_J2KR"):
        res = load_image(dicom_data / f"{name}.dcm")
        assert res.reason == ("skipped: BodyPartExamined is 'EXTREMITY', not a chest radiograph "
                              "(use --allow-non-chest to score it)")
        assert res.pixels is None


# ------------------------------------------------------------------------------------------
# B. unique, traceable relative names
# ------------------------------------------------------------------------------------------
def _tree(root: Path, names: list[str], payload: bytes = b"x") -> Path:
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(payload)
    return root


def test_two_folders_with_the_same_file_name(tmp_path):
    a = _tree(tmp_path / "A", ["x.dcm", "sub/y.dcm"])
    b = _tree(tmp_path / "B", ["x.dcm"])
    found = list(discover([a, b]))
    assert [f.rel for f in found] == ["A/sub/y.dcm", "A/x.dcm", "B/x.dcm"]
    assert [f.source for f in found] == [a, a, b]
    assert found[1].path == a / "x.dcm" and found[2].path == b / "x.dcm"


def test_two_folders_with_the_same_base_name(tmp_path):
    d1 = _tree(tmp_path / "one" / "data", ["x.dcm"])
    d2 = _tree(tmp_path / "two" / "data", ["x.dcm"])
    d3 = _tree(tmp_path / "three" / "data", ["x.dcm"])
    rels = [f.rel for f in discover([d1, d2, d3])]
    assert rels == ["data/x.dcm", "data~2/x.dcm", "data~3/x.dcm"]
    assert [f.rel for f in discover([d2, d1])] == ["data/x.dcm", "data~2/x.dcm"]  # by argument order


def test_files_given_directly_keep_their_name_unless_it_collides(tmp_path):
    a = _tree(tmp_path / "a", ["x.dcm", "y.dcm"])
    b = _tree(tmp_path / "b", ["x.dcm"])
    c = _tree(tmp_path / "c", ["x.dcm"])
    found = list(discover([a / "x.dcm", b / "x.dcm", a / "y.dcm", c / "x.dcm"]))
    assert [f.rel for f in found] == ["x.dcm", "x~2.dcm", "y.dcm", "x~3.dcm"]
    assert [f.path for f in found] == [a / "x.dcm", b / "x.dcm", a / "y.dcm", c / "x.dcm"]


def test_mixed_arguments_are_unique_and_single_folder_is_unchanged(tmp_path):
    a = _tree(tmp_path / "in", ["x.dcm", "deep/er/x.dcm"])
    other = _tree(tmp_path / "o", ["x.dcm"])
    found = list(discover([a, other / "x.dcm", tmp_path / "in" / "x.dcm"]))  # the last one: already seen
    assert [f.rel for f in found] == ["in/deep/er/x.dcm", "in/x.dcm", "x.dcm"]
    assert len({f.rel for f in found}) == len(found)
    assert [f.rel for f in discover([a])] == ["deep/er/x.dcm", "x.dcm"]
    assert [f.rel for f in discover(a / "x.dcm")] == ["x.dcm"]
    dot = list(discover([Path(tmp_path / "in" / "."), other]))
    assert [f.rel for f in dot] == ["in/deep/er/x.dcm", "in/x.dcm", "o/x.dcm"]


# ------------------------------------------------------------------------------------------
# C. odd file-system entries
# ------------------------------------------------------------------------------------------
def test_non_utf8_file_name(rg1_pixels, tmp_path):
    src = plain(rg1_pixels, tmp_path)
    root = tmp_path / "in"
    root.mkdir()
    raw = os.fsencode(root) + b"/caf\xe9\n.dcm"  # latin-1 byte and a newline in the name
    try:
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as e:  # pragma: no cover - a file system that refuses such names
        pytest.skip(f"cannot create a non-UTF-8 file name here: {e}")
    os.write(fd, src.read_bytes())
    os.close(fd)
    (item,) = list(discover([root]))
    assert item.rel == "caf\\xe9\\x0a.dcm"
    assert item.rel.isprintable()
    item.rel.encode("utf-8")  # writable to a UTF-8 manifest
    res = load_image(item.path)
    assert res.status == "ok", res.reason


def test_escaped_names_stay_distinct(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for raw in (b"a\xff", b"a\\xff", b"a\\\\xff"):
        fd = os.open(os.fsencode(root) + b"/" + raw, os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)
    rels = sorted(f.rel for f in discover([root]))
    assert rels == sorted(["a\\xff", "a\\\\xff", "a\\\\\\\\xff"]) and len(set(rels)) == 3


def _run_with_deadline(fn, fifo: Path | None = None, seconds: float = 10.0):
    """Run ``fn`` in a thread; if it blocks (a FIFO opened for reading), unblock it by opening
    the FIFO for writing, and fail."""
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("out", fn()), daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if fifo is not None:
            with open(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), "wb"):
                pass
        t.join(5)
        pytest.fail("blocked on a FIFO")
    return box["out"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_in_a_folder_and_given_directly_never_blocks(rg1_pixels, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    save(rg1_crop(rg1_pixels), root / "good.dcm")
    fifo = root / "pipe.dcm"
    os.mkfifo(fifo)
    found = _run_with_deadline(lambda: list(discover([root])), fifo)
    assert [f.rel for f in found] == ["good.dcm", "pipe.dcm"]
    for target in (found[1].path, fifo):
        res = _run_with_deadline(lambda: load_image(target), fifo)
        assert (res.status, res.reason) == ("skipped", "skipped: not a regular file (FIFO)")
    assert _run_with_deadline(lambda: is_raster_image(fifo), fifo) is False  # what pipeline.prepare asks first
    assert _run_with_deadline(lambda: is_dicom_file(fifo), fifo) is False
    assert [f.rel for f in _run_with_deadline(lambda: list(discover([fifo])), fifo)] == ["pipe.dcm"]


def test_socket_and_device_are_reported(tmp_path):
    short = Path(tempfile.mkdtemp(prefix="cxr", dir="/tmp"))  # AF_UNIX paths are short
    try:
        sock_path = short / "s.dcm"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(str(sock_path))
            (item,) = list(discover([short]))
            assert load_image(item.path).reason == "skipped: not a regular file (socket)"
        finally:
            s.close()
    finally:
        for p in short.iterdir():
            p.unlink()
        short.rmdir()
    if os.path.exists("/dev/null") and stat.S_ISCHR(os.stat("/dev/null").st_mode):
        assert load_image("/dev/null").reason == "skipped: not a regular file (character device)"
        assert not is_dicom_file("/dev/null") and not is_raster_image("/dev/zero")


def test_dangling_and_looping_symlinks_are_reported_not_dropped(rg1_pixels, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    save(rg1_crop(rg1_pixels), root / "good.dcm")
    os.symlink(root / "missing.dcm", root / "dangling.dcm")
    os.symlink(root / "loop.dcm", root / "loop.dcm")
    os.symlink("good.dcm", root / "alias.dcm")  # a valid link to a file seen already: once
    (root / ".hidden_dir").mkdir()
    save(rg1_crop(rg1_pixels), root / ".hidden_dir" / "x.dcm")
    found = {f.rel: f for f in discover([root])}
    assert set(found) == {"alias.dcm", "dangling.dcm", "loop.dcm"}  # good.dcm is alias.dcm's target
    assert load_image(found["alias.dcm"].path).status == "ok"
    res = load_image(found["dangling.dcm"].path)
    assert (res.status, res.reason) == ("failed", "failed: broken symbolic link")
    res = load_image(found["loop.dcm"].path)
    assert (res.status, res.reason) == ("failed", "failed: symbolic link loop")
    # given directly, they are inputs too (not 'input not found')
    assert [f.rel for f in discover([root / "dangling.dcm"])] == ["dangling.dcm"]


def test_directory_symlinks_are_followed_without_cycles(rg1_pixels, tmp_path):
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.dcm").write_bytes(b"o")
    (root / "a" / "x.dcm").write_bytes(b"x")
    os.symlink(root, root / "a" / "back")  # a cycle
    os.symlink(outside, root / "linked")
    found = list(discover([root]))
    assert [f.rel for f in found] == ["a/x.dcm", "linked"]  # a link out of the folder is not followed
    assert found[1].skip.startswith(f"skipped: symbolic link to a folder outside {root} ({outside}); not followed")
    rels = [f.rel for f in discover([root], follow_links=True)]  # unless asked to
    assert rels == ["a/x.dcm", "linked/o.dcm"]


def test_exclude_keeps_the_output_folder_out(tmp_path):
    root = _tree(tmp_path / "in", ["x.dcm", "out/sr/1.2.3.dcm", "out/manifest.csv", "sub/y.dcm"])
    assert [f.rel for f in discover([root], exclude=[root / "out"])] == ["sub/y.dcm", "x.dcm"]
    # a not yet existing or relative spelling of the same folder works too
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert [f.rel for f in discover(["in"], exclude=["in/out/", "in/later"])] == ["sub/y.dcm", "x.dcm"]
    finally:
        os.chdir(cwd)
    assert list(discover([root / "out"], exclude=[root / "out"])) == []


# ------------------------------------------------------------------------------------------
# D. decompression bombs and lying lengths
# ------------------------------------------------------------------------------------------
def test_j2k_codestream_larger_than_the_header_is_refused_before_decoding(rg1_pixels, tmp_path):
    good = save(rg1_crop(rg1_pixels), tmp_path / "good.dcm", JPEG2000Lossless)
    assert load_image(good).status == "ok"
    bomb = patch_j2k(save(rg1_crop(rg1_pixels), tmp_path / "bomb.dcm", JPEG2000Lossless), 8000, 8000)
    res, peak, secs = peak_mib(lambda: load_image(bomb))
    assert res.reason == ("failed: the JPEG 2000 codestream of frame 1 is 8000 x 8000 pixels with 1 component(s) "
                          "but the header says 64 x 64 with 1 sample(s) per pixel; not decoded")
    assert peak < 16 and secs < 2  # the decoder would have allocated 8000 x 8000 samples


def _jp2_wrap(codestream: bytes) -> bytes:
    """The codestream in JP2 boxes: signature, file type, header (image header), codestream."""
    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    ihdr = box(b"ihdr", struct.pack(">IIHBBBB", 64, 64, 1, 15, 7, 0, 0))
    return (box(b"jP  ", b"\r\n\x87\n") + box(b"ftyp", b"jp2 \0\0\0\0jp2 ") + box(b"jp2h", ihdr)
            + box(b"jp2c", codestream))


def test_jp2_wrapped_codestream_is_checked(rg1_pixels, tmp_path):
    from pydicom.encaps import encapsulate, generate_frames

    ds = rg1_crop(rg1_pixels)
    save(ds, tmp_path / "j2k.dcm", JPEG2000Lossless)
    ds = pydicom.dcmread(tmp_path / "j2k.dcm")
    (frame,) = list(generate_frames(ds.PixelData, number_of_frames=1))
    i = frame.find(b"\xff\x4f\xff\x51")
    frame = bytearray(frame[i:])
    struct.pack_into(">II", frame, 8, 64, 20000)  # Xsiz 64, Ysiz 20000
    ds.PixelData = encapsulate([_jp2_wrap(bytes(frame))])
    ds.save_as(tmp_path / "jp2.dcm")
    res = load_image(tmp_path / "jp2.dcm")
    assert res.reason.startswith("failed: the JPEG 2000 codestream of frame 1 is 20000 x 64 pixels"), res.reason


def test_jpeg_ls_frame_header_larger_than_the_header_is_refused(rg1_pixels, tmp_path):
    good = save(rg1_crop(rg1_pixels), tmp_path / "good.dcm", JPEGLSLossless)
    assert load_image(good).status == "ok"
    bomb = save(rg1_crop(rg1_pixels), tmp_path / "bomb.dcm", JPEGLSLossless)
    data = bytearray(bomb.read_bytes())
    i = data.find(b"\xff\xf7")  # SOF55
    struct.pack_into(">HH", data, i + 5, 8000, 8000)
    bomb.write_bytes(bytes(data))
    res, peak, secs = peak_mib(lambda: load_image(bomb))
    assert res.reason == ("failed: the JPEG-LS codestream of frame 1 is 8000 x 8000 pixels with 1 component(s) "
                          "but the header says 64 x 64 with 1 sample(s) per pixel; not decoded")
    assert peak < 16 and secs < 2  # before: 33 s and a 256 MB buffer


def test_jpeg_lossless_sof_checked_on_a_real_file(tmp_path):
    src = Path(get_testdata_file("JPEG-LL.dcm"))  # NM, JPEG lossless SOF3, 1024 x 256
    opts = SelectionOptions(allowed_modalities=("NM",), allow_non_chest=True)
    assert load_image(src, opts).status == "ok"
    data = bytearray(src.read_bytes())
    i = data.find(b"\xff\xc3")
    assert struct.unpack(">HH", data[i + 5:i + 9]) == (1024, 256)
    struct.pack_into(">HH", data, i + 5, 1024, 4096)
    (tmp_path / "ll.dcm").write_bytes(bytes(data))
    res = load_image(tmp_path / "ll.dcm", opts)
    assert res.reason == ("failed: the JPEG codestream of frame 1 is 1024 x 4096 pixels with 1 component(s) but "
                          "the header says 1024 x 256 with 1 sample(s) per pixel; not decoded")


def test_deflate_header_bomb_with_a_declared_length_is_refused_without_inflating(rg1_pixels, tmp_path):
    data = plain(rg1_pixels, tmp_path).read_bytes()
    pix, start = pixel_element_at(data), dataset_start(data)
    # a private OB element declaring 300 MB (its 16 MB of zeros inflate 1000:1), then the image
    body = [data[start:pix], PRIVATE_CREATOR, explicit(0x7FDF1001, b"OB", 300 << 20), *zeros(16 << 20)]
    bomb = deflated_file(rg1_pixels, tmp_path / "bomb.dcm", body)
    assert bomb.stat().st_size < 100_000
    res, peak, secs = peak_mib(lambda: load_image(bomb))
    assert res.reason == ("failed: the deflated data set holds more than 32 MiB before its pixel data: element "
                          "(7FDF,1001) declares 314,572,800 bytes (a decompression bomb?); not inflated further")
    assert peak < 8 and secs < 1


def test_deflate_header_bomb_of_undefined_length_stops_at_the_allowance(rg1_pixels, tmp_path):
    data = plain(rg1_pixels, tmp_path).read_bytes()
    pix, start = pixel_element_at(data), dataset_start(data)
    body = [data[start:pix], PRIVATE_CREATOR, explicit(0x7FDF1001, b"OB", 0xFFFFFFFF), *zeros(48 << 20)]
    bomb = deflated_file(rg1_pixels, tmp_path / "bomb.dcm", body)
    res, peak, secs = peak_mib(lambda: load_image(bomb))
    assert res.reason == ("failed: the deflated data set holds more than 32 MiB before its pixel data "
                          "(a decompression bomb?); not inflated further")
    assert res.warnings == []  # the partial parses' "end of file" complaints are not the file's
    # the 32 MiB allowance, the parse's copy of it and pydicom's copy of the undefined-length value
    assert peak < 3 * 32 + 8 and secs < 10


def test_deflate_pixel_bomb_inflates_only_what_the_image_needs(rg1_pixels, tmp_path):
    data = plain(rg1_pixels, tmp_path).read_bytes()
    pix, start = pixel_element_at(data), dataset_start(data)
    n = 64 << 20  # PixelData of 64 MiB for a 64 x 64 image (needs 8 KiB)
    pixels = data[pix + 12:pix + 12 + 8192]
    body = [data[start:pix], explicit(0x7FE00010, b"OW", n), pixels, *zeros(n - len(pixels))]
    bomb = deflated_file(rg1_pixels, tmp_path / "bomb.dcm", body)
    res, peak, secs = peak_mib(lambda: load_image(bomb))
    assert res.status == "ok", res.reason
    assert res.pixels.shape == (64, 64)
    assert np.array_equal(res.pixels, np.frombuffer(pixels, "<u2").reshape(64, 64))
    assert res.warnings == [f"pixel data has {n - 8192:,} bytes more than expected; extra bytes ignored"]
    assert peak < 8 and secs < 1  # before: 2 x 64 MiB and more


def test_real_deflated_file_still_reads():
    res = load_image(get_testdata_file("image_dfl.dcm"), SelectionOptions(allowed_modalities=("OT",),
                                                                           allow_non_chest=True))
    assert res.status == "ok" and res.pixels.shape == (512, 512)


def test_pixel_data_length_beyond_the_file_is_refused_before_allocating(rg1_pixels, tmp_path):
    data = plain(rg1_pixels, tmp_path).read_bytes()
    pix = pixel_element_at(data)
    p = tmp_path / "len.dcm"
    p.write_bytes(data[:pix] + explicit(0x7FE00010, b"OW", 0xFFFFFFF0) + data[pix + 12:])
    res, peak, _ = peak_mib(lambda: load_image(p))
    left = len(data) - pix - 12  # the pixels and RG1's trailing padding element
    assert res.reason == (f"failed: PixelData declares 4,294,967,280 bytes but only {left:,} remain in the file "
                          f"(corrupt length); not read")
    assert peak < 8  # before: a 4 GiB read buffer


def test_element_length_beyond_the_file_is_refused_before_allocating(rg1_pixels, tmp_path):
    data = plain(rg1_pixels, tmp_path).read_bytes()
    pix = pixel_element_at(data)
    p = tmp_path / "elem.dcm"
    p.write_bytes(data[:pix] + PRIVATE_CREATOR + explicit(0x7FDF1001, b"OB", 0xFFFFFFF0) + bytes(1000))
    res, peak, _ = peak_mib(lambda: load_image(p))
    assert res.reason == ("failed: element (7FDF,1001) declares 4,294,967,280 bytes but only 1,000 remain in the "
                          "file (truncated or corrupt); not read")
    assert peak < 8


def test_valid_file_followed_by_200_mb_of_zeros_is_read_in_milliseconds(dicom_data, tmp_path, rg1_pixels):
    data = (dicom_data / "RG1_UNCR.dcm").read_bytes()
    p = tmp_path / "zeros.dcm"
    with open(p, "wb") as f:  # sparse: costs no disk
        f.write(data)
        f.truncate(len(data) + (200 << 20))
    res, peak, secs = peak_mib(lambda: load_image(p))
    assert res.status == "ok", res.reason
    assert np.array_equal(res.pixels, rg1_pixels[1])
    assert secs < 3 and peak < 64  # before: two parses of 26 million (0000,0000) elements (minutes)


def test_header_followed_by_zeros_instead_of_pixel_data(rg1_pixels, tmp_path):
    data = plain(rg1_pixels, tmp_path).read_bytes()
    pix = pixel_element_at(data)
    p = tmp_path / "zeros.dcm"
    with open(p, "wb") as f:
        f.write(data[:pix])
        f.truncate(pix + (200 << 20))
    res, _, secs = peak_mib(lambda: load_image(p))
    assert res.reason == (f"failed: the data set runs into a block of zero bytes at byte {pix:,} and has no pixel "
                          f"data (file corrupt)")
    assert secs < 2


def test_encapsulated_fragment_longer_than_the_file(rg1_pixels, tmp_path):
    p = save(rg1_crop(rg1_pixels), tmp_path / "j2k.dcm", JPEG2000Lossless)
    data = bytearray(p.read_bytes())
    i = data.find(b"\xff\x4f\xff\x51")
    struct.pack_into("<I", data, i - 4, 0x7FFFFFF0)  # the fragment's item length
    p.write_bytes(bytes(data))
    res = load_image(p)
    assert res.reason.startswith("failed: pixel data is truncated (fragment 1 declares 2,147,483,632 bytes but only "), \
        res.reason


# ------------------------------------------------------------------------------------------
# D. weights: zip bombs
# ------------------------------------------------------------------------------------------
def _patch_zip_sizes(path: Path, member: str, file_size: int) -> None:
    """Make a zip's local header and central directory declare ``file_size`` for ``member``."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    i = data.find(b"PK\x03\x04")
    assert data[i + 30:i + 30 + len(name)] == name
    struct.pack_into("<I", data, i + 22, file_size)
    j = data.find(b"PK\x01\x02")
    assert data[j + 46:j + 46 + len(name)] == name
    struct.pack_into("<I", data, j + 24, file_size)
    path.write_bytes(bytes(data))


def test_weights_zip_member_declaring_too_much_is_refused_before_reading(tmp_path):
    from cxr_lung_risk.weights import WeightsError, WeightSource

    z = tmp_path / "w.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("weights/m.pth", b"\0" * 1000)
    _patch_zip_sizes(z, "weights/m.pth", 0xF0000000)
    src = WeightSource(z)
    with pytest.raises(WeightsError, match=r"w\.zip!weights/m\.pth: the zip declares it uncompressed as "
                                           r"4,026,531,840 bytes, more than a weights file"):
        src.load("m.pth")


def test_weights_zip_member_with_an_absurd_ratio_is_refused(tmp_path):
    from cxr_lung_risk.weights import WeightsError, WeightSource

    z = tmp_path / "w.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("m.pth", "w") as f:
            for chunk in zeros(40 << 20):
                f.write(chunk)
    assert z.stat().st_size < 200_000
    src = WeightSource(z)
    with pytest.raises(WeightsError, match=r"w\.zip!m\.pth: compresses .*:1 .* absurd for float weights"):
        src.load("m.pth")


def test_weights_size_limit_follows_the_model(tmp_path):
    import torch

    from cxr_lung_risk.weights import WeightsError, WeightSource, state_dict_nbytes

    model = torch.nn.Linear(10, 10)
    assert state_dict_nbytes(model) == (100 + 10) * 4
    buf = tmp_path / "m.pth"
    torch.save(model.state_dict(), buf)
    z = tmp_path / "w.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(buf, "m.pth")
        zf.writestr("big.pth", b"\1" * (20 << 20))
    src = WeightSource(z)
    state = src.load("m.pth", expected_bytes=state_dict_nbytes(model))
    assert torch.equal(state["weight"], model.weight)
    with pytest.raises(WeightsError, match=r"big\.pth: the zip declares it uncompressed as 20,971,520 bytes"):
        src.load("big.pth", expected_bytes=state_dict_nbytes(model))
    with pytest.raises(WeightsError, match=r"the file is 20,971,520 bytes"):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "big.pth").write_bytes(b"\1" * (20 << 20))
        WeightSource(tmp_path / "d").load("big.pth", expected_bytes=state_dict_nbytes(model))


# ------------------------------------------------------------------------------------------
# E. extreme shapes and blank renderings
# ------------------------------------------------------------------------------------------
def test_extreme_aspect_ratio_is_refused_before_decoding(rg1_pixels, tmp_path):
    src, arr = rg1_pixels
    ds = copy.deepcopy(src)
    strip = np.tile(arr[900:908, :], (1, 5))[:, :8000]
    ds.PixelData = np.ascontiguousarray(strip).astype("<u2").tobytes()
    ds.Rows, ds.Columns = 8, 8000
    p = save(ds, tmp_path / "strip.dcm")
    res, peak, _ = peak_mib(lambda: load_image(p))
    assert res.reason == ("failed: image aspect ratio 1:1000 cannot be a chest radiograph (Rows 8 x Columns 8000, "
                          "limit 4:1); not decoded")
    assert peak < 8
    tall = save(rg1_crop(rg1_pixels, 64, Rows=320, Columns=64, PixelData=bytes(320 * 64 * 2)), tmp_path / "t.dcm")
    assert load_image(tall).reason.startswith("failed: image aspect ratio 5.0:1 cannot be a chest radiograph")
    assert load_image(tall, SelectionOptions(max_aspect_ratio=6)).status == "ok"


def test_trimmed_strip_is_refused_before_the_resize():
    img = np.full((600, 600), 40, np.uint8)
    img[300:302, 10:590] = np.arange(580) % 200 + 50  # a 2 x 580 strip on a uniform background
    (out, peak, secs) = peak_mib(lambda: _raises(lambda: preprocess.imagemagick_recipe(img)))
    assert isinstance(out, preprocess.ImageRefused)
    assert str(out) == ("image aspect ratio 1:290 cannot be a chest radiograph (after trimming, 2 x 580 pixels would "
                        "be resized to 512 x 148480 = 76,021,760 pixels, limit 40,000,000)")
    assert peak < 16 and secs < 1  # before: ~5 GB for the 512 x 148480 float planes
    meta = preprocess.PixelMeta("MONOCHROME2", 8, 8)
    with pytest.raises(preprocess.ImageRefused, match=r"^image aspect ratio 1:290 cannot be a chest radiograph "
                                                      r"\(after trimming its uniform border the image is 2 x 580"):
        preprocess.preprocess_checked(img, meta)
    # an elongated crop within the resize limit is still processed as ImageMagick does
    wide = np.tile((np.arange(600) % 251).astype(np.uint8)[None, :], (100, 1))  # trims to 100 x 598
    assert preprocess.imagemagick_recipe(wide).shape == preprocess.resize_shape(100, 598) == (512, 3062)


def _raises(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


def test_absurd_rescale_renders_blank_and_is_refused(rg1_pixels, tmp_path):
    p = save(rg1_crop(rg1_pixels, 64, RescaleSlope="1E-30", RescaleIntercept="0"), tmp_path / "r.dcm")
    res = load_image(p)
    assert res.status == "ok", res.reason
    gray = preprocess.preprocess_pixels(res.pixels, res.meta)
    assert gray.max() == gray.min()
    why = preprocess.check_rendered(gray)
    assert why == ("the preprocessed image has no contrast (every pixel is gray level 0): the pixel data or its "
                   "rescale/LUT make a blank image")
    with pytest.raises(preprocess.ImageRefused, match="no contrast"):
        preprocess.preprocess_checked(res.pixels, res.meta)
    good = load_image(plain(rg1_pixels, tmp_path))
    ref = preprocess.preprocess_pixels(good.pixels, good.meta)
    assert preprocess.check_rendered(ref) is None
    assert np.array_equal(preprocess.preprocess_checked(good.pixels, good.meta), ref)  # same maths


# ------------------------------------------------------------------------------------------
# F. values
# ------------------------------------------------------------------------------------------
def _with_raw_uid(path: Path, keyword: str, raw: bytes) -> Path:
    ds = pydicom.dcmread(path)
    ds[keyword].value = "9.9"
    ds.save_as(path)
    data = path.read_bytes()
    tag = pydicom.datadict.tag_for_keyword(keyword)
    head = struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, b"UI", 4) + b"9.9\0"
    assert data.count(head) == 1
    raw = raw + b"\0" * (len(raw) % 2)
    path.write_bytes(data.replace(head, struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, b"UI", len(raw)) + raw))
    return path


def test_backslash_in_sop_instance_uid_gives_one_clean_string(rg1_pixels, tmp_path):
    p = _with_raw_uid(plain(rg1_pixels, tmp_path), "SOPInstanceUID", b"1.2.840.1234\\5678")
    res = load_image(p)
    assert res.status == "ok", res.reason
    assert isinstance(res.sop_uid, str) and res.sop_uid == "1.2.840.1234.5678"
    assert ("SOPInstanceUID '1.2.840.1234\\5678' holds 2 values (a backslash in a UID); using '1.2.840.1234.5678'"
            in res.warnings), res.warnings
    # the property gives the same without load_image's cache
    assert LoadedImage("ok", dataset=res.dataset).sop_uid == "1.2.840.1234.5678"


@pytest.mark.parametrize("raw,problem", [
    (b"1.2.3." + b"4" * 70, "is not a valid UID (76 characters, more than 64)"),
    (b"1.2.abc.4", "is not a valid UID (characters other than digits and dots)"),
    (b"1.02.3", "is not a valid UID (an empty component or a leading zero)"),
])
def test_invalid_uids_are_warned_and_kept_as_text(rg1_pixels, tmp_path, raw, problem):
    p = _with_raw_uid(plain(rg1_pixels, tmp_path), "StudyInstanceUID", raw)
    res = load_image(p)
    assert res.status == "ok", res.reason
    assert res.study_uid == raw.decode()
    expected = f"StudyInstanceUID '{raw.decode()[:77] + '...' if len(raw) > 80 else raw.decode()}' {problem}; kept as text"
    assert expected in res.warnings, res.warnings


# ------------------------------------------------------------------------------------------
# G. library warnings are recorded, not printed
# ------------------------------------------------------------------------------------------
def _implicit_body_explicit_claim(rg1_pixels, path: Path) -> Path:
    """The file meta says explicit VR little endian, the data set is implicit VR."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = rg1_crop(rg1_pixels)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    data = save(ds, path).read_bytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, ds.file_meta, enforce_standard=True)
        f.write(data[dataset_start(data):])
    return path


def test_library_warnings_become_file_warnings_not_stderr(rg1_pixels, tmp_path, capfd):
    p = _implicit_body_explicit_claim(rg1_pixels, tmp_path / "vr.dcm")
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # an application that logs to stderr
    root.addHandler(handler)
    capfd.readouterr()
    try:
        with warnings.catch_warnings(record=True) as outside:
            warnings.simplefilter("always")
            res = load_image(p)
    finally:
        root.removeHandler(handler)
    assert res.status == "ok", res.reason
    assert "pydicom: Expected explicit VR, but found implicit VR - using implicit VR for reading" in res.warnings
    assert len([w for w in res.warnings if "Expected explicit VR" in w]) == 1  # warning + log record: once
    assert outside == []
    assert capfd.readouterr().err == ""


# ------------------------------------------------------------------------------------------
# H. round 2 (issue 25): structure bombs, links out of the folder, empty files, warnings
# ------------------------------------------------------------------------------------------
from hostile_files import run_tree_peak, with_empty_items, with_nested_sequences  # noqa: E402

from cxr_lung_risk import pipeline  # noqa: E402
from cxr_lung_risk.dicom_io import MAX_HEADER_ELEMENTS, MAX_SEQUENCE_DEPTH  # noqa: E402

_CLI = [sys.executable, "-m", "cxr_lung_risk.cli"]


def _manifest(out: Path) -> dict[str, dict[str, str]]:
    import csv

    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        return {r["File"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("deflate,n", [(False, 16 << 20), (True, 3_500_000)])
def test_millions_of_empty_sequence_items_are_refused_in_seconds(rg1_pixels, tmp_path, deflate, n):
    """16.7 M empty items (128 MiB plain) or 3.5 M (28 MiB inflated from 50 KB, inside the 32 MiB
    inflate cap): before, pydicom built one Dataset per item until the worker's memory limit
    stopped it after minutes (3.05 GB for the run)."""
    p = with_empty_items(rg1_pixels, tmp_path / "items.dcm", n, deflate=deflate)
    size = p.stat().st_size
    assert size < 600_000 if deflate else size > 8 * n
    t = time.perf_counter()
    res = load_image(p)
    secs = time.perf_counter() - t
    assert res.status == "failed"
    assert res.reason.startswith(f"failed: the header holds more than {MAX_HEADER_ELEMENTS:,} data elements and "
                                 f"sequence items before the pixel data (at byte "), res.reason
    assert res.reason.endswith("); not parsed")
    assert secs < 5
    again, peak, _ = peak_mib(lambda: load_image(p))  # Python allocations (tracemalloc slows it down)
    assert again.reason == res.reason and peak < 48


def test_a_normal_number_of_items_still_reads(rg1_pixels, tmp_path):
    res = load_image(with_empty_items(rg1_pixels, tmp_path / "items.dcm", 5000))
    assert res.status == "ok", res.reason
    assert res.pixels.shape == (64, 64)
    res = load_image(with_nested_sequences(rg1_pixels, tmp_path / "nested.dcm", MAX_SEQUENCE_DEPTH))
    assert res.status == "ok", res.reason


def test_deep_sequence_nesting_has_its_own_reason_and_no_traceback(rg1_pixels, tmp_path, capfd):
    """100 nested sequences: before, the worker printed a RecursionError traceback (pickling the
    header) and the row blamed the worker."""
    d = tmp_path / "in"
    d.mkdir()
    with_nested_sequences(rg1_pixels, d / "deep.dcm", 100)
    with_nested_sequences(rg1_pixels, d / "ok.dcm", MAX_SEQUENCE_DEPTH)  # the limit itself: through the worker
    capfd.readouterr()
    got = {r.file.rel: r for r in pipeline.iter_prepared(list(discover([d])), pipeline.PrepareOptions(), workers=1)}
    assert got["deep.dcm"].status == "failed"
    assert got["deep.dcm"].reason.startswith(f"failed: sequence nesting deeper than {MAX_SEQUENCE_DEPTH} (at byte ")
    assert got["ok.dcm"].status == "ok", got["ok.dcm"].reason
    err = capfd.readouterr().err
    assert "Traceback" not in err and err == ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="samples /proc")
def test_structure_bombs_in_a_run_the_tree_peak_and_the_time(rg1_pixels, tmp_path):
    """The cases through the CLI with a decode worker (preprocess: no models, so the tree's
    peak is what the inputs cost): each refused with its reason within seconds."""
    d = tmp_path / "in"
    d.mkdir()
    with_empty_items(rg1_pixels, d / "items_plain_128MiB.dcm", 16 << 20)
    with_empty_items(rg1_pixels, d / "items_deflated.dcm", 3_500_000, deflate=True)
    with_nested_sequences(rg1_pixels, d / "nested_100.dcm", 100)
    (d / "empty.dcm").write_bytes(b"")
    save(rg1_crop(rg1_pixels), d / "control.dcm")
    out = tmp_path / "o"
    rc, _, err, secs, peak = run_tree_peak([*_CLI, "preprocess", str(d), "--out", str(out), "--workers", "1", "--quiet"],
                                           timeout=300)
    assert rc == 2, err
    assert "Traceback" not in err and "Invalid value" not in err
    rows = _manifest(out)
    assert rows["control.dcm"]["status"] == "ok"
    for name in ("items_plain_128MiB.dcm", "items_deflated.dcm"):
        assert rows[name]["status"] == "failed" and "data elements and sequence items" in rows[name]["reason"]
    assert "sequence nesting deeper than" in rows["nested_100.dcm"]["reason"]
    assert rows["empty.dcm"]["reason"] == "failed: the file is empty (0 bytes)"
    # before: the worker grew to its 1.5 GiB limit, for minutes
    assert secs < 60 and peak < 1024, (secs, peak)


def test_a_link_to_the_parent_folder_is_not_followed(rg1_pixels, tmp_path):
    """A '..' link in a folder of 23 entries made 25,203 inputs (the parent's files)."""
    parent = tmp_path / "archive"
    d = parent / "study"
    d.mkdir(parents=True)
    for k in range(200):
        (parent / f"other_{k:03d}.dcm").write_bytes(b"not selected")
    for k in range(22):
        (d / f"x{k:02d}.txt").write_bytes(b"x")
    save(rg1_crop(rg1_pixels), d / "chest.dcm")
    os.symlink("..", d / "up")
    os.symlink("/", d / "root")
    found = list(discover([d]))
    assert len(found) == 25  # the 23 entries and the two links, each listed once
    skipped = {f.rel: f.skip for f in found if f.skip}
    assert set(skipped) == {"up", "root"}
    assert skipped["up"] == (f"skipped: symbolic link to a folder outside {d} ({parent}); not followed "
                             f"(--follow-links follows it)")
    p = pipeline.prepare(next(f for f in found if f.rel == "up"), pipeline.PrepareOptions())
    assert (p.status, p.reason) == ("skipped", skipped["up"])
    out = tmp_path / "o"
    rc, _, err, _, _ = run_tree_peak([*_CLI, "preprocess", str(d), "--out", str(out), "--quiet"], timeout=300)
    rows = _manifest(out)
    assert len(rows) == 25 and rows["up"]["status"] == "skipped" and rows["chest.dcm"]["status"] == "ok", err
    # followed on request (still without loops: the parent's own 'study' folder is not walked twice)
    followed = [f.rel for f in discover([d], follow_links=True) if f.rel.startswith("up/")]
    assert len([r for r in followed if r.startswith("up/other_")]) == 200
    assert not any(r.startswith("up/study/") for r in followed)


@pytest.mark.parametrize("accept_raster", [True, False])  # predict / preprocess
def test_an_empty_dcm_fails_in_predict_and_preprocess_alike(tmp_path, accept_raster):
    p = tmp_path / "empty.dcm"
    p.write_bytes(b"")
    (item,) = discover([p])
    res = pipeline.prepare(item, pipeline.PrepareOptions(accept_raster=accept_raster))
    assert (res.status, res.reason) == ("failed", "failed: the file is empty (0 bytes)")


def test_warnings_of_unpickling_a_worker_result_are_the_inputs(rg1_pixels, tmp_path, capfd):
    """pydicom validates UIDs again when the worker's header is unpickled in the main process:
    its 'Invalid value for VR UI' reached stderr raw."""
    d = tmp_path / "in"
    d.mkdir()
    _with_raw_uid(save(rg1_crop(rg1_pixels), d / "uid.dcm"), "StudyInstanceUID", b"1.2.abc.4")
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # what the CLI's interpreter does: print each warning once
        (res,) = pipeline.iter_prepared(list(discover([d])), pipeline.PrepareOptions(), workers=1)
    assert res.status == "ok", res.reason
    assert capfd.readouterr().err == ""
    vr = [w for w in res.warnings if "Invalid value for VR UI: '1.2.abc.4'" in w]
    assert len(vr) == 1 and vr[0].startswith("pydicom: "), res.warnings


def test_predict_help_tells_the_default_workers(monkeypatch, capsys):
    from cxr_lung_risk import cli

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert pipeline.default_workers() == 1
    for cmd in ("predict", "preprocess"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "so 1 on 2 cores" in text and "in-process" not in text, text


# large legal images: one pixel limit for every input kind, and a peak under the goal
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height (8-bit gray) and whose data is a stub."""
    import zlib as _z

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", _z.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", _z.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_the_pixel_limit_applies_to_png_and_jpeg_before_decoding(tmp_path, sample_pngs):
    """A 156-megapixel PNG was decoded (2.63 GB for the run): the 100 MP limit was DICOM's only."""
    big = _png_header_only(tmp_path / "big.png", 12490, 12490)
    (item,) = discover([big])
    res, peak, secs = peak_mib(lambda: pipeline.prepare(item, pipeline.PrepareOptions()))
    assert res.status == "failed"
    assert res.reason == (f"failed: {big}: image is too large (12490 x 12490 = 156,000,100 pixels, limit "
                          f"100,000,000); not decoded")
    assert peak < 8 and secs < 1
    # the same limit object as DICOM's (SelectionOptions.max_pixels), for PNG and JPEG alike
    from PIL import Image

    jpg = tmp_path / "a.jpg"
    with Image.open(sample_pngs[0]) as im:
        im.convert("L").save(jpg)
    small = SelectionOptions(max_pixels=1000)
    for path in (sample_pngs[0], jpg):
        (item,) = discover([path])
        res = pipeline.prepare(item, pipeline.PrepareOptions(selection=small))
        assert res.status == "failed" and "pixels, limit 1,000); not decoded" in res.reason, res.reason
        assert pipeline.prepare(item, pipeline.PrepareOptions()).status == "ok"


_PEAK_CHILD = r"""
import gc, json, sys
from cxr_lung_risk.dicom_io import discover
from cxr_lung_risk.pipeline import PrepareOptions, prepare

def status():
    d = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            d[line.split(":")[0]] = int(line.split()[1])
    return d

(warm,) = discover([sys.argv[2]])
assert prepare(warm, PrepareOptions()).status == "ok"
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the RSS now
before = status()["VmRSS"]
(item,) = discover([sys.argv[1]])
res = prepare(item, PrepareOptions())
print(json.dumps({"status": str(res.status), "reason": res.reason, "growth_mib": (status()["VmHWM"] - before) / 1024}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_largest_accepted_images_decode_within_a_small_peak(rg1_pixels, tmp_path):
    """100 megapixels, the largest accepted image: decoded into the final buffer, the stored
    values freed once rendered, the first resize pass block by block (bit-exact: the recipe's
    own arithmetic per output pixel). Before: +1,049 MiB (DICOM) and +769 MiB (PNG) in the decode
    worker, on top of the main process's 1.5 GB of weights (2.57 GB and 2.63 GB for the tree)."""
    from hostile_files import large_dicom, large_png

    warm = save(rg1_crop(rg1_pixels), tmp_path / "warm.dcm")
    dcm = large_dicom(rg1_pixels, tmp_path / "big.dcm", 10000, 10000)
    png = large_png(rg1_pixels, tmp_path / "big.png", 10000, 10000)
    import json as _json
    import subprocess

    for path, limit in ((dcm, 2 * 191 + 64), (png, 191 + 64)):  # the stored values (and their bytes) + slack
        cp = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(path), str(warm)], capture_output=True, text=True,
                            timeout=300)
        got = _json.loads(cp.stdout.strip().splitlines()[-1])
        assert got["status"] == "ok", got
        assert got["growth_mib"] < limit, (path.name, got)
