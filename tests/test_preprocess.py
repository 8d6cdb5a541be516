"""DICOM -> PNG maths against the authors' toolchain references and the real dcmtk / ImageMagick tools.

Expected values come only from independent sources: the reference PNGs made by the authors'
toolchain (tests/data/reference/preprocessing) and dcmj2pnm / mogrify run live.
"""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr_lung_risk.preprocess import (
    IM_AUTHORS,
    IM_DEBIAN,
    PixelMeta,
    dcmj2pnm_8bit,
    imagemagick_recipe,
    preprocess_pixels,
    read_png_gray,
    write_png,
)

RG_FILES = [f"{p}_{s}" for p in ("RG1", "RG3") for s in ("UNCR", "UNCI", "J2KR", "J2KI")]
REF_DIRS = {IM_AUTHORS: "im_6.8.9-9", IM_DEBIAN: "im_6.9.11-60"}

# Grayscale pydicom-data files that Debian's dcmj2pnm 3.6.7 decodes (it cannot read JPEG 2000
# or JPEG-LS here) and whose rendering PixelMeta fully describes (no Modality LUT).
LIVE_FILES = [
    "RG1_UNCR", "RG1_UNCI", "RG3_UNCR", "RG3_UNCI",  # CR, MONOCHROME1, 15 / 10 bits
    "693_UNCR",  # CT, signed 14 bits, rescale -1024
    "MR2_UNCR",  # MR, fractional slope and intercept
    "JPEG-LL",  # signed 16 bits, JPEG lossless
    "JPGLosslessP14SV1_1s_1f_8b",  # 8 bits, PresentationLUTShape IDENTITY
    "MR-SIEMENS-DICOM-WithOverlays",  # 484x484: enlarged (Mitchell)
    "emri_small_RLE",  # 64x64 multi-frame RLE: strong enlargement, first frame
    "eCT_Supplemental",  # enhanced CT, 16 bits
    "liver",  # 1 bit
    "vlut_04",  # VOI LUT present (dcmj2pnm ignores it without +Wl)
]


def _meta_pixels(path: Path) -> tuple[PixelMeta, np.ndarray]:
    ds = pydicom.dcmread(path)
    px = ds.pixel_array
    if px.ndim == 3:  # dcmj2pnm renders the first frame
        px = px[0]
    return PixelMeta.from_dataset(ds), px


def _ndiff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.count_nonzero(a != b))


def _center_crop_224(img: np.ndarray) -> np.ndarray:
    """fastai's validation Resize(224, Crop) as the notes (section 2) describe."""
    im = Image.fromarray(img)
    w, h = im.size
    s = int((min(w, h) / 224) * 224)
    left, top = int(0.5 * (w - s)), int(0.5 * (h - s))
    im = im.crop((left, top, left + s, top + s))
    if im.size != (224, 224):
        im = im.resize((224, 224), Image.BILINEAR)
    return np.asarray(im)


# ------------------------------------------------------------------ the authors' references


@pytest.fixture(scope="module")
def rg_outputs(dicom_data):
    out = {}
    for name in RG_FILES:
        meta, px = _meta_pixels(dicom_data / f"{name}.dcm")
        out[name] = {v: preprocess_pixels(px, meta, v) for v in REF_DIRS}
    return out


@pytest.mark.parametrize("name", RG_FILES)
@pytest.mark.parametrize("version", [IM_AUTHORS, IM_DEBIAN])
def test_matches_reference_png(rg_outputs, reference_dir, name, version):
    ref = read_png_gray(reference_dir / "preprocessing" / REF_DIRS[version] / f"{name}.png")
    got = rg_outputs[name][version]
    assert got.dtype == np.uint8 and min(got.shape) == 512
    assert _ndiff(got, ref) == 0
    assert _ndiff(_center_crop_224(got), _center_crop_224(ref)) == 0


def test_versions_differ_and_other_version_does_not_match(rg_outputs, reference_dir):
    """The two builds really differ (so the per-version references are a real check)."""
    name = "RG1_UNCR"
    ref = read_png_gray(reference_dir / "preprocessing" / REF_DIRS[IM_AUTHORS] / f"{name}.png")
    assert _ndiff(rg_outputs[name][IM_DEBIAN], ref) > 0


def test_pixel_meta_from_dataset(dicom_data):
    ds = pydicom.dcmread(dicom_data / "693_UNCR.dcm", stop_before_pixels=True)
    m = PixelMeta.from_dataset(ds)
    assert (m.photometric, m.bits_stored, m.pixel_representation) == ("MONOCHROME2", 14, 1)
    assert (m.rescale_slope, m.rescale_intercept) == (1.0, -1024.0)


def test_uniform_image_is_blank_512():
    out = imagemagick_recipe(np.full((40, 30), 77, np.uint8), IM_AUTHORS)
    assert out.shape == (512, 512) and not out.any()


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        imagemagick_recipe(np.zeros((4, 4), np.uint16))
    with pytest.raises(ValueError):
        imagemagick_recipe(np.zeros((4, 4), np.uint8), "7.1")
    with pytest.raises(ValueError):
        dcmj2pnm_8bit(np.zeros((2, 2, 3), np.uint8), PixelMeta("MONOCHROME2", 8, 8))


def test_png_roundtrip_and_gama(tmp_path, rg_outputs):
    img = rg_outputs["RG3_UNCR"][IM_AUTHORS]
    p = tmp_path / "x.png"
    write_png(p, img)
    assert _ndiff(read_png_gray(p), img) == 0
    with Image.open(p) as im:
        assert im.mode == "L" and im.info.get("gamma") == pytest.approx(1.0)


# ------------------------------------------------------------------ real tools, live


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd[0]} failed: {r.stderr.strip()[-300:]}"


def _tool_render(tools, dcm: Path, out_dir: Path) -> tuple[np.ndarray, Path]:
    """dcmj2pnm -O +ot +G, then the authors' mogrify; returns (dcmj2pnm pixels, PNG path)."""
    tif = out_dir / (dcm.stem + ".tif")
    _run([tools["dcmj2pnm"], "-O", "+ot", "+G", str(dcm), str(tif)])
    with Image.open(tif) as im:
        img8 = np.array(im)
    _run([tools["mogrify"], "-trim", "+repage", "-colorspace", "RGB", "-auto-level", "-depth", "8",
          "-resize", "512x512^", "-format", "png", str(tif)])
    return img8, tif.with_suffix(".png")


def _png_chunks(path: Path) -> dict[bytes, bytes]:
    data = path.read_bytes()
    i, chunks = 8, {}
    while i < len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        chunks.setdefault(data[i + 4:i + 8], data[i + 8:i + 8 + n])
        i += 12 + n
    return chunks


def _derive(src: Path, dst: Path, pixels: np.ndarray, **attrs) -> Path:
    """Write a copy of a real DICOM with new (uncompressed) pixels and attributes."""
    ds = pydicom.dcmread(src)
    ds.decompress() if ds.file_meta.TransferSyntaxUID.is_compressed else None
    for k in ("NumberOfFrames",):
        if k in ds:
            del ds[k]
    ds.Rows, ds.Columns = pixels.shape
    for k, v in attrs.items():
        if v is None:
            if k in ds:
                del ds[k]
        else:
            setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def derived_cases(dicom_data, tmp_path_factory):
    """Generated inputs: enlargement, a framed image, a uniform image."""
    d = tmp_path_factory.mktemp("derived")
    rg1 = pydicom.dcmread(dicom_data / "RG1_UNCR.dcm").pixel_array
    rg3 = pydicom.dcmread(dicom_data / "RG3_UNCR.dcm").pixel_array
    small = np.ascontiguousarray(rg1[200:200 + 260 * 6:6, 150:150 + 300 * 5:5]).astype(np.uint16)
    framed = np.full((700, 640), 1000, np.uint16)
    framed[37:37 + 600, 55:55 + 520] = rg3[400:1000:1, 500:1020:1]
    cases = {
        "enlarge": _derive(dicom_data / "RG1_UNCR.dcm", d / "enlarge.dcm", small),
        "framed": _derive(dicom_data / "RG3_UNCR.dcm", d / "framed.dcm", framed),
        "uniform": _derive(dicom_data / "RG3_UNCR.dcm", d / "uniform.dcm", np.full((64, 80), 300, np.uint16)),
    }
    return cases


@pytest.mark.tools
@pytest.mark.parametrize("name", LIVE_FILES)
def test_live_tools_pydicom_data(real_tools, dicom_data, tmp_path, name):
    dcm = dicom_data / f"{name}.dcm"
    meta, px = _meta_pixels(dcm)
    img8, png = _tool_render(real_tools, dcm, tmp_path)
    assert _ndiff(dcmj2pnm_8bit(px, meta), img8) == 0
    ref = read_png_gray(png)
    ours = imagemagick_recipe(img8, IM_DEBIAN)
    assert _ndiff(ours, ref) == 0
    assert _ndiff(preprocess_pixels(px, meta, IM_DEBIAN), ref) == 0


@pytest.mark.tools
@pytest.mark.parametrize("case", ["enlarge", "framed"])
def test_live_tools_generated(real_tools, derived_cases, tmp_path, case):
    dcm = derived_cases[case]
    meta, px = _meta_pixels(dcm)
    img8, png = _tool_render(real_tools, dcm, tmp_path)
    assert _ndiff(dcmj2pnm_8bit(px, meta), img8) == 0
    ref = read_png_gray(png)
    if case == "enlarge":
        assert max(ref.shape) > 512 and min(ref.shape) == 512 and min(px.shape) < 512
    else:  # the border is gone: the tool output is the trimmed content's aspect (600x520)
        assert ref.shape == (591, 512)
    assert _ndiff(imagemagick_recipe(img8, IM_DEBIAN), ref) == 0


@pytest.mark.tools
def test_live_tools_uniform(real_tools, derived_cases, tmp_path):
    dcm = derived_cases["uniform"]
    meta, px = _meta_pixels(dcm)
    img8, png = _tool_render(real_tools, dcm, tmp_path)
    ref = read_png_gray(png)
    ours = imagemagick_recipe(img8, IM_DEBIAN)
    assert ours.shape == ref.shape == (512, 512)
    assert _ndiff(ours, ref) == 0


@pytest.mark.tools
def test_live_write_png_matches_tool_png(real_tools, dicom_data, tmp_path):
    dcm = dicom_data / "RG3_UNCI.dcm"
    img8, png = _tool_render(real_tools, dcm, tmp_path)
    ours = tmp_path / "ours.png"
    write_png(ours, imagemagick_recipe(img8, IM_DEBIAN))
    with Image.open(ours) as a, Image.open(png) as b:
        assert a.mode == b.mode == "L"
        assert _ndiff(np.array(a), np.array(b)) == 0
    assert _png_chunks(ours)[b"gAMA"] == _png_chunks(png)[b"gAMA"] == struct.pack(">I", 100000)


# ------------------------------------------------------------------ dcmj2pnm rules, live


def _dcmj2pnm(tools, dcm: Path, tmp_path: Path) -> np.ndarray:
    out = tmp_path / (dcm.stem + ".pgm")
    _run([tools["dcmj2pnm"], "-O", "+G", str(dcm), str(out)])
    with Image.open(out) as im:
        return np.array(im)


def _rule_cases(dicom_data: Path, d: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    rg3 = dicom_data / "RG3_UNCR.dcm"
    p10 = pydicom.dcmread(rg3).pixel_array[600:900, 500:820].astype(np.uint16)  # 10 bits stored
    ct = dicom_data / "693_UNCR.dcm"
    pct = pydicom.dcmread(ct).pixel_array.astype(np.int16)  # signed 14 bits
    mr = dicom_data / "emri_small.dcm"
    pmr = pydicom.dcmread(mr).pixel_array[0].astype(np.uint16)  # 64x64, 12 bits: dcmtk's non-LUT path
    garbage = (rng.integers(0, 64, p10.shape, dtype=np.uint16) << 10).astype(np.uint16)
    sgarb = ((pct.view(np.uint16) & 0x3FFF) | (rng.integers(0, 4, pct.shape, dtype=np.uint16) << 14))
    return {
        "mono1_identity": _derive(rg3, d / "m1id.dcm", p10, PresentationLUTShape="IDENTITY"),
        "mono1_inverse": _derive(rg3, d / "m1inv.dcm", p10, PresentationLUTShape="INVERSE"),
        "mono2_inverse": _derive(rg3, d / "m2inv.dcm", p10, PhotometricInterpretation="MONOCHROME2",
                                 PresentationLUTShape="INVERSE"),
        "garbage_high_bits": _derive(rg3, d / "garb.dcm", p10 | garbage, HighBit=9),
        "signed_garbage": _derive(ct, d / "sgarb.dcm", sgarb),
        "rescale_frac_lut": _derive(rg3, d / "resc.dcm", p10, PhotometricInterpretation="MONOCHROME2",
                                    RescaleSlope="2.5", RescaleIntercept="-100.75", RescaleType="US"),
        "rescale_negative_slope": _derive(ct, d / "negs.dcm", pct, RescaleSlope="-0.7",
                                          RescaleIntercept="12.3"),
        "rescale_frac_nolut": _derive(mr, d / "mrfr.dcm", pmr, RescaleSlope="1.37",
                                      RescaleIntercept="0.6", RescaleType="US"),
        "signed_small_nolut": _derive(ct, d / "ctsm.dcm", np.ascontiguousarray(pct[100:140, 100:150]),
                                      RescaleIntercept="-1024.5"),
    }


@pytest.mark.tools
def test_dcmj2pnm_rules_live(real_tools, dicom_data, tmp_path):
    failures = []
    for name, dcm in _rule_cases(dicom_data, tmp_path).items():
        ds = pydicom.dcmread(dcm)
        got = dcmj2pnm_8bit(ds.pixel_array, PixelMeta.from_dataset(ds))
        want = _dcmj2pnm(real_tools, dcm, tmp_path)
        n = _ndiff(got, want)
        if n:
            failures.append(f"{name}: {n} pixels differ")
    assert not failures, failures


@pytest.fixture(scope="module")
def rg3_8bit(real_tools, dicom_data, tmp_path_factory):
    """dcmj2pnm's real 8-bit rendering of RG3_UNCR (the input mogrify sees)."""
    d = tmp_path_factory.mktemp("rg3")
    tif = d / "rg3.tif"
    _run([real_tools["dcmj2pnm"], "-O", "+ot", "+G", str(dicom_data / "RG3_UNCR.dcm"), str(tif)])
    with Image.open(tif) as im:
        return np.array(im)


def _edge_case(rg3: np.ndarray, name: str) -> np.ndarray:
    if name == "wide_100x600":  # x factor > y factor: horizontal pass first, 6x enlargement
        return rg3[800:900, 300:900].copy()
    if name == "shrink_700x513":  # barely shrinking: Lanczos support ~3
        return rg3[500:1200, 600:1113].copy()
    if name == "enlarge_900x511":  # barely enlarging: Mitchell
        return rg3[400:1300, 600:1111].copy()
    bg = np.full((50, 60), rg3[900, 900], np.uint8)
    if name == "single_pixel":  # trims to 1x1: no auto-level, 1 -> 512 resize
        bg[10, 10] = rg3[100, 100] ^ 0x55
    elif name == "tiny_4x2":
        bg[10:12, 10:14] = rg3[880:882, 880:884] ^ 0x0F
    elif name == "only_corner_differs":  # ImageMagick finds no box: blank output
        bg[0, 0] = rg3[900, 900] ^ 0xFF
    return bg


@pytest.mark.tools
@pytest.mark.parametrize("name", ["wide_100x600", "shrink_700x513", "enlarge_900x511", "single_pixel",
                                  "tiny_4x2", "only_corner_differs"])
def test_live_imagemagick_edge_cases(real_tools, rg3_8bit, tmp_path, name):
    img8 = _edge_case(rg3_8bit, name)
    tif = tmp_path / f"{name}.tif"
    Image.fromarray(img8).save(tif)
    _run([real_tools["mogrify"], "-trim", "+repage", "-colorspace", "RGB", "-auto-level", "-depth", "8",
          "-resize", "512x512^", "-format", "png", str(tif)])
    with Image.open(tif.with_suffix(".png")) as im:
        ref = np.array(im.convert("L"))
    assert _ndiff(imagemagick_recipe(img8, IM_DEBIAN), ref) == 0
