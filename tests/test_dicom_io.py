"""DICOM-in stage: discovery, selection (with reasons), decoding, robustness.

Every input is a real DICOM file from pydicom-data / pydicom's test files, or derived from one at
test time (with dcmtk's encoders or pydicom).  Reference pixels come from an independent source:
the raw little-endian PixelData bytes of the uncompressed original read with numpy, or dcmtk's own
decoders (dcmdjpeg) for lossy JPEG.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    UID,
)

from cxr_lung_risk.dicom_io import (
    DicomInputError,
    InputFile,
    SelectionOptions,
    discover,
    is_dicom_file,
    is_raster_image,
    load_image,
    raster_kind,
    read_header,
)

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def raw_le_pixels(path: Path) -> np.ndarray:
    """Reference pixels of an uncompressed explicit-LE 16-bit file: its PixelData bytes read by
    numpy (independent of pydicom's pixel decoders)."""
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.BitsAllocated == 16
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = np.frombuffer(ds.PixelData, dtype="<u2" if ds.PixelRepresentation == 0 else "<i2")
    return arr[: frames * ds.Rows * ds.Columns].reshape(frames, ds.Rows, ds.Columns)


def dcmtk(tool: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"dcmtk tool {tool} missing (apt-get install dcmtk)")
    return exe


def run_tool(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True, timeout=120)


def small_rg1(src: Path, dst: Path, size: int = 256, **changes) -> Path:
    """A centre crop of RG1 (real header, real pixels) with header ``changes`` applied."""
    ds = pydicom.dcmread(src)
    arr = ds.pixel_array
    r0, c0 = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    crop = np.ascontiguousarray(arr[r0 : r0 + size, c0 : c0 + size])
    ds.PixelData = crop.astype("<u2").tobytes()
    ds.Rows, ds.Columns = crop.shape
    for key, value in changes.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.fixture(scope="session")
def rg1(dicom_data) -> Path:
    return dicom_data / "RG1_UNCR.dcm"


@pytest.fixture(scope="session")
def rg1_ref(rg1) -> np.ndarray:
    return raw_le_pixels(rg1)[0]


@pytest.fixture(scope="session")
def rg1_small(rg1, tmp_path_factory) -> Path:
    return small_rg1(rg1, tmp_path_factory.mktemp("rg1") / "rg1_small.dcm")


# ------------------------------------------------------------------------------------------
# 1. real chest CR in its four pydicom-data transfer syntaxes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["RG1_UNCR", "RG1_UNCI", "RG1_J2KR", "RG1_J2KI"])
def test_rg1_accepted(dicom_data, name):
    res = load_image(dicom_data / f"{name}.dcm")
    assert res.status == "ok", res.reason
    assert res.reason == ""
    assert res.warnings == []
    assert res.pixels is not None and res.pixels.shape == (1955, 1841)  # Rows, Columns (dcmdump)
    assert res.pixels.dtype.kind == "u" and res.pixels.dtype.isnative
    assert res.meta.photometric == "MONOCHROME1"
    assert (res.meta.bits_stored, res.meta.bits_allocated, res.meta.pixel_representation) == (15, 16, 0)
    assert res.meta.rescale_slope == 1.0 and res.meta.rescale_intercept == 0.0
    assert "PixelData" not in res.dataset
    assert res.dataset.Modality == "CR"


def test_rg1_lossless_identical(dicom_data, rg1_ref):
    uncr = load_image(dicom_data / "RG1_UNCR.dcm").pixels
    j2kr = load_image(dicom_data / "RG1_J2KR.dcm").pixels
    assert np.array_equal(uncr, rg1_ref)
    assert np.array_equal(j2kr, rg1_ref)


def test_rg1_lossy_matches_its_uncompressed_copy(dicom_data):
    # UNCI is pydicom-data's uncompressed copy of the lossy J2KI image.
    unci = load_image(dicom_data / "RG1_UNCI.dcm").pixels
    j2ki = load_image(dicom_data / "RG1_J2KI.dcm").pixels
    assert np.array_equal(unci, raw_le_pixels(dicom_data / "RG1_UNCI.dcm")[0])
    assert np.abs(unci.astype(int) - j2ki.astype(int)).max() <= 1


def test_header_uids_match_dcmdump(dicom_data):
    exe = dcmtk("dcmdump")
    path = dicom_data / "RG1_UNCR.dcm"
    out = subprocess.run([exe, "-Un", "+P", "SOPInstanceUID", "+P", "StudyInstanceUID", "+P", "SeriesInstanceUID",
                          "+P", "SOPClassUID", str(path)], capture_output=True, text=True, check=True).stdout
    vals = {line.split()[-1]: line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "[" in line}
    res = load_image(path)
    assert res.sop_class_uid == vals["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.1"
    assert res.sop_uid == vals["SOPInstanceUID"]
    assert res.study_uid == vals["StudyInstanceUID"]
    assert res.series_uid == vals["SeriesInstanceUID"]


# ------------------------------------------------------------------------------------------
# 2. RG1 re-encoded by dcmtk (an independent encoder) in the other transfer syntaxes
# ------------------------------------------------------------------------------------------
DCMTK_LOSSLESS = [
    ("dcmconv", ["+tb"], "1.2.840.10008.1.2.2"),  # explicit VR big endian
    ("dcmconv", ["+ti"], "1.2.840.10008.1.2"),  # implicit VR little endian
    ("dcmconv", ["+td"], "1.2.840.10008.1.2.1.99"),  # deflated
    ("dcmcrle", [], "1.2.840.10008.1.2.5"),  # RLE lossless
    ("dcmcjpeg", ["+e1"], "1.2.840.10008.1.2.4.70"),  # JPEG lossless SV1
    ("dcmcjpeg", ["+el"], "1.2.840.10008.1.2.4.57"),  # JPEG lossless (process 14)
    ("dcmcjpls", [], "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
]


@pytest.mark.parametrize("tool,opts,ts", DCMTK_LOSSLESS, ids=[t[2] for t in DCMTK_LOSSLESS])
def test_dcmtk_lossless_reencodings(tool, opts, ts, rg1, rg1_ref, tmp_path):
    out = tmp_path / "rg1.dcm"
    run_tool(dcmtk(tool), *opts, rg1, out)
    res = load_image(out)
    assert res.status == "ok", res.reason
    assert res.dataset.file_meta.TransferSyntaxUID == ts
    assert res.pixels.dtype.isnative
    assert np.array_equal(res.pixels, rg1_ref)


@pytest.mark.parametrize("opt,ts", [("+eb", "1.2.840.10008.1.2.4.50"), ("+ee", "1.2.840.10008.1.2.4.51")])
def test_dcmtk_lossy_jpeg_matches_dcmtk_decoder(opt, ts, rg1, tmp_path):
    enc, dec = tmp_path / "lossy.dcm", tmp_path / "decoded.dcm"
    run_tool(dcmtk("dcmcjpeg"), opt, rg1, enc)
    run_tool(dcmtk("dcmdjpeg"), enc, dec)  # dcmtk's IJG decoder: the independent reference
    res = load_image(enc)
    assert res.status == "ok", res.reason
    assert res.dataset.file_meta.TransferSyntaxUID == ts
    ref_ds = pydicom.dcmread(dec)
    ref = np.frombuffer(ref_ds.PixelData, dtype="<u1" if ref_ds.BitsAllocated == 8 else "<u2")
    ref = ref[: ref_ds.Rows * ref_ds.Columns].reshape(ref_ds.Rows, ref_ds.Columns)
    assert res.meta.bits_stored == ref_ds.BitsStored
    # two different IDCT implementations: at most one grey level apart
    assert np.abs(res.pixels.astype(int) - ref.astype(int)).max() <= 1


# ------------------------------------------------------------------------------------------
# 3. RG1 re-encoded by pydicom's own encoders (no dcmtk needed)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ts", [RLELossless, JPEGLSLossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian])
def test_pydicom_reencodings(ts, rg1_small, tmp_path):
    ref = raw_le_pixels(rg1_small)[0]
    ds = pydicom.dcmread(rg1_small)
    if ts == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ts
    else:
        from pydicom.pixels import get_encoder

        if not get_encoder(ts).is_available:
            pytest.skip(f"no pydicom encoder for {ts.name}")
        ds.compress(ts)
    out = tmp_path / "enc.dcm"
    ds.save_as(out, enforce_file_format=True)
    res = load_image(out)
    assert res.status == "ok", res.reason
    assert res.dataset.file_meta.TransferSyntaxUID == ts
    assert np.array_equal(res.pixels, ref)


# ------------------------------------------------------------------------------------------
# 4. real files of other syntaxes (decoding only: their modality needs a widened option)
# ------------------------------------------------------------------------------------------
# other modalities test the decoders: their body parts (HEAD, ...) are accepted too
MR_OPTS = SelectionOptions(allowed_modalities=("MR",), allow_multiframe=True, allow_non_chest=True)


@pytest.mark.parametrize("name", ["MR_small_RLE", "MR_small_bigendian", "MR_small_expb", "MR_small_implicit",
                                  "MR_small_jp2klossless", "MR_small_jpeg_ls_lossless", "MR_small_padded"])
def test_mr_small_syntaxes(name):
    ref = raw_le_pixels(TEST_FILES / "MR_small.dcm")[0].astype(np.int16)
    res = load_image(TEST_FILES / f"{name}.dcm", MR_OPTS)
    assert res.status == "ok", res.reason
    assert np.array_equal(res.pixels.astype(np.int16), ref)


@pytest.mark.parametrize("name", ["emri_small_RLE", "emri_small_big_endian", "emri_small_jpeg_ls_lossless",
                                  "emri_small_jpeg_2k_lossless"])
def test_multiframe_syntaxes_first_frame(dicom_data, name):
    ref = raw_le_pixels(dicom_data / "emri_small.dcm")[0]
    res = load_image(dicom_data / f"{name}.dcm", MR_OPTS)
    assert res.status == "ok", res.reason
    assert "multi-frame image: only frame 1 of 10 is used" in res.warnings
    assert np.array_equal(res.pixels, ref)


@pytest.mark.parametrize("path,modality,tol", [
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", "US", 0),
    ("JPEG-LL.dcm", "NM", 0),
    (str(TEST_FILES / "JPGExtended.dcm"), "NM", 1),  # lossy 12-bit DCT: IDCTs may differ by 1
])
def test_real_jpeg_files_match_dcmdjpeg(dicom_data, path, modality, tol, tmp_path):
    src = Path(path) if os.path.isabs(path) else dicom_data / path
    dec = tmp_path / "dec.dcm"
    run_tool(dcmtk("dcmdjpeg"), src, dec)
    ref_ds = pydicom.dcmread(dec)
    ref = np.frombuffer(ref_ds.PixelData, dtype="<u1" if ref_ds.BitsAllocated == 8 else "<u2")
    ref = ref[: ref_ds.Rows * ref_ds.Columns].reshape(ref_ds.Rows, ref_ds.Columns)
    res = load_image(src, SelectionOptions(allowed_modalities=(modality,), allow_non_chest=True))
    assert res.status == "ok", res.reason
    assert np.abs(res.pixels.astype(np.int64) - ref.astype(np.int64)).max() <= tol


def test_real_deflate_file():
    res = load_image(TEST_FILES / "image_dfl.dcm", SelectionOptions(allowed_modalities=("OT",), allow_non_chest=True))
    assert res.status == "ok", res.reason
    assert res.dataset.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert res.pixels.shape == (res.dataset.Rows, res.dataset.Columns)


# ------------------------------------------------------------------------------------------
# 5. refusals of real files
# ------------------------------------------------------------------------------------------
REFUSALS = [
    ("data:liver.dcm", None, "skipped: modality SEG is not a radiograph (CR/DX)"),
    ("test:CT_small.dcm", None, "skipped: modality CT is not a radiograph (CR/DX)"),
    ("data:MR2_UNCR.dcm", None, "skipped: modality MR is not a radiograph (CR/DX)"),
    ("data:US1_UNCR.dcm", None, "skipped: modality US is not a radiograph (CR/DX)"),
    ("data:JPEG-LL.dcm", None, "skipped: modality NM is not a radiograph (CR/DX)"),
    ("data:SC_rgb.dcm", None, "skipped: secondary capture (modality OT, ConversionType SYN, BodyPartExamined "
                              "missing) does not look like a radiograph"),
    ("data:OT-PAL-8-face.dcm", None, "skipped: secondary capture (modality OT, ConversionType DV"),
    # colour, once the modality rule is widened
    ("data:US1_UNCR.dcm", ("US",), "skipped: photometric interpretation RGB (3 samples per pixel) is not monochrome"),
    ("data:US1_J2KR.dcm", ("US",), "skipped: photometric interpretation YBR_RCT"),
    ("data:OT-PAL-8-face.dcm", ("OT",), "skipped: photometric interpretation PALETTE COLOR"),
    ("data:SC_ybr_full_uncompressed.dcm", ("OT",), "skipped: photometric interpretation YBR_FULL"),
    # multi-frame
    ("data:emri_small.dcm", ("MR",), "skipped: multi-frame image (10 frames); only single-frame radiographs"),
    ("data:SC_rgb_2frame.dcm", ("OT",), "skipped: multi-frame image (2 frames)"),
    # non-image objects
    ("test:test-SR.dcm", None, "skipped: Comprehensive SR Storage, modality SR is not an image (no pixel data)"),
    ("test:rtplan.dcm", None, "skipped: RT Plan Storage, modality RTPLAN is not an image (no pixel data)"),
    ("test:rtstruct.dcm", None, "skipped: RT Structure Set Storage, modality RTSTRUCT is not an image"),
    ("test:waveform_ecg.dcm", None, "skipped: 12-lead ECG Waveform Storage, modality ECG is not an image"),
    ("test:dicomdirtests/DICOMDIR", None, "skipped: DICOMDIR (a media directory index, not an image)"),
    ("test:README.txt", None, "skipped: not a DICOM file"),
    # broken real files
    ("test:MR_truncated.dcm", ("MR",), "failed: pixel data is truncated (8,130 bytes, expected 8,192 for 64 x 64"),
]


@pytest.mark.parametrize("src,modalities,reason", REFUSALS, ids=[f"{r[0]}-{r[1]}" for r in REFUSALS])
def test_refusals(dicom_data, src, modalities, reason):
    where, name = src.split(":", 1)
    path = (dicom_data if where == "data" else TEST_FILES) / name
    opts = SelectionOptions(allowed_modalities=modalities, allow_non_chest=True) if modalities else SelectionOptions()
    res = load_image(path, opts)
    assert res.status == reason.split(":", 1)[0]
    assert res.reason.startswith(reason), res.reason
    assert res.pixels is None and res.meta is None


def test_dicomdir_any_name(tmp_path):
    dst = tmp_path / "index.bin"
    shutil.copy(TEST_FILES / "dicomdirtests" / "DICOMDIR", dst)
    assert load_image(dst).reason == "skipped: DICOMDIR (a media directory index, not an image)"


def test_fileset_dicomdir(rg1_small, tmp_path):
    from pydicom.fileset import FileSet

    fs = FileSet()
    fs.add(pydicom.dcmread(rg1_small))
    fs.write(tmp_path / "fs")
    res = load_image(tmp_path / "fs" / "DICOMDIR")
    assert (res.status, res.reason) == ("skipped", "skipped: DICOMDIR (a media directory index, not an image)")
    images = [f for f in discover([tmp_path / "fs"]) if f.rel != "DICOMDIR"]
    assert len(images) == 1 and load_image(images[0].path).status == "ok"


# ------------------------------------------------------------------------------------------
# 6. derived policy cases on a real chest CR
# ------------------------------------------------------------------------------------------
def _view_code(meaning: str) -> DicomSequence:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "399173006", "SCT", meaning
    return DicomSequence([item])


@pytest.mark.parametrize("changes,why", [
    ({"ViewPosition": "LL"}, "ViewPosition LL"),
    ({"ViewPosition": "RL"}, "ViewPosition RL"),
    ({"ViewPosition": "LATERAL"}, "ViewPosition LATERAL"),
    ({"ViewPosition": "", "ImageType": ["DERIVED", "PRIMARY", "LATERAL"]}, "ImageType contains LATERAL"),
    ({"ViewPosition": None, "ViewCodeSequence": _view_code("left lateral")}, "view code 'left lateral'"),
])
def test_lateral_refused_then_allowed(rg1, tmp_path, changes, why):
    path = small_rg1(rg1, tmp_path / "lat.dcm", **changes)
    res = load_image(path)
    assert res.status == "skipped"
    assert res.reason == f"skipped: lateral view ({why}); only frontal (PA/AP) chest radiographs are supported"
    res = load_image(path, SelectionOptions(allow_lateral=True))
    assert res.status == "ok" and f"lateral view accepted ({why})" in res.warnings


@pytest.mark.parametrize("view", ["PA", "AP", "", None])
def test_frontal_or_unknown_view_accepted(rg1, tmp_path, view):
    res = load_image(small_rg1(rg1, tmp_path / "v.dcm", ViewPosition=view))
    assert res.status == "ok" and res.warnings == []


def test_dx_for_processing(rg1, tmp_path):
    dx = dict(Modality="DX", SOPClassUID=UID("1.2.840.10008.5.1.4.1.1.1.1.1"), PresentationIntentType="FOR PROCESSING")
    path = small_rg1(rg1, tmp_path / "dx.dcm", **dx)
    res = load_image(path)
    assert res.status == "skipped"
    assert res.reason == "skipped: DX image is FOR PROCESSING (raw detector data), not FOR PRESENTATION"
    res = load_image(path, SelectionOptions(allow_for_processing=True))
    assert res.status == "ok" and "FOR PROCESSING image accepted (raw detector data)" in res.warnings


def test_dx_for_presentation_accepted(rg1, tmp_path):
    dx = dict(Modality="DX", SOPClassUID=UID("1.2.840.10008.5.1.4.1.1.1.1"), PresentationIntentType="FOR PRESENTATION")
    res = load_image(small_rg1(rg1, tmp_path / "dx.dcm", **dx))
    assert res.status == "ok" and res.warnings == []


def test_missing_modality_taken_from_sop_class(rg1, tmp_path):
    res = load_image(small_rg1(rg1, tmp_path / "nomod.dcm", Modality=None))
    assert res.status == "ok", res.reason


def test_body_part_hand(rg1, tmp_path):
    path = small_rg1(rg1, tmp_path / "hand.dcm", BodyPartExamined="HAND")
    res = load_image(path)
    assert (res.status, res.reason) == (
        "skipped", "skipped: BodyPartExamined is 'HAND', not a chest radiograph (use --allow-non-chest to score it)")
    res = load_image(path, SelectionOptions(allow_non_chest=True))
    assert res.status == "ok"
    assert res.warnings == ["BodyPartExamined is 'HAND', not chest-like"]


def test_real_extremity_cr_skipped_unless_allowed(dicom_data):
    res = load_image(dicom_data / "RG3_UNCR.dcm")
    assert (res.status, res.reason) == (
        "skipped", "skipped: BodyPartExamined is 'EXTREMITY', not a chest radiograph (use --allow-non-chest to score it)")
    res = load_image(dicom_data / "RG3_UNCR.dcm", SelectionOptions(allow_non_chest=True))
    assert res.status == "ok" and res.warnings == ["BodyPartExamined is 'EXTREMITY', not chest-like"]


@pytest.mark.parametrize("conversion,body,ok", [("DF", "", True), ("DI", "", True), ("SYN", "CHEST", True),
                                                ("WSD", "", False), ("SYN", "HAND", False)])
def test_secondary_capture_rule(rg1, tmp_path, conversion, body, ok):
    sc = dict(Modality="OT", SOPClassUID=UID("1.2.840.10008.5.1.4.1.1.7"), ConversionType=conversion,
              BodyPartExamined=body or None)
    path = small_rg1(rg1, tmp_path / "sc.dcm", **sc)
    res = load_image(path)
    if ok:
        assert res.status == "ok", res.reason
        assert any(w.startswith("secondary capture (modality OT") for w in res.warnings)
    else:
        assert res.status == "skipped"
        assert res.reason.startswith(f"skipped: secondary capture (modality OT, ConversionType {conversion}")
        assert res.reason.endswith("(needs ConversionType DF/DI or a chest BodyPartExamined)")
    res = load_image(path, SelectionOptions(accept_radiograph_like_sc=False))
    assert res.reason == "skipped: modality OT is not a radiograph (CR/DX)"
    assert load_image(path, SelectionOptions(allowed_modalities=("CR", "DX", "OT"), allow_non_chest=True)).status == "ok"


def test_multiframe_cr(rg1, tmp_path):
    path = small_rg1(rg1, tmp_path / "one.dcm")
    ds = pydicom.dcmread(path)
    one = raw_le_pixels(path)[0]
    ds.NumberOfFrames = 2
    ds.PixelData = one.tobytes() + (one // 2).astype("<u2").tobytes()
    ds.save_as(tmp_path / "two.dcm")
    res = load_image(tmp_path / "two.dcm")
    assert res.reason == "skipped: multi-frame image (2 frames); only single-frame radiographs are supported"
    res = load_image(tmp_path / "two.dcm", SelectionOptions(allow_multiframe=True))
    assert res.status == "ok" and np.array_equal(res.pixels, one)
    assert "multi-frame image: only frame 1 of 2 is used" in res.warnings


def test_rescale_and_presentation_lut_carried(rg1, tmp_path):
    path = small_rg1(rg1, tmp_path / "r.dcm", RescaleSlope="2", RescaleIntercept="-100",
                     PresentationLUTShape="INVERSE")
    res = load_image(path)
    assert res.status == "ok"
    assert (res.meta.rescale_slope, res.meta.rescale_intercept, res.meta.presentation_lut_shape) == (2.0, -100.0, "INVERSE")
    # raw stored values: no rescale applied
    assert np.array_equal(res.pixels, raw_le_pixels(path)[0])


# ------------------------------------------------------------------------------------------
# 7. broken files
# ------------------------------------------------------------------------------------------
def test_zero_bytes(tmp_path):
    p = tmp_path / "empty.dcm"
    p.write_bytes(b"")
    assert (load_image(p).status, load_image(p).reason) == ("failed", "failed: the file is empty (0 bytes)")


def test_truncated_half(rg1, tmp_path):
    data = rg1.read_bytes()
    p = tmp_path / "half.dcm"
    p.write_bytes(data[: len(data) // 2])
    res = load_image(p)
    assert res.status == "failed"
    assert res.reason.startswith("failed: pixel data is truncated"), res.reason


def test_truncated_in_header(rg1, tmp_path):
    p = tmp_path / "head.dcm"
    p.write_bytes(rg1.read_bytes()[:700])
    res = load_image(p)
    assert res.reason == ("failed: Computed Radiography Image Storage header has no Rows/Columns "
                          "(file truncated or malformed)")


def test_random_bytes_and_text(tmp_path):
    rnd = tmp_path / "random.dcm"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    txt = tmp_path / "notes.txt"
    txt.write_text("this is not DICOM\n" * 20)
    for p in (rnd, txt):
        res = load_image(p)
        assert (res.status, res.reason) == ("skipped", "skipped: not a DICOM file")


def test_pixel_data_removed(rg1_small, tmp_path):
    ds = pydicom.dcmread(rg1_small)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    res = load_image(tmp_path / "nopix.dcm")
    assert (res.status, res.reason) == ("failed", "failed: PixelData is missing")


def test_pixel_buffer_shortened(rg1_small, tmp_path):
    ds = pydicom.dcmread(rg1_small)
    ds.PixelData = ds.PixelData[:1000]
    ds.save_as(tmp_path / "short.dcm")
    res = load_image(tmp_path / "short.dcm")
    # 256 x 256 x 2 bytes = 131,072 expected (hand computation)
    assert res.reason == "failed: pixel data is truncated (1,000 bytes, expected 131,072 for 256 x 256 at 16 bits)"


def test_memory_bomb_not_allocated(rg1_small, tmp_path):
    ds = pydicom.dcmread(rg1_small)
    ds.Rows = ds.Columns = 60000
    ds.save_as(tmp_path / "bomb.dcm")
    tracemalloc.start()
    t0 = time.perf_counter()
    res = load_image(tmp_path / "bomb.dcm")
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert res.status == "failed"
    assert res.reason == ("failed: image is too large (60000 x 60000 = 3,600,000,000 pixels, "
                          "limit 100,000,000); not decoded")
    assert peak < 20 * 2**20 and elapsed < 5
    # a limit below the real size refuses a genuine image too
    res = load_image(rg1_small, SelectionOptions(max_pixels=1000))
    assert res.reason.startswith("failed: image is too large (256 x 256 = 65,536 pixels, limit 1,000)")


def _patch_ts(src: Path, dst: Path, old: str, new: str) -> Path:
    """Rewrite the transfer syntax UID in the file meta (same padded length, so no length changes)."""
    a, b = old.encode() + b"\x00" * (len(old) % 2), new.encode() + b"\x00" * (len(new) % 2)
    assert len(a) == len(b)
    data = src.read_bytes()
    head = data[:400]
    assert head.count(a) == 1
    dst.write_bytes(head.replace(a, b) + data[400:])
    return dst


def test_wrong_transfer_syntax_claims(rg1_small, dicom_data, tmp_path):
    # native little-endian bytes claimed as RLE Lossless
    res = load_image(_patch_ts(rg1_small, tmp_path / "claim_rle.dcm", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"))
    assert res.status == "failed"
    assert res.reason == ("failed: transfer syntax RLE Lossless (1.2.840.10008.1.2.5) says compressed but the "
                          "pixel data is native (uncompressed)")
    # JPEG 2000 codestreams claimed as JPEG-LS: the decoder's error is reported
    j2k = dicom_data / "RG1_J2KR.dcm"
    res = load_image(_patch_ts(j2k, tmp_path / "claim_jls.dcm", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"))
    assert res.status == "failed"
    assert res.reason.startswith("failed: could not decode the pixel data (JPEG-LS Lossless Image Compression"), res.reason
    # encapsulated JPEG 2000 claimed as deflated: the data set cannot even be inflated
    res = load_image(_patch_ts(j2k, tmp_path / "claim_dfl.dcm", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1.99"))
    assert res.status == "failed" and res.reason.startswith("failed: malformed DICOM header"), res.reason


def test_corrupt_rle_segment_quiet(rg1_small, tmp_path, capfd):
    """An RLE segment that expands past the frame (found by the fuzz test): pylibjpeg-rle panics
    in Rust on it (a BaseException, with a backtrace on stderr); load_image must stay quiet."""
    import struct

    from pydicom.encaps import encapsulate

    seg = bytes([0x81, 0x07]) * 40  # 40 replicate runs of 128 bytes = 5120 > 64 * 64 per segment
    frame = struct.pack("<16I", 2, 64, 64 + len(seg), *([0] * 13)) + seg + seg
    ds = pydicom.dcmread(rg1_small)
    ds.Rows = ds.Columns = 64
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.save_as(tmp_path / "bad_rle.dcm")
    capfd.readouterr()
    res = load_image(tmp_path / "bad_rle.dcm")
    # pydicom's RLE decoder trims the excess and warns; the warning is passed on
    assert res.status == "ok", res.reason
    assert any(w.startswith("decoder: ") and "non-conformant padding" in w for w in res.warnings), res.warnings
    assert res.pixels.shape == (64, 64)
    assert "panicked" not in capfd.readouterr().err


def test_no_preamble_files(rg1, rg1_ref, tmp_path):
    data = rg1.read_bytes()
    ds = pydicom.dcmread(rg1, stop_before_pixels=True)
    body_start = 132 + 12 + ds.file_meta.FileMetaInformationGroupLength
    # file meta without the 128-byte preamble and 'DICM'
    (tmp_path / "meta_no_preamble").write_bytes(data[132:])
    # a bare explicit-VR little-endian data set, no file meta at all
    (tmp_path / "bare").write_bytes(data[body_start:])
    for name in ("meta_no_preamble", "bare"):
        assert is_dicom_file(tmp_path / name)
        res = load_image(tmp_path / name)
        assert res.status == "ok", (name, res.reason)
        assert np.array_equal(res.pixels, rg1_ref)


def test_undecodable_real_file():
    # pydicom's JPEG-lossy.dcm carries a misplaced marker that pylibjpeg's libjpeg rejects
    res = load_image(TEST_FILES / "JPEG-lossy.dcm", SelectionOptions(allowed_modalities=("NM",), allow_non_chest=True))
    if res.status == "ok":
        pytest.skip("this decoder accepts JPEG-lossy.dcm")
    assert res.status == "failed"
    assert res.reason.startswith("failed: could not decode the pixel data (JPEG Extended")


def test_directory_is_not_a_file(tmp_path):
    assert load_image(tmp_path).reason == "failed: not a regular file"
    assert load_image(tmp_path / "absent.dcm").status == "failed"


# ------------------------------------------------------------------------------------------
# 8. discovery and format sniffing
# ------------------------------------------------------------------------------------------
def test_discover_tree(rg1_small, tmp_path):
    root = tmp_path / "in"
    (root / "b" / "c").mkdir(parents=True)
    (root / ".git").mkdir()
    shutil.copy(rg1_small, root / "b" / "c" / "IMG0001")
    shutil.copy(rg1_small, root / "a.dcm")
    shutil.copy(rg1_small, root / ".git" / "x.dcm")
    (root / ".hidden").write_bytes(b"junk")
    (root / "b" / "readme.txt").write_text("hi")
    single = tmp_path / "single.dcm"
    shutil.copy(rg1_small, single)
    found = list(discover([root, single, root / "a.dcm"]))
    # several inputs: a folder's files are prefixed with its name; a file keeps its own name
    assert [f.rel for f in found] == ["in/.hidden", "in/a.dcm", "in/b/c/IMG0001", "in/b/readme.txt", "single.dcm"]
    assert found[2] == InputFile(root / "b" / "c" / "IMG0001", "in/b/c/IMG0001")
    assert found[2].source == root and found[4].source == single
    alone = list(discover([root]))  # one folder: paths relative to it
    assert [f.rel for f in alone] == [".hidden", "a.dcm", "b/c/IMG0001", "b/readme.txt"]
    assert [f.path for f in alone] == [f.path for f in found[:4]]
    assert list(discover([root])) == alone  # deterministic
    statuses = [load_image(f.path).status for f in found]
    assert statuses == ["skipped", "ok", "ok", "skipped", "ok"]


def test_discover_missing_input(tmp_path):
    with pytest.raises(DicomInputError, match="input not found: .*nope"):
        list(discover([tmp_path / "nope"]))


def test_sniffing(rg1, tmp_path):
    from PIL import Image

    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    img.save(tmp_path / "x.png")
    img.save(tmp_path / "x.jpg")
    shutil.copy(tmp_path / "x.png", tmp_path / "noext")
    assert raster_kind(tmp_path / "x.png") == "png" and raster_kind(tmp_path / "noext") == "png"
    assert raster_kind(tmp_path / "x.jpg") == "jpeg"
    assert is_raster_image(tmp_path / "x.jpg") and not is_raster_image(rg1)
    assert is_dicom_file(rg1) and not is_dicom_file(tmp_path / "x.png")
    assert is_dicom_file(TEST_FILES / "ExplVR_BigEndNoMeta.dcm")  # big endian, no meta
    assert is_dicom_file(TEST_FILES / "ExplVR_LitEndNoMeta.dcm")
    assert load_image(tmp_path / "x.png").reason == "skipped: not a DICOM file"
    hdr = read_header(rg1)
    assert "PixelData" not in hdr and hdr.Rows == 1955
    with pytest.raises(pydicom.errors.InvalidDicomError):
        read_header(tmp_path / "x.png")
